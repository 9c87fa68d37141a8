"""The algorithm seam: every phase the loop can run, and which phases each MODE runs.

A phase is one module under ``algorithms/`` with a step function ``(ctx, next_batch) -> metrics``
(:class:`~hybrid_ds.algorithms.context.PhaseContext`); the loop (:mod:`hybrid_ds.run.loop`)
knows phases only through this table. A new estimator or mode is its module plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hybrid_ds.algorithms import dpo, ppo, rm, sft
from hybrid_ds.algorithms.context import NextBatch, PhaseContext


@dataclass(frozen=True)
class Phase:
    name: str  # metrics namespace and learning-rate schedule name ("sft/loss", schedules["sft"])
    counter: str  # the Counters field one step advances
    step: Callable[[PhaseContext, NextBatch], dict[str, float]]
    loss_keys: tuple[str, ...]  # a non-finite value among these: the step's update was skipped
    needs_reference: bool  # a frozen reference model (KL penalty)
    needs_reward: bool  # a task reward (REWARD)


PHASES: dict[str, Phase] = {
    "sft": Phase("sft", "sft_step", sft.run_step, ("sft/loss",), needs_reference=False, needs_reward=False),
    "ppo": Phase("ppo", "ppo_update", ppo.run_update, ("ppo/loss/policy", "ppo/loss/value"),
                 needs_reference=True, needs_reward=True),
    "dpo": Phase("dpo", "pref_step", dpo.run_step, ("dpo/loss",), needs_reference=True, needs_reward=False),
    "rm": Phase("rm", "pref_step", rm.run_step, ("rm/loss",), needs_reference=False, needs_reward=False),
}

#: MODE -> the phases it interleaves, in cycle order (hybrid: SFT steps, then RL updates).
MODES: dict[str, tuple[str, ...]] = {"sft": ("sft",), "ppo": ("ppo",), "hybrid": ("sft", "ppo"), "dpo": ("dpo",),
                                     "rm": ("rm",)}


def mode_phases(mode: str, hybrid_rl: str = "ppo") -> list[Phase]:
    """The phases MODE runs, in cycle order; MODE=hybrid's RL phase is HYBRID_RL (ppo or dpo)."""
    return [PHASES[hybrid_rl if mode == "hybrid" and name == "ppo" else name] for name in MODES[mode]]

