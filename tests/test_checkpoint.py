"""Checkpoints, exact resume, merged weights and faults (hybrid_ds/run/checkpoint*.py, run/resume.py).

Fast tier: resume planning, config comparison, pointer fallback, pruning and log rewinding on
hand-made checkpoint directories. Slow tier (real launches): a run killed with SIGKILL after its
cycle-2 checkpoint and resumed equals an uninterrupted one (ZeRO-2 and ZeRO-3, 2 processes); a
crash or a full disk while writing leaves the previous checkpoint in use; SIGTERM on one rank stops
both with a checkpoint and exit 0; non-finite losses are skipped, then stop the run; a ZeRO-3
checkpoint exports to weights that vanilla transformers loads.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch_utils import BIN, REPO, env, free_port, load_weights, max_rel_diff, metrics

from hybrid_ds.run import checkpoint as ck
from hybrid_ds.run import checkpoint_dir as cdir
from hybrid_ds.run import resume
from hybrid_ds.run import output_lock
from hybrid_ds.config import ConfigError
from hybrid_ds.run.preflight import load_config

IGNORED = ("time", "time/", "perf/", "mem/")  # wall-clock and memory keys differ between runs


# --------------------------------------------------------------------------------------
# helpers


def rl_cfg(out, **extra):
    cfg = {"MODE": "hybrid", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks", "OUTPUT_DIR": str(out),
           "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 1e-3, "PPO_BATCH": 4, "PPO_MINI": 2, "PPO_EPOCHS": 2,
           "LR_PPO": 1e-4, "MAX_NEW_TOKENS": 6, "MIN_NEW_TOKENS": 2, "MAXSEQ": 96, "MAX_STEPS": 8,
           "SCHEDULER": "linear", "REWARD": {"type": "word_f1"}}
    cfg.update(extra)
    return cfg


def sft_cfg(out, **extra):
    cfg = {"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks", "OUTPUT_DIR": str(out),
           "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 1e-3, "MAX_STEPS": 6, "SCHEDULER": "linear",
           "MAXSEQ": 128}  # within the tiny model's 512 positions (the default 1024 is refused)
    cfg.update(extra)
    return cfg


def start(cfg, tmp_path, name, *, nproc=1, zero=0, hooks=None):
    """Launch a run in its own session (so the test can kill all of it); output goes to NAME.log.
    ``hooks``: faults of tests/fault_injection.py, through its wrapper entry script."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    entry = [os.path.join(REPO, "tests", "scripts", "train_with_faults.py")] if hooks else ["-m", "hybrid_ds.train"]
    if nproc == 1 and zero == 0:
        cmd = [sys.executable, *entry, str(path)]
    else:
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(REPO, "launch", f"zero{zero}.yaml"),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), *entry, str(path)]
    e = env()
    e.update({f"HYBRID_DS_FAULT_{k}": str(v) for k, v in (hooks or {}).items()})
    log = open(tmp_path / f"{name}.log", "w")
    p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p.log_path = tmp_path / f"{name}.log"
    return p


def kill_all(p):
    """SIGKILL a launch and every process under it (torch's launcher puts each worker in its own session)."""
    import psutil

    try:
        procs = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for q in [psutil.Process(p.pid)] * (p.poll() is None) + procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    p.wait()
    psutil.wait_procs(procs, timeout=30)


def finish(p, timeout=300):
    """Wait for ``p``; returns (exit code, its output). Kills all of it on timeout."""
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(p)
        raise AssertionError(f"timed out after {timeout}s:\n{p.log_path.read_text()[-4000:]}")
    return rc, p.log_path.read_text()


def run_ok(cfg, tmp_path, name, **kw):
    rc, out = finish(start(cfg, tmp_path, name, **kw))
    assert rc == 0, f"{name}: exit {rc}\n{out[-6000:]}"
    return out


def wait_for(cond, p, what, timeout=240):
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"run ended (exit {p.returncode}) before {what}:\n{p.log_path.read_text()[-4000:]}")
        if time.time() - t0 > timeout:
            kill_all(p)
            raise AssertionError(f"no {what} after {timeout}s:\n{p.log_path.read_text()[-4000:]}")
        time.sleep(0.1)


def latest(out):
    try:
        return (out / "checkpoints" / "latest").read_text()
    except OSError:
        return None


def assert_same_metrics(rows_a, rows_b, tol=1e-6):
    """Each (phase, step) once in B, the same set as A, the same values (wall-clock keys aside)."""
    keys_b = [(r["phase"], r["step"]) for r in rows_b]
    assert len(keys_b) == len(set(keys_b)), f"duplicated steps: {sorted(keys_b)}"
    by_a = {(r["phase"], r["step"]): r for r in rows_a}
    assert set(keys_b) == set(by_a), (sorted(set(by_a) - set(keys_b)), sorted(set(keys_b) - set(by_a)))
    for r in rows_b:
        a = by_a[(r["phase"], r["step"])]
        keys = {k for k in a if not k.startswith(IGNORED)}
        assert keys == {k for k in r if not k.startswith(IGNORED)}, (r["phase"], r["step"])
        for k in keys:
            x, y = a[k], r[k]
            if isinstance(x, str) or isinstance(y, str):
                assert x == y, (r["phase"], r["step"], k, x, y)
            else:
                assert abs(x - y) <= tol * max(1.0, abs(x)), (r["phase"], r["step"], k, x, y)


def tb_scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


# --------------------------------------------------------------------------------------
# fast tier: planning and bookkeeping on hand-made checkpoints


class OneProcess:
    """The Dist of a one-process run, as far as OUTPUT_DIR preparation uses it."""

    is_main = True

    def barrier(self):
        pass

    def broadcast_object(self, obj):
        return obj


def fake_checkpoint(out, name, cfg_dict, *, complete=True, counters=None, mode="sft"):
    d = out / "checkpoints" / name
    d.mkdir(parents=True)
    c = counters or {"sft_step": int(name.split("-")[1]), "ppo_update": 0, "cycle": 0}
    (d / cdir.STATE_FILE).write_text(json.dumps({"mode": mode, "counters": c, "seed": 0,
                                               "plan": {"cycles": 0, "sft_steps": 6, "ppo_updates": 0}}))
    resolved = load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg_dict.items()],
                           check_files=False).to_json_dict()
    (d / cdir.CONFIG_FILE).write_text(json.dumps({**resolved, "SEED": 0}))
    if complete:
        (d / cdir.COMPLETE).write_text("{}")
    return d


def cfg_args(d):
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def test_resume_picks_latest_and_falls_back_when_the_pointer_is_broken(tmp_path):
    out = tmp_path / "out"
    base = sft_cfg(out)
    fake_checkpoint(out, "step-0000002", base)
    fake_checkpoint(out, "step-0000004", base)
    fake_checkpoint(out, "step-0000006", base, complete=False)  # interrupted while writing
    (out / "checkpoints" / "step-0000008.tmp").mkdir()
    assert cdir.find_latest(str(out)).endswith("step-0000004")
    (out / "checkpoints" / "latest").write_text("step-0000002")
    assert cdir.find_latest(str(out)).endswith("step-0000002")  # the pointer wins while it is valid
    (out / "checkpoints" / "latest").write_text("step-0000006")  # names an incomplete one
    assert cdir.find_latest(str(out)).endswith("step-0000004")
    cfg = load_config(None, cfg_args(base))
    point, problems = resume.resolve_resume(cfg)
    assert not problems and point.path.endswith("step-0000004") and point.seed == 0
    assert cdir.checkpoint_order("warmup-0000009") < cdir.checkpoint_order("step-0000000") < cdir.checkpoint_order("step-0000010")


def test_config_change_is_refused_listing_keys_unless_allowed(tmp_path):
    out = tmp_path / "out"
    base = sft_cfg(out)
    fake_checkpoint(out, "step-0000002", base)
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args({**base, "LR_SFT": 2e-3, "GRAD_ACCUM": 2, "MAX_STEPS": 9, "EPOCHS": 3}))
    msg = str(e.value)
    assert "LR_SFT (saved 0.001, now 0.002)" in msg and "GRAD_ACCUM (saved 1, now 2)" in msg, msg
    assert "MAX_STEPS" not in msg and "EPOCHS" not in msg  # always safe
    load_config(None, cfg_args({**base, "LR_SFT": 2e-3, "GRAD_ACCUM": 2, "ALLOW_CONFIG_CHANGE": ["lr_sft", "GRAD_ACCUM"]}))
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args({**base, "ALLOW_CONFIG_CHANGE": ["LR_SFTT"]}))
    assert "ALLOW_CONFIG_CHANGE: 'LR_SFTT' is not a config key." in str(e.value)
    del base["SEED"]  # an absent SEED takes the checkpoint's
    load_config(None, cfg_args(base))


def test_resume_modes(tmp_path):
    out = tmp_path / "out"
    base = sft_cfg(out)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "phase": "sft"}\n')
    with pytest.raises(ConfigError) as e:  # a run without a checkpoint is never overwritten
        load_config(None, cfg_args(base))
    assert "already holds a run" in str(e.value) and "RESUME=fresh" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args({**base, "RESUME": "never"}))
    assert "RESUME=never" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args({**base, "RESUME": "atuo"}))
    assert "neither auto, never, fresh nor an existing checkpoint directory" in str(e.value)
    fake_checkpoint(out, "step-0000002", base, complete=False)
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args({**base, "RESUME": str(out / "checkpoints" / "step-0000002")}))
    assert "is not a complete checkpoint" in str(e.value)

    cfg = load_config(None, cfg_args({**base, "RESUME": "fresh"}))
    try:
        assert resume.prepare_output_dir(cfg, OneProcess()) is None
    finally:
        output_lock.release_output_dir()
    moved = [p for p in os.listdir(tmp_path) if p.startswith("out.prev-")]
    assert len(moved) == 1 and (tmp_path / moved[0] / "metrics.jsonl").is_file()
    assert not (out / "metrics.jsonl").exists()  # the new run's OUTPUT_DIR holds only its lock


def test_rewind_truncates_metrics_and_purges_tensorboard(tmp_path):
    out = tmp_path / "out"
    base = rl_cfg(out)
    rows = []
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out / "tensorboard"))
    for s in range(1, 7):  # the old run got to cycle 6; the checkpoint is at cycle 4
        for phase in ("sft", "ppo"):
            rows.append({"step": s, "phase": phase, "time": 0.0, f"{phase}/loss": float(s)})
            w.add_scalar(f"{phase}/loss", float(s), s)
    w.close()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_checkpoint(out, "step-0000004", base, mode="hybrid", counters={"sft_step": 4, "ppo_update": 4, "cycle": 4})
    cfg = load_config(None, cfg_args(base))
    point, _ = resume.resolve_resume(cfg)
    time.sleep(1.1)  # a new event file name (its timestamp has 1 s resolution)
    resume.rewind_logs(cfg, point)
    assert [(r["phase"], r["step"]) for r in metrics(out)] == [(p, s) for s in range(1, 5) for p in ("sft", "ppo")]
    w = SummaryWriter(str(out / "tensorboard"))  # the resumed run logs 5 and 6 again
    w.add_scalar("sft/loss", 50.0, 5)
    w.close()
    assert tb_scalars(out, "sft/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]


def test_prune_keeps_the_newest(tmp_path):
    out = tmp_path / "out"
    base = sft_cfg(out)
    for s in (2, 4, 6, 8):
        fake_checkpoint(out, f"step-{s:07d}", base)
    ck._prune(str(out / "checkpoints"), 2, "step-0000008")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000006", "step-0000008"]


# --------------------------------------------------------------------------------------
# slow tier: real runs


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3], ids=["zero2", "zero3"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, zero):
    """A: 4 hybrid cycles straight. B: SAVE_EVERY=2, SIGKILL after cycle 3 (past its cycle-2
    checkpoint), resumed. Same weights, same metrics rows, each once; TensorBoard continues.
    (Two cycles on each side of the checkpoint: every counter, optimizer state, schedule and RNG
    stream has moved before it is saved and moves again after the resume.)"""
    a_out, b_out = tmp_path / "A", tmp_path / "B"
    run_ok(rl_cfg(a_out, MAX_STEPS=4), tmp_path, "A", nproc=2, zero=zero)

    b_cfg = rl_cfg(b_out, MAX_STEPS=4, SAVE_EVERY=2)
    p = start(b_cfg, tmp_path, "B1", nproc=2, zero=zero, hooks={"HANG_AT": 3})
    wait_for(lambda: latest(b_out) == "step-0000002" and "hanging after step 3" in p.log_path.read_text(), p,
             "the cycle-2 checkpoint")
    kill_all(p)
    assert any(r["step"] == 3 for r in metrics(b_out, "ppo"))  # rows past the checkpoint, to be dropped
    out = run_ok(b_cfg, tmp_path, "B2", nproc=2, zero=zero)
    assert f"resuming from {b_out}/checkpoints/step-0000002" in out, out[-3000:]
    assert "metrics.jsonl: dropped" in out

    # weights: policy (inference_lm) and value head (ppo_full)
    wa, wb = load_weights(a_out / "inference_lm"), load_weights(b_out / "inference_lm")
    assert max_rel_diff(wa, wb) <= 1e-6, max_rel_diff(wa, wb)
    va = torch.load(a_out / "ppo_full" / "value_head.pt")
    vb = torch.load(b_out / "ppo_full" / "value_head.pt")
    assert max_rel_diff(va, vb) <= 1e-6
    # metrics and TensorBoard
    assert_same_metrics(metrics(a_out), metrics(b_out))
    tb = tb_scalars(b_out, "sft/loss")
    assert [s for s, _ in tb] == list(range(1, 5))
    assert all(math.isclose(v, r["sft/loss"], rel_tol=1e-6) for (_, v), r in zip(tb, metrics(b_out, "sft")))
    # checkpoints: KEEP_LAST=2 of 2 and 4, the pointer on 4
    assert latest(b_out) == "step-0000004"
    assert sorted(os.listdir(b_out / "checkpoints")) == ["latest", "step-0000002", "step-0000004"]

    if zero == 3:  # merged weights from the sharded checkpoint, loaded by vanilla transformers
        exp = tmp_path / "exported"
        p = subprocess.run([sys.executable, "-m", "hybrid_ds.checkpoint", "export",
                            str(b_out / "checkpoints" / "step-0000004"), str(exp)], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(exp))
        AutoTokenizer.from_pretrained(str(exp))
        sd = {k: v for k, v in model.state_dict().items() if k in wb}
        assert sd.keys() == wb.keys()
        assert max_rel_diff(wb, sd) <= 1e-6, max_rel_diff(wb, sd)


@pytest.mark.slow
def test_full_disk_and_crash_while_writing_keep_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    cfg = sft_cfg(out, SAVE_EVERY=2)
    # 1. the step-4 checkpoint fails as on a full disk: a clear error, step 2 stays the latest
    rc, log = finish(start(cfg, tmp_path, "full", hooks={"FAIL_WRITE": 4}))
    assert rc == 1, log[-3000:]
    assert f"could not write checkpoint {out}/checkpoints/step-0000004.tmp" in log, log[-3000:]
    assert "No space left on device" in log and f"previous checkpoint ({out}/checkpoints/step-0000002) is intact" in log
    assert latest(out) == "step-0000002" and sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000002"]
    # 2. resumed, then killed while writing step 4: its .tmp stays behind, the pointer does not move
    rc, log = finish(start(cfg, tmp_path, "crash", hooks={"CRASH_IN_CHECKPOINT": 4}))
    assert rc == 17 and "exiting while checkpoint step-0000004 is being written" in log, log[-3000:]
    assert latest(out) == "step-0000002" and (out / "checkpoints" / "step-0000004.tmp").is_dir()
    # 3. resumed again: from step 2, to the end, each step logged once
    log = run_ok(cfg, tmp_path, "resume")
    assert f"resuming from {out}/checkpoints/step-0000002" in log
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000004", "step-0000006"]


def workers(p):
    import psutil

    return {int(c.environ().get("RANK", -1)): c for c in psutil.Process(p.pid).children(recursive=True)
            if any(e in " ".join(c.cmdline()) for e in ("hybrid_ds.train", "train_with_faults.py"))}


def _signal_rank_1_stops_both(tmp_path, sig):
    """A 2-process ZeRO-2 SFT run; ``sig`` to rank 1 only: both ranks finish the step, checkpoint
    and exit 0. Returns (OUTPUT_DIR, config, checkpoint name, steps done)."""
    out = tmp_path / "out"
    cfg = sft_cfg(out, MAX_STEPS=40, DIST_TIMEOUT_S=60)
    p = start(cfg, tmp_path, sig.name.lower(), nproc=2, zero=2, hooks={"STEP_SLEEP": 0.3})
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2, p, "two logged steps")
    workers(p)[1].send_signal(sig)
    rc, log = finish(p, timeout=120)
    assert rc == 0, log[-4000:]
    assert f"stopped by {sig.name} after step-" in log and "Run the same command again to resume" in log, log[-3000:]
    name = latest(out)
    stop = json.loads((out / "checkpoints" / name / cdir.STATE_FILE).read_text())["counters"]["sft_step"]
    assert 2 <= stop < 40 and name == f"step-{stop:07d}" and metrics(out)[-1]["step"] == stop
    return out, cfg, name, stop


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_then_a_dying_rank_ends_the_job(tmp_path):
    # 1. SIGTERM to rank 1 only: both ranks finish the step, checkpoint, exit 0
    out, cfg, name, stop = _signal_rank_1_stops_both(tmp_path, signal.SIGTERM)
    assert (out / "inference_lm" / "model.safetensors").is_file()
    # 2. resumed; then rank 1 dies (SIGKILL): every process exits non-zero within seconds, no hang,
    #    and the SIGTERM checkpoint is still the one to resume
    p = start(cfg, tmp_path, "die", nproc=2, zero=2, hooks={"STEP_SLEEP": 0.3})
    wait_for(lambda: len(metrics(out)) >= stop + 2, p, "two steps after the resume")
    ranks = workers(p)
    t0 = time.time()
    ranks[1].kill()
    rc, log = finish(p, timeout=120)
    assert rc != 0 and time.time() - t0 < 60, (rc, time.time() - t0)
    assert f"resuming from {out}/checkpoints/{name}" in log
    assert not ranks[0].is_running() or ranks[0].status() == "zombie"
    assert latest(out) == name


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    out = tmp_path / "out"
    cfg = sft_cfg(out, MAX_STEPS=8, MAX_NAN_STEPS=3)
    t0 = time.time()
    rc, log = finish(start(cfg, tmp_path, "nan", hooks={"NAN_AT": "2,4,5,6"}), timeout=120)
    assert rc == 1, log[-3000:]
    assert "stopped: 3 non-finite losses in a row (MAX_NAN_STEPS=3), the last at SFT step 6" in log, log[-3000:]
    assert "non-finite sft/loss at SFT step 2: update skipped (1 in a row" in log
    rows = {r["step"]: r for r in metrics(out)}
    assert rows[2]["sft/loss"] == "nan" and rows[2]["faults/nonfinite_total"] == 1.0
    assert math.isfinite(rows[3]["sft/loss"]) and rows[3]["sft/loss"] < 20  # the weights survived step 2
    assert rows[6]["sft/loss"] == "nan" and 7 not in rows
    assert time.time() - t0 < 120


@pytest.mark.slow
def test_sigint_on_one_rank_stops_both_with_a_checkpoint(tmp_path):
    out, _, _, stop = _signal_rank_1_stops_both(tmp_path, signal.SIGINT)
    assert [r["step"] for r in metrics(out)] == list(range(1, stop + 1))


@pytest.mark.slow
def test_nonfinite_sft_and_ppo_steps_under_zero2_are_skipped_and_counted(tmp_path):
    """Hybrid, ZeRO-2, 2 processes: NaN logits in SFT step 2 and NaN values in PPO update 2 (both
    ranks). Both updates are skipped and counted (2 in a row, MAX_NAN_STEPS=3), cycle 3 is finite
    again, and the weights written at the end are finite."""
    out = tmp_path / "out"
    cfg = rl_cfg(out, MAX_STEPS=3, MAX_NAN_STEPS=3)
    rc, log = finish(start(cfg, tmp_path, "nan2", nproc=2, zero=2, hooks={"NAN_AT": "2", "NAN_VALUES_AT": "2"}),
                     timeout=300)
    assert rc == 0, log[-4000:]
    assert "non-finite sft/loss at SFT step 2: update skipped (1 in a row" in log, log[-3000:]
    assert "non-finite ppo/loss/value at PPO update 2: update skipped (2 in a row" in log, log[-3000:]
    sft, ppo = {r["step"]: r for r in metrics(out, "sft")}, {r["step"]: r for r in metrics(out, "ppo")}
    assert sorted(sft) == sorted(ppo) == [1, 2, 3]
    assert sft[2]["sft/loss"] == "nan" and sft[2]["faults/nonfinite_total"] == 1.0
    assert ppo[2]["ppo/loss/value"] == "nan" and ppo[2]["faults/nonfinite_total"] == 2.0
    for r in (sft[1], sft[3], ppo[1], ppo[3]):
        assert all(not isinstance(v, str) or k == "phase" for k, v in r.items()), r
    assert ppo[2]["objective/kl_coef"] == ppo[1]["objective/kl_coef"]  # skipped update: the controller did not adapt
    w = load_weights(out / "inference_lm")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert all(torch.isfinite(v).all() for v in torch.load(out / "ppo_full" / "value_head.pt").values())
