"""Summarise a run's metrics.jsonl: ``python -m hybrid_ds.report OUTPUT_DIR [KEY ...] [--plot]``.

Prints, per metric, the mean over consecutive windows of logged steps, so a trend (SFT loss falling,
reward rising, response length collapsing) reads at a glance.
"""

from __future__ import annotations

import argparse
import sys

from hybrid_ds.run.metrics import read_metrics

DEFAULT_KEYS = {"sft": ["sft/loss"],
                "ppo": ["ppo/reward_mean", "objective/kl", "objective/kl_coef", "ppo/response_len",
                        "ppo/eos_frac", "ppo/clipfrac"],
                "dpo": ["dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/margins",
                        "dpo/rewards/accuracies"],
                "rm": ["rm/loss", "rm/accuracy", "rm/margin"]}


def windows(values: list[float], n: int) -> list[float]:
    """Means of ``n`` nearly equal consecutive windows."""
    if not values:
        return []
    n = min(n, len(values))
    bounds = [round(i * len(values) / n) for i in range(n + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]


def summarise(output_dir: str, keys: list[str] | None = None, n: int = 6) -> str:
    lines = []
    for phase, default in DEFAULT_KEYS.items():
        rows = read_metrics(output_dir, phase)
        if not rows:
            continue
        lines.append(f"{phase}: {len(rows)} logged steps (mean per window, first -> last)")
        for k in keys or default:
            vals = [float(r[k]) for r in rows if k in r and isinstance(r[k], (int, float))]
            if vals:
                lines.append(f"  {k:<22} " + "  ".join(f"{v:8.4f}" for v in windows(vals, n)))
        times = [k for k in rows[-1] if k.startswith("time/") and k.endswith("_s")]
        if times:
            lines.append("  seconds per step: " + ", ".join(
                f"{k[5:-2]} {sum(r[k] for r in rows) / len(rows):.3f}" for k in times))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_ds.report", description=__doc__.splitlines()[0])
    p.add_argument("output_dir")
    p.add_argument("keys", nargs="*", help="metric keys (default: loss, reward, KL, length ...)")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--plot", action="store_true", help="also write PNG curves to OUTPUT_DIR/plots/ (matplotlib)")
    a = p.parse_args(argv)
    import os

    if not os.path.isfile(os.path.join(a.output_dir, "metrics.jsonl")):
        print(f"no metrics.jsonl in {a.output_dir!r}: has a run written there yet?", file=sys.stderr)
        return 2
    print(summarise(a.output_dir, a.keys or None, a.windows))
    if a.plot:
        from hybrid_ds.run.plots import plot_run

        paths = plot_run(a.output_dir)
        print(f"plots ({len(paths)}) in {os.path.dirname(paths[0]) if paths else a.output_dir}: "
              + ", ".join(os.path.basename(q) for q in paths))
    return 0

