"""Never lose finished work, never run foreign code (hybrid_ds/checkpoint.py, hybrid_ds/dist.py).

One run per OUTPUT_DIR (an flock on OUTPUT_DIR/.lock): a second run is refused with exit 2 naming
the holder, a lock left by a dead process is taken over. A damaged checkpoint (named by RESUME, or
the latest) is refused with exit 2 before anything is changed. Checkpoint files are loaded with
weights_only=True: a pickle that would run code is refused, and its code never runs. DeepSpeed's
shared-memory all-reduce segments of a killed run are removed by the next start. A build lock of
DeepSpeed's ops that a killed build left (every later load would wait on it forever) ends a run
under DeepSpeed with exit 2 naming it.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from launch_utils import BIN, REPO, env, free_port, metrics
from test_checkpoint import OneProcess, finish, kill_all, latest, run_ok, sft_cfg, start, wait_for

from hybrid_ds.run import checkpoint_dir as cdir
from hybrid_ds.run import resume
from hybrid_ds.run import output_lock
from hybrid_ds.run.preflight import load_config


def snapshot(root):
    """{relative path: sha256} of every file under ``root`` (the lock file aside: runs take it)."""
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            if n == ".lock":
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------------------
# one run per OUTPUT_DIR


def hold_lock_in_child(out, then="sleep"):
    """A child process that takes OUTPUT_DIR's lock, then sleeps (returned, still running) or is
    SIGKILLed while holding it (returns its pid)."""
    code = ("import os, sys, time\nfrom hybrid_ds.run import output_lock\noutput_lock.lock_output_dir(sys.argv[1])\n"
            "print('locked', flush=True)\n"
            + ("time.sleep(600)\n" if then == "sleep" else "os.kill(os.getpid(), 9)\n"))
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         text=True)
    if then == "sleep":
        assert p.stdout.readline().strip() == "locked"
        return p
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    return p.pid


def test_output_dir_held_by_a_live_process_is_refused_naming_it(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock_in_child(out)
    try:
        with pytest.raises(cdir.ResumeError) as e:  # what prepare_output_dir does on the main rank
            output_lock.lock_output_dir(str(out))
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and str(out) in msg, msg
        # config validation (every rank) refuses too, with the same words
        from hybrid_ds.config import ConfigError

        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{k}={json.dumps(v)}" for k, v in sft_cfg(out).items()])
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    output_lock.lock_output_dir(str(out))  # its holder is gone: free again
    output_lock.release_output_dir()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    dead = hold_lock_in_child(out, then="die")
    assert json.loads((out / ".lock").read_text())["pid"] == dead  # it died holding it
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sft_cfg(out).items()])  # not refused
    try:
        assert resume.prepare_output_dir(cfg, OneProcess()) is None
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    finally:
        output_lock.release_output_dir()
    said = capsys.readouterr().out
    assert f"took over the lock of pid {dead} on host {socket.gethostname()}" in said, said
    assert (out / ".lock").read_text() == ""  # released: nothing left to take over


@pytest.mark.slow
def test_second_run_in_the_same_output_dir_is_refused_and_the_first_is_intact(tmp_path):
    out = tmp_path / "out"
    cfg = sft_cfg(out, MAX_STEPS=6, SAVE_EVERY=2, KEEP_LAST=2)
    first = start(cfg, tmp_path, "first", hooks={"STEP_SLEEP": 1.0})
    wait_for(lambda: latest(out) == "step-0000002", first, "the first checkpoint")
    rc, log = finish(start(cfg, tmp_path, "second"), timeout=240)
    assert rc == 2, log[-3000:]
    assert f"pid {first.pid} on host {socket.gethostname()}" in log and "Traceback" not in log, log[-3000:]
    rc, log = finish(first)
    assert rc == 0, log[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000004", "step-0000006"]
    assert latest(out) == "step-0000006"


# --------------------------------------------------------------------------------------
# damaged or foreign checkpoints: refused before anything changes


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step SFT run with checkpoints at steps 2 and 4 (KEEP_LAST=0 keeps both)."""
    tmp = tmp_path_factory.mktemp("base")
    out = tmp / "out"
    run_ok(sft_cfg(out, MAX_STEPS=4, SAVE_EVERY=2, KEEP_LAST=0), tmp, "base")
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000002", "step-0000004"]
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    cfg = sft_cfg(out, MAX_STEPS=4, SAVE_EVERY=2, KEEP_LAST=0)
    return out, cfg


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_damaged_older_checkpoint_named_by_resume_changes_nothing(finished_run, tmp_path):
    out, cfg = copy_run(finished_run, tmp_path)
    bad = out / "checkpoints" / "step-0000002"
    truncate(bad / "optimizer.pt")
    before = snapshot(out)
    rc, log = finish(start({**cfg, "RESUME": str(bad)}, tmp_path, "resume-bad"), timeout=240)
    assert rc == 2, log[-3000:]
    assert f"{bad}/optimizer.pt is damaged or truncated" in log and "Nothing was changed" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert snapshot(out) == before  # no row, checkpoint, pointer or log touched
    assert latest(out) == "step-0000004" and len(metrics(out)) == 4


def test_damaged_latest_is_refused_naming_the_previous_one_then_resuming_that_keeps_everything(
        finished_run, tmp_path):
    out, cfg = copy_run(finished_run, tmp_path)
    newest = out / "checkpoints" / "step-0000004"
    truncate(newest / "optimizer.pt")
    damaged = (newest / "optimizer.pt").read_bytes()
    before = snapshot(out)
    rc, log = finish(start(cfg, tmp_path, "auto-bad"), timeout=240)  # RESUME=auto: the latest
    assert rc == 2, log[-3000:]
    previous = out / "checkpoints" / "step-0000002"
    assert f"{newest}/optimizer.pt is damaged" in log and f"RESUME={previous}" in log, log[-3000:]
    assert "Traceback" not in log and snapshot(out) == before
    # as told: resume the previous one. It runs to the end; the damaged checkpoint is set aside, not
    # deleted, once the new step-4 is complete; the old rows 3 and 4 are kept aside too.
    old_rows = metrics(out)
    log = run_ok({**cfg, "RESUME": str(previous)}, tmp_path, "resume-previous")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert metrics(out)[:2] == old_rows[:2]
    names = sorted(os.listdir(out / "checkpoints"))
    assert names[:3] == ["latest", "step-0000002", "step-0000004"] and names[3].startswith("superseded-"), names
    assert (out / "checkpoints" / names[3] / "step-0000004" / "optimizer.pt").read_bytes() == damaged
    aside = [n for n in os.listdir(out) if n.startswith("metrics.superseded-")]
    assert len(aside) == 1 and [json.loads(ln) for ln in (out / aside[0]).read_text().splitlines()] == old_rows[2:]
    assert latest(out) == "step-0000004" and not (out / "resume-pending.json").exists()


class Evil:
    """Unpickling this creates a directory: the proof that a checkpoint file ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("name", ["rng/rank-00000.pt", "schedules.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused_and_never_runs(finished_run, tmp_path, name):
    out, cfg = copy_run(finished_run, tmp_path)
    marker = tmp_path / "side-effect"
    torch.save({"torch": Evil(str(marker))}, out / "checkpoints" / "step-0000004" / name)
    before = snapshot(out)
    rc, log = finish(start({**cfg, "MAX_STEPS": 6}, tmp_path, "evil"), timeout=240)
    assert not marker.exists(), "the pickled code ran"
    assert rc == 2, log[-3000:]
    assert f"step-0000004/{name} holds pickled objects" in log and "weights_only=True" in log, log[-3000:]
    assert "Traceback" not in log and snapshot(out) == before


def test_abandoned_resume_rows_are_moved_aside_at_the_next_start(finished_run, tmp_path):
    """A run resumed from step 2 that dies before its first checkpoint: its rows are moved aside by
    the next start, and metrics.jsonl is again the one of the complete checkpoints."""
    out, cfg = copy_run(finished_run, tmp_path)
    old = (out / "metrics.jsonl").read_bytes()
    rc, log = finish(start({**cfg, "RESUME": str(out / "checkpoints" / "step-0000002")}, tmp_path, "crash",
                           hooks={"CRASH_IN_CHECKPOINT": 4}), timeout=240)
    assert rc == 17, log[-3000:]
    assert (out / "resume-pending.json").is_file() and (out / "metrics.jsonl").read_bytes().startswith(old)
    assert latest(out) == "step-0000004" and len(metrics(out)) == 6  # rows 3, 4 twice until the next start
    cfg_obj = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**cfg, "MAX_STEPS": 4}.items()])
    try:
        point = resume.prepare_output_dir(cfg_obj, OneProcess())
    finally:
        output_lock.release_output_dir()
    assert point.path.endswith("step-0000004")
    assert (out / "metrics.jsonl").read_bytes() == old
    aside = [n for n in os.listdir(out) if n.startswith("metrics.abandoned-")]
    assert len(aside) == 1 and [json.loads(ln)["step"] for ln in (out / aside[0]).read_text().splitlines()] == [3, 4]


# --------------------------------------------------------------------------------------
# DeepSpeed's shared-memory all-reduce segments


def shm_segments(port):
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")
                  and f"_{port}_" in n)


@pytest.fixture(scope="module")
def killed_then_next_run(tmp_path_factory):
    """LOCAL_SIZE (set by the deepspeed launcher) turns on DeepSpeed's CPU shared-memory all-reduce:
    68 MiB per rank in /dev/shm, never unlinked by DeepSpeed. A 2-process ZeRO-2 SFT run killed after
    step 2, then the next start in its OUTPUT_DIR (RESUME=fresh, 2 steps, ending with its step-2
    checkpoint). Returns (the /dev/shm segments seen along the way and the next run's exit and log,
    OUTPUT_DIR, config): the next run is also the finished 2-rank ZeRO-2 run whose checkpoint
    test_damaged_deepspeed_shard_of_rank_1_stops_every_rank_with_exit_2 damages (one launch fewer)."""
    tmp = tmp_path_factory.mktemp("shm")
    out = tmp / "out"
    cfg = sft_cfg(out, MAX_STEPS=40)
    path = tmp / "cfg.json"
    path.write_text(json.dumps(cfg))

    def launch(port, name, hooks, **extra):
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(REPO, "launch", "zero2.yaml"),
               "--num_processes", "2", "--main_process_port", str(port),
               os.path.join(REPO, "tests", "scripts", "train_with_faults.py"), str(path),
               *[f"{k}={v}" for k, v in extra.items()]]
        e = dict(env(), LOCAL_SIZE="2", **hooks)  # tests/fault_injection.py
        log = open(tmp / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        p.log_path = tmp / f"{name}.log"
        return p

    port = free_port()
    p = launch(port, "killed", {"HYBRID_DS_FAULT_HANG_AT": "2"})
    wait_for(lambda: "hanging after step 2" in p.log_path.read_text(), p, "step 2")
    seen = {"killed, running": shm_segments(port)}
    kill_all(p)
    seen["killed, after SIGKILL"] = shm_segments(port)
    port2 = free_port()
    rc, log = finish(launch(port2, "next", {}, RESUME="fresh", MAX_STEPS=2), timeout=300)
    seen.update({"next": (rc, log), "killed, after the next start": shm_segments(port),
                 "next, after its end": shm_segments(port2)})
    return seen, out, {**cfg, "RESUME": "fresh", "MAX_STEPS": 2}


@pytest.mark.slow
def test_shared_memory_of_a_killed_run_is_removed_by_the_next_start(killed_then_next_run):
    """A clean end removes its own segments; a killed run's are removed by the next start."""
    seen, _, _ = killed_then_next_run
    assert len(seen["killed, running"]) == 2  # one per rank
    assert len(seen["killed, after SIGKILL"]) == 2  # SIGKILL: nobody removed them
    rc, log = seen["next"]
    assert rc == 0, log[-3000:]
    assert seen["killed, after the next start"] == [], "the killed run's segments are still there"
    assert seen["next, after its end"] == [], "the clean run left its own segments"


@pytest.mark.slow
def test_damaged_deepspeed_shard_of_rank_1_stops_every_rank_with_exit_2(killed_then_next_run, tmp_path):
    """Two ranks, ZeRO-2: rank 0 verifies every rank's files before anything changes; its decision
    reaches rank 1, so both exit 2 with the message and nothing is touched. The finished run is the
    fixture's next start (a copy of its OUTPUT_DIR)."""
    seen, finished, cfg = killed_then_next_run
    assert seen["next"][0] == 0, seen["next"][1][-3000:]
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    cfg = {**cfg, "OUTPUT_DIR": str(out)}
    engine = out / "checkpoints" / "step-0000002" / "engine"
    shard = next(p for p in engine.iterdir() if "zero_pp_rank_1_" in p.name and p.name.endswith("optim_states.pt"))
    truncate(shard)
    before = snapshot(out)
    rc, log = finish(start({**cfg, "RESUME": "auto", "MAX_STEPS": 4}, tmp_path, "bad", nproc=2, zero=2), timeout=300)
    # The launcher's report: a rank exited 2; a rank it stopped before that rank's own exit 2 shows
    # SIGTERM (-15). That both ranks reached the refusal is the message count below.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", log)
    assert rc != 0 and "2" in codes and set(codes) <= {"2", "-15"}, log[-4000:]
    assert log.count(f"hybrid_ds: checkpoint {out}/checkpoints/step-0000002 cannot be resumed: {shard} is damaged") \
        == 2, log[-4000:]  # one message per rank
    package = os.path.join(REPO, "hybrid_ds") + os.sep  # the launcher's own traceback is not ours
    assert package not in "".join(ln for ln in log.splitlines(True) if ln.lstrip().startswith("File "))
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------
# DeepSpeed's op build locks (hybrid_ds/engine/jit_ops.py)


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """An extensions root of its own with a cpu_adam build folder, aged by ``age(lock, seconds)``."""
    root = tmp_path / "ext"
    (root / "cpu_adam").mkdir(parents=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def aged(path, seconds):
    path.touch()
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))
    return str(path)


def test_a_build_lock_is_abandoned_only_when_old_and_held_by_no_process(extensions):
    from hybrid_ds.engine.jit_ops import abandoned_build_locks

    lock = aged(extensions / "cpu_adam" / "lock", 20 * 60)
    assert [p for p, _ in abandoned_build_locks()] == [lock]
    fd = os.open(lock, os.O_RDONLY)  # a build in progress holds its lock open (torch's FileBaton)
    try:
        assert abandoned_build_locks() == []
    finally:
        os.close(fd)
    aged(extensions / "cpu_adam" / "lock", 60)  # young: maybe a build on another node of the cluster
    assert abandoned_build_locks() == []


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_an_abandoned_build_lock_ends_a_deepspeed_run_with_exit_2_naming_it(extensions, tmp_path, dry_run, capsys):
    from hybrid_ds.run.cli import main

    lock = aged(extensions / "cpu_adam" / "lock", 20 * 60)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**sft_cfg(tmp_path / "out"), "ZERO_STAGE": 2}))
    with pytest.raises(SystemExit) as e:
        main([str(cfg), *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"rm {lock}" in err and "cpu_adam" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    # Without DeepSpeed no op is loaded: the lock is no concern of the run's.
    assert main([str(cfg), "ZERO_STAGE=0", "--dry-run"]) == 0
    # The command that builds the ops ahead refuses it the same way instead of waiting on it.
    p = subprocess.run([sys.executable, "-m", "hybrid_ds.engine.jit_ops"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and f"rm {lock}" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_op_counts_as_built_only_from_this_deepspeed_install(extensions):
    """A virtual environment elsewhere that shares the cache folder built it from other sources:
    loading it here rebuilds it (ninja sees other paths), so it is not built for this install."""
    import importlib.util

    from hybrid_ds.engine.jit_ops import op_built

    build = extensions / "cpu_adam"
    ops = os.path.join(importlib.util.find_spec("deepspeed").submodule_search_locations[0], "ops")
    (build / "build.ninja").write_text(f"build cpu_adam.o: compile {ops}/csrc/cpu/adam/cpu_adam.cpp\n")
    assert not op_built("cpu_adam")  # no library yet
    (build / "cpu_adam.so").write_bytes(b"")
    assert op_built("cpu_adam")
    (build / "build.ninja").write_text("build cpu_adam.o: compile /elsewhere/deepspeed/ops/csrc/cpu/adam/cpu_adam.cpp\n")
    assert not op_built("cpu_adam")
