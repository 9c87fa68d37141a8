"""Tokenised examples and their batches: response-only labels, padding, the global batch order.

Plain formats: SFT text = prompt + target + EOS, with the prompt tokens labelled -100. Prompt and
target are tokenised separately so the prompt ids are exactly those PPO generates from.
Conversations (:mod:`hybrid_ds.data.chat`): the whole conversation is one SFT sequence labelled on
its assistant turns; the PPO prompt is the history before the last assistant turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional

from hybrid_ds.data.chat import stop_token_ids, tokenize_conversation
from hybrid_ds.data.formats import Sample, detect_format, render_template
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
    sft_ids: Optional[list] = None  # conversations: the whole SFT sequence (prompt + target otherwise)
    sft_labels: Optional[list] = None  # conversations: its labels, IGNORE_INDEX off the assistant turns

    def sft_sequence(self) -> tuple[list, list]:
        """``(input ids, labels)`` of the SFT sequence."""
        if self.sft_ids is not None:
            return self.sft_ids, self.sft_labels
        return self.prompt_ids + self.target_ids, [IGNORE_INDEX] * len(self.prompt_ids) + self.target_ids


def to_sample(item: dict, fmt: str, output_field: str, template: str = "") -> Sample:
    """The :class:`~hybrid_ds.data.formats.Sample` of an item already checked as format ``fmt``."""
    if fmt == "fields":
        prompt = render_template(template, item) if template else render_prompt(item, output_field)
        return Sample(render_target(item, output_field), prompt=prompt)
    if fmt == "text":
        only = {output_field: item[output_field]}
        return Sample(render_target(only, output_field), prompt=render_prompt(only, output_field))
    if fmt == "messages":
        msgs = [{"role": m["role"], "content": m["content"]} for m in item["messages"]]
        return Sample(msgs[-1]["content"].strip(), messages=msgs)
    p, c = item["prompt"], item["completion"]
    if isinstance(p, str):
        return Sample(c, prompt=p)  # as TRL does: prompt + completion exactly as written
    msgs = [{"role": m["role"], "content": m["content"]} for m in p + c]
    return Sample(msgs[-1]["content"].strip(), messages=msgs, first_labelled=len(p))


def tokenize_items(items: list[dict], tokenizer, output_field: str, maxseq: int,
                   report: Optional[DataReport] = None, *, data_format: str = "auto",
                   prompt_template: str = "") -> list[Example]:
    """Examples with prompt and target tokenised separately; long ones truncated (and counted).

    ``data_format`` is one of :data:`hybrid_ds.data.formats.FORMATS` (``auto``: detected from the
    items); conversations go through the tokenizer's chat template when it has one."""
    report = report if report is not None else DataReport()
    fmt = detect_format(items, output_field) if data_format == "auto" else data_format
    samples = [to_sample(it, fmt, output_field, prompt_template) for it in items]
    plain = [k for k, s in enumerate(samples) if s.messages is None]
    p_ids = tokenizer([samples[k].prompt for k in plain], add_special_tokens=False)["input_ids"] if plain else []
    t_ids = tokenizer([samples[k].target for k in plain], add_special_tokens=False)["input_ids"] if plain else []
    plain_ids = {k: (pi, ti) for k, pi, ti in zip(plain, p_ids, t_ids)}
    stops = stop_token_ids(tokenizer) if len(plain) < len(samples) else []
    out = []
    for i, (it, s) in enumerate(zip(items, samples)):
        ex = (_plain_example(i, it, s, *plain_ids[i], tokenizer.eos_token_id, maxseq, report) if i in plain_ids
              else _conversation_example(i, it, s, tokenizer, stops, maxseq, report))
        if ex is not None:
            out.append(ex)
    if not out:
        raise DataError(f"every item's prompt is at least MAXSEQ={maxseq} tokens long; raise MAXSEQ.")
    return out


def _plain_example(i, item, s: Sample, pi, ti, eos_id, maxseq, report) -> Optional[Example]:
    ti = list(ti) + [eos_id]
    if len(pi) >= maxseq:
        report.dropped_too_long += 1  # no response token would survive: never an all-masked example
        return None
    if len(pi) + len(ti) > maxseq:
        report.truncated += 1
        ti = ti[: maxseq - len(pi)]
    return Example(i, item, s.prompt, s.target, list(pi), ti)


def _conversation_example(i, item, s: Sample, tokenizer, stops, maxseq, report) -> Optional[Example]:
    try:
        ids, flags, last = tokenize_conversation(s.messages, s.first_labelled, tokenizer, stops)
    except Exception as e:  # noqa: BLE001 - a user's template failing on a user's item: name both
        raise DataError(f"TRAIN_FILE: the chat template cannot render the conversation starting "
                        f"{s.messages[0]['content'][:40]!r} ({str(e).strip() or type(e).__name__}); fix the item "
                        f"or set CHAT_TEMPLATE (a Jinja file, or none for the plain rendering).") from None
    prompt_ids = ids[:last]  # PPO's prompt; collate_prompts keeps its end when it is long
    target_ids = [t for t, f in zip(ids[last:], flags[last:]) if f]
    if flags.index(1) >= maxseq:
        report.dropped_too_long += 1  # not one labelled token within MAXSEQ: never an all-masked example
        return None
    if len(ids) > maxseq:
        report.truncated += 1
        ids, flags = ids[:maxseq], flags[:maxseq]
    labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
    return Example(i, item, tokenizer.decode(prompt_ids), s.target, prompt_ids, target_ids, ids, labels)


def collate_sft(examples: list[Example], pad_id: int):
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (B, L); labels -100 off the response
    (conversations: off the assistant turns)."""
    import torch

    seqs = [e.sft_sequence() for e in examples]
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    lab = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for r, (seq, labels) in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq)
        att[r, : len(seq)] = 1
        lab[r, : len(seq)] = torch.tensor(labels)
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
