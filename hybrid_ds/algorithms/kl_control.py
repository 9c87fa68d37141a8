"""The KL coefficient: fixed, or adapted toward a target KL (Ziegler et al. 2019, arXiv:1909.08593,
section 2.2; docs/ppo.md §8). Plain Python on floats: the caller passes the KL already reduced
across ranks."""

from __future__ import annotations

import math
from typing import Dict, Optional, Union


class FixedKLController:
    """Constant KL coefficient beta; ``update`` is a no-op (same interface as the adaptive one)."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, section 2.2 (also docs/ppo.md §8).

    ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``, where ``KL`` is
    the measured KL of the last batch (per sequence: per-token KL summed over the response, then
    averaged over sequences, as there) and ``n_steps`` the number of sequences it contained.
    Target and horizon come from the constructor (the config); only ``value`` is checkpointed.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        if init_beta < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {init_beta}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from a host-side float KL (read it once per batch); returns the new beta."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            return self.value  # a NaN/inf measurement must not poison beta
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    beta: float,
    target_kl: Optional[float] = None,
    horizon: Optional[float] = None,
    adaptive: bool = True,
) -> Union[AdaptiveKLController, FixedKLController]:
    """An :class:`AdaptiveKLController` (``adaptive=True``; needs ``target_kl`` and ``horizon``)
    or a :class:`FixedKLController`."""
    if not adaptive:
        return FixedKLController(beta)
    if target_kl is None or horizon is None:
        raise ValueError(
            f"an adaptive KL controller needs target_kl and horizon (got {target_kl}, {horizon})"
        )
    return AdaptiveKLController(beta, target_kl, horizon)
