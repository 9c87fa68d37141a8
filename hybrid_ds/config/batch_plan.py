"""Batch arithmetic in one place: global = micro x accumulation x data-parallel world."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch splits over processes and accumulation.

    ``global_batch`` sequences (or prompts) per optimizer step = ``micro`` per forward on each
    of ``world`` processes x ``accum`` micro-batches.
    """

    global_batch: int
    world: int
    accum: int

    @property
    def per_rank(self) -> int:
        """Sequences one rank handles per optimizer step."""
        return self.global_batch // self.world

    @property
    def micro(self) -> int:
        """Sequences in one forward/backward on one rank."""
        return self.global_batch // (self.world * self.accum)

    @staticmethod
    def problems(name: str, global_batch: int, world: int, accum: int, accum_name: str) -> list[str]:
        """Why ``global_batch`` cannot split exactly; empty when it can."""
        if global_batch % (world * accum):
            return [f"{name} ({global_batch}) must be divisible by processes x {accum_name} = "
                    f"{world} x {accum} = {world * accum}; e.g. {name}={max(1, global_batch // (world * accum)) * world * accum}."]
        return []

    def describe(self) -> str:
        return (f"{self.global_batch} = {self.world} processes x {self.accum} accumulation x "
                f"{self.micro} micro-batch")


@dataclass(frozen=True)
class PPOBatchPlan:
    """One PPO update's batches: ``prompts`` rolled out, then per epoch ``minibatches`` optimizer
    steps, each over ``mini`` (global = micro x accumulation x world)."""

    prompts: int  # PPO_BATCH: prompts per update, all ranks
    mini: BatchPlan  # one optimizer step: PPO_MINI (or PPO_BATCH) over world x PPO_GRAD_ACCUM

    @property
    def minibatches(self) -> int:
        """Optimizer steps per PPO epoch (the same on every rank)."""
        return self.prompts // self.mini.global_batch

    @property
    def per_rank(self) -> int:
        """Prompts this rank rolls out per update."""
        return self.prompts // self.mini.world

    @property
    def forward_chunk(self) -> int:
        """Rows per no-grad forward (old and reference log-probs): one training micro-batch, so
        those forwards never hold more activations than the update itself."""
        return max(1, self.mini.micro)

    def describe(self) -> str:
        return f"{self.prompts} prompts per update, minibatch {self.mini.describe()}"


@dataclass(frozen=True)
class BatchPlans:
    """The run's batch arithmetic, computed once from the config and the data-parallel world."""

    sft: BatchPlan
    ppo: PPOBatchPlan

    @classmethod
    def from_config(cls, cfg, world: int) -> "BatchPlans":
        return cls(sft=BatchPlan(cfg.sft.batch, world, cfg.sft.grad_accum),
                   ppo=PPOBatchPlan(cfg.ppo.batch, BatchPlan(cfg.ppo_mini, world, cfg.ppo.grad_accum)))
