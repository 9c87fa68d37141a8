"""Python reward functions (``hybrid_ds.train(cfg, reward_fns=[...])``) as a reward node.

Each function has TRL's reward-function signature, ``fn(prompts, completions, **fields) -> list[float]``
(TRL's GRPOTrainer ``reward_funcs``): the batch's prompt texts, the responses, and one list per item
field (``answer=[...]``, the target field included), except ``prompt`` and ``completion``, which TRL
does not pass either. The functions are weighted equally; with a REWARD spec beside them the spec is
one more equally weighted component. Each is a :class:`Leaf`, so a function that raises, returns
the wrong count or a non-finite score meets the same fault policy as a built-in reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .base import FaultPolicy, Leaf, Reward
from .compose import WeightedSum
from .python_fn import trl_batch

@dataclass
class RewardFunctions:
    """What a run is given besides its config: the functions, and whether REWARD joins them."""

    fns: list  # callables fn(prompts, completions, **fields) -> list[float]
    with_spec: bool = False  # REWARD was set: its reward is one more equally weighted component


def function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def function_reward(fns: Sequence[Callable], spec_reward: Optional[Reward] = None,
                    faults: Optional[FaultPolicy] = None) -> Reward:
    """The equal-weight mean of ``fns`` (and ``spec_reward``, when given) as one reward node."""
    bad = [repr(f) for f in fns if not callable(f)]
    if not fns or bad:
        raise TypeError(f"reward_fns: expected a non-empty list of callables fn(prompts, completions, **fields), "
                        f"got {bad or 'an empty list'}")
    faults = faults or FaultPolicy("raise")
    parts: list[tuple[float, Reward]] = [(1.0, Leaf(function_name(f), trl_batch(f, function_name(f)), faults))
                                         for f in fns]
    if spec_reward is not None:
        parts.append((1.0, spec_reward))
    return parts[0][1] if len(parts) == 1 else WeightedSum(parts, faults)
