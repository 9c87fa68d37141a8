"""``python -m hybrid_ds.report OUTPUT_DIR --plot``: a run's curves as PNG files beside its metrics.

One figure per question a run raises: is the reward rising, and which of its components moves it
(``reward.png``); is the policy drifting from the reference and how β answers (``kl.png``); are
responses collapsing (``length.png``: response length and the fraction ending in EOS); is SFT
learning (``sft_loss.png``); where the time goes (``time.png``: seconds per phase of each step).
matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

import os

from hybrid_ds.run.metrics import read_metrics

#: file -> (title, [(phase, metric key, axis)]): axis 0 is the left axis, 1 a right one for other units
FIGURES = {
    "reward.png": ("reward and its components", [("ppo", "ppo/reward_mean", 0), ("eval", "eval/reward_mean", 0)]),
    "kl.png": ("KL to the reference and its coefficient", [("ppo", "objective/kl", 0),
                                                            ("ppo", "objective/kl_coef", 1)]),
    "length.png": ("response length and EOS fraction", [("ppo", "ppo/response_len", 0), ("ppo", "ppo/eos_frac", 1)]),
    "sft_loss.png": ("SFT loss", [("sft", "sft/loss", 0), ("eval", "eval/loss", 0)]),
    "time.png": ("seconds per step, by phase", []),
}


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw(left, title: str, drawn: list, xlabel: str) -> None:
    """Curves ``(phase, key, axis, x, y)`` on ``left`` (and a right axis for axis 1)."""
    right = left.twinx() if any(d[2] for d in drawn) else None
    for i, (phase, key, ax, x, y) in enumerate(drawn):
        (right if ax else left).plot(x, y, label=f"{key} ({phase})" if phase == "eval" else key,
                                     color=f"C{i}", linewidth=1.2)
    left.set_title(title, fontsize=10)
    left.set_xlabel(xlabel, fontsize=8)
    handles = [h for a in (left, right) if a is not None for h in a.get_legend_handles_labels()[0]]
    left.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    left.grid(alpha=0.3)


def plot_run(output_dir: str, dest: str | None = None) -> list[str]:
    """Write the figures that have data to ``dest`` (default OUTPUT_DIR/plots), and ``overview.png``
    with the first four in a 2 x 2 grid; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest = dest or os.path.join(output_dir, "plots")
    os.makedirs(dest, exist_ok=True)
    rows = {p: read_metrics(output_dir, p) for p in ("sft", "ppo", "eval")}
    comps = sorted({k for r in rows["ppo"] for k in r if k.startswith("reward/") and k != "reward/faults"
                    and not k.startswith("reward/faults/")})
    times = {p: sorted({k for r in rows[p] for k in r if k.startswith("time/") and k.endswith("_s")})
             for p in ("sft", "ppo")}
    panels = []
    for name, (title, curves) in FIGURES.items():
        curves = list(curves)
        if name == "reward.png":
            curves += [("ppo", k, 0) for k in comps]
        if name == "time.png":
            curves = [(p, k, 0) for p in times for k in times[p]]
        drawn = [(p, k, ax, *_series(rows[p], k)) for p, k, ax in curves]
        drawn = [d for d in drawn if d[3]]
        if drawn:
            xlabel = ("step (SFT steps, PPO updates)" if name == "time.png" else
                      "SFT step" if name == "sft_loss.png" else "PPO update")
            panels.append((name, title, drawn, xlabel))
    written = []
    for name, title, drawn, xlabel in panels:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
        _draw(ax, title, drawn, xlabel)
        fig.tight_layout()
        written.append(os.path.join(dest, name))
        fig.savefig(written[-1])
        plt.close(fig)
    if panels:
        grid = [p for p in panels if p[0] != "time.png"][:4]
        n_rows = (len(grid) + 1) // 2
        fig, axes = plt.subplots(n_rows, 2, figsize=(9, 3.0 * n_rows), dpi=72, squeeze=False)
        for ax, (_, title, drawn, xlabel) in zip(axes.flat, grid):
            _draw(ax, title, drawn, xlabel)
        for ax in list(axes.flat)[len(grid):]:
            ax.set_visible(False)
        fig.tight_layout()
        written.append(os.path.join(dest, "overview.png"))
        fig.savefig(written[-1])
        plt.close(fig)
    return written
