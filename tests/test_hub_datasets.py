"""Datasets loaded through ``datasets.load_dataset`` (TRAIN_FILE/EVAL_FILE as a directory of data files
with configurations and splits, or a hub dataset id, DATASET_CONFIG, SPLIT/EVAL_SPLIT) and through
``load_from_disk``, in every item format; offline, a hub id is refused when the config is validated."""

import json

import pytest

from hybrid_ds.config import ConfigError
from hybrid_ds.data import DataError, DataReport, load_items
from hybrid_ds.run.preflight import load_config

CHAT = [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
# config name -> (SELECT_OUTPUT, detected format, train items, test items)
FORMATS = {
    "fields": ("output", "fields", [{"task": "reverse", "input": f"a{i} b", "output": f"b a{i}"} for i in range(3)],
               [{"task": "reverse", "input": "x y", "output": "y x"}]),
    "text": ("text", "text", [{"text": f"The tower {i} stands."} for i in range(3)], [{"text": "A held-out line."}]),
    "pc_text": ("output", "prompt_completion", [{"prompt": f"Count {i}:", "completion": f" {i + 1}"} for i in range(3)],
                [{"prompt": "Count 9:", "completion": " 10"}]),
    "pc_messages": ("output", "prompt_completion",
                    [{"prompt": CHAT[:1], "completion": [{"role": "assistant", "content": f"b a {i}"}]}
                     for i in range(3)], [{"prompt": CHAT[:1], "completion": CHAT[1:]}]),
    "messages": ("output", "messages",
                 [{"messages": [{"role": "system", "content": f"s{i}"}] + CHAT} for i in range(3)],
                 [{"messages": CHAT}]),
}


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory):
    """Dataset directories as on the hub, one configuration per format, each with a train and a test
    split declared in README.md's metadata: the plain formats as JSONL files, the conversational ones
    as parquet (the datasets library reads one file type per directory). Config name -> directory."""
    import datasets

    root, dirs = tmp_path_factory.mktemp("hubds"), {}
    for ext, names in (("jsonl", ("fields", "text", "pc_text")), ("parquet", ("pc_messages", "messages"))):
        lines = ["---", "configs:"]
        for name in names:
            _, _, train, test = FORMATS[name]
            (root / ext / name).mkdir(parents=True)
            for split, rows in (("train", train), ("test", test)):
                if ext == "jsonl":
                    (root / ext / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                else:
                    datasets.Dataset.from_list(rows).to_parquet(str(root / ext / name / f"{split}.parquet"))
            lines += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {name}/train.{ext}",
                      "  - split: test", f"    path: {name}/test.{ext}"]
            dirs[name] = str(root / ext)
        (root / ext / "README.md").write_text("\n".join(lines + ["---", ""]))
    return dirs


@pytest.mark.parametrize("name", list(FORMATS))
def test_dataset_dir_config_and_split_in_every_format(dataset_dirs, name):
    out, fmt, train, test = FORMATS[name]
    for split, expected in (("train", train), ("test", test)):
        report = DataReport()
        items = load_items(dataset_dirs[name], out, split=split, config=name, shuffle=False, report=report)
        assert items == expected and report.data_format == fmt


def test_dataset_dir_names_the_missing_config_and_split(dataset_dirs):
    dataset_dir = dataset_dirs["fields"]
    with pytest.raises(DataError, match=r"TRAIN_FILE .*Config name is missing.*'fields'.*DATASET_CONFIG selects"):
        load_items(dataset_dir)
    with pytest.raises(DataError, match=r"no split 'valid' \(has train, test\); set EVAL_SPLIT"):
        load_items(dataset_dir, split="valid", config="fields", key="EVAL_FILE")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    _, _, train, test = FORMATS["messages"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dict"))
    assert load_items(str(tmp_path / "dict"), split="test", shuffle=False) == test
    assert load_items(str(tmp_path / "dict"), shuffle=False) == train
    _, _, train, _ = FORMATS["pc_text"]
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "one"))
    report = DataReport()
    assert load_items(str(tmp_path / "one"), shuffle=False, report=report) == train
    assert report.data_format == "prompt_completion"


def _keys(tmp_path, **keys):
    base = {"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
            "OUTPUT_DIR": str(tmp_path / "out"), "SFT_BATCH": 2, "MAXSEQ": 128}
    return [f"{k}={json.dumps(v)}" for k, v in {**base, **keys}.items()]


def test_offline_hub_id_is_refused_at_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        load_config(None, _keys(tmp_path, TRAIN_FILE="no-such-org/no-such-set", EVAL_FILE="other/set"))
    text = str(e.value)
    assert "TRAIN_FILE: 'no-such-org/no-such-set' is not a local file or directory" in text
    assert "EVAL_FILE: 'other/set'" in text and "save_to_disk(DIR)" in text and "offline" in text
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = load_config(None, _keys(tmp_path, TRAIN_FILE="no-such-org/no-such-set", DATASET_CONFIG="en"))
    assert cfg.run.train_file == "no-such-org/no-such-set"  # online: load_dataset fetches it at preflight


def test_cli_dry_run_hub_id_offline_exits_2_without_traceback(tmp_path, monkeypatch, capsys):
    from hybrid_ds.run.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        main(["--dry-run"] + _keys(tmp_path, TRAIN_FILE="org/name"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "TRAIN_FILE: 'org/name'" in err and "Traceback" not in err


def test_cli_dry_run_dataset_dir_with_eval_split(tmp_path, dataset_dirs, capsys):
    from hybrid_ds.run.cli import main

    dataset_dir = dataset_dirs["messages"]
    assert main(["--dry-run"] + _keys(tmp_path, TRAIN_FILE=dataset_dir, DATASET_CONFIG="messages",
                                      EVAL_FILE=dataset_dir, EVAL_SPLIT="test", EVAL_EVERY=2)) == 0
    out = capsys.readouterr().out
    assert "data: items: 3 in file, 3 used" in out and "format: messages (detected)" in out
    assert f"eval: 1 items of {dataset_dir}, every 2 SFT steps and at the end (loss)" in out


def test_eval_and_dataset_config_keys_need_their_data(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, _keys(tmp_path, EVAL_EVERY=5, DATASET_CONFIG="en"))
    text = str(e.value)
    assert "EVAL_EVERY (5) applies to evaluation: set EVAL_FILE" in text
    assert "DATASET_CONFIG ('en')" in text and "remove DATASET_CONFIG" in text
