"""Run hybrid_ds through its real entry points in subprocesses (accelerate launch, python -m)."""

import json
import math
import os
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def launch(cfg: dict, tmp_path, *, nproc: int = 1, zero: int = 0, overrides=(), timeout=600, check=True,
           name="cfg", cwd=REPO):
    """Write ``cfg`` and train it. zero=0 and nproc=1: plain ``python -m``; else ``accelerate launch``.
    ``cwd``: the directory the command starts in (the launch yamls must work from any)."""
    path = os.path.join(str(tmp_path), f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    if zero == 0 and nproc == 1:
        cmd = [sys.executable, "-m", "hybrid_ds.train", path, *overrides]
    else:
        yaml = os.path.join(REPO, "launch", f"zero{zero}.yaml")
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", yaml, "--num_processes", str(nproc),
               "--main_process_port", str(free_port()), "-m", "hybrid_ds.train", path, *overrides]
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {' '.join(cmd)}\n--- stdout\n{p.stdout[-3000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p


def forked_runs(runs: dict, tmp_path, timeout=900):
    """Train each ``{name: (config, nproc)}`` of ``runs`` through tests/scripts/forked_runs.py: the entry
    point's ``main`` on ranks forked from one interpreter after its imports (a torchrun-style rendezvous,
    DeepSpeed from each config's ZERO_STAGE), for runs whose point is what trains, not the launcher.
    Returns ``({name: (exit code, seconds)}, the whole log: stdout, then stderr)``."""
    jobs = []
    for name, (cfg, nproc) in runs.items():
        path = os.path.join(str(tmp_path), f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        jobs.append({"name": name, "nproc": nproc, "config": path})
    jobs_path = os.path.join(str(tmp_path), "jobs.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    p = subprocess.run([sys.executable, os.path.join(REPO, "tests", "scripts", "forked_runs.py"), jobs_path],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    done = {}
    for line in p.stdout.splitlines():
        if line.startswith("JOB "):
            _, name, code, seconds = line.split()
            done[name] = (int(code), float(seconds))
    return done, p.stdout + p.stderr


def metrics(output_dir, phase=None):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if phase is None or r["phase"] == phase]


def load_weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def rel_norm_diffs(a: dict, b: dict) -> dict:
    """Per tensor ||a-b|| / ||a||. For GPT-2's fused attention bias only the query and value thirds
    count: the key bias has an identically-zero gradient (softmax is invariant to a per-query shift),
    so Adam turns float round-off into +-lr steps there, whatever the run layout."""
    out = {}
    for k in a:
        x, y = a[k].double(), b[k].double()
        if k.endswith("attn.c_attn.bias"):
            third = x.shape[0] // 3
            x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
        out[k] = float((x - y).norm() / x.norm().clamp(min=1e-12))
    return out


def max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of |a-b|_max / max(|a|_max, tiny)."""
    worst = 0.0
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].double(), b[k].double()
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp(min=1e-12)))
    return worst


def assert_finite_rows(rows, expected: int, phase: str):
    """``rows`` are ``expected`` logged steps of ``phase``, numbered 1.., with every metric finite
    (metrics.jsonl writes a non-finite value as the string "nan"/"inf")."""
    assert [r["step"] for r in rows] == list(range(1, expected + 1)), (phase, [r["step"] for r in rows])
    for r in rows:
        assert r["phase"] == phase
        bad = {k: v for k, v in r.items() if k != "phase" and not (isinstance(v, (int, float)) and math.isfinite(v))}
        assert not bad, (phase, r["step"], bad)
