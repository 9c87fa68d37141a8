"""hybrid_ds on the peers' fixed work unit, through its real entry point; prints one JSON line.

The work unit (``../shared/bench-peers``): bench-small GPT-2 (4 layers, 256 wide, vocab 4096), 512
checkable items; one cycle = 1 SFT step (batch 8, AdamW 5e-5) + 1 PPO update (8 prompts, exactly 32
new tokens, top_p 0.9 / temperature 0.7 / top_k 50 / no-repeat 3 / repetition 1.15, word-F1 reward,
4 PPO epochs, minibatch 8), 1 process, fp32, OMP_NUM_THREADS=2.

    python bench/bench_hybrid.py [--work peer-work/unit] [--cycles 21] [--launcher accelerate|python]
        [--bf16] [--nproc 1] [--zero 2] [KEY=VALUE ...]

``--launcher accelerate`` (default) runs ``accelerate launch --config_file launch/zeroN.yaml``,
DeepSpeed included, as a user would; ``python`` runs ``python -m hybrid_ds.train`` (no DeepSpeed).
The first cycle is a warm-up and is not timed. Any other model/data/lengths: KEY=VALUE overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), "shared", "bench-peers")


def work_unit(path: str) -> str:
    if not os.path.isfile(os.path.join(path, "data.json")):
        subprocess.run([sys.executable, os.path.join(PEERS, "make_work.py"), path], check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    return path


def config(work: str, out: str, cycles: int, bf16: bool) -> dict:
    return {"MODE": "hybrid", "MODEL": os.path.join(work, "bench-small"), "TRAIN_FILE": os.path.join(work, "data.json"),
            "OUTPUT_DIR": out, "SEED": 0, "MAX_STEPS": cycles, "CYCLE_SFT_STEPS": 1, "CYCLE_PPO_UPDATES": 1,
            "SFT_BATCH": 8, "LR_SFT": 5e-5, "PPO_BATCH": 8, "PPO_MINI": 8, "PPO_EPOCHS": 4, "LR_PPO": 1e-5,
            "SCHEDULER": "constant", "WEIGHT_DECAY": 0.0, "TOP_P": 0.9, "TEMPERATURE": 0.7, "TOP_K": 50,
            "NO_REPEAT_NGRAM_SIZE": 3, "REPETITION_PENALTY": 1.15, "MAX_NEW_TOKENS": 32, "MIN_NEW_TOKENS": 32,
            "MAXSEQ": 256, "REWARD": {"type": "word_f1"}, "BF16": bf16, "CLEANSE": False}


def run(args, overrides) -> dict:
    work = work_unit(args.work)
    out = tempfile.mkdtemp(prefix="hybrid-bench-")
    cfg_path = os.path.join(out, "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(config(work, os.path.join(out, "run"), args.cycles, args.bf16), f)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.launcher == "python":
        cmd = [sys.executable, "-m", "hybrid_ds.train", cfg_path]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(REPO, "launch", f"zero{args.zero}.yaml"), "--num_processes", str(args.nproc),
               "-m", "hybrid_ds.train", cfg_path]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + list(overrides), cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"hybrid_ds failed ({p.returncode}):\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    ppo = [r for r in rows if r["phase"] == "ppo"]
    sft = [r for r in rows if r["phase"] == "sft"]
    cycle_s = [b["time"] - a["time"] for a, b in zip(ppo, ppo[1:])]  # cycle 0 (warm-up) excluded
    med = statistics.median
    phases = {k[5:-2]: med(r[k] for r in ppo[1:]) for k in ppo[-1] if k.startswith("time/") and k.endswith("_s")}
    if sft:  # MODE=ppo (e.g. the GRPO row of run_vs_peers.py) has no SFT step
        phases["sft"] = med(r["time/sft_s"] for r in sft[1:])
    gen_tokens = med(r["ppo/response_len"] for r in ppo[1:]) * 8
    return {"bench": "hybrid_ds", "launcher": args.launcher, "nproc": args.nproc, "zero": args.zero,
            "bf16": args.bf16, "cycles_timed": len(cycle_s), "cycles_per_s": 1.0 / med(cycle_s),
            "cycle_s_mean": statistics.mean(cycle_s),
            "cycle_s_min_max": [min(cycle_s), max(cycle_s)], "ppo_samples_per_s": 8.0 / med(cycle_s),
            "sft_steps_per_s": 1.0 / phases["sft"] if sft else None, "gen_tokens_per_s": gen_tokens / phases["rollout"],
            "median_s": phases, "process_wall_s": wall,
            "peak_rss_mb": per_rank(ppo[-1], "mem/peak_rss_mb/"),
            "model_state_mb": {"params": per_rank(ppo[-1], "mem/params_mb/"),
                               "optimizer": per_rank(ppo[-1], "mem/optim_mb/"),
                               "buffers": per_rank(ppo[-1], "mem/buffers_mb/")}}


def per_rank(row: dict, prefix: str) -> dict:
    return {k.rsplit("/", 1)[1]: v for k, v in row.items() if k.startswith(prefix)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(REPO, "peer-work", "unit"))
    ap.add_argument("--cycles", type=int, default=21)
    ap.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    args, overrides = ap.parse_known_args()
    print(json.dumps(run(args, overrides)))


if __name__ == "__main__":
    main()
