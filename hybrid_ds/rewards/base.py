"""The reward object, leaf rewards, and the runtime fault policy.

A reward scores a batch: ``score_batch(responses, targets, prompts, items) -> list[float]`` and is
callable on one sample: ``reward(response, target, prompt=None, item=None) -> float``. Every node
checks its outputs, so no NaN or inf ever leaves a reward: a bad value is either an error
(``on_error="raise"``) or replaced by the fallback value and counted (``on_error="fallback"``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Sequence

BatchFn = Callable[[Sequence, Sequence, Sequence, Sequence], Sequence[float]]


class RewardError(RuntimeError):
    """A reward failed on one sample; ``kind``, ``index`` and ``response`` say where."""

    def __init__(self, kind: str, index: int, response: Any, cause: BaseException):
        text = response if isinstance(response, str) else repr(response)
        short = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"reward {kind!r} failed on sample {index} (response {short!r}): "
                         f"{type(cause).__name__}: {cause}")
        self.kind, self.index, self.response, self.cause = kind, index, response, cause


class RewardSpecError(ValueError):
    """A reward spec is invalid; ``problems`` lists every message."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid reward spec:\n  " + "\n  ".join(problems))
        self.problems = problems


class FaultPolicy:
    """What to do when a sample's reward raises or is not finite, shared by all nodes of a tree.

    ``mode="raise"``: raise ``RewardError``. ``mode="fallback"``: return ``fallback`` for that
    sample and count it per reward type; ``pop()`` returns and resets the counters."""

    def __init__(self, mode: str = "raise", fallback: float = 0.0):
        self.mode, self.fallback = mode, float(fallback)
        self.total = 0
        self._since_pop: Counter = Counter()

    def handle(self, kind: str, index: int, response: Any, error: BaseException) -> float:
        if self.mode == "raise":
            raise RewardError(kind, index, response, error) from error
        self.total += 1
        self._since_pop["reward/faults"] += 1
        self._since_pop[f"reward/faults/{kind}"] += 1
        return self.fallback

    def note(self, key: str) -> None:
        """Count an event that is not a fault (e.g. a batch retried per sample)."""
        self._since_pop[key] += 1

    def pop(self) -> dict[str, float]:
        stats = {"reward/faults": 0.0, **{k: float(v) for k, v in self._since_pop.items()}}
        self._since_pop.clear()
        return stats


class Reward:
    """Base of every reward node: batch/sample calling convention, output checks, state."""

    def __init__(self, kind: str, faults: FaultPolicy):
        self.kind, self._faults = kind, faults

    def score_batch(self, responses: Sequence[str], targets: Sequence[str],
                    prompts: Sequence[str | None] | None = None,
                    items: Sequence[dict | None] | None = None) -> list[float]:
        """Score a batch; all given lists have the same length, ``prompts``/``items`` may be None."""
        n = len(responses)
        prompts = [None] * n if prompts is None else list(prompts)
        items = [None] * n if items is None else list(items)
        if not len(targets) == len(prompts) == len(items) == n:
            raise ValueError(f"reward {self.kind!r}: batch lengths differ: responses={n}, "
                             f"targets={len(targets)}, prompts={len(prompts)}, items={len(items)}")
        scores = self._score(list(responses), list(targets), prompts, items)
        return [self._finite(i, s, responses[i]) for i, s in enumerate(scores)]

    def __call__(self, response: str, target: str, prompt: str | None = None,
                 item: dict | None = None) -> float:
        return self.score_batch([response], [target], [prompt], [item])[0]

    def _score(self, responses, targets, prompts, items) -> list[float]:
        raise NotImplementedError

    def _finite(self, index: int, score: float, response: Any) -> float:
        if isinstance(score, (int, float)) and math.isfinite(score):
            return float(score)
        return self._faults.handle(self.kind, index, response, ValueError(f"non-finite score {score!r}"))

    def components(self) -> dict[str, list[float]]:
        """The scores each component gave the last batch, by name (a ``weighted_sum``'s parts; a single
        reward has none: its score is the reward)."""
        return {}

    @property
    def fault_count(self) -> int:
        """Samples scored with the fallback value since the reward was built (whole tree)."""
        return self._faults.total

    def pop_stats(self) -> dict[str, float]:
        """Counters since the last call, as metrics: ``reward/faults``, ``reward/faults/<type>``,
        ``reward/batch_retries``."""
        return self._faults.pop()

    def gauges(self, prefix: str = "reward/weight") -> dict[str, float]:
        """Current values of the tree's state worth plotting: the learned weights of every
        ``weighted_sum`` with ``learn_weights``, as ``<prefix>/<component>`` (none by default)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """What a run logs after each scoring step: the counters of ``pop_stats`` (reset by this
        call) and the ``gauges``, e.g. ``reward/weight/<component>``."""
        return {**self.pop_stats(), **self.gauges()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"reward {self.kind!r} is stateless but got state keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind})"


class Leaf(Reward):
    """A leaf reward around a batch function ``fn(responses, targets, prompts, items)``.

    If the batch call raises, every sample is retried alone so that only the bad ones fault."""

    def __init__(self, kind: str, fn: BatchFn, faults: FaultPolicy):
        super().__init__(kind, faults)
        self._fn = fn

    def _score(self, responses, targets, prompts, items) -> list[float]:
        if not responses:
            return []
        try:
            return self._call(responses, targets, prompts, items)
        except Exception as error:
            if len(responses) == 1:
                return [self._faults.handle(self.kind, 0, responses[0], error)]
        self._faults.note("reward/batch_retries")
        return [self._one(i, responses, targets, prompts, items) for i in range(len(responses))]

    def _one(self, i, responses, targets, prompts, items) -> float:
        try:
            return self._call([responses[i]], [targets[i]], [prompts[i]], [items[i]])[0]
        except Exception as error:
            return self._faults.handle(self.kind, i, responses[i], error)

    def _call(self, responses, targets, prompts, items) -> list[float]:
        scores = [float(s) for s in self._fn(responses, targets, prompts, items)]
        if len(scores) != len(responses):
            raise ValueError(f"returned {len(scores)} scores for {len(responses)} samples")
        return scores
