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
