"""Sample tables (LOG_SAMPLES_EVERY): ``OUTPUT_DIR/samples.jsonl`` and the trackers, main rank only.

Each row of ``samples.jsonl`` is one response: ``update`` (the PPO update that sampled it), ``prompt``,
``response``, ``reward``, ``reward/<component>`` for each REWARD component, ``kl`` and ``length``
(hybrid_ds/algorithms/samples.py builds them from the main rank's share of the batch). The same table
goes to TensorBoard as text and to W&B as a table (hybrid_ds/engine/trackers.py).

A resumed run repeats the updates after its checkpoint: before its first table it drops the rows of
those updates that the interrupted run had written, so no update appears twice.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from hybrid_ds.engine.trackers import Trackers


class SampleLogger:
    def __init__(self, output_dir: str, *, enabled: bool, trackers: Optional[Trackers] = None):
        self.enabled, self.trackers = enabled, trackers
        self.path = os.path.join(output_dir, "samples.jsonl")
        self._rewound = False

    def write(self, update: int, rows: list[dict]) -> None:
        """The table of PPO update ``update``: appended to samples.jsonl and sent to the trackers."""
        if not self.enabled or not rows:
            return
        if not self._rewound:
            drop_rows_from(self.path, update)
            self._rewound = True
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"update": update, **r}) + "\n")
        if self.trackers is not None:
            columns = list(rows[0])
            self.trackers.log_table("samples", columns, [[r.get(c) for c in columns] for r in rows], update)


def drop_rows_from(path: str, update: int) -> int:
    """Remove the rows of updates ``>= update`` from ``path`` (atomically); returns how many went."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("update", 0) < update]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def read_samples(output_dir: str) -> list[dict]:
    """The rows of ``samples.jsonl`` (empty when none were written)."""
    path = os.path.join(output_dir, "samples.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
