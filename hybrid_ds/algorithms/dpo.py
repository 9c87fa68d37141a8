"""The DPO phase: one optimizer step of Direct Preference Optimization over a global batch of pairs.

Each pair's chosen and rejected responses run through the policy and through the frozen reference
(the colocated copy, or with LoRA the policy's base with its adapters disabled: ``ppo.reference_model``;
with REF_PLACEMENT=separate the reference's own ranks, through the rollout's log-prob requests)
as one batch of ``2B`` sequences, chosen first (:func:`hybrid_ds.data.pairs.collate_pairs`). The
summed response log-probs give DPO_LOSS (:mod:`hybrid_ds.algorithms.pref_math`). The loss is the
mean over *all pairs of the global batch*: each micro-batch's summed pair losses are divided by
PREF_BATCH and multiplied by the data-parallel world (DDP and DeepSpeed average gradients over
ranks), so the split into ranks and accumulation does not change the update (as in ``sft``).

Metrics follow TRL's names: ``dpo/rewards/{chosen,rejected,margins,accuracies}`` are the means of
the implicit rewards ``beta * (log pi - log pi_ref)`` over the global batch (Rafailov et al. 2023 §5).
"""

from __future__ import annotations

import math
import time

import torch

from hybrid_ds.algorithms import pref_math
from hybrid_ds.algorithms.context import NextBatch, PhaseContext, scheduled_step
from hybrid_ds.algorithms.ppo import reference_model
from hybrid_ds.algorithms.sft import labelled_tail
from hybrid_ds.data import Pair, collate_pairs, micro_batches
from hybrid_ds.models.policy_value import causal_lm_logits

METRICS = ("chosen", "rejected", "margins", "accuracies")


def pair_logps(model, batch: dict, device, policy: bool) -> tuple[torch.Tensor, torch.Tensor, object]:
    """``(log-probs (2B,), response tokens (2B,), values or None)`` of a collated pair batch under the
    policy engine (``policy``; values for the 0-weight value-head term) or a plain causal LM (the
    reference); the LM head runs on the labelled tail only."""
    keep = labelled_tail(batch["labels"])
    ids, att, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    if policy:
        logits, values = model(ids, att, with_values=True, keep_last=keep)
    else:
        logits, values = causal_lm_logits(model, ids, att, keep_last=keep), None
    logps, n = pref_math.sequence_logps(logits, labels[:, -keep:])
    return logps, n, values


def remote_pair_logps(client, batch: dict, device) -> torch.Tensor:
    """:func:`pair_logps`'s summed log-probs ``(2B,)`` from the reference on its own ranks
    (REF_PLACEMENT=separate): the tokens from the first labelled position on are asked for, as a
    rollout's response is (raw logits: temperature 1), and summed where labelled. The right padding
    sits in that tail with mask 0, so the positions are the sequence's own."""
    labels = batch["labels"]
    start = labels.shape[1] - labelled_tail(labels) + 1  # the first position whose token can be labelled
    lp = client.logprobs(batch["input_ids"], batch["attention_mask"], start, labels.shape[1] - start, 1.0)
    return (lp.to(device) * (labels[:, start:] != pref_math.IGNORE_INDEX).to(device)).sum(1)


@torch.no_grad()
def reference_logps(ctx: PhaseContext, micros: list[dict]) -> list[torch.Tensor]:
    """The reference's summed response log-probs ``(2B,)`` of each micro-batch (no grad, no dropout)."""
    if ctx.ref_client is not None:  # the reference's ranks score every micro-batch, in the same rounds on all ranks
        return [remote_pair_logps(ctx.ref_client, b, ctx.dist.device) for b in micros]
    ctx.engine.eval()  # a LoRA reference is the policy's own module: dropout off for it too
    with reference_model(ctx) as ref:
        return [pair_logps(ref, b, ctx.dist.device, policy=False)[0] for b in micros]


def dpo_step(ctx: PhaseContext, pairs: list[Pair], *, lr: float, momentum=None) -> dict[str, float]:
    """One DPO optimizer step on this rank's share of the global batch; metrics reduced across ranks.

    1. split into PREF_GRAD_ACCUM micro-batches; the reference's log-probs of each
    2. forward/backward each micro-batch through the policy (accumulation boundary on the last)
    3. step with LR_PREF for the policy and 0 for the value head
    """
    t0 = time.perf_counter()
    cfg, dist, engine = ctx.cfg, ctx.dist, ctx.engine
    p = cfg.pref
    # 1. micro-batches and the reference
    micros = [collate_pairs(m, ctx.tokenizer.pad_token_id) for m in micro_batches(pairs, p.grad_accum)]
    refs = reference_logps(ctx, micros)
    engine.train()
    # 2. forward/backward
    sums = torch.zeros(len(METRICS) + 3, dtype=torch.float64)  # loss, metrics, chosen and rejected logps
    for i, (b, ref) in enumerate(zip(micros, refs)):
        boundary = i == len(micros) - 1
        with engine.no_sync(boundary):
            logps, n, values = pair_logps(engine, b, dist.device, policy=True)
            B = logps.shape[0] // 2
            loss, stats = pref_math.dpo_loss(p.dpo_loss, logps[:B], logps[B:], ref[:B], ref[B:], p.dpo_beta,
                                             label_smoothing=p.dpo_label_smoothing, chosen_tokens=n[:B],
                                             rejected_tokens=n[B:])
            # 0 x values: ZeRO sees a (zero) value-head gradient rather than a missing one (as in sft)
            total = loss.sum() * dist.world / p.batch + (0.0 * values.sum() if values is not None else 0.0)
            engine.backward(total, boundary)
        sums += torch.cat([loss.detach().sum().reshape(1), stats.sums(),
                           logps.detach()[:B].sum().reshape(1), logps.detach()[B:].sum().reshape(1)]).double().cpu()
    # 3. optimizer step
    grad_norm = engine.step({"policy": lr, "value": 0.0}, momentum)
    g = (dist.all_reduce_sum(sums.float().to(dist.device)).double().cpu() / p.batch).tolist()
    m = {"dpo/loss": g[0], **{f"dpo/rewards/{k}": v for k, v in zip(METRICS, g[1:5])},
         "dpo/logps/chosen": g[5], "dpo/logps/rejected": g[6], "dpo/lr": lr,
         "dpo/grad_norm": grad_norm if grad_norm is not None else float("nan")}
    return {**m, "time/dpo_s": time.perf_counter() - t0}


def run_step(ctx: PhaseContext, next_batch: NextBatch) -> dict[str, float]:
    """The DPO phase's step for the loop: the next pairs, the scheduled rate, one optimizer step."""
    return scheduled_step(ctx, next_batch("pref"), "dpo", dpo_step)


@torch.no_grad()
def evaluate_pairs(ctx: PhaseContext, pairs: list[Pair]) -> dict[str, float]:
    """The implicit rewards and loss of held-out pairs (EVAL_FILE in MODE=dpo), no update: each rank
    its shard (pairs ``rank, rank + world, ...``), every rank as many forwards (a rank short of pairs
    repeats the first and drops the result, as ``evaluate`` does), one all-reduce of the sums."""
    t0 = time.perf_counter()
    cfg, dist = ctx.cfg, ctx.dist
    p = cfg.pref
    chunk = max(1, p.batch // (dist.world * p.grad_accum))
    mine = pairs[dist.rank::dist.world]
    sums = torch.zeros(1 + len(METRICS) + 1, dtype=torch.float64)  # loss, metrics, pairs
    for c in range(math.ceil(math.ceil(len(pairs) / dist.world) / chunk)):
        part = mine[c * chunk:(c + 1) * chunk]
        b = collate_pairs(part or pairs[:1], ctx.tokenizer.pad_token_id)
        (ref,) = reference_logps(ctx, [b])
        logps, n, _ = pair_logps(ctx.engine, b, dist.device, policy=True)
        B = logps.shape[0] // 2
        loss, stats = pref_math.dpo_loss(p.dpo_loss, logps[:B], logps[B:], ref[:B], ref[B:], p.dpo_beta,
                                         label_smoothing=p.dpo_label_smoothing, chosen_tokens=n[:B],
                                         rejected_tokens=n[B:])
        if part:
            row = torch.cat([loss.sum().reshape(1), stats.sums(), torch.full((1,), float(B), device=loss.device)])
            sums += row.double().cpu()
    g = dist.all_reduce_sum(sums.float().to(dist.device)).double().cpu().tolist()
    n = max(g[-1], 1.0)
    return {"eval/loss": g[0] / n, **{f"eval/rewards/{k}": v / n for k, v in zip(METRICS, g[1:5])},
            "eval/items": g[-1], "time/eval_s": time.perf_counter() - t0}
