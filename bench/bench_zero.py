"""ZeRO-3 against ZeRO-2 on the peers' work unit: rollout time on 2 processes, model state per rank at 1/2/4.

    python bench/bench_zero.py [--rounds 3] [--cycles 11] [--out bench/results]

Both go through ``bench/bench_hybrid.py`` (``accelerate launch`` with launch/zero2.yaml or zero3.yaml, the
path a user takes). Generation: the median ``time/rollout_s`` of a 2-process run under each stage,
alternating stages over ``--rounds`` rounds, OMP threads = cores / processes; under ZeRO-3 the policy's
partitions are gathered once per rollout (``dist.generation_model``: one all-gather), not per token. Memory: the parameters and the optimizer's state,
master weights and gradient buffers each rank holds (``mem/params_mb`` + ``mem/optim_mb``,
``dist.model_state_bytes``) under ZeRO-3 at 1, 2 and 4 processes, against the 1-process total / N.
Prints a Markdown table and writes ``zero.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(nproc: int, zero: int, cycles: int) -> dict:
    threads = max(1, (os.cpu_count() or 2) // nproc)  # one core each: oversubscribed OpenMP threads spin
    cmd = [sys.executable, os.path.join(REPO, "bench", "bench_hybrid.py"), "--nproc", str(nproc), "--zero", str(zero),
           "--cycles", str(cycles), "--threads", str(threads)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=11)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args()
    gen: dict[int, list[float]] = {2: [], 3: []}
    for r in range(args.rounds):
        for zero in (2, 3):  # alternating, so drift hits both alike
            rec = bench(2, zero, args.cycles)
            gen[zero].append(rec["median_s"]["rollout"])
            print(f"round {r + 1}/{args.rounds} ZeRO-{zero}, 2 processes: rollout {gen[zero][-1]:.3f} s", flush=True)
    mem = {}
    for n in (1, 2, 4):
        ms = bench(n, 3, 3)["model_state_mb"]
        mem[n] = {rank: ms["params"][rank] + ms["optimizer"][rank] for rank in ms["params"]}
    total = mem[1]["rank0"]
    med = {z: statistics.median(v) for z, v in gen.items()}
    print("\n| 2 processes | rollout s (median) | min-max |\n|---|---|---|")
    for z in (2, 3):
        print(f"| ZeRO-{z} | {med[z]:.3f} | {min(gen[z]):.3f}-{max(gen[z]):.3f} |")
    print(f"\nZeRO-3 / ZeRO-2 generation time: {med[3] / med[2]:.2f}x")
    print("\n| ZeRO-3 processes | params + optimizer MB per rank | total / N | worst rank / (total / N) |\n|---|---|---|---|")
    for n, ranks in mem.items():
        worst = max(ranks.values())
        print(f"| {n} | {', '.join(f'{v:.1f}' for v in ranks.values())} | {total / n:.1f} | {worst / (total / n):.3f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "zero.json"), "w") as f:
        json.dump({"rollout_s": gen, "ratio": med[3] / med[2], "model_state_mb": mem}, f, indent=1)


if __name__ == "__main__":
    main()
