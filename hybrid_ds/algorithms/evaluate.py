"""Evaluation on held-out items (EVAL_FILE): the SFT loss and the reward of greedy responses, with no
gradient, no update and no change to the run's state.

Every rank evaluates its shard (items ``rank, rank + world, ...``) and the sums are all-reduced through
``ctx.dist``, so the numbers are those of the whole set, whatever the world size:

* ``eval/loss``: the SFT loss of :mod:`hybrid_ds.algorithms.sft` over the whole held-out set as one
  batch: cross-entropy summed over every item's labelled (response) tokens, divided by their count.
* ``eval/reward_mean`` (and ``_std``): the run's REWARD (post-processing included, SCORE_CLIP not) on
  greedy responses to the held-out prompts. Greedy decoding makes it a property of the policy, not of a
  draw: the same on every evaluation of the same weights, on any number of ranks. The run's MAX_NEW_TOKENS,
  MIN_NEW_TOKENS, NO_REPEAT_NGRAM_SIZE and REPETITION_PENALTY apply, its sampling settings do not. A
  reward with state (EMA normalisation) is put back as it was, so evaluating changes no later score.
  Without a reward (MODE=sft) only the loss is computed.

Collectives are the same on every rank whatever its shard: the loss forwards run in as many chunks on
every rank (a rank with fewer items runs its last ones on a dummy item whose result it drops: under
ZeRO-3 each forward gathers parameters with every rank), generation runs inside one
``dist.generation_model`` (one gather under ZeRO-3, then no collective per token: ``generate``'s
``synced_gpus``, on by default under ZeRO-3, is turned off, as ranks generate for shards of different
sizes), the reward is
called once per rank, and one all-reduce sums the results.
"""

from __future__ import annotations

import math
import time

import torch

from hybrid_ds.algorithms.context import PhaseContext
from hybrid_ds.algorithms.ppo import eos_arg, finish_responses
from hybrid_ds.algorithms.sft import labelled_ce_sum
from hybrid_ds.data import IGNORE_INDEX, Example, collate_prompts, collate_sft, stop_token_ids


def shard(examples: list[Example], rank: int, world: int) -> list[Example]:
    """This rank's items: every ``world``-th from ``rank`` (shards differ in size by one at most)."""
    return examples[rank::world]


@torch.no_grad()
def eval_loss_sums(ctx: PhaseContext, examples: list[Example], mine: list[Example], chunk: int) -> tuple[float, float]:
    """``(summed CE, labelled tokens)`` of this rank's items ``mine``, ``chunk`` rows per forward; every rank
    runs ``ceil(ceil(len(examples) / world) / chunk)`` forwards (module docstring)."""
    per_rank = math.ceil(len(examples) / ctx.dist.world)
    ce, tokens = 0.0, 0.0
    for c in range(math.ceil(per_rank / chunk)):
        part = mine[c * chunk:(c + 1) * chunk]
        b = collate_sft(part or examples[:1], ctx.tokenizer.pad_token_id)
        ce_sum, _ = labelled_ce_sum(ctx.engine, b, ctx.dist.device)
        if part:
            ce += float(ce_sum)
            tokens += float((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    return ce, tokens


@torch.no_grad()
def greedy_responses(ctx: PhaseContext, examples: list[Example], chunk: int) -> tuple[list[str], torch.Tensor,
                                                                                      torch.Tensor]:
    """Greedy responses to ``examples``' prompts: ``(texts, lengths (B,), ended (B,))``, stopping at EOS
    or the chat template's end of turn as the rollout does (hybrid_ds/algorithms/ppo.py, ``generate``)."""
    cfg, tok, dev = ctx.cfg, ctx.tokenizer, ctx.dist.device
    stops = stop_token_ids(tok)
    max_prompt = max(1, cfg.data.maxseq - cfg.gen.max_new_tokens)
    g = cfg.gen
    texts, lengths, ended = [], [], []
    with ctx.dist.generation_model(ctx.engine) as lm:
        for s in range(0, len(examples), chunk):
            q_ids, q_mask = collate_prompts(examples[s:s + chunk], tok.pad_token_id, max_prompt)
            out = lm.generate(input_ids=q_ids.to(dev), attention_mask=q_mask.to(dev), do_sample=False,
                              max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens,
                              no_repeat_ngram_size=g.no_repeat_ngram_size, repetition_penalty=g.repetition_penalty,
                              eos_token_id=eos_arg(stops), pad_token_id=tok.pad_token_id,
                              use_cache=True, synced_gpus=False)  # whole weights: no per-token collective
            _, mask, end, shown = finish_responses(out[:, q_ids.shape[1]:], stops, tok, q_ids.shape[0])
            texts += shown
            lengths.append(mask.sum(1).cpu())
            ended.append(end.cpu())
    if not texts:
        return [], torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return texts, torch.cat(lengths), torch.cat(ended)


def evaluate(ctx: PhaseContext, examples: list[Example]) -> dict[str, float]:
    """Evaluate the policy on ``examples`` (the same list on every rank); metrics reduced across ranks.

    1. this rank's shard  2. the SFT loss sums  3. greedy responses and their reward (with a reward)
    4. one all-reduce of the sums
    """
    t0 = time.perf_counter()
    dist, engine = ctx.dist, ctx.engine
    engine.eval()  # no dropout; the phases set train mode themselves
    # 1. shard
    mine = shard(examples, dist.rank, dist.world)
    # 2. loss, one SFT micro-batch of rows per forward
    ce, tokens = eval_loss_sums(ctx, examples, mine, max(1, ctx.batches.sft.micro))
    sums = [ce, tokens, float(len(mine))]
    # 3. greedy responses, scored once by the run's reward (its state put back)
    reward = ctx.reward
    if reward is not None:
        texts, lengths, ended = greedy_responses(ctx, mine, max(1, ctx.batches.ppo.per_rank))
        state, faults = reward.state_dict(), reward.fault_count
        scores = reward.score_batch(texts, [e.target for e in mine], [e.prompt for e in mine], [e.item for e in mine])
        reward.load_state_dict(state)
        scores = torch.tensor(scores, dtype=torch.float64)
        sums += [float(scores.sum()), float((scores ** 2).sum()), float(lengths.sum()), float(ended.sum()),
                 float(reward.fault_count - faults)]
    # 4. totals over ranks
    total = dist.all_reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
    ce, tokens, n = total[:3]
    out = {"eval/loss": ce / tokens if tokens else float("nan"), "eval/tokens": tokens, "eval/items": n}
    if reward is not None:
        r_sum, r_sq, len_sum, ended_n, faults = total[3:]
        mean = r_sum / n
        out.update({"eval/reward_mean": mean, "eval/reward_std": math.sqrt(max(r_sq / n - mean * mean, 0.0)),
                    "eval/response_len": len_sum / n, "eval/eos_frac": ended_n / n, "eval/reward_faults": faults})
    out["time/eval_s"] = time.perf_counter() - t0
    return out
