"""The Python API (``hybrid_ds.train``), REPORT_TO's trackers, LOG_SAMPLES_EVERY's tables and
``report --plot``, on runs in this process (tiny GPT-2, plain torch, one process).

One run (module fixture) with a Python reward function, W&B offline and MLflow's file store is
asserted on by most tests; a second, short one resumes it to check samples.jsonl.
"""

import json
import os

import pytest

from inproc import base

import hybrid_ds
from hybrid_ds.config import ConfigError


def contains(prompts, completions, **fields):
    """A TRL-style reward function: 1 when the response holds the item's answer."""
    return [float(out.strip() in c) for c, out in zip(completions, fields["output"])]


CALLS = []


def counting_len(prompts, completions, **fields):
    CALLS.append((len(prompts), sorted(fields)))
    return [min(len(c), 10) / 10 for c in completions]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"file:{tmp / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    (tmp / "wandb").mkdir()
    try:
        cfg = base(tmp, mode="ppo", MAX_STEPS=4, SAVE_EVERY=2, LOG_SAMPLES_EVERY=2, LOG_SAMPLES_ROWS=3)
        del cfg["REWARD"]  # the functions alone are the reward
        result = hybrid_ds.train(cfg, {"REPORT_TO": ["tensorboard", "wandb", "mlflow"]},
                                 reward_fns=[contains, counting_len])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return tmp, result


def test_train_returns_paths_and_final_metrics(api_run):
    tmp, r = api_run
    assert r.output_dir == str(tmp / "out") and r.completed
    for name in ("inference_lm", "ppo_full", "metrics", "samples", "config"):
        assert os.path.exists(r.paths[name]), name
    rows = [json.loads(x) for x in open(r.paths["metrics"])]
    last = [x for x in rows if x["phase"] == "ppo"][-1]
    assert last["step"] == 4 and r.metrics["ppo/reward_mean"] == pytest.approx(last["ppo/reward_mean"])


def test_reward_functions_get_trl_arguments_and_are_components(api_run):
    _, r = api_run
    n, fields = CALLS[0]
    assert n == 4 and "output" in fields and "prompt" not in fields
    # the reward is their equal-weight mean, each logged as a component
    assert r.metrics["ppo/reward_mean"] == pytest.approx(
        (r.metrics["reward/contains"] + r.metrics["reward/counting_len"]) / 2, abs=1e-6)


def test_samples_table_every_n_updates(api_run):
    _, r = api_run
    rows = [json.loads(x) for x in open(r.paths["samples"])]
    assert [x["update"] for x in rows] == [2, 2, 2, 4, 4, 4]
    for x in rows:
        assert {"prompt", "response", "reward", "reward/contains", "reward/counting_len", "kl", "length"} <= set(x)
        assert x["reward"] == pytest.approx((x["reward/contains"] + x["reward/counting_len"]) / 2, abs=1e-6)
        assert x["prompt"].startswith("### Prompt:") and x["length"] >= 1


def test_tensorboard_gets_scalars_and_the_samples_text(api_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = api_run
    ea = EventAccumulator(str(tmp / "out" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert [e.step for e in ea.Scalars("ppo/reward_mean")] == [1, 2, 3, 4]
    assert any("samples" in t for t in ea.Tags()["tensors"])


def test_wandb_offline_run_holds_the_metrics(api_run):
    tmp, _ = api_run
    runs = [d for d in (tmp / "wandb" / "wandb").iterdir() if d.name.startswith("offline-run-")]
    assert len(runs) == 1
    records = b"".join(f.read_bytes() for f in runs[0].glob("run-*.wandb"))  # protobuf: keys stay plain bytes
    assert b"ppo/reward_mean" in records and b"ppo/step" in records and b"reward/contains" in records
    tables = sorted(runs[0].glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 2  # updates 2 and 4
    t = json.loads(tables[0].read_text())
    assert t["columns"][:3] == ["prompt", "response", "reward"] and len(t["data"]) == 3


def test_mlflow_file_store_holds_the_metrics(api_run):
    tmp, _ = api_run
    found = list((tmp / "mlruns").rglob("metrics/ppo/reward_mean"))
    assert len(found) == 1
    steps = [int(line.split()[2]) for line in found[0].read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_appends_samples_only_after_the_restored_update(api_run, tmp_path):
    import shutil

    tmp, r = api_run
    out = tmp_path / "out"
    shutil.copytree(r.output_dir, out)
    # the checkpoint at update 2 is the one to resume from: the rows of updates 3-4 are written again
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "checkpoints" / "latest").write_text("step-0000002")
    # mark the rows on disk: update 2's must stay, update 4's must be replaced by the resumed run's
    rows = [json.loads(x) for x in open(out / "samples.jsonl")]
    (out / "samples.jsonl").write_text("".join(json.dumps({**x, "response": f"OLD{x['update']}"}) + "\n" for x in rows))
    cfg = base(tmp_path, mode="ppo", MAX_STEPS=4, SAVE_EVERY=2, LOG_SAMPLES_EVERY=2, LOG_SAMPLES_ROWS=3,
               REPORT_TO="none")
    del cfg["REWARD"]
    hybrid_ds.train(cfg, reward_fns=[contains, counting_len])
    rows = [json.loads(x) for x in open(out / "samples.jsonl")]
    assert [x["update"] for x in rows] == [2, 2, 2, 4, 4, 4]
    assert [x["response"] == "OLD2" for x in rows] == [True] * 3 + [False] * 3
    ppo_steps = [x["step"] for x in map(json.loads, open(out / "metrics.jsonl")) if x["phase"] == "ppo"]
    assert ppo_steps == [1, 2, 3, 4]


def test_errors_raise_with_the_cli_message(tmp_path, capsys):
    from hybrid_ds.run.cli import main

    cfg = base(tmp_path, REPORT_TO="tensorbord")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        hybrid_ds.train(str(path))
    assert "REPORT_TO: 'tensorbord' is not a tracker" in str(e.value) and "Did you mean 'tensorboard'" in str(e.value)
    with pytest.raises(SystemExit) as ex:
        main([str(path)])
    assert ex.value.code == 2 and str(e.value) in capsys.readouterr().err
    with pytest.raises(ConfigError, match="MODE=sft scores nothing"):
        hybrid_ds.train(base(tmp_path, mode="sft"), reward_fns=[contains])
    with pytest.raises(ConfigError, match="REPORT_TO: none cannot be combined"):
        hybrid_ds.train(base(tmp_path), {"REPORT_TO": ["none", "wandb"]})


def test_missing_tracker_package_is_named_at_preflight(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ConfigError, match="REPORT_TO: mlflow is not installed; pip install mlflow-skinny"):
        hybrid_ds.train(base(tmp_path, REPORT_TO="mlflow"))


def test_train_stays_callable_after_the_submodule_is_imported():
    import importlib

    mod = importlib.import_module("hybrid_ds.train")  # as the console script does
    assert hybrid_ds.train is mod and callable(mod) and callable(mod.main)
    from hybrid_ds import train

    with pytest.raises(ConfigError, match="expected a dict of keys"):
        train(42)


def test_report_plot_writes_pngs(api_run, capsys):
    from hybrid_ds.run.report import main

    _, r = api_run
    assert main([r.output_dir, "--plot"]) == 0
    printed = capsys.readouterr().out
    plots = os.path.join(r.output_dir, "plots")
    assert f"in {plots}" in printed
    for name in ("reward.png", "kl.png", "length.png", "time.png", "overview.png"):
        with open(os.path.join(plots, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_function_reward_components_and_faults():
    """Repeated component types are numbered; a function's non-finite score meets the fault policy."""
    from hybrid_ds.rewards import RewardError, make_reward
    from hybrid_ds.rewards.callables import function_reward

    spec = make_reward({"type": "weighted_sum", "components": [{"type": "length", "target": 4},
                                                               {"type": "length", "target": 8}]})
    r = function_reward([contains], spec)
    items = [{"input": "a", "output": "yes"}, {"input": "b", "output": "no"}]
    scores = r.score_batch(["yes it is", "maybe"], ["yes", "no"], ["p1", "p2"], items)
    parts = r.components()
    assert sorted(parts) == ["contains", "weighted_sum"] and parts["contains"] == [1.0, 0.0]
    assert spec.components().keys() == {"length_1", "length_2"}
    assert scores == pytest.approx([(a + b) / 2 for a, b in zip(parts["contains"], parts["weighted_sum"])])
    with pytest.raises(RewardError, match="reward 'not_finite' failed on sample 1"):
        function_reward([not_finite]).score_batch(["a", "b"], ["x", "y"], ["p", "q"], items)


def not_finite(prompts, completions, **fields):
    return [float("nan") if c == "b" else 1.0 for c in completions]
