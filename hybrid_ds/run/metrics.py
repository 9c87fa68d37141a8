"""Metrics: reduced across ranks by the caller, written by the main process only.

One JSON object per logged step in ``OUTPUT_DIR/metrics.jsonl`` (keys namespaced: ``sft/loss``,
``ppo/clipfrac``, ``objective/kl`` ...), the same scalars as TensorBoard events under
``OUTPUT_DIR/tensorboard/``, and a progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional


class MetricsLogger:
    def __init__(self, output_dir: str, *, enabled: bool, total: int, desc: str = "train"):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._t0 = time.time()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except Exception as e:  # tensorboard missing: keep the jsonl, say so once
            print(f"[hybrid_ds] TensorBoard disabled: {e}")
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not enabled)

    def log(self, step: int, phase: str, metrics: dict[str, float]) -> None:
        """Write one record; ``metrics`` must already be reduced across ranks."""
        if not self.enabled:
            return
        record = {"step": step, "phase": phase, "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
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
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        self._file.close()


def read_metrics(output_dir: str, phase: Optional[str] = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (optionally one phase's)."""
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if phase is None or r["phase"] == phase]
