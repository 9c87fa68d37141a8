"""Multi-node launches, as two "machines" on this one: two ``accelerate launch`` invocations (machine
ranks 0 and 1, one process each, loopback, gloo) that either form one 2-process run or refuse.

hybrid_ds/engine/launcher.py reads what an ``accelerate launch`` asked for; the unit tests below
feed it command lines, the launches run it for real."""

import os
import json
import subprocess

import pytest

from launch_utils import BIN, REPO, env, free_port, metrics

WALL = ("time", "perf/", "mem/")  # wall-clock (time, time/*) and memory: differ between any two runs


def write_cfg_json(cfg: dict, tmp_path) -> str:
    path = os.path.join(str(tmp_path), "cfg.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _two_machines(yaml: str, cfg_path: str, cwd, extra=()):
    """Start machine ranks 0 and 1 of a 2-machine, 2-process launch of ``cfg_path`` with ``yaml``
    and wait for both; returns their CompletedProcess-like (returncode, stdout, stderr)."""
    port = free_port()
    e = env()
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")  # Accelerate's pdsh path runs `deepspeed` by name
    procs = []
    for rank in (0, 1):
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(REPO, "launch", yaml),
               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--num_processes", "2", *extra, "-m", "hybrid_ds.train",
               cfg_path]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_machines_train_as_the_two_process_run(hybrid_zero2_bf16_run, tmp_path):
    """launch/multinode.yaml on machine ranks 0 and 1 forms one world of 2: every logged metric equals
    the single-machine 2-process run of the same config (tests/conftest.py), and the checkpoint in
    the shared OUTPUT_DIR holds both ranks' files."""
    from hybrid_ds.run.checkpoint_dir import find_latest, read_point
    from hybrid_ds.run.checkpoint_verify import checkpoint_problem

    single_cfg, single_out = hybrid_zero2_bf16_run
    cfg = dict(single_cfg, OUTPUT_DIR=str(tmp_path / "shared_out"))
    runs = _two_machines("multinode.yaml", write_cfg_json(cfg, tmp_path), tmp_path)
    for rank, (code, stdout, stderr) in enumerate(runs):
        assert code == 0, (rank, stdout[-2000:], stderr[-4000:])
    assert "hybrid on 2 process(es)" in runs[0][1]
    out = cfg["OUTPUT_DIR"]
    rows, single = metrics(out), metrics(single_out)
    assert [(r["phase"], r["step"]) for r in rows] == [(r["phase"], r["step"]) for r in single]
    assert len(rows) == 6  # per cycle: 1 SFT step, the reference sync (the hybrid default), 1 PPO update
    for a, b in zip(rows, single):
        keys = {k for k in b if not k.startswith(WALL)}
        assert keys == {k for k in a if not k.startswith(WALL)}
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, (a["phase"], a["step"])
    latest = find_latest(out)
    assert latest and os.path.dirname(latest) == os.path.join(out, "checkpoints")
    point = read_point(latest)
    assert checkpoint_problem(point) == ""  # every rank's files: RNG states, both ZeRO optimizer shards
    for r in (0, 1):
        assert os.path.isfile(os.path.join(latest, "rng", f"rank-{r:05d}.pt"))
    assert os.path.isfile(os.path.join(out, "inference_lm", "model.safetensors"))


@pytest.mark.slow
def test_two_machines_without_hostfile_refuse_instead_of_training_alone(tmp_path):
    """The launch that trained machine 0 alone: launch/zero2.yaml with --num_machines 2 hands
    DeepSpeed's pdsh launcher the hostfile None, and DeepSpeed starts each machine's process as a
    world of 1. Each of them now exits 2 naming both numbers, before any process group (so before
    either binds the port) and before OUTPUT_DIR is touched."""
    from test_ppo_runs import rl_cfg

    cfg = rl_cfg(tmp_path, "hybrid")
    runs = _two_machines("zero2.yaml", write_cfg_json(cfg, tmp_path), tmp_path)
    for rank, (code, stdout, stderr) in enumerate(runs):
        log = stdout + stderr
        assert code != 0, (rank, log[-4000:])
        assert "Unable to find hostfile" in log  # the silent fallback this refuses
        assert "the launch asked for 2 processes" in log and "this run's world has 1" in log, (rank, log[-4000:])
        assert "exits with return code = 2" in log, (rank, log[-4000:])  # DeepSpeed's launcher on the rank
        assert "EADDRINUSE" not in log and "address already in use" not in log.lower()
    assert not os.path.exists(cfg["OUTPUT_DIR"])


# --------------------------------------------------------------------------------------
# the request, from command lines (no launch)


def _request(args, cwd=REPO):
    from hybrid_ds.engine.launcher import request_from_args

    return request_from_args([*args, "-m", "hybrid_ds.train", "cfg.json"], cwd, pid=42)


def test_request_resolves_command_line_over_config_file():
    from hybrid_ds.engine.launcher import world_problem

    bad = _request(["--config_file", "launch/zero2.yaml", "--num_machines", "2", "--machine_rank", "1",
                    "--num_processes", "2"])
    assert (bad.processes, bad.machines, bad.deepspeed, bad.multinode_launcher, bad.hostfile) == \
        (2, 2, True, "pdsh", None)
    msg = world_problem(1, bad)
    assert "asked for 2 processes" in msg and "world has 1" in msg and "pdsh" in msg and "launch/multinode.yaml" in msg
    assert world_problem(2, bad) is None
    good = _request(["--config_file", "launch/multinode.yaml", "--num_machines", "2", "--num_processes", "2"])
    assert (good.processes, good.machines, good.multinode_launcher) == (2, 2, "standard")
    # the yaml's own values when the command line is silent; a relative config path is the launcher's cwd's
    conf = _request(["--config_file", "multinode.yaml"], cwd=os.path.join(REPO, "launch"))
    assert (conf.processes, conf.machines) == (16, 2)
    # uneven processes per machine: Accelerate starts num_processes // num_machines on each
    uneven = _request(["--config_file", "launch/multinode.yaml", "--num_machines", "2", "--num_processes", "3"])
    msg = world_problem(2, uneven)
    assert "asked for 3 processes" in msg and "num_machines x processes" in msg and "pdsh" not in msg
    assert world_problem(1, None) is None


def test_accelerate_launch_is_found_in_its_command_line_forms():
    from hybrid_ds.engine.launcher import _accelerate_launch_args, accelerate_request

    rest = ["--num_processes", "2", "train.py", "launch"]
    for argv in (["/v/bin/python", "/v/bin/accelerate", "launch", *rest], ["/v/bin/accelerate", "launch", *rest],
                 ["python", "-m", "accelerate.commands.launch", *rest], ["accelerate-launch", *rest],
                 ["python3", "-m", "accelerate", "launch", *rest]):
        assert _accelerate_launch_args(argv) == rest, argv
    for argv in (["python", "train.py", "accelerate", "launch"], ["/v/bin/accelerate", "config"], []):
        assert _accelerate_launch_args(argv) is None, argv
    assert accelerate_request() is None  # pytest is not under accelerate launch


def test_only_a_launch_that_announced_its_world_is_judged(monkeypatch):
    """MPI launches (accelerate's multi-CPU mpirun) announce no WORLD_SIZE: nothing to compare yet."""
    from hybrid_ds.engine import launcher

    asked = launcher.LaunchRequest(processes=4, machines=2, deepspeed=False, multinode_launcher="pdsh",
                                   hostfile=None, pid=42)
    monkeypatch.setattr(launcher, "accelerate_request", lambda: asked)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher.launched_world_problem(1) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "asked for 4 processes" in launcher.launched_world_problem(2)

