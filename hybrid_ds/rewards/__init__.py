"""Reward functions for hybrid_ds, built from JSON specs.

    reward = make_reward({"type": "cosine_sts"})
    scores = reward.score_batch(responses, targets, prompts, items)   # list[float]
    score = reward(response, target)                                  # float

``validate_reward_spec`` checks a spec without loading a model; ``REWARD_TYPES`` is the registry
(docs: ``python -m hybrid_ds.rewards.docs``). Importing this package imports no torch: models
are loaded by ``make_reward``.
"""

from .base import FaultPolicy, Reward, RewardError, RewardSpecError
from .build import make_reward
from .registry import ALIASES, POSTPROCESS_TYPES, REWARD_TYPES, Param, RewardType
from .validate import validate_reward_spec

__all__ = [
    "ALIASES", "POSTPROCESS_TYPES", "REWARD_TYPES", "FaultPolicy", "Param", "Reward", "RewardError",
    "RewardSpecError", "RewardType", "make_reward", "validate_reward_spec",
]
