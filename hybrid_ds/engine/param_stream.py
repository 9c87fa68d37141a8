"""The policy's weights one whole parameter at a time, for a reference on its own ranks (REF_SYNC_EVERY
with REF_PLACEMENT=separate; the wire format is ``reference/weights.py``).

Under ZeRO-3 each rank holds a partition of every parameter and a reference rank hears only its own
policy ranks, so whole parameters are needed: :func:`whole_parameters` gathers one parameter at a
time over the policy ranks and releases it before the next, so no rank ever holds more than one
whole parameter beyond its partitions (generation holds the whole model, ``Dist.generation_model``).
Without ZeRO-3 every rank holds the whole weights already and nothing is gathered.
"""

from __future__ import annotations

from typing import Iterator

import torch


def parameter_manifest(module: torch.nn.Module) -> list[tuple[int, torch.dtype]]:
    """``(numel, dtype)`` of each of ``module``'s parameters, whole (also where ZeRO-3 partitioned them),
    in ``named_parameters`` order: what the reference checks before it takes any weight."""
    return [(int(p.ds_numel) if hasattr(p, "ds_tensor") else p.numel(), p.dtype) for p in module.parameters()]


@torch.no_grad()
def whole_parameters(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Each parameter of ``module`` whole, in ``named_parameters`` order, valid until the next is asked
    for. Under ZeRO-3 this is one all-gather per parameter over the policy ranks: every policy rank
    must walk the whole iterator, in step, also the ranks that send nothing."""
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield p.data
        else:
            yield p.data
