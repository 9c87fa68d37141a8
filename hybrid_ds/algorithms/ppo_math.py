"""Pure PPO math for language models: masked statistics, KL-shaped rewards, GAE and clipped losses
(token log-probs from logits: :mod:`hybrid_ds.models.logprobs`; the KL coefficient:
:mod:`hybrid_ds.algorithms.kl_control`).

Every function here is side-effect free and works on tensors only: no torch.distributed, no
accelerate, no deepspeed, no ``.item()`` (so no host synchronisation on an accelerator). The one
place where ranks matter, whitening with statistics over all data-parallel ranks, is handled by
returning summable moments (:func:`moment_sums`) that the caller all-reduces.

Conventions
-----------
* ``B`` is the number of sequences, ``T`` the response length (the prompt is not included),
  ``V`` the vocabulary size.
* A *mask* is a ``(B, T)`` bool or float tensor with 1 on real response tokens and 0 on padding
  and on everything after the first EOS. Responses are right-padded, so the real tokens of a row
  are a prefix of it; a row may have zero real tokens.
* Reductions are over masked tokens only; an empty mask gives 0, never NaN.

References
----------
* [PPO]   Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
* [GAE]   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
          Estimation", arXiv:1506.02438.
* [Z19]   Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
          arXiv:1909.08593 (per-token KL penalty, adaptive KL coefficient).
* [N-IMPL] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on
          TL;DR Summarization", arXiv:2403.17031 (and the ICLR 2023 blog-track post "The N
          Implementation Details of RLHF with PPO").
* [KL-APPROX] J. Schulman, "Approximating KL Divergence", blog post, 2020
          (http://joschu.net/blog/kl-approx.html): estimators k1, k2, k3.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
Number = Union[float, int]

#: Added to the variance before taking the inverse square root in :func:`whiten`.
WHITEN_EPS = 1e-8
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------
def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as a floating tensor of ``like``'s dtype (bool masks become 0/1)."""
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0 (no NaN for empty masks, no host sync)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when ``dim`` is None).

    Shapes: ``x`` and ``mask`` ``(B, T)`` (any equal shapes work); result 0-d, or ``x`` with
    ``dim`` removed. Positions where the mask is 0 contribute exactly 0 even if ``x`` holds
    ``inf`` or ``NaN`` there (e.g. an exploded ratio on a padding token).
    """
    m = _float_mask(mask, x)
    xm = torch.where(m != 0, x * m, torch.zeros_like(x))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (weighted mean for fractional masks).

    Shapes: ``x``, ``mask`` ``(B, T)``; result 0-d (``dim=None``) or with ``dim`` removed, e.g.
    ``(B,)`` for ``dim=1``. Empty masks (or empty rows with ``dim``) give 0.
    """
    m = _float_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim)
    return _safe_div(masked_sum(x, m, dim), count)


def masked_mean_per_row(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean over real tokens: ``(B, T)`` -> ``(B,)``; rows without tokens give 0."""
    return masked_mean(x, mask, dim=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions (two-pass: mean first, then centred squares).

    Shapes: ``x``, ``mask`` ``(B, T)`` -> 0-d. With ``unbiased`` the sum of squares is divided by
    ``n - 1`` (Bessel), where ``n`` is the mask sum. When ``n <= 1`` Bessel's correction is
    undefined; the biased variance is returned instead (0 for a single element, 0 for none), so
    the result is never NaN and no host sync is needed to check ``n``.
    """
    m = _float_mask(mask, x)
    mean = masked_mean(x, m)
    n = m.sum()
    var = _safe_div(masked_sum((x - mean) ** 2, m), n)
    if unbiased:
        var = torch.where(n > 1, var * n / torch.where(n > 1, n - 1, torch.ones_like(n)), var)
    return var


# ----------------------------------------------------------------------------------------------
# Whitening (normalisation), optionally with statistics over all data-parallel ranks
# ----------------------------------------------------------------------------------------------
def moment_sums(x: Tensor, mask: Tensor) -> Tensor:
    """Summable moments of ``x`` over the mask: ``[count, sum, sum_of_squares]`` in float64.

    Shapes: ``x``, ``mask`` ``(B, T)`` -> ``(3,)`` float64 on ``x``'s device. Moments of several
    batches (e.g. one per data-parallel rank) combine by plain addition, so the trainer can
    ``all_reduce(SUM)`` this tensor and pass :func:`moments_from_sums` of the result to
    :func:`whiten`; trlx and [N-IMPL] (docs/ppo.md §10) whiten with statistics over all ranks.
    """
    x64 = x.detach().to(torch.float64)
    m = mask.detach().to(device=x.device, dtype=torch.float64)
    return torch.stack([m.sum(), masked_sum(x64, m), masked_sum(x64 * x64, m)])


def moments_from_sums(sums: Tensor, unbiased: bool = True) -> Tuple[Tensor, Tensor]:
    """Turn ``[count, sum, sum_sq]`` (see :func:`moment_sums`) into ``(mean, var)``, 0-d float64.

    ``var = (sum_sq - count * mean**2) / (count - 1)`` when ``unbiased`` (``/ count`` otherwise),
    clamped at 0 against rounding. As in :func:`masked_var`, ``count <= 1`` gives the biased
    variance and ``count == 0`` gives ``(0, 0)``.
    """
    sums = sums.to(torch.float64)
    n, s, ss = sums[0], sums[1], sums[2]
    mean = _safe_div(s, n)
    centred = (ss - n * mean * mean).clamp(min=0.0)
    den = torch.where(n > 1, n - 1, n) if unbiased else n
    return mean, _safe_div(centred, den)


def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    stats: Optional[Tuple[Union[Tensor, Number], Union[Tensor, Number]]] = None,
) -> Tensor:
    """Whiten ``x`` with masked statistics: ``(x - mean) / sqrt(var + 1e-8)``.

    Shapes: ``x``, ``mask`` ``(B, T)`` -> ``(B, T)`` in ``x``'s dtype (statistics and arithmetic in
    float64). Positions outside the mask are set to 0.

    ``shift_mean=True`` (advantages) centres the result at 0; ``shift_mean=False`` (rewards) only
    rescales, adding the mean back so that the result keeps the mean of ``x`` (docs/ppo.md §10).
    ``stats`` is a precomputed ``(mean, var)`` pair, e.g. from
    :func:`moments_from_sums` of all-reduced :func:`moment_sums`; without it the statistics of
    this ``x`` alone (unbiased variance) are used.
    """
    x64 = x.to(torch.float64)
    m = mask.to(device=x.device, dtype=torch.float64)
    if stats is None:
        mean, var = masked_mean(x64, m), masked_var(x64, m, unbiased=True)
    else:
        mean, var = (torch.as_tensor(s, dtype=torch.float64, device=x.device) for s in stats)
    out = (x64 - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, torch.zeros_like(out)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# KL penalty and reward shaping
# ----------------------------------------------------------------------------------------------
def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi ([KL-APPROX]).

    Shapes: ``logp``, ``ref_logp`` ``(B, T)`` -> ``(B, T)``. With ``d = logp - ref_logp``:

    * ``"k1"``: ``d`` (unbiased, high variance, can be negative per token).
    * ``"k2"``: ``0.5 * d**2`` (biased, low variance, >= 0).
    * ``"k3"``: ``(exp(-d) - 1) + d`` (unbiased, low variance, >= 0).
    * ``"abs"``: ``|d|``.
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def weighted_kl(logp: Tensor, ref_logp: Tensor, weights: Optional[Sequence[float]] = None,
                kl_fn: Callable[[Tensor, Tensor], Tensor] = kl_penalty) -> Tensor:
    """Per-token KL to one reference, or REFS' weighted sum over several (docs/ppo.md, "Several references").

    Without ``weights``: ``kl_fn(logp, ref_logp)`` with ``ref_logp`` ``(B, T)``. With ``weights``
    ``(K,)``: ``ref_logp`` is ``(B, K, T)`` and the result ``sum_k w_k kl_fn(logp, ref_logp[:, k])``
    ``(B, T)``, each reference's KL by the one estimator. The sum starts from its first term, so one
    reference of weight 1 gives ``kl_fn``'s very numbers (times 1.0 is exact in floating point).
    """
    if weights is None:
        return kl_fn(logp, ref_logp)
    if ref_logp.dim() != 3 or ref_logp.shape[1] != len(weights):
        raise ValueError(f"ref_logp of shape {tuple(ref_logp.shape)} for {len(weights)} weights; expected (B, K, T)")
    total = None
    for k, w in enumerate(weights):
        term = w * kl_fn(logp, ref_logp[:, k])
        total = term if total is None else total + term
    return total


def last_token_index(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Index of the last real token in each row and whether the row has any.

    Shapes: ``mask`` ``(B, T)`` -> ``(index (B,) long, has_any (B,) bool)``. Rows without real
    tokens get index 0 and ``has_any=False``. Works for any mask, not only prefixes.
    """
    real = mask != 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    index = torch.where(real, positions, torch.zeros_like(positions)).amax(dim=1)
    return index, real.any(dim=1)


def shape_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: Union[float, Tensor],
    estimator: str = "k1",
    missing_eos_penalty: Optional[float] = None,
    ended_with_eos: Optional[Tensor] = None,
    ref_weights: Optional[Sequence[float]] = None,
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards: KL penalty on every token, task score on the last real token.

    ``r_t = -beta * kl_t`` for each real token, plus ``score`` at the last real token of the row
    ([Z19] eq. 2; docs/ppo.md §1 and §7). Shapes: ``scores`` ``(B,)``; ``logp``, ``ref_logp``,
    ``mask`` ``(B, T)`` -> ``(rewards (B, T), kl (B, T))`` in ``logp``'s dtype, both 0 outside the
    mask (so everything after the last real token is 0). ``kl`` is the per-token estimate from
    :func:`kl_penalty`, not multiplied by ``beta``; ``kl.sum(1).mean()`` is the per-sequence KL
    that :class:`AdaptiveKLController` expects. REFS: with ``ref_weights`` ``(K,)``, ``ref_logp`` is
    ``(B, K, T)`` and ``kl`` the weighted sum of the K references' estimates (:func:`weighted_kl`).

    Missing EOS (docs/ppo.md §12): when ``missing_eos_penalty`` is given, rows whose
    ``ended_with_eos`` ``(B,)`` is False get ``score - missing_eos_penalty``. We *subtract* rather
    than replace the score (Huang et al. replace it with a fixed value): ranking among truncated
    responses is preserved, and with a large penalty the effect is the same. A caller that wants
    replacement passes ``torch.where(ended, scores, fixed)`` as ``scores`` instead.

    Rows with zero real tokens have no position to hold the score: their score is dropped and
    their rewards and KL are all 0 (no crash, no NaN).
    """
    if missing_eos_penalty is not None and ended_with_eos is None:
        raise ValueError("missing_eos_penalty needs ended_with_eos (a (B,) bool tensor)")
    m = _float_mask(mask, logp)
    per_token = weighted_kl(logp, ref_logp, ref_weights, lambda a, b: kl_penalty(a, b, estimator))
    kl = torch.where(m != 0, per_token * m, torch.zeros_like(logp))
    rewards = -beta * kl
    scores = scores.to(device=rewards.device, dtype=rewards.dtype)
    if missing_eos_penalty is not None:
        ended = ended_with_eos.to(device=rewards.device, dtype=torch.bool)
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if m.shape[1] == 0:  # empty responses: nothing to place the score on
        return rewards, kl
    index, has_any = last_token_index(m)
    placed = torch.where(has_any, scores, torch.zeros_like(scores))
    rewards = rewards.scatter_add(1, index.unsqueeze(1), placed.unsqueeze(1))
    return rewards, kl


# ----------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------------------
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens ([GAE] eqs. 11-16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    computed by a reverse loop over ``T`` with tensor ops over ``B``. Shapes: ``rewards``,
    ``values``, ``mask`` ``(B, T)`` -> ``(advantages (B, T), returns (B, T))`` with
    ``returns = advantages + values`` (the value targets); both 0 outside the mask.

    Values and rewards outside the mask count as 0, so bootstrapping stops after the last real
    token (the response is a finished episode; a masked position inside a row would end the
    episode there too). Inputs are detached: advantages and returns are targets, not graph nodes.
    Defaults gamma=1, lam=0.95 follow docs/ppo.md §13.
    """
    m = _float_mask(mask, rewards).detach()
    r = torch.where(m != 0, rewards.detach(), torch.zeros_like(rewards))
    v = torch.where(m != 0, values.detach().to(r.dtype), torch.zeros_like(r))
    steps = r.shape[1]
    if steps == 0:
        return r.clone(), r.clone()
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    reversed_adv = []
    for t in range(steps - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]
        reversed_adv.append(adv_t)
        next_value, next_adv = v[:, t], adv_t
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = torch.where(m != 0, advantages + v, torch.zeros_like(r))
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def token_mean(x: Tensor, mask: Tensor, num_tokens: Optional[Union[Tensor, Number]],
               weights: Optional[Tensor] = None) -> Tensor:
    """Masked mean, or masked sum / ``num_tokens`` when a global token count is given, or the
    masked sum of ``x * weights`` when per-token weights are (LOSS_AGG, algorithms/estimators.py)."""
    if weights is not None:
        return masked_sum(x * weights, mask)
    if num_tokens is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask) / num_tokens


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    num_tokens: Optional[Union[Tensor, Number]] = None,
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped surrogate policy loss ([PPO] eq. 7), averaged over real tokens.

    ``ratio = exp(logp - old_logp)``; per token ``max(-A * ratio, -A * clip(ratio, 1-c, 1+c))``
    (the negated PPO objective). Shapes: ``logp`` (with grad), ``old_logp``, ``advantages``,
    ``mask`` ``(B, T)`` -> ``(loss 0-d, stats)``.

    Reduction: masked mean over the tokens of this batch; with ``num_tokens`` the masked *sum*
    divided by ``num_tokens`` instead (pass the token count of the whole minibatch so that
    gradient accumulation over micro-batches gives the same update as one big batch); with
    ``weights`` ``(B, T)`` the masked sum of the per-token losses times them (LOSS_AGG).

    ``stats`` (detached 0-d tensors, no host sync):
    ``clipfrac`` fraction of tokens where the clipped term is active; ``approx_kl`` the k3
    estimator ``mean((ratio - 1) - log(ratio))`` of KL(pi_old || pi) ([KL-APPROX]), unbiased and
    >= 0; ``ratio_mean``; ``ratio_max`` (max over real tokens, 0 for an empty mask).
    """
    m = _float_mask(mask, logp)
    old_logp = old_logp.detach()
    advantages = advantages.detach()
    log_ratio = torch.where(m != 0, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.maximum(unclipped, clipped), m, num_tokens, weights)
    with torch.no_grad():
        ratio_d = ratio.detach()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(m.dtype), m),
            "approx_kl": masked_mean((ratio_d - 1.0) - log_ratio.detach(), m),
            "ratio_mean": masked_mean(ratio_d, m),
            "ratio_max": torch.where(m != 0, ratio_d, torch.zeros_like(ratio_d)).amax(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: Optional[float] = 0.2,
    num_tokens: Optional[Union[Tensor, Number]] = None,
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped value loss (docs/ppo.md §11; PPO2 baselines), averaged over real tokens.

    ``v_clip = old + clip(v - old, -c, c)``; per token ``0.5 * max((v - R)**2, (v_clip - R)**2)``.
    ``clip_range=None`` gives the plain ``0.5 * (v - R)**2``. Shapes: ``values`` (with grad),
    ``old_values``, ``returns``, ``mask`` ``(B, T)`` -> ``(loss 0-d, stats)``. ``num_tokens`` and
    ``weights`` as in :func:`policy_loss`.

    ``stats`` (detached 0-d): ``vf_clipfrac`` fraction of tokens where the clip acts
    (``|v - old| > c``) and the clipped term is the larger;
    ``value_mean``; ``explained_variance`` ``1 - Var(R - v) / Var(R)`` over real tokens (0 when
    ``Var(R) == 0``).
    """
    m = _float_mask(mask, values)
    old_values = old_values.detach()
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        clipped, active = unclipped, torch.zeros_like(m, dtype=torch.bool)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        # Inside the range v_clip is v only up to rounding (old + (v - old) is inexact when v and old
        # differ in sign or scale), so a token counts as clipped only where the clip acts.
        active = (values - old_values).abs() > clip_range
    loss = 0.5 * token_mean(torch.maximum(unclipped, clipped), m, num_tokens, weights)
    with torch.no_grad():
        v = values.detach()
        var_r = masked_var(returns, m)
        var_res = masked_var(returns - v, m)
        stats = {
            "vf_clipfrac": masked_mean((active & (clipped > unclipped)).to(m.dtype), m),
            "value_mean": masked_mean(v, m),
            "explained_variance": _safe_div(var_r - var_res, var_r),
        }
    return loss, stats


def ratio_guard(
    logp: Tensor, old_logp: Tensor, mask: Tensor, max_ratio: float = 10.0
) -> Tensor:
    """True (0-d bool tensor) when the batch's mean probability ratio exceeds ``max_ratio``.

    ``mean_t exp(logp - old_logp)`` over real tokens; a NaN or inf mean also counts as exceeded.
    The caller skips the update for such a batch (docs/ppo.md §11; Huang et al. skip a
    minibatch whose ratio explodes). Shapes: ``(B, T)`` inputs -> 0-d bool. No host sync: the
    caller decides when to read it.
    """
    with torch.no_grad():
        m = _float_mask(mask, logp)
        log_ratio = torch.where(m != 0, logp - old_logp, torch.zeros_like(logp))
        mean_ratio = masked_mean(torch.exp(log_ratio), m)
        return ~(mean_ratio <= max_ratio)




# ----------------------------------------------------------------------------------------------
# Response masks
# ----------------------------------------------------------------------------------------------
def mask_after_eos(
    tokens: Tensor, eos_id: Union[int, Sequence[int]], pad_id: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """Response mask that keeps tokens up to and including the first EOS (docs/ppo.md §12).

    Shapes: ``tokens`` ``(B, T)`` generated response ids -> ``(mask (B, T) float32, ended (B,)
    bool)``. ``mask`` is 1 up to and including the first token in ``eos_id`` (an int, or several
    stop ids) and 0 after it; a row without EOS keeps all ``T`` tokens and has ``ended=False``
    (truncated: see ``missing_eos_penalty`` in :func:`shape_rewards`). The EOS itself stays in the
    mask, so the model learns to stop even when the pad id equals the EOS id (docs/ppo.md §2).

    ``pad_id``: if given and not an EOS id, tokens equal to it are also masked wherever they
    appear (a generator that pads rows of different lengths without an EOS). If it equals an EOS
    id it changes nothing.
    """
    try:
        eos_ids = [int(e) for e in eos_id]  # type: ignore[union-attr]
    except TypeError:
        eos_ids = [int(eos_id)]  # type: ignore[arg-type]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=tokens.dtype, device=tokens.device))
    seen_before = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    keep = ~seen_before
    if pad_id is not None and int(pad_id) not in eos_ids:
        keep = keep & (tokens != pad_id)
    return keep.float(), is_eos.any(dim=1)
