"""Composite rewards (``weighted_sum``, with fixed or learned weights) and post-processors (``clip``,
``scale``, ``ema_normalize``).

A post-processor maps a batch of scores to a batch of scores and may keep state (the running
statistics of ``ema_normalize``), exposed through ``state_dict``/``load_state_dict``, as are the
learned weights of ``LearnedWeightedSum``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from .base import FaultPolicy, Reward


def numbered(kinds: Sequence[str]) -> list[str]:
    """Names for a sum's components: each kind, numbered from 1 where a kind repeats (length_1, length_2)."""
    return [k if kinds.count(k) == 1 else f"{k}_{kinds[:i].count(k) + 1}" for i, k in enumerate(kinds)]


class WeightedSum(Reward):
    """``sum_k w_k r_k / sum_k w_k`` over components ``(weight, reward)``; zero weights are skipped."""

    def __init__(self, components: Sequence[tuple[float, Reward]], faults: FaultPolicy,
                 names: Sequence[str] | None = None):
        super().__init__("weighted_sum", faults)
        self.parts = list(components)
        self.total_weight = sum(w for w, _ in self.parts)
        # each component's name in metrics and sample tables (build.component_names: its spec's type,
        # numbered when a type repeats); the reward's kind where no spec names it
        kinds = [r.kind for _, r in self.parts]
        self.names = list(names) if names is not None else \
            numbered(kinds)
        self._last: dict[str, list[float]] = {}

    def _score(self, responses, targets, prompts, items) -> list[float]:
        total = [0.0] * len(responses)
        self._last = {}
        for name, (weight, reward) in zip(self.names, self.parts):
            if weight == 0:
                continue
            scores = reward.score_batch(responses, targets, prompts, items)
            self._last[name] = scores
            for i, s in enumerate(scores):
                total[i] += weight * s
        return [t / self.total_weight for t in total]

    def components(self) -> dict[str, list[float]]:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"components": [r.state_dict() for _, r in self.parts]}

    def gauges(self, prefix: str = "reward/weight") -> dict[str, float]:
        """Learned weights of nested sums, under ``<prefix>/<component index>``."""
        return {k: v for i, (_, r) in enumerate(self.parts) for k, v in r.gauges(f"{prefix}/{i}").items()}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("components", [])
        if len(states) != len(self.parts):
            raise ValueError(f"weighted_sum has {len(self.parts)} components, state has {len(states)}")
        for (_, reward), sub in zip(self.parts, states):
            reward.load_state_dict(sub)


class Postprocessed(Reward):
    """A reward followed by post-processing steps, applied in order to each batch of scores."""

    def __init__(self, inner: Reward, steps: Sequence, faults: FaultPolicy):
        super().__init__(f"{inner.kind}.postprocess", faults)
        self.inner, self.steps = inner, list(steps)

    def _score(self, responses, targets, prompts, items) -> list[float]:
        scores = self.inner.score_batch(responses, targets, prompts, items)
        for step in self.steps:  # runs on empty batches too: ema_normalize's all-reduce must
            scores = step(scores)
        return scores

    def components(self) -> dict[str, list[float]]:
        return self.inner.components()  # before post-processing, as each component scored

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "postprocess": [s.state_dict() for s in self.steps]}

    def gauges(self, prefix: str = "reward/weight") -> dict[str, float]:
        return self.inner.gauges(prefix)

    def load_state_dict(self, state: dict) -> None:
        steps = state.get("postprocess", [])
        if len(steps) != len(self.steps):
            raise ValueError(f"{self.kind} has {len(self.steps)} post-processors, state has {len(steps)}")
        self.inner.load_state_dict(state.get("inner", {}))
        for step, sub in zip(self.steps, steps):
            step.load_state_dict(sub)


class Stateless:
    """Mixin for post-processors without state."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Clip(Stateless):
    """Clamp scores to ``[min, max]`` (either bound may be None)."""

    def __init__(self, min: float | None = None, max: float | None = None):
        self.low, self.high = min, max

    def __call__(self, scores: list[float]) -> list[float]:
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        return [min(max(s, low), high) for s in scores]


class Scale(Stateless):
    """Affine map ``s * mul + add``."""

    def __init__(self, mul: float = 1.0, add: float = 0.0):
        self.mul, self.add = mul, add

    def __call__(self, scores: list[float]) -> list[float]:
        return [s * self.mul + self.add for s in scores]


def ema_update(mean: float, var: float, batch_mean: float, batch_var: float,
               decay: float) -> tuple[float, float]:
    """Exponentially weighted moments: the mixture of the old distribution (weight ``decay``) and
    the batch (weight ``1 - decay``): ``mean' = d m + (1-d) m_b``,
    ``var' = d v + (1-d) v_b + d (1-d) (m_b - m)^2`` (law of total variance)."""
    new_mean = decay * mean + (1 - decay) * batch_mean
    new_var = decay * var + (1 - decay) * batch_var + decay * (1 - decay) * (batch_mean - mean) ** 2
    return new_mean, new_var


def batch_moments(count: float, shifted_sum: float, shifted_sq: float, shift: float) -> tuple[float, float]:
    """Mean and (population) variance from ``count``, ``sum(x - shift)`` and ``sum((x - shift)^2)``."""
    mean_shifted = shifted_sum / count
    return shift + mean_shifted, max(shifted_sq / count - mean_shifted ** 2, 0.0)


class EmaNormalize:
    """Normalise scores with running moments: ``(x - mean) / sqrt(var + eps)``.

    Each batch first updates the moments (``ema_update``; the first batch initialises them), then
    is normalised with the updated moments. With ``all_reduce_sum`` the batch's count, sum and sum
    of squares (shifted by the current mean for precision) are summed across data-parallel ranks,
    so every rank holds identical statistics; every rank must then call it once per step, with an
    empty batch if it has no sample."""

    def __init__(self, decay: float = 0.99, eps: float = 1e-8,
                 all_reduce_sum: Callable | None = None):
        self.decay, self.eps, self.all_reduce_sum = decay, eps, all_reduce_sum
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def __call__(self, scores: list[float]) -> list[float]:
        shift = self.mean if self.count else 0.0
        sums = [float(len(scores)), sum(s - shift for s in scores), sum((s - shift) ** 2 for s in scores)]
        count, shifted_sum, shifted_sq = self._reduce(sums)
        if count > 0:
            batch_mean, batch_var = batch_moments(count, shifted_sum, shifted_sq, shift)
            if self.count == 0:
                self.mean, self.var = batch_mean, batch_var
            else:
                self.mean, self.var = ema_update(self.mean, self.var, batch_mean, batch_var, self.decay)
            self.count += int(round(count))
        scale = math.sqrt(self.var + self.eps)
        return [(s - self.mean) / scale for s in scores]

    def _reduce(self, sums: list[float]) -> list[float]:
        if self.all_reduce_sum is None:
            return sums
        import torch

        local = torch.tensor(sums, dtype=torch.float64)
        reduced = self.all_reduce_sum(local)
        return (local if reduced is None else reduced).cpu().tolist()  # None: reduced in place

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def eg_weight_update(weights: Sequence[float], means: Sequence[float], targets: Sequence[float],
                     lr: float, total: float, min_weight: float = 0.0) -> list[float]:
    """One exponentiated-gradient step on mixture weights toward per-component target levels.

    ``w_i' = total * w_i exp(lr (t_i - m_i)) / sum_j w_j exp(lr (t_j - m_j))``: the multiplicative
    update of Kivinen & Warmuth, "Exponentiated Gradient versus Gradient Descent for Linear
    Predictors" (1997), with gradient ``m_i - t_i`` (how far component ``i``'s running mean ``m_i``
    lies above its target ``t_i``), renormalised to the sum ``total``: a component that lags its
    target gains weight, one above it loses weight. Computed in log space, so no factor overflows.
    Then every weight below ``min_weight`` is raised to it and the others are rescaled to keep the
    sum (repeated until none is below; needs ``min_weight * n <= total``). A zero weight without a
    floor stays zero."""
    logs = [math.log(w) + lr * (t - m) if w > 0 else -math.inf for w, t, m in zip(weights, targets, means)]
    top = max(logs)
    raw = [math.exp(a - top) for a in logs]
    fixed = [False] * len(raw)
    while True:
        free = sum(r for r, f in zip(raw, fixed) if not f)
        budget = total - min_weight * sum(fixed)
        new = [min_weight if f else r * budget / free for r, f in zip(raw, fixed)]
        low = [i for i, (w, f) in enumerate(zip(new, fixed)) if not f and w < min_weight]
        if not low:
            return new
        for i in low:
            fixed[i] = True


def reduce_sums(all_reduce_sum: Callable | None, sums: list[float]) -> list[float]:
    """``sums`` summed across ranks by ``all_reduce_sum`` (as a CPU float64 tensor), or as is without it."""
    if all_reduce_sum is None:
        return sums
    import torch

    local = torch.tensor(sums, dtype=torch.float64)
    reduced = all_reduce_sum(local)
    return (local if reduced is None else reduced).cpu().tolist()  # None: reduced in place


class LearnedWeightedSum(WeightedSum):
    """A ``weighted_sum`` whose weights adapt online toward per-component target levels.

    Each batch (every rank must call it once per step, with an empty batch if it has no sample):
    1. every component scores the batch; 2. each component's batch mean, summed across ranks with
    ``all_reduce_sum`` (as ``EmaNormalize`` does), updates its running mean ``m_i``, an EMA over
    batches with ``decay`` (the first batch initialises it); 3. ``eg_weight_update`` moves the
    weights, keeping their initial sum; 4. the batch is combined with the updated weights (the ones
    ``gauges`` then reports). Weights, running means and the batch count are the reward's state."""

    def __init__(self, components: Sequence[tuple[float, Reward]], names: Sequence[str], faults: FaultPolicy,
                 targets: Sequence[float], lr: float, decay: float = 0.9, min_weight: float = 0.0,
                 all_reduce_sum: Callable | None = None):
        super().__init__(components, faults, names)
        self.targets = [float(t) for t in targets]
        self.lr, self.decay, self.min_weight, self.all_reduce_sum = lr, decay, min_weight, all_reduce_sum
        self.weights = [w for w, _ in self.parts]
        self.means, self.count = [0.0] * len(self.parts), 0

    def _score(self, responses, targets, prompts, items) -> list[float]:
        # 1. every component scores (also on an empty batch: nested all-reduces must run on every rank)
        per = [reward.score_batch(responses, targets, prompts, items) for _, reward in self.parts]
        # 2. running means from batch means over all ranks
        count, *sums = reduce_sums(self.all_reduce_sum, [float(len(responses))] + [sum(s) for s in per])
        if count > 0:
            batch = [s / count for s in sums]
            d = 0.0 if self.count == 0 else self.decay
            self.means = [d * m + (1 - d) * b for m, b in zip(self.means, batch)]
            self.count += int(round(count))
            # 3. weights toward the targets
            self.weights = eg_weight_update(self.weights, self.means, self.targets, self.lr,
                                            self.total_weight, self.min_weight)
        # 4. the weighted mean with the updated weights
        return [sum(w * s[i] for w, s in zip(self.weights, per)) / self.total_weight for i in range(len(responses))]

    def gauges(self, prefix: str = "reward/weight") -> dict[str, float]:
        out = {f"{prefix}/{name}": w for name, w in zip(self.names, self.weights)}
        for name, (_, reward) in zip(self.names, self.parts):
            out.update(reward.gauges(f"{prefix}/{name}"))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weights": list(self.weights), "means": list(self.means), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        n = len(self.parts)
        if len(state.get("weights", [])) != n or len(state.get("means", [])) != n:
            raise ValueError(f"weighted_sum with learn_weights has {n} components; the state has "
                             f"weights {state.get('weights')!r} and means {state.get('means')!r}")
        super().load_state_dict(state)
        self.weights = [float(w) for w in state["weights"]]
        self.means, self.count = [float(m) for m in state["means"]], int(state["count"])
