"""Colocated vs separate reference placement on the same global batch: per-phase seconds, per-rank peak memory.

    python bench/bench_placement.py [--cycles 6] [--zero 2] [--policy 2] [--model builtin:small-gpt2]

Colocated: ``--policy`` processes, each holding the policy/value model and a reference copy.
Separate: ``--policy`` + 1 processes; the reference lives on the last rank, which answers log-prob
requests while the policy ranks score rewards. Same config, same global batch, same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg: dict, nproc: int, zero: int, threads: int) -> dict:
    out = tempfile.mkdtemp(prefix="hybrid-placement-")
    cfg = dict(cfg, OUTPUT_DIR=os.path.join(out, "run"))
    path = os.path.join(out, "cfg.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(REPO, "launch", f"zero{zero}.yaml"), "--num_processes", str(nproc), "-m", "hybrid_ds.train",
           path]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"run failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        ppo = [json.loads(line) for line in f if '"phase": "ppo"' in line][1:]  # first update = warm-up
    phases = {k[5:-2]: statistics.median(r[k] for r in ppo) for k in ppo[0] if k.startswith("time/") and k.endswith("_s")}
    mem = {k.rsplit("/", 1)[1]: v for k, v in ppo[-1].items() if k.startswith("mem/peak_rss_mb/")}
    for rank, mb in re.findall(r"reference rank (\d+): served \d+ requests, peak_rss_mb ([\d.]+)", p.stdout + p.stderr):
        mem[f"rank{rank} (reference)"] = float(mb)
    return {"ppo_update_s": statistics.median(r["perf/ppo_update_s"] for r in ppo), "phases_s": phases,
            "peak_rss_mb": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--policy", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="builtin:small-gpt2")
    a = ap.parse_args()
    cfg = {"MODE": "hybrid", "MODEL": a.model, "TRAIN_FILE": "builtin:demo-tasks", "SEED": 0, "MAX_STEPS": a.cycles,
           "SFT_BATCH": 8 * a.policy, "PPO_BATCH": 8 * a.policy, "PPO_MINI": 8 * a.policy, "PPO_EPOCHS": 2,
           "MAX_NEW_TOKENS": 16, "MIN_NEW_TOKENS": 16, "MAXSEQ": 128, "SCHEDULER": "constant",
           "REWARD": {"type": "word_f1"}}
    result = {"bench": "placement", "zero": a.zero, "policy_ranks": a.policy, "model": a.model,
              "colocated": run(cfg, a.policy, a.zero, a.threads),
              "separate": run(dict(cfg, REF_PLACEMENT="separate", REF_RANKS=1), a.policy + 1, a.zero, a.threads)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
