"""Advantages over the policy's tokens of a multi-turn dialogue (ENV, docs/ppo.md §21): pure tensor math.

A dialogue is one sequence ``[policy turn 1, env turn 1, policy turn 2, ...]`` whose action mask
``(B, T)`` is 1 on the policy's tokens only. GAE (and REINFORCE++'s discounted return) must run over
the policy's tokens as one episode, skipping the environment's: the policy's last token of turn 1 is
followed, as a decision, by its first token of turn 2 (the environment's tokens are the transition,
not actions). :func:`ppo_math.gae` stops bootstrapping at any masked position, so these functions
*pack* each row's action tokens to the left (keeping their order), run the single-turn math there,
and scatter the results back; environment positions get 0 advantage and 0 return. On a mask that is
1 on a prefix of each row (a single-turn response) packing is the identity, so the result equals
``ppo_math.gae`` exactly (tests/test_multiturn.py).
"""

from __future__ import annotations

from typing import Tuple

import torch

from hybrid_ds.algorithms import estimators as est
from hybrid_ds.algorithms import ppo_math as pm

Tensor = torch.Tensor


def action_order(mask: Tensor) -> Tensor:
    """``(B, T)`` long: per row, the positions of the action tokens in order, then the others in order
    (a permutation of ``0..T-1``; stable sort of "is not an action")."""
    return torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices


def pack(x: Tensor, order: Tensor) -> Tensor:
    """``x`` ``(B, T)`` reordered by :func:`action_order`: the action tokens first."""
    return x.gather(1, order)


def unpack(x: Tensor, order: Tensor) -> Tensor:
    """Inverse of :func:`pack`: ``(B, T)`` back in sequence order."""
    return torch.empty_like(x).scatter_(1, order, x)


def gae_over_actions(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                     lam: float = 0.95) -> Tuple[Tensor, Tensor]:
    """:func:`ppo_math.gae` over the action tokens only. Shapes: ``rewards``, ``values``, ``mask``
    ``(B, T)`` -> ``(advantages, returns)`` ``(B, T)``, 0 off the mask. ``delta_t = r_t + gamma *
    V_next - V_t`` where ``next`` is the row's next *action* token, so the values and rewards at
    environment positions are never read."""
    order = action_order(mask)
    adv, ret = pm.gae(pack(rewards, order), pack(values, order), pack(mask, order), gamma=gamma, lam=lam)
    return unpack(adv, order), unpack(ret, order)


def returns_over_actions(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """:func:`estimators.discounted_returns` over the action tokens only, ``(B, T) -> (B, T)``."""
    order = action_order(mask)
    return unpack(est.discounted_returns(pack(rewards, order), pack(mask, order), gamma), order)


def left_pad(seqs: list, pad: int, dev) -> tuple:
    """``(ids, mask)`` ``(B, max len)`` long, each row's ids at its end."""
    n = max(1, max(map(len, seqs)))
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, n - len(s):], att[r, n - len(s):] = torch.tensor(s), 1
    return ids.to(dev), att.to(dev)


def right_pad(seqs: list, pad: int, dev) -> tuple:
    """``(ids, mask)`` ``(B, max len)`` long, each row's ids at its start."""
    ids, att = left_pad([s[::-1] for s in seqs], pad, dev)
    return ids.flip(1), att.flip(1)
