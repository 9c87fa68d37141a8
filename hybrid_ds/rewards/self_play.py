"""The ``self_play`` reward node: the policy's response against an opponent's, as a judge sees them.

For each prompt an opponent (the reference, or a frozen snapshot of the policy) answers too; the PPO
phase samples those answers (hybrid_ds/algorithms/self_play.py) and hands them to this node with
:meth:`SelfPlay.set_opponents` before it scores the batch. The judge, any reward spec, then scores the
policy's responses and the opponent's in one batched call (policy rows, then opponent rows, so a
judge with state, e.g. ``ema_normalize``, treats both sides alike) and the reward is

* ``difference``: ``judge(policy) - judge(opponent)``;
* ``win_prob``: ``sigmoid(judge(policy) - judge(opponent))``, the Bradley-Terry probability that the
  policy's response wins (Bradley & Terry 1952; the form of the reward-model loss of Ouyang et al.
  2022). Every judge of this registry scores one response at a time, so this is the rule for all.

Self-play as a preference game against an earlier policy follows SPPO (Wu et al. 2024, "Self-Play
Preference Optimization for Language Model Alignment") and SPIN (Chen et al. 2024, "Self-Play
Fine-Tuning Converts Weak Language Models to Strong Language Models"), whose opponent is the previous
iterate. The node does not sample: without opponent responses (held-out evaluation, a direct call) it
scores with the judge alone.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

from .base import FaultPolicy, Reward
from .compose import Postprocessed, WeightedSum

SCORE_RULES = ("difference", "win_prob")
OPPONENTS = ("reference", "snapshot")


def preference(policy: float, opponent: float, rule: str) -> float:
    """The self-play reward of one pair of judge scores under ``rule`` (module docstring)."""
    d = policy - opponent
    if rule == "difference":
        return d
    if d >= 0:  # sigmoid without overflow for either sign
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


class SelfPlay(Reward):
    """The judge's preference for the policy's responses over the opponent's (module docstring).

    ``snapshot`` and ``snapshot_update`` hold the frozen copy of the policy (opponent ``snapshot``) and
    the PPO update it was taken at; the PPO phase keeps them here, with the node that plays against
    them, and checkpoints write them (hybrid_ds/algorithms/self_play.py)."""

    def __init__(self, judge: Reward, opponent: str, snapshot_every: int, rule: str, faults: FaultPolicy):
        super().__init__("self_play", faults)
        self.judge, self.opponent, self.snapshot_every, self.rule = judge, opponent, snapshot_every, rule
        self.snapshot = None  # torch.nn.Module: the frozen policy copy (opponent "snapshot"), None before one
        self.snapshot_update = -1  # the PPO update the snapshot was taken at
        self._opponents: list[str] | None = None
        self._last: dict[str, list[float]] = {}
        self._judge_seconds = 0.0

    def set_opponents(self, texts: Sequence[str]) -> None:
        """The opponent's responses to the next batch's prompts, row for row; used by that batch only."""
        self._opponents = list(texts)

    def _score(self, responses, targets, prompts, items) -> list[float]:
        opponents, self._opponents = self._opponents, None
        t0 = time.perf_counter()
        if opponents is None:  # no opponent sampled: the judge's own score (module docstring)
            self._last = {}
            return self.judge.score_batch(responses, targets, prompts, items)
        n = len(responses)
        if len(opponents) != n:
            raise ValueError(f"self_play: {len(opponents)} opponent responses for {n} policy responses")
        both = self.judge.score_batch(responses + opponents, targets + targets, prompts + prompts, items + items)
        mine, theirs = both[:n], both[n:]
        self._judge_seconds += time.perf_counter() - t0
        self._last = {"self_play/judge_policy": mine, "self_play/judge_opponent": theirs}
        return [preference(a, b, self.rule) for a, b in zip(mine, theirs)]

    def pop_judge_seconds(self) -> float:
        """Seconds spent judging both sides since the last call."""
        s, self._judge_seconds = self._judge_seconds, 0.0
        return s

    def components(self) -> dict[str, list[float]]:
        """The judge's scores of the last batch: the policy's and the opponent's responses, row for row."""
        return dict(self._last)

    def gauges(self, prefix: str = "reward/weight") -> dict[str, float]:
        return self.judge.gauges(prefix)

    def state_dict(self) -> dict:
        return {"judge": self.judge.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.judge.load_state_dict(state.get("judge", {}))


def find_self_play(reward: Reward | None) -> list[SelfPlay]:
    """The ``self_play`` nodes of a reward tree (inside sums and post-processors)."""
    if reward is None:
        return []
    if isinstance(reward, SelfPlay):
        return [reward]
    children = [r for _, r in reward.parts] if isinstance(reward, WeightedSum) else \
        [reward.inner] if isinstance(reward, Postprocessed) else []
    return [node for child in children for node in find_self_play(child)]


def self_play_specs(spec, path: str) -> list[tuple[str, dict]]:
    """``(path, spec)`` of every ``self_play`` node of a reward spec (a judge's included)."""
    if not isinstance(spec, dict):
        return []
    found = [(path, spec)] if spec.get("type") == "self_play" else []
    comps = spec.get("components")
    for i, comp in enumerate(comps if isinstance(comps, list) else []):
        found += self_play_specs(comp, f"{path}.components[{i}]")
    if spec.get("type") == "self_play":
        found += self_play_specs(spec.get("judge"), f"{path}.judge")
    return found
