"""Metrics: reduced across ranks by the caller, written by the main process only.

One JSON object per logged step in ``OUTPUT_DIR/metrics.jsonl`` (keys namespaced: ``sft/loss``,
``ppo/clipfrac``, ``objective/kl`` ...), the same scalars to REPORT_TO's trackers (TensorBoard events
under ``OUTPUT_DIR/tensorboard/`` by default; hybrid_ds/engine/trackers.py), and progress bars.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from hybrid_ds.engine.trackers import Trackers


class MetricsLogger:
    def __init__(self, output_dir: str, *, enabled: bool, total: int, desc: str = "train",
                 trackers: Optional[Trackers] = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.trackers = trackers  # REPORT_TO (TensorBoard by default), hybrid_ds/engine/trackers.py
        self.last: dict[str, dict[str, float]] = {}  # phase -> its last logged metrics (every rank: reduced)
        self._bar = None
        self._default_bar = (desc, total)  # the bar advance() opens when no progress() bar was opened
        self._t0 = time.time()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def progress(self, desc: str, total: int, initial: int = 0) -> None:
        """Show a new progress bar (main rank) in place of the current one: the SFT warm-up has its own,
        then the run's cycles (or steps). Shown at once, so a run is never silent while it trains."""
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def log(self, step: int, phase: str, metrics: dict[str, float]) -> None:
        """Write one record; ``metrics`` must already be reduced across ranks."""
        self.last[phase] = {k: float(v) for k, v in metrics.items()}
        if not self.enabled:
            return
        record = {"step": step, "phase": phase, "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
        self._file.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(metrics, step, phase)
        if self._bar is not None:
            shown = {k.split("/", 1)[-1]: f"{float(v):.4g}" for k, v in metrics.items()
                     if k in ("sft/loss", "ppo/reward_mean", "objective/kl", "ppo/response_len")}
            self._bar.set_postfix(shown, refresh=False)

    def reopen(self) -> None:
        """Append to ``metrics.jsonl`` as it is on disk now (after it was rewritten and replaced)."""
        if self.enabled:
            self._file.close()
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def advance(self, n: int = 1) -> None:
        if self.enabled and self._bar is None:
            self.progress(*self._default_bar)
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()


def read_metrics(output_dir: str, phase: Optional[str] = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (optionally one phase's)."""
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if phase is None or r["phase"] == phase]
