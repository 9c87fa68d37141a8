"""The SFT phase: one optimizer step of response-only cross-entropy over a global batch.

The loss is the mean over *all response tokens of the global batch*: each micro-batch's summed
token loss is divided by the global token count (all-reduced once per step) and multiplied by the
data-parallel world (DDP and DeepSpeed average gradients over ranks). So 1 process x accumulation 4
and 2 processes x accumulation 2 give the same gradient, whatever the split.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from hybrid_ds.algorithms.context import NextBatch, PhaseContext
from hybrid_ds.data import IGNORE_INDEX, Example, collate_sft, micro_batches
from hybrid_ds.models.heads import head_loss_sums, head_targets, pool_last, task_heads_of
from hybrid_ds.models.logprobs import logprobs_from_logits
from hybrid_ds.models.policy_value import final_hidden


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions. logits ``(B, L, V)``, labels ``(B, L)``.

    ``-log p(label)`` through :func:`hybrid_ds.models.logprobs.logprobs_from_logits`, whose
    logsumexp runs in fp32 blocks of at most 2**24 elements, forward and backward: no fp32
    ``(B, L, V)`` copy of half-precision logits is made (``F.cross_entropy`` on ``logits.float()``
    would make one, gigabytes at a 150 k vocabulary). Equal to ``F.cross_entropy(..., reduction="sum")``
    to float32 rounding (tests/test_model.py).
    """
    # Position t predicts label t + 1; the last position predicts nothing. Shifting the labels, not
    # slicing the logits, lets the backward write the logits' gradient without a sliced copy.
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    keep = nxt != IGNORE_INDEX
    logp = logprobs_from_logits(logits, nxt.masked_fill(~keep, 0))
    return -(logp * keep).sum()


def labelled_tail(labels: torch.Tensor) -> int:
    """How many last positions of ``labels`` ``(B, L)`` the loss needs logits for: from the first
    position, in any row, whose next token is labelled (the prompts before it need no LM head)."""
    cols = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - (int(cols[0]) if len(cols) else labels.shape[1] - 1)


def labelled_ce_sum(engine, batch: dict, device, with_values: bool = False):
    """Summed CE of one collated (CPU) SFT batch and, with ``with_values``, the values of the positions
    it ran; the LM head runs on the labelled tail only (:func:`labelled_tail`)."""
    keep = labelled_tail(batch["labels"])
    b = {k: v.to(device) for k, v in batch.items()}
    logits, values = engine(b["input_ids"], b["attention_mask"], with_values=with_values, keep_last=keep)
    return token_ce_sum(logits, b["labels"][:, -keep:]), values


def sft_step(engine, examples: list[Example], *, accum: int, lr: float, pad_id: int, dist,
             momentum: Optional[float] = None) -> dict[str, float]:
    """One SFT optimizer step on this rank's share of the global batch; metrics reduced across ranks.

    1. split into ``accum`` micro-batches and count the global response tokens (and, with task
       heads, the global count of items that carry each head's field)
    2. forward/backward each micro-batch (accumulation boundary on the last)
    3. step with the SFT learning rate for the policy and the task heads, 0 for the value head

    With task heads (HEADS, models/heads.py) the loss is multi-task: the token mean of the CE plus,
    per head, ``weight`` x the head's loss averaged over the global batch's items that carry its field.
    """
    t0 = time.perf_counter()
    engine.train()
    heads = task_heads_of(engine.module)
    specs = heads.specs if heads is not None else []
    # 1. micro-batches and the global normalisers: [response tokens, items per head ...]
    groups = micro_batches(examples, accum)
    micros = [collate_sft(m, pad_id) for m in groups]
    targets = [head_targets([e.item for e in m], specs) for m in groups]
    local = [float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micros))]
    local += [float(sum(int(t[h][0].sum()) for t in targets)) for h in range(len(specs))]
    counts = dist.all_reduce_sum(torch.tensor(local))
    n_tokens, n_items = float(counts[0]), counts[1:].clamp(min=1.0)
    weights = torch.tensor([float(s.get("weight", 1.0)) for s in specs]) * dist.world / n_items
    # 2. forward/backward
    ce_total = torch.zeros((), device=dist.device)
    head_total = torch.zeros(len(specs), device=dist.device)
    for i, b in enumerate(micros):
        boundary = i == len(micros) - 1
        with engine.no_sync(boundary):
            with final_hidden(engine.module.lm, on=heads is not None) as final:  # the task heads' input
                ce_sum, values = labelled_ce_sum(engine, b, dist.device, with_values=True)
            # 0 x values: every parameter takes part in the graph, so ZeRO sees a (zero) value-head
            # gradient rather than a missing one; the value head itself stays unchanged (lr 0).
            loss = ce_sum * dist.world / n_tokens + (0.0 * values.sum() if values is not None else 0.0)
            if heads is not None:
                outputs = heads(pool_last(final.hidden, b["attention_mask"]))
                head_sums = head_loss_sums(outputs, specs, targets[i])
                loss = loss + (head_sums * weights.to(head_sums.device)).sum()
                head_total += head_sums.detach()
            engine.backward(loss, boundary)
        ce_total += ce_sum.detach()
    # 3. optimizer step
    grad_norm = engine.step({"policy": lr, "value": 0.0, "heads": lr}, momentum)
    loss = float(dist.all_reduce_sum(ce_total.reshape(1).float())[0]) / max(n_tokens, 1.0)
    dt = time.perf_counter() - t0
    m = {"sft/loss": loss, "sft/lr": lr, "sft/grad_norm": grad_norm if grad_norm is not None else float("nan"),
         "sft/tokens": n_tokens, "perf/sft_tokens_per_s": n_tokens / dt, "time/sft_s": dt}
    if heads is not None:
        head_means = dist.all_reduce_sum(head_total.float().cpu()) / n_items
        m.update({f"sft/head/{s['name']}/loss": float(v) for s, v in zip(specs, head_means)})
    return m


def run_step(ctx: PhaseContext, next_batch: NextBatch) -> dict[str, float]:
    """The SFT phase's step for the loop: the next batch, the scheduled rates, one optimizer step."""
    sched = ctx.schedules["sft"]
    m = sft_step(ctx.engine, next_batch("sft"), accum=ctx.batches.sft.accum, lr=sched.lr,
                 pad_id=ctx.tokenizer.pad_token_id, dist=ctx.dist, momentum=sched.momentum)
    sched.step(m.get(ctx.cfg.sched.plateau_metric or "sft/loss"))
    return m
