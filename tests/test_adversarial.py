"""Adversarial corpus: every problem a user or a file can cause ends the run with exit code 2 and one
message naming the key, file or item, never a traceback, in the real run as in --dry-run.

Each case is a row of ``CASES``: a base config (sft on builtin:tiny-gpt2, 2 steps) plus changes,
files written to ``tmp_path`` first, extra command-line arguments, and the fragments the message
must hold. ``{tmp}`` in a value is replaced by the case's ``tmp_path``. ``test_real_run`` runs the
real entry point, ``python -m hybrid_ds.train``, in a process of its own (forked after the imports by
tests/scripts/forked_cli.py; a case that sets environment variables in a fresh interpreter);
``test_dry_run_agrees`` runs ``--dry-run`` in-process and asserts it refuses (or accepts) exactly what
the real run does.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

from conftest import REPO
from launch_utils import env as launch_env

ITEMS = [{"task": "copy", "input": f"word{i}", "output": f"word{i}"} for i in range(8)]
LONG_ANSWERS = [{"task": "copy", "input": "x", "output": " ".join(["word"] * 900)} for _ in range(4)]


def _json(obj) -> str:
    return json.dumps(obj)


def _builtin_dir() -> str:
    from hybrid_ds.assets import resolve_model

    return resolve_model("builtin:tiny-gpt2")


def model_copy(tmp, name="model", drop=(), edit: Optional[Callable] = None) -> str:
    """A copy of the builtin model directory under ``tmp/name`` without the files in ``drop``."""
    dst = os.path.join(tmp, name)
    shutil.copytree(_builtin_dir(), dst)
    for f in drop:
        os.remove(os.path.join(dst, f))
    if edit:
        edit(dst)
    return dst


def _truncate_weights(d):
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _sharded_missing(d):
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}}, f)
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00002.safetensors"))


def _tokenizer_without_eos(d):
    path = os.path.join(d, "tokenizer_config.json")
    with open(path) as f:
        conf = json.load(f)
    conf.update(eos_token=None, bos_token=None, unk_token=None, pad_token=None)
    with open(path, "w") as f:
        json.dump(conf, f)


def _garbage(name):
    def edit(d):
        with open(os.path.join(d, name), "w") as f:
            f.write("{ this is not json")
    return edit


@dataclass
class Case:
    id: str
    changes: dict = field(default_factory=dict)  # config keys over BASE ({tmp} replaced)
    files: dict = field(default_factory=dict)  # name -> str | bytes | callable(tmp) that makes it
    args: tuple = ()  # extra command-line arguments ({tmp} replaced)
    expect: tuple = ()  # fragments of stderr (exit 2) or stdout (exit 0)
    rc: int = 2
    env: dict = field(default_factory=dict)  # extra environment ({tmp} replaced)
    cwd: str = REPO  # "{tmp}" runs from the case's directory
    config_text: Optional[str] = None  # the config file verbatim (then changes are ignored)
    config_path: Optional[str] = None  # the path given on the command line instead of cfg.json
    slow: bool = False
    dry: bool = True  # also run test_dry_run_agrees (False where --dry-run is itself under test)


BASE = {"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "{tmp}/data.json", "OUTPUT_DIR": "{tmp}/out",
        "SEED": 0, "MAX_STEPS": 2, "SFT_BATCH": 2, "MAXSEQ": 64, "SCHEDULER": "constant"}
PPO = {"MODE": "ppo", "PPO_BATCH": 2, "PPO_EPOCHS": 1, "MAX_NEW_TOKENS": 4, "REWARD": {"type": "word_f1"}}
DATA = {"data.json": _json(ITEMS)}
# a perplexity component that names no model: it scores fluency under MODEL
PPL_REWARD = {"type": "weighted_sum", "components": [{"type": "word_f1", "weight": 0.7},
                                                     {"type": "perplexity", "weight": 0.3}]}
NESTED = "[" * 100_000 + "]" * 100_000

CASES = [
    # 1. data / tokenizer / encoding problems found after validation
    Case("item_output_null", files={"data.json": _json(ITEMS[:3] + [{"input": "a", "output": None}])},
         expect=("item 3", "output field 'output'", "ON_BAD_ITEM")),
    Case("empty_data_list", files={"data.json": "[]"}, expect=("data.json", "no usable items")),
    Case("empty_data_file", files={"data.json": ""}, expect=("data.json", "no usable items")),
    Case("data_latin1", files={"data.json": _json([{"input": "café", "output": "thé"}] * 4).replace(
        "\\u00e9", "é").encode("latin-1")}, expect=("data.json", "UTF-8")),
    Case("maxseq_below_every_prompt", {"MAXSEQ": 8}, DATA, expect=("MAXSEQ=8", "prompt")),
    Case("tokenizer_without_eos", {"TOKENIZER": "{tmp}/tok"}, {**DATA, "tok": lambda t: model_copy(
        t, "tok", edit=_tokenizer_without_eos)}, expect=("TOKENIZER", "tok", "EOS")),
    Case("tokenizer_json_garbage", {"TOKENIZER": "{tmp}/tok"}, {**DATA, "tok": lambda t: model_copy(
        t, "tok", edit=_garbage("tokenizer.json"))}, expect=("TOKENIZER", "tok")),
    Case("data_json_object", files={"data.json": _json({"rows": ITEMS})}, expect=("data.json", "JSON object")),
    Case("data_bad_jsonl_line", {"TRAIN_FILE": "{tmp}/data.jsonl"},
         {"data.jsonl": _json(ITEMS[0]) + "\n{oops\n"}, expect=("data.jsonl", "line 2")),
    Case("select_output_missing", {"SELECT_OUTPUT": "answer"}, DATA, expect=("item 0", "SELECT_OUTPUT")),
    Case("data_utf8_bom_accepted", {"MAX_STEPS": 1}, {"data.json": b"\xef\xbb\xbf" + _json(ITEMS).encode()},
         args=("--dry-run",), expect=("items: 8 in file",), rc=0),
    # 2. --dry-run said fine, the real run crashed
    Case("fewer_items_than_sft_batch", {"SFT_BATCH": 4}, {"data.json": _json(ITEMS[:3])},
         expect=("SFT_BATCH (4)", "3 usable items")),
    Case("fewer_items_than_ppo_batch", {**PPO, "PPO_BATCH": 4, "NUM_SAMPLES": 2}, DATA,
         expect=("PPO_BATCH (4)", "2 usable items")),
    Case("maxseq_above_n_positions", {"MAXSEQ": 1024}, {"data.json": _json(LONG_ANSWERS)},
         expect=("MAXSEQ (1024)", "512", "n_positions")),
    Case("model_without_weights", {"MODEL": "{tmp}/model"}, {**DATA, "model": lambda t: model_copy(
        t, drop=("model.safetensors",))}, expect=("MODEL", "model", "no weights")),
    Case("model_truncated_safetensors", {"MODEL": "{tmp}/model"}, {**DATA, "model": lambda t: model_copy(
        t, edit=_truncate_weights)}, expect=("model.safetensors", "truncated")),
    Case("model_missing_shard", {"MODEL": "{tmp}/model"}, {**DATA, "model": lambda t: model_copy(
        t, edit=_sharded_missing)}, expect=("model-00002-of-00002.safetensors", "missing")),
    Case("model_config_garbage", {"MODEL": "{tmp}/model"}, {**DATA, "model": lambda t: model_copy(
        t, edit=_garbage("config.json"))}, expect=("MODEL", "config.json")),
    Case("reward_model_path_missing", {**PPO, "REWARD": {"type": "reward_model", "model": "{tmp}/no_rm"}}, DATA,
         expect=("REWARD.model", "no_rm", "does not exist")),
    Case("reward_model_dir_without_config", {**PPO, "REWARD": {"type": "reward_model", "model": "{tmp}/rm"}},
         {**DATA, "rm": lambda t: os.mkdir(os.path.join(t, "rm"))}, expect=("REWARD.model", "without config.json")),
    Case("perplexity_model_path_missing", {**PPO, "REWARD": {"type": "weighted_sum", "components": [
        {"type": "word_f1", "weight": 1}, {"type": "perplexity", "model": "./no/ppl", "weight": 0.3}]}}, DATA,
         expect=("REWARD.components[1].model", "./no/ppl")),
    Case("output_dir_below_a_file", {"OUTPUT_DIR": "{tmp}/afile/out"}, {**DATA, "afile": "x"},
         expect=("OUTPUT_DIR", "afile", "not a directory")),
    Case("output_dir_unwritable", {"OUTPUT_DIR": "/sys/hybrid_ds_adversarial_out"}, DATA,
         expect=("OUTPUT_DIR", "/sys/hybrid_ds_adversarial_out", "cannot be created")),
    # 3. MAXSEQ bounds prompt + response
    Case("max_new_tokens_at_maxseq", {**PPO, "MAX_NEW_TOKENS": 64}, DATA, expect=("MAX_NEW_TOKENS (64)", "MAXSEQ (64)")),
    # 4. finite floats only
    Case("nan_in_json", config_text='{"LR_SFT": NaN}', files=DATA, expect=("LR_SFT", "finite")),
    Case("infinity_in_json", config_text='{"MAX_GRAD_NORM": Infinity}', files=DATA,
         expect=("MAX_GRAD_NORM", "finite")),
    Case("nan_override", args=("LR_SFT=NaN",), files=DATA, expect=("LR_SFT", "finite")),
    Case("nan_string_override", args=("TARGET_KL=nan",), files=DATA, expect=("TARGET_KL", "finite")),
    Case("neg_infinity_override", args=("MAX_GRAD_NORM=-Infinity",), files=DATA, expect=("MAX_GRAD_NORM",)),
    Case("nan_in_reward_weight", {**PPO, "REWARD": {"type": "weighted_sum", "components": [
        {"type": "word_f1", "weight": float("nan")}]}}, DATA, expect=("REWARD.components[0].weight",)),
    # 5. duplicate keys
    Case("duplicate_key", config_text='{"LR_SFT": 1e-4, "SEED": 0, "LR_SFT": 2e-4}', files=DATA,
         expect=("LR_SFT", "duplicate")),
    # 6. the config file itself
    Case("config_is_a_directory", files=DATA, config_path="{tmp}", expect=("is a directory",)),
    Case("config_not_utf8", config_text=None, files={**DATA, "bad.json": b'{"MODE": "sft\xe9"}'},
         config_path="{tmp}/bad.json", expect=("bad.json", "UTF-8")),
    Case("config_absurdly_nested", files={**DATA, "deep.json": NESTED}, config_path="{tmp}/deep.json",
         expect=("deep.json", "nested")),
    # 7. ~ expanded everywhere a path is used
    Case("tilde_paths_everywhere", {"MODEL": "~/models/x", "TRAIN_FILE": "~/data.json", "OUTPUT_DIR": "~/out",
                                    "MAX_STEPS": 1},
         {**DATA, "models": lambda t: model_copy(t, "models/x")}, env={"HOME": "{tmp}"},
         expect=("done: outputs in",), rc=0),
    # 8. options and KEY=VALUE in any order
    Case("dry_run_before_override", files=DATA, args=("--dry-run", "LR_SFT=1e-4"), expect=("mode: sft",), rc=0,
         dry=False),
    Case("override_before_dry_run", files=DATA, args=("SFT_BATCH=4", "--dry-run", "MAX_STEPS=3"),
         expect=("SFT batch: 4", "steps: 3 SFT steps"), rc=0, dry=False),
    # 9. DeepSpeed configs from any directory
    Case("ds_config_relative_to_repo", {"DS_CONFIG": "ds_configs/zero2.json"}, DATA, args=("--dry-run",),
         cwd="{tmp}", expect=("mode: sft",), rc=0),
    Case("ds_config_by_name", {"DS_CONFIG": "zero3"}, DATA, args=("--dry-run",), cwd="{tmp}",
         expect=("mode: sft",), rc=0),
    Case("ds_config_unknown", {"DS_CONFIG": "zero9"}, DATA, expect=("DS_CONFIG", "zero9", "zero2")),
    Case("ds_config_not_json", {"DS_CONFIG": "{tmp}/ds.json"}, {**DATA, "ds.json": "{nope"},
         expect=("DS_CONFIG", "ds.json", "JSON")),
    # 10. data files the loader cannot read
    Case("data_json_gz", {"TRAIN_FILE": "{tmp}/data.json.gz"}, {"data.json.gz": gzip.compress(_json(ITEMS).encode())},
         expect=("data.json.gz",)),
    Case("data_fifo", {"TRAIN_FILE": "{tmp}/fifo"}, {"fifo": lambda t: os.mkfifo(os.path.join(t, "fifo"))},
         expect=("TRAIN_FILE", "fifo", "not a regular file")),
    Case("data_python_file", {"TRAIN_FILE": "{tmp}/data.py"}, {"data.py": "print('hi')\n"},
         expect=("TRAIN_FILE", "data.py")),
    Case("data_directory_without_dataset", {"TRAIN_FILE": "{tmp}/d"}, {"d": lambda t: os.mkdir(os.path.join(t, "d"))},
         expect=("TRAIN_FILE", "d")),
    # 11. scheduler defaults and spellings
    Case("scheduler_seed_spellings", {"SCHEDULER": "cosineannealing_warm_restarts", "T_0": 5, "LAST_EPOCH": -1},
         DATA, args=("--dry-run",), expect=("mode: sft",), rc=0),
    Case("scheduler_none_synonym_null", {"SCHEDULER": None}, DATA, args=("--dry-run",), expect=("mode: sft",), rc=0),
    Case("scheduler_none_synonym_no", {"SCHEDULER": "no"}, DATA, args=("--dry-run",), expect=("mode: sft",), rc=0),
    Case("scheduler_collapse_warning", {"SCHEDULER": "step", "STEP_SIZE": 1, "GAMMA": 0.1, "MAX_STEPS": 20},
         DATA, args=("--dry-run",), expect=("warning", "SCHEDULER=step", "GAMMA"), rc=0),
    Case("warmup_longer_than_run", {"SCHEDULER": "linear", "NUM_WARMUP_STEPS": 10}, DATA,
         expect=("10 warm-up steps exceed the 2 steps",)),
    # 12. perplexity defaults to the policy's own model
    Case("perplexity_default_model_checks", {**PPO, "REWARD": PPL_REWARD}, DATA, args=("--dry-run",),
         expect=("mode: ppo",), rc=0),
    Case("perplexity_default_model_runs", {**PPO, "MAX_STEPS": 1, "REWARD": PPL_REWARD}, DATA,
         expect=("done: outputs in",), rc=0, slow=True),
    # 14. config errors found at setup in a real run
    Case("unknown_key_still_clean", {"EPOCHSS": 2}, DATA, expect=("EPOCHSS: unknown key",)),
]


def _fill(value, tmp):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return value


def prepare(case: Case, tmp) -> tuple[str, list[str], dict, str]:
    """Write the case's files and config; return (config path, args, environment, cwd)."""
    for name, content in case.files.items():
        path = os.path.join(tmp, name)
        if callable(content):
            content(str(tmp))
        else:
            with open(path, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    cfg_path = os.path.join(tmp, "cfg.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        if case.config_text is not None:  # verbatim, the rest of the base given as overrides
            f.write(case.config_text)
        else:
            json.dump(_fill({**BASE, **case.changes}, tmp), f)
    args = [_fill(a, tmp) for a in case.args]
    if case.config_text is not None:
        args = [f"{k}={json.dumps(_fill(v, tmp))}" for k, v in BASE.items()
                if f'"{k}"' not in case.config_text] + args
    from hybrid_ds.assets import cache_root

    env = {"HYBRID_DS_CACHE": cache_root(), **{k: _fill(v, tmp) for k, v in case.env.items()}}
    return _fill(case.config_path, tmp) if case.config_path else cfg_path, args, env, _fill(case.cwd, tmp)


def _params(cases):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in cases]


@pytest.fixture(scope="module")
def forked_real_runs(request, tmp_path_factory):
    """``python -m hybrid_ds.train`` on every selected test_real_run case without an ``env`` of its own,
    each in its own process forked after the imports (tests/scripts/forked_cli.py): the command's exit
    code, stdout and stderr as a fresh interpreter gives them, without an interpreter start and the
    torch/transformers imports per case. Returns {case id: (exit code, stdout, stderr)}."""
    cases = [item.callspec.params["case"] for item in request.session.items
             if item.module is request.module and getattr(item, "originalname", None) == "test_real_run"]
    logs, jobs = tmp_path_factory.mktemp("logs"), []
    for case in cases:
        if case.env:
            continue
        cfg, args, extra_env, cwd = prepare(case, tmp_path_factory.mktemp(case.id))
        jobs.append({"name": case.id, "args": [cfg, *args], "env": {**launch_env(), **extra_env}, "cwd": cwd,
                     "stdout": str(logs / f"{case.id}.out"), "stderr": str(logs / f"{case.id}.err"), "timeout": 300})
    if not jobs:
        return {}
    (logs / "jobs.json").write_text(json.dumps(jobs))
    from hybrid_ds.assets import cache_root

    runner = os.path.join(REPO, "tests", "scripts", "forked_cli.py")
    p = subprocess.run([sys.executable, runner, str(logs / "jobs.json")], cwd=REPO, capture_output=True, text=True,
                       env={**launch_env(), "HYBRID_DS_CACHE": cache_root()}, timeout=300 * len(jobs))
    codes = dict(line.split()[1:3] for line in p.stdout.splitlines() if line.startswith("JOB "))
    assert p.returncode == 0 and len(codes) == len(jobs), f"forked_cli.py: exit {p.returncode}\n{p.stderr[-4000:]}"
    return {name: (int(code), (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text())
            for name, code in codes.items()}


@pytest.mark.parametrize("case", _params(CASES))
def test_real_run(case, tmp_path, forked_real_runs):
    if case.env:  # some libraries read the environment at import (HOME: Hugging Face's cache paths)
        cfg, args, extra_env, cwd = prepare(case, tmp_path)
        env = {**launch_env(), **extra_env}
        p = subprocess.run([sys.executable, "-m", "hybrid_ds.train", cfg, *args], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    else:
        rc, stdout, stderr = forked_real_runs[case.id]
    out = stderr if case.rc == 2 else stdout
    assert rc == case.rc, f"exit {rc}\n--- stdout\n{stdout[-2000:]}\n--- stderr\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    for fragment in case.expect:
        assert fragment in out, f"{fragment!r} not in:\n{out[-3000:]}"


@pytest.mark.parametrize("case", _params([c for c in CASES if c.dry and not c.slow]))
def test_dry_run_agrees(case, tmp_path, monkeypatch, capsys):
    """--dry-run refuses exactly what the real run refuses, with the same message (in-process: fast)."""
    from hybrid_ds.train import main

    cfg, args, extra_env, cwd = prepare(case, tmp_path)
    for k, v in extra_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    if "--dry-run" not in args:
        args = [*args, "--dry-run"]
    try:
        rc = main([cfg, *args])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    want = 0 if case.rc == 0 else 2
    assert rc == want, captured.err[-3000:]
    if want == 2:
        for fragment in case.expect:
            assert fragment in captured.err, f"{fragment!r} not in:\n{captured.err[-3000:]}"
    assert not os.path.exists(os.path.join(tmp_path, "out")), "dry run must not write outputs"


def test_corpus_is_large_enough():
    assert len(CASES) >= 35 and len({c.id for c in CASES}) == len(CASES)


# -- launchers: every rank refuses, nothing hangs. That the launch yamls work from any directory is
# asserted on training runs that start in tmp_path:
# test_sft_distributed.test_accumulation_and_ranks_are_equivalent.


def _accelerate(tmp_path, cfg: dict, nproc: int, cwd: str, *overrides):
    from launch_utils import BIN, free_port

    path = os.path.join(str(tmp_path), "cfg.json")
    with open(path, "w") as f:
        json.dump(_fill(cfg, tmp_path), f)
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(REPO, "launch", "zero2.yaml"),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "hybrid_ds.train", path,
           *overrides]
    from hybrid_ds.assets import cache_root

    return subprocess.run(cmd, cwd=cwd, env={**launch_env(), "HYBRID_DS_CACHE": cache_root()}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_every_rank_exits_2_with_the_message(tmp_path):
    """Two ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_* set), with no agent to
    kill the other on the first exit: each finds the problem before any process group exists,
    prints the message and exits 2; none waits for the other."""
    from launch_utils import free_port

    with open(tmp_path / "data.json", "w") as f:
        json.dump(ITEMS[:3], f)
    cfg = os.path.join(str(tmp_path), "cfg.json")
    with open(cfg, "w") as f:
        json.dump(_fill({**BASE, "SFT_BATCH": 4}, tmp_path), f)
    from hybrid_ds.assets import cache_root

    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "hybrid_ds.train", cfg], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**launch_env(), "HYBRID_DS_CACHE": cache_root(), "RANK": str(r),
                                   "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-3000:]
        assert "SFT_BATCH (4) is larger than the 3 usable items" in err and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_accelerate_launch_reports_the_ranks_exit_code_2(tmp_path):
    """Under accelerate launch (torch's elastic agent) the first rank to exit 2 ends the others, the
    launcher's summary shows exitcode 2 with the rank's message above it, and accelerate exits 1."""
    with open(tmp_path / "data.json", "w") as f:
        json.dump(ITEMS[:3], f)
    p = _accelerate(tmp_path, {**BASE, "SFT_BATCH": 4}, 2, REPO)
    assert "hybrid_ds: 1 problem(s) in the data:" in p.stderr, p.stderr[-4000:]
    assert "SFT_BATCH (4) is larger than the 3 usable items" in p.stderr
    assert "exitcode  : 2" in p.stderr and p.returncode == 1, p.stderr[-4000:]
