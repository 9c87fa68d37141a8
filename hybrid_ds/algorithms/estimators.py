"""Critic-free advantage estimators and loss aggregation: pure tensor math, like ppo_math.py.

``ADVANTAGE`` picks how a rollout's scores become per-token advantages:

* ``gae``: the value head and GAE (ppo_math.gae), as in PPO [Z19].
* ``grpo``: each prompt's ``K = NUM_GENERATIONS`` samples form a group; a sample's advantage is its
  score minus the group mean, divided by the group's standard deviation (``GROUP_STD``; Dr. GRPO
  drops the division) [GRPO] [DR-GRPO].
* ``rloo``: the score minus the mean of the *other* K - 1 samples of its group (leave-one-out
  baseline, unbiased) [RLOO].
* ``reinforce_pp``: per-token KL-shaped rewards summed into discounted returns, whitened over the
  whole batch (all ranks), no critic and no groups [R++].

Group statistics are exact wherever a group's samples sit: each rank adds its samples into a
``(groups, 3)`` table of counts, sums and sums of squares indexed by the global group id
(:func:`group_sums`), the caller all-reduces the table once, and :func:`group_advantages` reads it.

``LOSS_AGG`` weights each token's loss so that a minibatch's loss is a plain weighted sum, split
over micro-batches and ranks without changing it (:func:`token_weights`): ``token_mean`` (every
token of the minibatch counts the same: long responses weigh more), ``seq_mean`` (each sequence's
token mean, averaged over sequences, as GRPO's paper), ``dr_grpo`` (token sums over a constant,
sequences x MAX_NEW_TOKENS: no length bias either way) [DR-GRPO].

References
----------
* [GRPO] Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, section 4.1.
* [DR-GRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv:2503.20783 (no std scaling, constant normaliser).
* [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", arXiv:2402.14740.
* [R++] Hu 2025, "REINFORCE++", arXiv:2501.03262.
* [Z19] Ziegler et al. 2019, arXiv:1909.08593.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "rloo")
LOSS_AGGS = ("token_mean", "seq_mean", "dr_grpo")
#: Added to a group's standard deviation before dividing (GRPO; a group of equal scores gets 0).
STD_EPS = 1e-4


def group_sums(scores: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Summable group statistics: ``(n_groups, 3)`` float64 of ``[count, sum, sum of squares]``.

    ``scores`` ``(N,)``, ``group`` ``(N,)`` global group ids in ``[0, n_groups)``. Tables of
    several ranks add up (all-reduce sum) to the table of their union."""
    s = scores.detach().double()
    table = torch.zeros(n_groups, 3, dtype=torch.float64, device=scores.device)
    table.index_add_(0, group.long(), torch.stack([torch.ones_like(s), s, s * s], 1))
    return table


def group_advantages(scores: Tensor, group: Tensor, table: Tensor, estimator: str, scale_std: bool = True) -> Tensor:
    """Per-sample advantages ``(N,)`` (float32) from the all-reduced ``table`` of :func:`group_sums`.

    ``grpo``: ``(s - mean_g) / (std_g + STD_EPS)`` with the unbiased std of the group (as
    ``torch.std``), or ``s - mean_g`` when ``scale_std`` is False (Dr. GRPO). ``rloo``:
    ``s - (sum_g - s) / (count_g - 1)``; a group of one sample has no baseline and gets 0."""
    s = scores.detach().double()
    count, total, sq = table[group.long()].unbind(1)
    if estimator == "grpo":
        mean = total / count
        var = (sq - count * mean * mean) / (count - 1).clamp(min=1)
        adv = s - mean
        if scale_std:
            adv = adv / (var.clamp(min=0).sqrt() + STD_EPS)
    elif estimator == "rloo":
        adv = torch.where(count > 1, s - (total - s) / (count - 1).clamp(min=1), torch.zeros_like(s))
    else:
        raise ValueError(f"unknown group estimator {estimator!r}; choose from {', '.join(GROUP_ESTIMATORS)}")
    return adv.float()


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over each row's real tokens ``(B, T) -> (B, T)``, 0 outside the mask
    (REINFORCE++'s return; with gamma = 1 every token of a row gets the rest of the row's reward)."""
    m = (mask != 0).to(rewards.dtype)
    r = rewards.detach() * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0]) if r.shape[1] else None
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running * m[:, t]
        running = running * m[:, t]  # a masked position ends the episode
    return out


def token_weights(mask: Tensor, agg: str, n_seqs, n_tokens, max_len: int) -> Tensor:
    """``(B, T)`` weights whose sum against per-token losses gives one micro-batch's share of the loss.

    ``n_seqs`` / ``n_tokens``: the minibatch's sequences and real tokens per rank (the global counts
    divided by the ranks, whose gradients are averaged): ``token_mean`` weighs every token
    ``1 / n_tokens``; ``seq_mean`` ``1 / (len_i * n_seqs)``; ``dr_grpo`` ``1 / (max_len * n_seqs)``.
    Summed over a minibatch split any way over micro-batches and ranks, the weights are the same."""
    m = (mask != 0).float()
    if agg == "token_mean":
        return m / n_tokens
    if agg == "seq_mean":
        return m / (m.sum(1, keepdim=True).clamp(min=1.0) * n_seqs)
    if agg == "dr_grpo":
        return m / (max_len * n_seqs)
    raise ValueError(f"unknown LOSS_AGG {agg!r}; choose from {', '.join(LOSS_AGGS)}")


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` ``(B, T)``: the k3 estimator of KL(pi || ref),
    >= 0 and differentiable in ``logp``, GRPO's KL term in the loss [GRPO] eq. 4."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1.0
