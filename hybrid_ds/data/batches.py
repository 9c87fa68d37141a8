"""Tokenised examples and their batches: response-only labels, padding, the global batch order.

SFT text = prompt + target + EOS, with the prompt tokens labelled -100. Prompt and target are
tokenised separately so the prompt ids are exactly those PPO generates from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional

from hybrid_ds.data.items import DataError, DataReport, render_prompt, render_target
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenised item. ``target_ids`` ends with EOS unless truncation cut it."""

    index: int
    item: dict
    prompt: str
    target: str
    prompt_ids: list
    target_ids: list


def tokenize_items(items: list[dict], tokenizer, output_field: str, maxseq: int,
                   report: Optional[DataReport] = None) -> list[Example]:
    """Examples with prompt and target tokenised separately; long ones truncated (and counted)."""
    report = report if report is not None else DataReport()
    prompts = [render_prompt(it, output_field) for it in items]
    targets = [render_target(it, output_field) for it in items]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    out = []
    for i, (it, p, t, pi, ti) in enumerate(zip(items, prompts, targets, p_ids, t_ids)):
        ti = list(ti) + [tokenizer.eos_token_id]
        if len(pi) >= maxseq:
            report.dropped_too_long += 1  # no response token would survive: never an all-masked example
            continue
        if len(pi) + len(ti) > maxseq:
            report.truncated += 1
            ti = ti[: maxseq - len(pi)]
        out.append(Example(i, it, p, t, list(pi), ti))
    if not out:
        raise DataError(f"every item's prompt is at least MAXSEQ={maxseq} tokens long; raise MAXSEQ.")
    return out


def collate_sft(examples: list[Example], pad_id: int):
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (B, L); labels -100 off the response."""
    import torch

    L = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    lab = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        seq = e.prompt_ids + e.target_ids
        ids[r, : len(seq)] = torch.tensor(seq)
        att[r, : len(seq)] = 1
        lab[r, len(e.prompt_ids): len(seq)] = torch.tensor(e.target_ids)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def collate_prompts(examples: list[Example], pad_id: int, max_prompt: int):
    """Left-padded prompts (B, P) for generation; prompts longer than ``max_prompt`` keep their end."""
    import torch

    seqs = [e.prompt_ids[-max_prompt:] for e in examples]
    P = max(map(len, seqs))
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), P), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, P - len(s):] = torch.tensor(s)
        att[r, P - len(s):] = 1
    return ids, att


class BatchStream:
    """Global batches of example indices, epoch after epoch, reproducible from (seed, position).

    Epoch ``e`` walks a permutation drawn from ``seed + e`` (identity when not shuffling) and drops
    its incomplete tail, so every rank derives the same global batch with no communication.
    """

    def __init__(self, n: int, global_batch: int, seed: int, shuffle: bool):
        if global_batch > n:
            raise DataError(f"batch of {global_batch} is larger than the {n} usable items; lower the batch "
                            f"size or use more data.")
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.position = 0  # global batches handed out so far

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(idx)
        return idx

    def next(self) -> list[int]:
        epoch, k = divmod(self.position, self.batches_per_epoch)
        self.position += 1
        return self._order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def rank_slice(batch: list, rank: int, world: int) -> list:
    """This rank's contiguous share of a global batch."""
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]


def micro_batches(batch: list, accum: int) -> list[list]:
    """Split a rank's batch into ``accum`` equal micro-batches."""
    per = len(batch) // accum
    return [batch[i * per:(i + 1) * per] for i in range(accum)]
