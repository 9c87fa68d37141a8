"""Preference pairs: read and check them, tokenise each side as an SFT example, batch chosen and rejected.

A pair (:func:`hybrid_ds.data.formats.pair_problem`) is ``{"prompt", "chosen", "rejected"}``, all text or
all message lists. Each side is tokenised as the ``prompt_completion`` item ``{"prompt", "completion":
side}`` would be (:func:`hybrid_ds.data.batches.tokenize_items`): the same prompt ids, response-only
labels, conversations through the chat template, so the log-probs DPO compares are those SFT trains.
docs/preference.md shows both forms.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

from hybrid_ds.data.batches import Example, collate_sft, tokenize_items
from hybrid_ds.data.formats import pair_problem
from hybrid_ds.data.items import DataError, DataReport, read_items


@dataclass
class Pair:
    """One tokenised preference pair: each side an :class:`~hybrid_ds.data.batches.Example` whose
    target is that response."""

    index: int  # the item's position among the items kept
    item: dict
    chosen: Example
    rejected: Example


def load_pairs(path: str, *, key: str = "TRAIN_FILE", split: str = "train", config: str = "",
               shuffle: bool = True, seed: int = 0, num_samples: int = 0, on_bad_item: str = "error",
               report: Optional[DataReport] = None, percent: float = 100.0) -> list[dict]:
    """Read (:func:`hybrid_ds.data.items.read_items`), check, shuffle (with ``seed``) and subset the
    pairs of ``path``; a bad item raises DataError naming ``key``, the file and the item (ON_BAD_ITEM)."""
    report = report if report is not None else DataReport()
    raw = read_items(path, split, config, key)
    report.total = len(raw)  # no DATA_FORMAT line: a pairs file has one format
    items = []
    for i, item in enumerate(raw):
        problem = pair_problem(item)
        if problem is None:
            items.append(item)
        elif on_bad_item == "error":
            raise DataError(f"{key} {path!r} item {i}: {problem}. Fix the item, or set ON_BAD_ITEM=skip to skip "
                            f"such items (read as preference pairs).")
        else:
            report.skipped[problem] = report.skipped.get(problem, 0) + 1
    if not items:
        raise DataError(f"{key} {path!r}: no usable preference pairs (of {len(raw)}).")
    if shuffle:
        random.Random(seed).shuffle(items)
    n = num_samples if num_samples > 0 else max(1, math.ceil(len(items) * percent / 100.0))
    report.used = len(items[:n])
    return items[:n]


def tokenize_pairs(items: list[dict], tokenizer, maxseq: int, report: Optional[DataReport] = None,
                   key: str = "TRAIN_FILE") -> list[Pair]:
    """The pairs whose both sides keep a response token within MAXSEQ, each side tokenised as a
    ``prompt_completion`` item (module docstring); truncations and drops land in ``report``."""
    report = report if report is not None else DataReport()
    sides = {}
    for side in ("chosen", "rejected"):
        as_items = [{"prompt": it["prompt"], "completion": it[side]} for it in items]
        try:
            examples = tokenize_items(as_items, tokenizer, "", maxseq, report, data_format="prompt_completion")
        except DataError as e:
            raise DataError(f"{key}: {side} responses: {e}") from None
        sides[side] = {ex.index: ex for ex in examples}
    kept = [i for i in range(len(items)) if i in sides["chosen"] and i in sides["rejected"]]
    if not kept:
        raise DataError(f"{key}: no preference pair has both responses within MAXSEQ={maxseq}; raise MAXSEQ.")
    return [Pair(n, items[i], sides["chosen"][i], sides["rejected"][i]) for n, i in enumerate(kept)]


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict:
    """One right-padded SFT batch ``(2B, L)`` of the pairs: the ``B`` chosen sequences, then the ``B``
    rejected ones (labels -100 off each response), as TRL's preference collator orders them."""
    return collate_sft([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
