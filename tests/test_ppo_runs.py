"""PPO and hybrid through the real launchers: value-head isolation, ZeRO-2/3 runs, the seed configs."""

import json
import os
import subprocess
import sys

import pytest

from launch_utils import REPO, assert_finite_rows, env, free_port, launch, metrics

pytestmark = pytest.mark.slow


def rl_cfg(tmp_path, mode="hybrid", **extra):
    cfg = {"MODE": mode, "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
           "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 1e-3, "PPO_BATCH": 4,
           "PPO_MINI": 2, "PPO_EPOCHS": 2, "LR_PPO": 1e-4, "MAX_NEW_TOKENS": 6, "MIN_NEW_TOKENS": 2,
           "MAXSEQ": 96, "MAX_STEPS": 2, "SCHEDULER": "constant", "REWARD": {"type": "word_f1"},
           "MAX_NAN_STEPS": 1}  # a single non-finite update fails the run
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """``probe(nproc, zero)``: the stdout of tests/scripts/value_head_probe.py on that layout, launched
    once per layout in this module. Under ZeRO-3 the same launch also runs the generation-gather
    check, so the value-head test and the gather test share one 2-process ZeRO-3 launch."""
    done = {}

    def get(nproc, zero):
        if (nproc, zero) not in done:
            tmp = tmp_path_factory.mktemp(f"probe{nproc}x{zero}")
            path = tmp / "cfg.json"
            path.write_text(json.dumps(rl_cfg(tmp, WEIGHT_DECAY=0.1)))
            script = os.path.join(REPO, "tests", "scripts", "value_head_probe.py")
            if nproc == 1:
                cmd = [sys.executable, script, str(path)]
            else:
                cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
                       os.path.join(REPO, "launch", f"zero{zero}.yaml"), "--num_processes", str(nproc),
                       "--main_process_port", str(free_port()), script, str(path)]
            p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-4000:]
            done[(nproc, zero)] = p.stdout
        return done[(nproc, zero)]

    return get


def probe_line(stdout, tag):
    line = next(ln for ln in stdout.splitlines() if ln.startswith(tag + " "))
    return json.loads(line[len(tag) + 1:])


@pytest.mark.parametrize("nproc,zero", [(1, 0), (2, 2), (2, 3)], ids=["plain", "zero2", "zero3"])
def test_sft_leaves_value_head_bit_identical_and_ppo_moves_it(probe, nproc, zero):
    r = probe_line(probe(nproc, zero), "PROBE")
    assert r == {"sft_value_changed": False, "sft_policy_changed": True, "ppo_value_changed": True,
                 "ppo_policy_changed": True}, r


def test_zero3_generation_weights_equal_deepspeeds_gather(probe):
    """dist.generation_model gathers ZeRO-3 partitions with one all-gather: the same weights as
    DeepSpeed's GatheredParameters, partitions restored on exit, training unaffected. Checked in the
    ZeRO-3 value-head probe's launch, after its SFT steps and PPO update moved the weights."""
    assert probe_line(probe(2, 3), "GATHER") == {"whole_lm": True, "equal": True, "partitioned_after": True,
                                                 "trains_after": True}


def assert_rl_outputs(out, mode):
    """A finished 2-update ``mode`` run in ``out``: both model directories and the value head written,
    every PPO row (and, in hybrid, every SFT row) finite with the PPO metrics present; no SFT rows in ppo."""
    for d in ("inference_lm", "ppo_full"):
        assert os.path.isfile(os.path.join(out, d, "model.safetensors")), d
    assert os.path.isfile(os.path.join(out, "ppo_full", "value_head.pt"))
    rows = metrics(out, "ppo")
    assert_finite_rows(rows, 2, "ppo")
    for k in ("ppo/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value",
              "ppo/clipfrac", "ppo/approx_kl", "ppo/response_len", "time/rollout_s",
              "time/scoring_s", "time/reference_s", "time/update_s", "perf/rollout_tokens_per_s"):
        assert k in rows[-1], k
    if mode == "hybrid":
        assert_finite_rows(metrics(out, "sft"), 2, "sft")
    else:
        assert not metrics(out, "sft")


# The fp32 ZeRO-2 runs of both modes are the seed-config runs below, and the fp32 ZeRO-3 hybrid run is
# the colocated run of test_placement_runs.test_separate_reference_matches_colocated[3]: each asserts
# assert_rl_outputs on its own launch, so these layouts are not launched a second time here.
@pytest.mark.parametrize("mode,zero,bf16", [("ppo", 3, False), ("hybrid", 2, True), ("hybrid", 3, True)])
def test_ppo_and_hybrid_run_on_two_processes(tmp_path, request, mode, zero, bf16):
    if (mode, zero, bf16) == ("hybrid", 2, True):  # shared with tests/test_multinode.py (conftest.py)
        cfg, _ = request.getfixturevalue("hybrid_zero2_bf16_run")
    else:
        cfg = rl_cfg(tmp_path, mode, BF16=bf16)
        launch(cfg, tmp_path, nproc=2, zero=zero)
    assert_rl_outputs(cfg["OUTPUT_DIR"], mode)


@pytest.mark.parametrize("name", ["ppo", "hybrid"])
def test_seed_configs_run_with_local_models(tmp_path, name):
    """The seed configs (fp32, ZeRO-2, 2 processes): they run, and these are also the fp32 ZeRO-2
    runs of test_ppo_and_hybrid_run_on_two_processes in their mode."""
    from hybrid_ds.assets import resolve_model

    with open(os.path.join(REPO, "examples", "seed", f"{name}.json")) as f:
        cfg = json.load(f)
    assert cfg["MODE"] == name and not cfg.get("BF16") and not cfg.get("FP16")
    model = resolve_model("builtin:tiny-gpt2")
    reward = json.loads(json.dumps(cfg["REWARD"]).replace('"gpt2"', json.dumps(model)))
    cfg.update(MODEL=model, TRAIN_FILE="builtin:demo-tasks", OUTPUT_DIR=str(tmp_path / "out"), REWARD=reward)
    # The seed files run unchanged but for local paths; MAX_STEPS keeps the test short, and MAXSEQ
    # fits the tiny model's 512 positions (the seed's 1024 is GPT-2's).
    launch(cfg, tmp_path, nproc=2, zero=2, overrides=["MAX_STEPS=2", "MAX_NEW_TOKENS=16", "MAXSEQ=512"])
    assert_rl_outputs(cfg["OUTPUT_DIR"], name)


def test_lean_sampler_run_equals_hf_generate_run(tmp_path):
    """SAMPLER=lean_exact reproduces a SAMPLER=hf run exactly (same tokens, so the same rewards, KL and
    losses) when the old log-probs are recomputed; taken from the sampler (OLD_LOGPROBS=rollout, the
    fp32 default) they differ from the recomputed ones by float32 rounding only. The three runs are
    ``python -m hybrid_ds.train``'s main in this process (tests/inproc.py): the sampler, not the
    launcher, is the point here, and the launchers have their own tests above."""
    from inproc import train

    rows = {}
    runs = {"hf": dict(SAMPLER="hf"), "lean_exact": dict(SAMPLER="lean_exact", OLD_LOGPROBS="recompute"),
            "rollout": dict(SAMPLER="lean_exact", OLD_LOGPROBS="rollout")}
    for name, keys in runs.items():
        cfg = rl_cfg(tmp_path / name, "ppo", MAX_STEPS=3, MIN_NEW_TOKENS=0, NO_REPEAT_NGRAM_SIZE=2,
                     REPETITION_PENALTY=1.2, **keys)
        train(cfg, tmp_path, name=name)
        rows[name] = metrics(cfg["OUTPUT_DIR"], "ppo")
    for name in runs:
        assert_finite_rows(rows[name], 3, "ppo")
    wall = ("time", "time/", "perf/", "mem/")  # wall-clock and memory: differ between any two runs
    keys = sorted(k for k in rows["hf"][0] if not k.startswith(wall) and k not in ("step", "phase"))
    assert len(keys) > 15 and all(sorted(k for k in r if not k.startswith(wall) and k not in ("step", "phase"))
                                  == keys for n in runs for r in rows[n])
    for a, b in zip(rows["hf"], rows["lean_exact"]):
        for k in ("ppo/reward_mean", "ppo/response_len", "objective/kl", "ppo/loss/policy", "ppo/loss/value",
                  "ppo/value_mean_old"):
            assert a[k] == b[k], (k, a[k], b[k])
    off = [(a["step"], k, a[k], c[k]) for a, c in zip(rows["lean_exact"], rows["rollout"]) for k in keys
           if c[k] != pytest.approx(a[k], rel=1e-3, abs=1e-5)]
    assert not off, off  # every logged metric
    assert all(r["time/old_logprobs_s"] < 0.2 * b["time/old_logprobs_s"]  # no second forward
               for r, b in zip(rows["rollout"], rows["lean_exact"]))
