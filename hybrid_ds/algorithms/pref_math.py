"""Pure preference math: the Bradley-Terry reward-model loss and the DPO/IPO policy losses.

Side-effect free tensor functions (no accelerate, no deepspeed), shared by the DPO phase
(:mod:`hybrid_ds.algorithms.dpo`).
Every loss returns per-pair values ``(B,)``; the caller chooses how they add up (a mean over the
global batch of pairs, tests/test_pref_math.py checks each against hand-computed numbers and against
TRL's DPOTrainer and RewardTrainer on the same batch).

Sources:

* Bradley & Terry (1952); its use for reward models: Ouyang et al. 2022, "Training language models
  to follow instructions with human feedback", eq. 1. The margin variant is Llama 2's
  (Touvron et al. 2023, eq. 2): ``-log sigma(r_c - r_r - m)``.
* DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7; the implicit reward
  ``beta * (log pi(y|x) - log pi_ref(y|x))`` is their section 5.
* Label smoothing (conservative DPO): Mitchell 2023, "A note on DPO with noisy preferences":
  the labels are taken to be flipped with probability ``eps``.
* IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17, ``(h - 1 / (2 tau))^2``; with the log-ratios averaged per response token,
  as TRL does (its authors' reported setting), so ``tau`` (DPO_BETA) does not depend on length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybrid_ds.data import IGNORE_INDEX
from hybrid_ds.models.logprobs import logprobs_from_logits

LOSSES = ("sigmoid", "ipo")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None) -> torch.Tensor:
    """Per-pair reward-model loss ``-log sigma(r_c - r_r - m)``, ``(B,)``.

    ``chosen``, ``rejected``: scalar rewards ``(B,)``; ``margin``: ``(B,)``, a float or None (0).
    ``F.logsigmoid`` is exact for large |x| where ``log(sigmoid(x))`` would underflow to -inf.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def dpo_sigmoid_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, ``(B,)``.

    ``chosen_logratios`` / ``rejected_logratios`` ``(B,)``: ``log pi(y|x) - log pi_ref(y|x)``, each
    summed over the response's tokens; ``h`` is their difference. ``eps = 0`` is DPO (Rafailov et
    al. eq. 7); ``eps > 0`` conservative DPO (Mitchell 2023).
    """
    h = beta * (chosen_logratios - rejected_logratios)
    loss = -F.logsigmoid(h)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-h)
    return loss


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair IPO loss ``(h - 1 / (2 beta))^2``, ``(B,)``, where ``h`` is the difference of the
    log-ratios ``(B,)`` (token sums) each divided by its response's token count ``(B,)`` (at least 1)."""
    h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return (h - 1.0 / (2.0 * beta)) ** 2


@dataclass
class PairStats:
    """The implicit rewards of a batch of pairs, for the ``dpo/rewards/*`` metrics (Rafailov et al. §5)."""

    chosen: torch.Tensor  # (B,) beta x chosen log-ratio
    rejected: torch.Tensor  # (B,) beta x rejected log-ratio

    @property
    def margins(self) -> torch.Tensor:  # (B,)
        return self.chosen - self.rejected

    @property
    def accuracies(self) -> torch.Tensor:  # (B,) 1.0 where the chosen reward is strictly higher
        return (self.chosen > self.rejected).float()

    def sums(self) -> torch.Tensor:
        """``(4,)`` sums of chosen, rejected, margins, accuracies over the batch: they add up across
        micro-batches and ranks, and divided by the global pair count give the batch means."""
        return torch.stack([self.chosen.sum(), self.rejected.sum(), self.margins.sum(), self.accuracies.sum()])


def dpo_loss(kind: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, *, label_smoothing: float = 0.0,
             chosen_tokens=None, rejected_tokens=None) -> tuple[torch.Tensor, PairStats]:
    """Per-pair loss ``(B,)`` of DPO_LOSS ``kind`` and the implicit rewards (detached).

    ``policy_*`` / ``ref_*`` ``(B,)``: summed response-token log-probs under the policy and the frozen
    reference; ``*_tokens`` ``(B,)``: response token counts (``ipo`` only)."""
    c, r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if kind == "sigmoid":
        loss = dpo_sigmoid_loss(c, r, beta, label_smoothing)
    elif kind == "ipo":
        loss = ipo_loss(c, r, beta, chosen_tokens, rejected_tokens)
    else:
        raise ValueError(f"DPO_LOSS {kind!r}: expected one of {', '.join(LOSSES)}")
    return loss, PairStats(beta * c.detach(), beta * r.detach())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens ``(B,)`` and their count ``(B,)``.

    ``logits`` ``(B, L, V)`` of a causal LM over the ids whose ``labels`` ``(B, L)`` are the ids on the
    response and -100 elsewhere: position t predicts label t + 1, as in
    :func:`hybrid_ds.algorithms.sft.token_ce_sum`; the log-softmax runs in fp32 blocks
    (:func:`hybrid_ds.models.logprobs.logprobs_from_logits`).
    """
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    keep = nxt != IGNORE_INDEX
    logp = logprobs_from_logits(logits, nxt.masked_fill(~keep, 0))
    return (logp * keep).sum(1), keep.sum(1)
