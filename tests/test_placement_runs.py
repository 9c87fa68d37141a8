"""REF_PLACEMENT=separate through the real launcher: same results as colocated, other layouts, faults."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from launch_utils import REPO, assert_finite_rows, env, free_port, launch, load_weights, metrics, rel_norm_diffs
from test_ppo_runs import assert_rl_outputs
from tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow


def cfg_for(tmp_path, name, **extra):
    cfg = {"MODE": "hybrid", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
           "OUTPUT_DIR": str(tmp_path / name), "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 1e-3, "PPO_BATCH": 8,
           "PPO_MINI": 4, "PPO_EPOCHS": 2, "LR_PPO": 1e-4, "MAX_NEW_TOKENS": 6, "MAXSEQ": 96, "MAX_STEPS": 2,
           "SCHEDULER": "constant", "REWARD": {"type": "word_f1"}, "MAX_NAN_STEPS": 1,
           "REF_SYNC_EVERY": 0}  # a frozen reference in both placements (a sync needs it colocated)
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("zero", [2, 3])
def test_separate_reference_matches_colocated(tmp_path, zero):
    # Cycle 1 measures the KL from the starting reference; after cycle 2's SFT step the reference is
    # synced to the policy (REF_SYNC_EVERY=2, a copy): over the bridge, under ZeRO-3 parameter by parameter.
    # Under ZeRO-3 the KL is REFS' (docs/ppo.md): the run's own reference plus another model at weight 0.5,
    # both on the reference rank, each answering its own requests; the sync moves the first alone.
    refs = {} if zero == 2 else {"REFS": [{"model": "policy", "weight": 1.0},
                                          {"model": tiny_model_dir("gpt2", seed=1), "weight": 0.5}]}
    a = cfg_for(tmp_path, "colocated", REF_SYNC_EVERY=2, **refs)
    b = cfg_for(tmp_path, "separate", REF_PLACEMENT="separate", REF_RANKS=1, REF_SYNC_EVERY=2, **refs)
    launch(a, tmp_path, nproc=2, zero=zero, name="a")
    launch(b, tmp_path, nproc=3, zero=zero, name="b")
    # The colocated run is also test_ppo_runs' fp32 hybrid run on 2 processes at this ZeRO stage.
    assert_rl_outputs(a["OUTPUT_DIR"], "hybrid")
    ma, mb = metrics(a["OUTPUT_DIR"], "ppo"), metrics(b["OUTPUT_DIR"], "ppo")
    assert_finite_rows(ma, 2, "ppo")
    assert_finite_rows(mb, 2, "ppo")
    for run in (a, b):
        assert_finite_rows(metrics(run["OUTPUT_DIR"], "sft"), 2, "sft")
    per_ref = ["objective/kl/ref0", "objective/kl/ref1"] if refs else []
    for ra, rb in zip(ma, mb):
        for k in ["ppo/reward_mean", "objective/kl", "ppo/loss/policy", "ppo/loss/value"] + per_ref:
            assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
    # the synced reference is the policy the rollout sampled from: KL 0 (before the sync it was not);
    # REFS' other model is never synced, and objective/kl is the weighted sum
    own = "objective/kl/ref0" if refs else "objective/kl"
    for m in (ma, mb):
        assert abs(m[0][own]) > 1e-4 and abs(m[1][own]) < 1e-3, m
        for r in m if refs else []:
            assert r["objective/kl/ref1"] > 1e-2, r
            want = r["objective/kl/ref0"] + 0.5 * r["objective/kl/ref1"]
            assert abs(r["objective/kl"] - want) <= 1e-5 * max(1.0, abs(want)), r
    assert [r["step"] for r in metrics(b["OUTPUT_DIR"], "ref")] == [2]
    # Without the key third of c_attn.bias: its gradient is identically zero (softmax is invariant to a
    # per-query shift of the key scores), so Adam turns round-off there into +-lr steps (README).
    diffs = rel_norm_diffs(load_weights(os.path.join(a["OUTPUT_DIR"], "inference_lm")),
                           load_weights(os.path.join(b["OUTPUT_DIR"], "inference_lm")))
    assert max(diffs.values()) < 1e-5, max(diffs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("nproc,ref_ranks", [(4, 1), (4, 2)], ids=["3+1", "2+2"])
def test_four_process_layouts_run(tmp_path, nproc, ref_ranks):
    policy = nproc - ref_ranks
    c = cfg_for(tmp_path, "run", REF_PLACEMENT="separate", REF_RANKS=ref_ranks, SFT_BATCH=4 * policy,
                PPO_BATCH=2 * policy, PPO_MINI=2 * policy)
    p = launch(c, tmp_path, nproc=nproc, zero=2)
    assert_finite_rows(metrics(c["OUTPUT_DIR"], "ppo"), 2, "ppo")
    assert_finite_rows(metrics(c["OUTPUT_DIR"], "sft"), 2, "sft")
    assert p.stdout.count("served") == ref_ranks


def test_killed_reference_ends_every_rank_with_a_clear_message(tmp_path):
    c = cfg_for(tmp_path, "run", REF_PLACEMENT="separate", REF_RANKS=1, MAX_STEPS=200, REF_TIMEOUT_S=60)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(c))
    cmd = [os.path.join(os.path.dirname(__import__("sys").executable), "accelerate"), "launch", "--config_file",
           os.path.join(REPO, "launch", "zero2.yaml"), "--num_processes", "3", "--main_process_port",
           str(free_port()), "-m", "hybrid_ds.train", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = os.path.join(c["OUTPUT_DIR"], "reference-rank-2.pid")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(pid_file) and _ppo_rows(c["OUTPUT_DIR"]) >= 1):
        time.sleep(0.5)
    assert os.path.exists(pid_file), "reference rank never started"
    os.kill(int(open(pid_file).read()), signal.SIGKILL)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    with open(os.path.join(str(tmp_path), "launch.err"), "w") as f:
        f.write(err)
    assert proc.returncode != 0
    assert time.time() - t0 < 90, "ranks took too long to stop"
    # Ours ("reference rank 2 closed its connection ...") or, when the launcher tears the group down
    # first, torch elastic's failure summary naming rank 2 and the signal.
    assert "reference rank 2" in err or re.search(r"rank\s*:\s*2 .*\n.*\n.*exitcode\s*:\s*-9", err), err[-3000:]


def _ppo_rows(out):
    try:
        return len(metrics(out, "ppo"))
    except FileNotFoundError:
        return 0
