"""Non-finite losses: a step whose loss is NaN/inf had its update skipped by the engine
(:meth:`hybrid_ds.engine.train_engine.TrainEngine.step`, DeepSpeed's own overflow check); count them and
stop after MAX_NAN_STEPS in a row, pointing at the last checkpoint."""

from __future__ import annotations

import math

from hybrid_ds.algorithms.registry import Phase


class NonFiniteLossError(RuntimeError):
    """MAX_NAN_STEPS non-finite losses in a row."""


def check_finite(run, phase: Phase, metrics: dict) -> bool:
    """Count a non-finite loss of ``phase``'s step; raise after MAX_NAN_STEPS in a row.
    Returns whether the step's losses were finite."""
    bad = [k for k in phase.loss_keys if k in metrics and not math.isfinite(float(metrics[k]))]
    c = run.counters
    if not bad:
        c.nan_streak = 0
        return True
    c.nan_streak += 1
    c.nonfinite_total += 1
    metrics["faults/nonfinite_total"] = float(c.nonfinite_total)
    step = getattr(c, phase.counter)
    what = f"{'SFT step' if phase.name == 'sft' else phase.name.upper() + ' update'} {step}"
    limit = run.cfg.run.max_nan_steps
    if run.dist.is_main:
        print(f"[hybrid_ds] non-finite {', '.join(bad)} at {what}: update skipped ({c.nan_streak} in a row, "
              f"MAX_NAN_STEPS={limit})", flush=True)
    if c.nan_streak >= limit:
        run.logger.log(step, phase.name, metrics)  # the step that stops the run is logged too
        last = run.last_checkpoint
        raise NonFiniteLossError(
            f"stopped: {c.nan_streak} non-finite losses in a row (MAX_NAN_STEPS={limit}), the last at {what} "
            f"({', '.join(bad)}). The weights are unchanged since the last finite step; lower the learning rate "
            f"or check the data, then resume from the last checkpoint "
            f"({last or 'none written yet'}).")
    return False
