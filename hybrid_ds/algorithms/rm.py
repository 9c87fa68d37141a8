"""The reward-model phase (MODE=rm): one optimizer step of the Bradley-Terry loss over a global batch of pairs.

The model is the trunk with a bias-free scalar head (:mod:`hybrid_ds.models.reward_model`); a sequence's
reward is the head's value at its last token. Each pair's chosen and rejected sequences (prompt +
response) run as one batch of ``2B`` rows, chosen first; the loss is
``-log sigma(r_chosen - r_rejected - margin)`` (:func:`hybrid_ds.algorithms.pref_math.bradley_terry_loss`,
``margin`` an item's optional field, else 0), averaged over the pairs of the global batch as ``dpo``
averages its own (divided by PREF_BATCH, times the data-parallel world).

The sequences are scored as the ``reward_model`` reward scores a PPO response, ``prompt + response``
with no EOS after it: the EOS that tokenisation appends to a text pair's response is left out.
Metrics: ``rm/loss``, ``rm/accuracy`` (pairs whose chosen reward is higher), ``rm/margin``,
``rm/reward_chosen``, ``rm/reward_rejected``; with EVAL_FILE the same over held-out pairs (``eval/*``).
"""

from __future__ import annotations

import math
import time

import torch

from hybrid_ds.algorithms import pref_math
from hybrid_ds.algorithms.context import NextBatch, PhaseContext, scheduled_step
from hybrid_ds.data import Pair, micro_batches
from hybrid_ds.models.reward_model import last_token_scores

KEYS = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected")


def collate_scored(pairs: list[Pair], pad_id: int, eos_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` ``(2B, L)`` (chosen rows, then rejected rows) and the
    pairs' margins ``(B,)``: each side's SFT sequence, a trailing EOS dropped (module docstring)."""
    rows = []
    for ex in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        ids = list(ex.sft_sequence()[0])
        rows.append(ids[:-1] if len(ids) > 1 and ids[-1] == eos_id else ids)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    for r, seq in enumerate(rows):
        ids[r, :len(seq)], att[r, :len(seq)] = torch.tensor(seq), 1
    margin = torch.tensor([float(p.item.get("margin", 0.0)) for p in pairs])
    return {"input_ids": ids, "attention_mask": att, "margin": margin}


def pair_scores(engine, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards ``(2B,)`` of a collated batch and a 0-valued term that ties the LM head's logits into
    the graph (ZeRO then sees a zero gradient for it rather than a missing one, as in ``sft``)."""
    ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits, values = engine(ids, att, with_values=True)
    return last_token_scores(values, att), 0.0 * logits.sum()


def sums_of(loss: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``(5,)`` sums over the pairs for :data:`KEYS`; divided by the pair count they are the means."""
    B = scores.shape[0] // 2
    c, r = scores[:B].detach(), scores[B:].detach()
    return torch.stack([loss.detach().sum(), (c > r).float().sum(), (c - r).sum(), c.sum(), r.sum()])


def rm_step(ctx: PhaseContext, pairs: list[Pair], *, lr: float, momentum=None) -> dict[str, float]:
    """One reward-model optimizer step on this rank's share of the global batch; metrics reduced across ranks.

    1. split into PREF_GRAD_ACCUM micro-batches
    2. forward/backward each (accumulation boundary on the last)
    3. step with LR_PREF for the trunk and the head
    """
    t0 = time.perf_counter()
    cfg, dist, engine, tok = ctx.cfg, ctx.dist, ctx.engine, ctx.tokenizer
    engine.train()
    # 1. micro-batches
    micros = [collate_scored(m, tok.pad_token_id, tok.eos_token_id) for m in micro_batches(pairs, cfg.pref.grad_accum)]
    # 2. forward/backward
    sums = torch.zeros(len(KEYS), dtype=torch.float64)
    for i, b in enumerate(micros):
        boundary = i == len(micros) - 1
        with engine.no_sync(boundary):
            scores, zero = pair_scores(engine, b, dist.device)
            B = scores.shape[0] // 2
            loss = pref_math.bradley_terry_loss(scores[:B], scores[B:], b["margin"].to(scores.device))
            engine.backward(loss.sum() * dist.world / cfg.pref.batch + zero, boundary)
        sums += sums_of(loss, scores).double().cpu()
    # 3. optimizer step
    grad_norm = engine.step({"policy": lr, "value": lr}, momentum)
    g = (dist.all_reduce_sum(sums.float().to(dist.device)).double().cpu() / cfg.pref.batch).tolist()
    return {**{f"rm/{k}": v for k, v in zip(KEYS, g)}, "rm/lr": lr,
            "rm/grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "time/rm_s": time.perf_counter() - t0}


def run_step(ctx: PhaseContext, next_batch: NextBatch) -> dict[str, float]:
    """The reward-model phase's step for the loop: the next pairs, the scheduled rate, one optimizer step."""
    return scheduled_step(ctx, next_batch("pref"), "rm", rm_step)


@torch.no_grad()
def evaluate_pairs(ctx: PhaseContext, pairs: list[Pair]) -> dict[str, float]:
    """Held-out pair accuracy, loss and margin (EVAL_FILE in MODE=rm), no update: each rank its shard,
    every rank as many forwards (a rank short of pairs repeats the first and drops the result, as
    ``evaluate`` does), one all-reduce of the sums."""
    t0 = time.perf_counter()
    dist, tok, p = ctx.dist, ctx.tokenizer, ctx.cfg.pref
    ctx.engine.eval()
    chunk = max(1, p.batch // (dist.world * p.grad_accum))
    mine = pairs[dist.rank::dist.world]
    sums = torch.zeros(len(KEYS) + 1, dtype=torch.float64)
    for c in range(math.ceil(math.ceil(len(pairs) / dist.world) / chunk)):
        part = mine[c * chunk:(c + 1) * chunk]
        b = collate_scored(part or pairs[:1], tok.pad_token_id, tok.eos_token_id)
        scores, _ = pair_scores(ctx.engine, b, dist.device)
        B = scores.shape[0] // 2
        loss = pref_math.bradley_terry_loss(scores[:B], scores[B:], b["margin"].to(scores.device))
        if part:
            sums += torch.cat([sums_of(loss, scores).double().cpu(), torch.tensor([float(B)], dtype=torch.float64)])
    g = dist.all_reduce_sum(sums.float().to(dist.device)).double().cpu().tolist()
    n = max(g[-1], 1.0)
    return {**{f"eval/{k}": v / n for k, v in zip(KEYS, g)}, "eval/items": g[-1],
            "time/eval_s": time.perf_counter() - t0}
