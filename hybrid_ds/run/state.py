"""The run object: everything the phases and the loop share, typed.

It satisfies :class:`hybrid_ds.algorithms.context.PhaseContext` (what phase steps read) and adds
what only the run layer uses: the metrics logger, the data streams, the step plan, the fault guard.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from hybrid_ds.algorithms.context import Counters, KLController
from hybrid_ds.config import Config
from hybrid_ds.config.batch_plan import BatchPlans
from hybrid_ds.data import BatchStream, Example, Pair, rank_slice
from hybrid_ds.engine.dist import Dist
from hybrid_ds.engine.signals import Guard
from hybrid_ds.engine.train_engine import TrainEngine
from hybrid_ds.optim import PhaseSchedule
from hybrid_ds.reference.protocol import RefClient
from hybrid_ds.rewards.base import Reward
from hybrid_ds.run.checkpoint_dir import ResumePoint
from hybrid_ds.run.metrics import MetricsLogger
from hybrid_ds.run.samples import SampleLogger
from hybrid_ds.run.schedule import Schedule


@dataclass
class Run:
    """Everything the phases share (see the module docstring)."""

    cfg: Config
    dist: Dist
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    examples: list[Example]  # the tokenised data, the same list on every rank
    engine: TrainEngine  # the policy/value model
    ref: Optional[torch.nn.Module]  # frozen reference on these ranks (None in sft mode or on its own ranks)
    reward: Optional[Reward]  # None in sft mode
    schedules: dict[str, PhaseSchedule]  # phase name -> learning-rate schedule
    kl_ctl: Optional[KLController]  # None in sft mode
    logger: MetricsLogger
    plan: Schedule
    batches: BatchPlans
    seed: int = 0
    ref_client: Optional[RefClient] = None  # the reference on its own ranks (REF_PLACEMENT=separate)
    streams: dict[str, BatchStream] = field(default_factory=dict)  # "sft" / "ppo" / "pref": global batch order
    counters: Counters = field(default_factory=Counters)
    guard: Optional[Guard] = None  # SIGTERM/SIGINT handling, set by checkpoint.attach
    last_checkpoint: Optional[str] = None  # name of the newest complete checkpoint of this run
    resuming: Optional[ResumePoint] = None  # the checkpoint resumed in OUTPUT_DIR, until this run's first one
    eval_examples: list[Example] = field(default_factory=list)  # EVAL_FILE's, the same list on every rank
    samples: Optional[SampleLogger] = None  # LOG_SAMPLES_EVERY's tables (main rank)
    pairs: list[Pair] = field(default_factory=list)  # preference pairs (MODE=dpo, rm; HYBRID_RL=dpo)
    eval_pairs: list[Pair] = field(default_factory=list)  # MODE=dpo and rm: EVAL_FILE's pairs
    ref_models: list = field(default_factory=list)  # REFS, colocated: per entry its frozen model (None: "policy")

    def seed_for(self, tag: str, step: int) -> int:
        """A reproducible seed for ``tag`` at ``step`` on this rank (resumable: no hidden RNG state)."""
        return (self.seed * 1_000_003 + zlib.crc32(tag.encode()) * 1009 + step * 7919 + self.dist.rank) % 2**31

    def log_samples(self, update: int, rows: list[dict]) -> None:
        """A PPO update's table of samples (hybrid_ds/run/samples.py); written by the main rank."""
        if self.samples is not None:
            self.samples.write(update, rows)

    def next_batch(self, stream: str) -> list[Example]:
        """This rank's share of the next global batch of ``stream`` (``pref``: of preference pairs)."""
        idx = rank_slice(self.streams[stream].next(), self.dist.rank, self.dist.world)
        pool = self.pairs if stream == "pref" else self.examples
        return [pool[i] for i in idx]
