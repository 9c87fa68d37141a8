"""hybrid_ds and its peers on the same work unit, in the same run: alternating rounds, medians, ratios.

    python bench/run_vs_peers.py [--rounds 3] [--cycles 21] [--bf16-too] [--out bench/results]

Peers (from ``../shared/bench-peers``): the original loop on TRL 0.11.4 (per-prompt generation),
the same with batched generation, and the bare HF-generate floor; all fixed 32 new tokens,
1 process, fp32, OMP_NUM_THREADS=2. TRL 0.11.4 is installed side by side into
``peer-work/trl0114`` on first use (``pip install --no-deps --target``; ``tyro`` must be importable).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), "shared", "bench-peers")
TRL011 = os.path.join(REPO, "peer-work", "trl0114")


def cycles_per_s(rec: dict) -> float:
    if rec["bench"] == "floor":
        return 1.0 / rec["floor_cycle_s (sft + trl011_equiv)"]
    return rec["cycles_per_s"]


def run_json(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith('{"bench"')))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=21)
    ap.add_argument("--bf16-too", action="store_true", help="also run hybrid_ds in bf16")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args()
    work = os.path.join(REPO, "peer-work", "unit")
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PEER_WORK=work)
    if not os.path.isfile(os.path.join(TRL011, "trl", "__init__.py")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", TRL011, "trl==0.11.4"],
                       check=True)
    subprocess.run([sys.executable, os.path.join(PEERS, "make_work.py"), work], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    py, n = sys.executable, str(args.cycles - 1)
    trl_env = dict(env, PYTHONPATH=TRL011)
    jobs = {
        "hybrid_ds fp32": ([py, "bench/bench_hybrid.py", "--cycles", str(args.cycles)], env),
        "original loop (TRL 0.11, per-prompt gen)": (
            [py, os.path.join(PEERS, "seed_trl011_hybrid.py"), "--cycles", n, "--gen", "per_prompt", "--fixed-len"],
            trl_env),
        "TRL 0.11, batched gen": (
            [py, os.path.join(PEERS, "seed_trl011_hybrid.py"), "--cycles", n, "--gen", "batched", "--fixed-len"],
            trl_env),
        "floor (HF generate + plain torch)": ([py, os.path.join(PEERS, "floor_bench.py"), "--iters", n], env),
    }
    if args.bf16_too:
        jobs["hybrid_ds bf16"] = ([py, "bench/bench_hybrid.py", "--cycles", str(args.cycles), "--bf16"], env)
    results: dict[str, list[dict]] = {k: [] for k in jobs}
    os.makedirs(args.out, exist_ok=True)
    for r in range(args.rounds):
        for name, (cmd, e) in jobs.items():  # round-robin: drift hits every entry alike
            rec = run_json(cmd, e)
            results[name].append(rec)
            print(f"round {r + 1}/{args.rounds} {name}: {cycles_per_s(rec):.3f} cycles/s", flush=True)
    with open(os.path.join(args.out, "vs_peers.json"), "w") as f:
        json.dump(results, f, indent=1)
    base = {k: statistics.median(cycles_per_s(x) for x in v) for k, v in results.items()}
    ours = base["hybrid_ds fp32"]
    print("\n| configuration | cycles/s median | min-max | hybrid_ds fp32 / this |\n|---|---|---|---|")
    for k, v in results.items():
        c = [cycles_per_s(x) for x in v]
        print(f"| {k} | {base[k]:.3f} | {min(c):.3f}-{max(c):.3f} | {ours / base[k]:.2f}x |")
    hd = results["hybrid_ds fp32"][-1]["median_s"]
    print("\nhybrid_ds fp32 seconds per cycle, by phase (last round): "
          + ", ".join(f"{k} {v:.3f}" for k, v in hd.items()))


if __name__ == "__main__":
    main()
