"""hybrid_ds and its peers on the same work unit, in the same run: alternating rounds, medians, ratios.

    python bench/run_vs_peers.py [--rounds 3] [--cycles 21] [--bf16-too] [--only cycle|grpo] [--threads 2]
        [--out bench/results]
    python bench/run_vs_peers.py --matrix [--rows SUBSTR] [--plain-too] [--rounds 3] [--cycles 4] [--threads 2]
        [--out bench/results]

Peers (from ``../shared/bench-peers``): the original loop on TRL 0.11.4 (per-prompt generation),
the same with batched generation, and the bare HF-generate floor; all fixed 32 new tokens,
1 process, fp32, OMP_NUM_THREADS=2 (``--threads``). TRL 0.11.4 is installed side by side into
``peer-work/trl0114`` on first use (``pip install --no-deps --target``), ``tyro`` (which it
imports) into ``peer-work/tyro`` when the interpreter lacks it; the venv is left alone.

The GRPO pair: hybrid_ds with ADVANTAGE=grpo against TRL 1.x's GRPOTrainer (``trl_grpo_bench.py``),
8 completions per step (2 prompts x 4), one optimizer step per step, KL beta 0.04 in the loss
(bench/README.md says what is equal and what differs). ``--matrix`` runs the rows of
``bench/matrix.py`` instead: each shape x length x precision against the floor and the original loop
(``--plain-too``: and hybrid_ds launched as ``python -m hybrid_ds.train``, without DeepSpeed).
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
TYRO = os.path.join(REPO, "peer-work", "tyro")

# hybrid_ds's GRPO as TRL 1.x's GRPOTrainer runs it with trl_grpo_bench.py's settings: 8 completions per
# step = 2 prompts x 4, the data in file order, one PPO epoch of one minibatch (one optimizer step),
# the k3 KL to the reference in the loss at a fixed beta of 0.04, each group's mean and std.
GRPO_K = 4
GRPO = ["MODE=ppo", "ADVANTAGE=grpo", f"NUM_GENERATIONS={GRPO_K}", f"PPO_BATCH={8 // GRPO_K}",
        f"PPO_MINI={8 // GRPO_K}", "PPO_EPOCHS=1", "KL_IN=loss", "INIT_KL_COEF=0.04", "ADAPTIVE_KL=false",
        "GROUP_STD=true", "LOSS_AGG=token_mean", "SHUFFLE=false"]


def cycles_per_s(rec: dict) -> float:
    """Cycles (GRPO: optimizer steps) per second, from each script's median where it reports one."""
    if rec["bench"] == "floor":
        return 1.0 / rec["floor_cycle_s (sft + trl011_equiv)"]
    if rec["bench"] == "trl_grpo":
        return 1.0 / rec["median_step_s"]
    return rec["cycles_per_s"]


def run_json(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith('{"bench"')))


def round_robin(jobs: dict, rounds: int, save: str) -> dict[str, list[dict]]:
    """Every job once per round, in order, ``rounds`` times: drift on the shared machine hits all alike.
    The records so far are rewritten to ``save`` (JSON) after each job, so a stopped run keeps them."""
    results: dict[str, list[dict]] = {k: [] for k in jobs}
    for r in range(rounds):
        for name, (cmd, e) in jobs.items():
            try:
                rec = run_json(cmd, e)
            except RuntimeError as err:  # one entry failing leaves the others' rounds standing
                print(f"round {r + 1}/{rounds} {name}: FAILED\n{err}", flush=True)
                continue
            results[name].append(rec)
            print(f"round {r + 1}/{rounds} {name}: {cycles_per_s(rec):.3f}/s", flush=True)
            with open(save, "w") as f:
                json.dump(results, f, indent=1)
    return results


def medians(results: dict[str, list[dict]]) -> dict[str, float]:
    """Median rate per entry over its rounds; an entry with no record yet (a stopped run) is left out."""
    return {k: statistics.median(cycles_per_s(x) for x in v) for k, v in results.items() if v}


def setup(work: str, threads: int = 2) -> tuple[dict, dict]:
    """TRL 0.11.4 (and tyro) beside the venv's TRL, the work unit; the peers' environment and TRL 0.11's."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PEER_WORK=work)
    if not os.path.isfile(os.path.join(TRL011, "trl", "__init__.py")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", TRL011, "trl==0.11.4"],
                       check=True)
    path = [TRL011]
    if subprocess.run([sys.executable, "-c", "import tyro"], capture_output=True).returncode:
        if not os.path.isdir(os.path.join(TYRO, "tyro")):
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", TYRO, "tyro"], check=True)
        path.append(TYRO)
    subprocess.run([sys.executable, os.path.join(PEERS, "make_work.py"), work], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return env, dict(env, PYTHONPATH=os.pathsep.join(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=None, help="per entry, the first untimed (default 21; matrix 4)")
    ap.add_argument("--bf16-too", action="store_true", help="also run hybrid_ds in bf16")
    ap.add_argument("--only", choices=("cycle", "grpo"), default=None,
                    help="only the hybrid-cycle entries, or only the GRPO pair (default: both)")
    ap.add_argument("--matrix", action="store_true", help="the shape x length x precision matrix (bench/matrix.py)")
    ap.add_argument("--rows", default="", help="matrix: only the rows whose name contains this (e.g. gpt2-8x512); "
                    "records then go to matrix_<rows>.json, beside the whole matrix's")
    ap.add_argument("--plain-too", action="store_true",
                    help="matrix: also run hybrid_ds as `python -m hybrid_ds.train` (1 process, no DeepSpeed)")
    ap.add_argument("--threads", type=int, default=2,
                    help="OMP_NUM_THREADS of every entry (the unit's 2; 1 when the machine is oversubscribed)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--table", default="", help="only print the tables of saved records (a results JSON)")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            results = json.load(f)
        return print(matrix_table(results) if any(" | " in k for k in results) else report(results))
    work = os.path.join(REPO, "peer-work", "unit")
    env, trl_env = setup(work, args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.matrix:
        return run_matrix(args, work, env, trl_env)
    cycles = args.cycles or 21
    py, n = sys.executable, str(cycles - 1)
    ours = [py, "bench/bench_hybrid.py", "--threads", str(args.threads), "--cycles", str(cycles)]
    jobs = {}
    if args.only != "grpo":
        jobs = {
            "hybrid_ds fp32": (ours, env),
            "original loop (TRL 0.11, per-prompt gen)": (
                [py, os.path.join(PEERS, "seed_trl011_hybrid.py"), "--cycles", n, "--gen", "per_prompt", "--fixed-len"],
                trl_env),
            "TRL 0.11, batched gen": (
                [py, os.path.join(PEERS, "seed_trl011_hybrid.py"), "--cycles", n, "--gen", "batched", "--fixed-len"],
                trl_env),
            "floor (HF generate + plain torch)": ([py, os.path.join(PEERS, "floor_bench.py"), "--iters", n], env),
        }
        if args.bf16_too:
            jobs["hybrid_ds bf16"] = (ours + ["--bf16"], env)
    if args.only != "cycle":
        jobs["hybrid_ds GRPO fp32"] = (ours + GRPO, env)
        jobs["TRL 1.16 GRPO fp32"] = ([py, os.path.join(PEERS, "trl_grpo_bench.py"), "--steps", n, "--fixed-len",
                                       "--num-generations", str(GRPO_K), "--beta", "0.04"], env)
    suffix = f"_{args.only}" if args.only else ""
    results = round_robin(jobs, args.rounds, os.path.join(args.out, f"vs_peers{suffix}.json"))
    print(report(results))


def report(results: dict[str, list[dict]]) -> str:
    """The hybrid-cycle table (against hybrid_ds fp32) and the GRPO table, for the entries present."""
    base, lines = medians(results), []
    if "hybrid_ds fp32" in base:
        ours = base["hybrid_ds fp32"]
        lines.append("\n| configuration | cycles/s median | min-max | hybrid_ds fp32 / this |\n|---|---|---|---|")
        for k in base:
            if "GRPO" not in k:
                c = [cycles_per_s(x) for x in results[k]]
                lines.append(f"| {k} | {base[k]:.3f} | {min(c):.3f}-{max(c):.3f} | {ours / base[k]:.2f}x |")
        hd = results["hybrid_ds fp32"][-1]["median_s"]
        lines.append("\nhybrid_ds fp32 seconds per cycle, by phase (last round): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in hd.items()))
    if "hybrid_ds GRPO fp32" in base and "TRL 1.16 GRPO fp32" in base:
        lines.append(grpo_table(results))
    return "\n".join(lines)


def grpo_table(results: dict[str, list[dict]]) -> str:
    """The GRPO pair: steps/s and samples/s medians, hybrid_ds / TRL, and each one's split of a step."""
    base, ours = medians(results), "hybrid_ds GRPO fp32"
    # the mean-based rate as well (all timed steps' total over their count): TRL's script reports both
    mean = {k: statistics.median(1 / x["cycle_s_mean"] if "cycle_s_mean" in x else x["steps_per_s"]
                                 for x in results[k]) for k in (ours, "TRL 1.16 GRPO fp32")}
    lines = ["\n| GRPO, 8 completions per step | steps/s median | min-max | samples/s | hybrid_ds / this "
             "| steps/s from the mean step | hybrid_ds / this |", "|---|---|---|---|---|---|---|"]
    for k in (ours, "TRL 1.16 GRPO fp32"):
        c = [cycles_per_s(x) for x in results[k]]
        lines.append(f"| {k} | {base[k]:.3f} | {min(c):.3f}-{max(c):.3f} | {8 * base[k]:.2f} | "
                     f"{base[ours] / base[k]:.2f}x | {mean[k]:.3f} | {mean[ours] / mean[k]:.2f}x |")
    hd = results[ours][-1]["median_s"]
    trl = results["TRL 1.16 GRPO fp32"][-1]["s_per_step"]
    lines.append("\nseconds per step, by phase (last round): hybrid_ds "
                 + ", ".join(f"{k} {v:.3f}" for k, v in hd.items())
                 + "; TRL " + ", ".join(f"{k} {v:.3f}" for k, v in trl.items()))
    return "\n".join(lines)


def run_matrix(args, work: str, env: dict, trl_env: dict) -> None:
    """Every row of bench/matrix.py against the floor and the original loop, all in one round-robin."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import matrix

    root = os.path.join(REPO, "peer-work", "matrix")
    jobs = {}
    rows = [row for row in matrix.ROWS if args.rows in row.name]
    if not rows:
        sys.exit(f"--rows {args.rows!r} matches no row of bench/matrix.py: {[row.name for row in matrix.ROWS]}")
    for row in rows:
        for label, job in matrix.row_jobs(row, work, root, args.cycles or 4, args.threads, sys.executable, PEERS,
                                          env, trl_env, plain=args.plain_too).items():
            jobs[f"{row.name} | {label}"] = job
    name = f"matrix_{args.rows.replace(' ', '_')}.json" if args.rows else "matrix.json"
    results = round_robin(jobs, args.rounds, os.path.join(args.out, name))
    print(matrix_table(results))


def matrix_table(results: dict[str, list[dict]]) -> str:
    """One line per row: medians of cycles/s, hybrid_ds over floor and over the original loop, peak RSS
    per rank of each; then hybrid_ds's per-phase split of a cycle for every row."""
    import matrix

    base = medians(results)
    lines = ["| row | hybrid_ds cycles/s | floor | original | / floor | / original | peak RSS MB per rank "
             "(hybrid_ds; floor; original) |", "|---|---|---|---|---|---|---|"]
    splits = []
    for row in matrix.ROWS:
        k = {label: f"{row.name} | {label}" for label in ("hybrid_ds", "floor", "original")}
        if not all(results.get(x) for x in k.values()):  # a stopped run: rows not yet measured
            continue
        ours, floor, orig = (base[k[x]] for x in ("hybrid_ds", "floor", "original"))
        rss = "; ".join(", ".join(f"{r} {max(matrix.peak_rss(x)[r] for x in results[k[lab]]):.0f}"
                                  for r in matrix.peak_rss(results[k[lab]][0]))
                        for lab in ("hybrid_ds", "floor", "original"))
        lines.append(f"| {row.name} | {ours:.3f} | {floor:.3f} | {orig:.3f} | {ours / floor:.2f}x | "
                     f"{ours / orig:.2f}x | {rss} |")
        plain = results.get(f"{row.name} | hybrid_ds plain")
        if plain:  # the same run without DeepSpeed (--plain-too), against the same floor and original loop
            mine = base[f"{row.name} | hybrid_ds plain"]
            lines.append(f"| {row.name}, python (no DeepSpeed) | {mine:.3f} | {floor:.3f} | {orig:.3f} | "
                         f"{mine / floor:.2f}x | {mine / orig:.2f}x | "
                         + ", ".join(f"{r} {max(matrix.peak_rss(x)[r] for x in plain):.0f}"
                                     for r in matrix.peak_rss(plain[0])) + "; ; |")
        for lab in ("hybrid_ds", "hybrid_ds plain", "floor", "original"):
            if lab not in k and not plain:
                continue
            split = matrix.phase_split(results[f"{row.name} | {lab}"][-1])
            splits.append(f"| {row.name} | {lab} | " + ", ".join(f"{p} {v:.3f}" for p, v in split.items()) + " |")
    lines += ["\nseconds per cycle by phase (last round):\n", "| row | entry | split |", "|---|---|---|"] + splits
    return "\n".join(lines)


if __name__ == "__main__":
    main()
