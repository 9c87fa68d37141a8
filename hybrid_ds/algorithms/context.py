"""What a phase step sees of the run: the typed context every algorithm module works on.

The run layer (:mod:`hybrid_ds.run.state`) builds one object that satisfies :class:`PhaseContext`;
phases read the config, the models and the seams from it and advance nothing but their own
:class:`Counters` field. Keeping this a Protocol lets algorithms stay below the run layer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

import torch

from hybrid_ds.algorithms.kl_control import AdaptiveKLController, FixedKLController
from hybrid_ds.config import Config
from hybrid_ds.config.batch_plan import BatchPlans
from hybrid_ds.data import Example
from hybrid_ds.engine.dist import Dist
from hybrid_ds.engine.train_engine import TrainEngine
from hybrid_ds.optim import PhaseSchedule
from hybrid_ds.reference.protocol import RefClient
from hybrid_ds.rewards.base import Reward

KLController = Union[AdaptiveKLController, FixedKLController]
#: A stream's name ("sft" | "ppo" | "pref") -> this rank's share of that stream's next global batch.
NextBatch = Callable[[str], list[Example]]


@dataclass
class Counters:
    """Where the run stands; saved in every checkpoint and restored on resume."""

    sft_step: int = 0  # SFT optimizer steps done (warm-up included)
    ppo_update: int = 0  # PPO updates done
    pref_step: int = 0  # DPO or reward-model optimizer steps done
    cycle: int = 0  # hybrid cycles done
    ref_snapshot: int = 0  # 1 once the reference is not the start (REF_INIT=after_warmup, REF_SYNC_EVERY)
    nan_streak: int = 0  # non-finite losses in a row (MAX_NAN_STEPS stops the run)
    nonfinite_total: int = 0  # non-finite losses in the whole run

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for k, v in state.items():
            if k in known:  # checkpoints of older versions may lack some, never carry others
                setattr(self, k, int(v))


class PhaseContext(Protocol):
    """The run as phase steps use it (:class:`hybrid_ds.run.state.Run` provides it)."""

    cfg: Config
    dist: Dist
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    engine: TrainEngine  # the policy/value model, trainable
    ref: Optional[torch.nn.Module]  # the frozen reference on these ranks (None: own ranks, SFT only, or LoRA,
    #                                  whose reference is engine.adapters_disabled())
    ref_client: Optional[RefClient]  # the reference on its own ranks (REF_PLACEMENT=separate)
    ref_models: list  # REFS, colocated: each entry's frozen model in REFS order, None for "policy" (ref above);
    #                   [] without REFS or on its own ranks (hybrid_ds/config/refs.py)
    reward: Optional[Reward]
    kl_ctl: Optional[KLController]
    schedules: dict[str, PhaseSchedule]
    batches: BatchPlans
    counters: Counters
    seed: int

    def seed_for(self, tag: str, step: int) -> int: ...

    def log_samples(self, update: int, rows: list[dict]) -> None: ...  # LOG_SAMPLES_EVERY's table of an update


class PhaseTimer:
    """Wall time of a step's phases: ``mark(name)`` closes the phase that ran since the last mark."""

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


def scheduled_step(ctx: PhaseContext, batch, phase: str, step: Callable[..., dict]) -> dict[str, float]:
    """One optimizer step of a preference ``phase`` ("dpo", "rm") on ``batch`` at its schedule's rate and
    momentum, then the schedule advanced with the step's loss (``<phase>/loss``, what reduce_on_plateau
    reads)."""
    sched = ctx.schedules[phase]
    m = step(ctx, batch, lr=sched.lr, momentum=sched.momentum)
    sched.step(m[f"{phase}/loss"])
    return m
