"""Experiment trackers (REPORT_TO) through Accelerate's tracker API, on the main rank only.

:func:`tracker_objects` gives ``init_dist`` the tracker objects it passes to
``Accelerator(log_with=...)``: Accelerate's own classes, built here rather than named, so each writes
where this project keeps things (TensorBoard to ``OUTPUT_DIR/tensorboard``, where resume purges it;
W&B to ``WANDB_DIR`` or OUTPUT_DIR; MLflow to ``MLFLOW_TRACKING_URI``) and the run is named after
OUTPUT_DIR. :class:`Trackers` is what the metrics logger sees: ``init_trackers`` with the resolved
config, one call per logged record, a table of samples, and ``end_training`` at shutdown
(``Dist.shutdown``). Accelerate makes and calls the trackers on the main process only.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def tracker_objects(names: list[str], output_dir: str, project: str) -> Optional[list]:
    """Accelerate tracker objects for the names of REPORT_TO (validated, installed), or None for none."""
    if not names:
        return None
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    run_name = os.path.basename(os.path.normpath(output_dir)) or "run"
    made = {"tensorboard": lambda: TensorBoardTracker("tensorboard", output_dir),
            "wandb": lambda: WandBTracker(project, name=run_name, dir=os.environ.get("WANDB_DIR", output_dir)),
            "mlflow": lambda: MLflowTracker(project, run_name=run_name)}
    return [made[n]() for n in names]


def end_trackers(accelerator) -> None:
    """Finish the trackers with Accelerate's ``end_training`` (which also destroys the default process
    group, so ``Dist.shutdown`` calls it after the DeepSpeed engines are gone); idempotent."""
    if accelerator is not None and accelerator.trackers:
        accelerator.end_training()
        accelerator.trackers.clear()


def _param(v: Any) -> Any:
    """A config value as a hyperparameter every tracker takes (TensorBoard's hparams refuse lists)."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)


class Trackers:
    """The run's trackers as the metrics logger uses them (no-ops off the main rank or with none)."""

    def __init__(self, accelerator, project: str, config: dict):
        self.acc = accelerator if accelerator is not None and accelerator.log_with else None
        if self.acc is not None:
            os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner would interleave with the progress bar
            self.acc.init_trackers(project, config={k: _param(v) for k, v in config.items()})

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.acc.trackers] if self.acc is not None else []

    def log(self, values: dict[str, float], step: int, phase: str) -> None:
        """One record of ``phase`` at its own ``step`` (finite values only). TensorBoard and MLflow keep
        each metric's history against its phase's step; W&B's single step must only grow, so W&B gets
        its own count and the phase's step as ``<phase>/step``."""
        if self.acc is None:
            return
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        for t in self.acc.trackers:
            if t.name == "wandb":
                t.log({**finite, f"{phase}/step": step})
            else:
                t.log(finite, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table: TensorBoard text (markdown), a W&B table; MLflow keeps scalars only."""
        if self.acc is None:
            return
        for t in self.acc.trackers:
            if t.name == "wandb":
                t.log_table(name, columns=columns, data=rows)
            elif t.name == "tensorboard":
                t.log({name: markdown_table(columns, rows)}, step=step)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """``rows`` under ``columns`` as a markdown table (TensorBoard renders text as markdown)."""
    def cell(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])
