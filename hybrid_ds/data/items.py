"""Training items: read them (JSON, JSONL, datasets files), check them, render the prompt template.

An item of the ``fields`` format (the other formats: :mod:`hybrid_ds.data.formats`) is a JSON object;
its output field (SELECT_OUTPUT) is the target, every other field becomes one ``key: value`` line of
the prompt (unless PROMPT_TEMPLATE says otherwise)::

    ### Prompt:\\n\\n```task: reverse\\ninput: a b c\\n```\\n\\n### Response:\\n\\n

Tokenising and batching them: :mod:`hybrid_ds.data.batches`.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from hybrid_ds.data.formats import detect_format, format_problem

PROMPT_HEAD = "### Prompt:\n\n```"
PROMPT_TAIL = "```\n\n### Response:\n\n"
_SCALARS = (str, int, float, bool)


class DataError(Exception):
    """A data problem with the item index and what to do about it."""


def _render_value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x).strip() for x in v)
    return str(v).strip()


def render_prompt(item: dict, output_field: str) -> str:
    """The prompt for ``item``: one ``key: value`` line per field except the output field.

    An item with no other field (a plain text corpus such as wikitext) uses its text as the prompt.
    """
    fields = [k for k in item if k != output_field] or [output_field]
    body = "".join(f"{k}: {_render_value(item[k])}\n" for k in fields)
    return PROMPT_HEAD + body + PROMPT_TAIL


def render_target(item: dict, output_field: str) -> str:
    """The target response: the output field, its first element when it is a list."""
    v = item[output_field]
    if isinstance(v, list):
        v = v[0]
    return str(v).strip()


def item_problem(item: Any, output_field: str) -> Optional[str]:
    """Why ``item`` cannot be rendered, or None."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if output_field not in item:
        return (f"missing output field {output_field!r} (fields: {', '.join(map(str, item)) or 'none'}); "
                f"set SELECT_OUTPUT to the field that holds the response")
    out = item[output_field]
    if isinstance(out, list):
        if not out:
            return f"output field {output_field!r} is an empty list"
        out = out[0]
    if not isinstance(out, _SCALARS) or isinstance(out, bool):
        return f"output field {output_field!r} is a {type(out).__name__}, not text"
    if not str(out).strip():
        return f"output field {output_field!r} is empty"
    for k, v in item.items():
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, _SCALARS) or x is None for x in vals):
            return f"field {k!r} holds a {type(v).__name__} that cannot be rendered as one prompt line"
    return None


# --------------------------------------------------------------------------------------
# loading


def demo_pairs(split: str = "train", key: str = "TRAIN_FILE") -> list[dict]:
    """builtin:demo-pairs: a preference pair per demo task item (hybrid_ds/data/pairs.py), checkably
    ranked: the prompt is the item's seed-template prompt, ``chosen`` its correct output, ``rejected``
    the output of the next item of the same task whose output differs (a wrong answer to this input).
    Split ``test`` holds every 8th item's pair (50), ``train`` the other 350."""
    if split not in ("train", "test"):
        raise DataError(f"{key} 'builtin:demo-pairs': no split {split!r} (has train, test); set "
                        f"{SPLIT_KEYS.get(key, 'SPLIT')}.")
    from hybrid_ds.assets import DEMO_TASKS

    with open(DEMO_TASKS, encoding="utf-8") as f:
        tasks = json.load(f)
    out = []
    for i, item in enumerate(tasks):
        later = tasks[i + 1:] + tasks[:i]
        wrong = next(t["output"] for t in later if t["task"] == item["task"] and t["output"] != item["output"])
        if (i % 8 == 0) == (split == "test"):
            out.append({"prompt": render_prompt(item, "output"), "chosen": item["output"], "rejected": wrong})
    return out


# The split key of each data key, for messages.
SPLIT_KEYS = {"TRAIN_FILE": "SPLIT", "EVAL_FILE": "EVAL_SPLIT"}


def read_items(path: str, split: str = "train", config: str = "", key: str = "TRAIN_FILE") -> list:
    """Raw items from a JSON list, JSONL, builtin:demo-tasks, builtin:demo-pairs (:func:`demo_pairs`), or
    anything ``datasets`` loads: a datasets file, a save_to_disk directory, a directory of data files or a
    hub dataset id (with its configuration ``config``, DATASET_CONFIG). ``key`` names the setting in
    messages (TRAIN_FILE, EVAL_FILE)."""
    if path == "builtin:demo-pairs":
        return demo_pairs(split, key)
    if path == "builtin:demo-tasks":
        from hybrid_ds.assets import DEMO_TASKS
        path = DEMO_TASKS
    problem = unreadable_data_file(path)
    if problem:
        raise DataError(f"{key} {path!r}: {problem}")
    if os.path.isfile(path) and path.endswith((".json", ".jsonl")):
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{key} {path!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                            f"{e.start}); re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            for key in ("data", "train", "items"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise DataError(f"{path}: a JSON object; expected a list of items (or an object with a 'data' list).")
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); expected a JSON list or "
                                    f"JSON Lines.") from None
        return items
    return _read_with_datasets(path, split, config, key)


# File extensions read by the datasets library, and its builder for each.
DATASETS_BUILDERS = {"csv": "csv", "tsv": "csv", "txt": "text", "parquet": "parquet", "arrow": "arrow"}


def unreadable_data_file(path: str) -> Optional[str]:
    """Why TRAIN_FILE ``path`` (a local path) cannot be read, or None; nothing is opened."""
    if not os.path.exists(path):
        return None  # a dataset name: the datasets library says what it can
    if not (os.path.isfile(path) or os.path.isdir(path)):
        return "not a regular file (a FIFO, socket or device); give a file or a save_to_disk directory."
    if os.path.isdir(path):
        return None
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext in ("json", "jsonl") or ext in DATASETS_BUILDERS:
        return None
    hint = " (decompress it first, e.g. gunzip)" if ext in ("gz", "bz2", "xz", "zst", "zip") else ""
    return (f"cannot read a .{ext or '<no extension>'} file{hint}; TRAIN_FILE takes .json (a list of items), "
            f".jsonl, {', '.join('.' + e for e in DATASETS_BUILDERS)} or a datasets save_to_disk directory.")


def _read_with_datasets(path: str, split: str, config: str = "", key: str = "TRAIN_FILE") -> list:
    import datasets

    hub = not os.path.exists(path)  # a hub dataset id (config/checks.py: hub_dataset_id)
    try:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_info.json")) or \
                os.path.isfile(os.path.join(path, "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            ext = os.path.splitext(path)[1].lstrip(".").lower()
            ds = datasets.load_dataset(DATASETS_BUILDERS[ext], data_files=path)
        elif hub:  # only the split asked for is downloaded and prepared
            ds = datasets.load_dataset(path, config or None, split=split)
        else:  # a local directory: its splits are cheap to list, so a wrong SPLIT names the others
            ds = datasets.load_dataset(path, config or None)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, the user gets its name and the reason
        text = str(e).strip()
        reason = " ".join(text.split("\n")[:2]) if text else type(e).__name__
        cause = str(e.__cause__ or "").strip()  # datasets wraps a builder's error in a generic one
        reason += f": {cause.splitlines()[0]}" if cause else ""
        what = "a hub dataset id (no such local path)" if hub else "the datasets library cannot load it"
        hint = f"; DATASET_CONFIG selects a configuration, {SPLIT_KEYS.get(key, 'SPLIT')} a split" if hub or \
            os.path.isdir(path) else ""
        raise DataError(f"{key} {path!r}: {what} ({reason}){hint}.") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (has {', '.join(ds)}); set {SPLIT_KEYS.get(key, 'SPLIT')}.")
        ds = ds[split]
    return [dict(r) for r in ds]


@dataclass
class DataReport:
    """What loading did, for the log and --dry-run."""

    total: int = 0
    used: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    empty_text_filtered: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    data_format: str = ""  # the format the items were read as (hybrid_ds.data.formats)
    detected: bool = False  # DATA_FORMAT=auto chose it

    def lines(self) -> list[str]:
        out = [f"items: {self.total} in file, {self.used} used"]
        if self.data_format:
            out.append(f"format: {self.data_format} ({'detected' if self.detected else 'DATA_FORMAT'})")
        if self.empty_text_filtered:
            out.append(f"empty text lines filtered: {self.empty_text_filtered}")
        for reason, n in self.skipped.items():
            out.append(f"skipped (ON_BAD_ITEM=skip): {n} x {reason}")
        if self.truncated:
            out.append(f"truncated to MAXSEQ: {self.truncated} (response cut, labels kept for what remains)")
        if self.dropped_too_long:
            out.append(f"dropped: {self.dropped_too_long} whose prompt alone fills MAXSEQ")
        return out


def load_items(path: str, output_field: str = "output", *, split: str = "train", shuffle: bool = True,
               seed: int = 0, percent: float = 100.0, num_samples: int = 0, on_bad_item: str = "error",
               report: Optional[DataReport] = None, data_format: str = "auto",
               prompt_template: str = "", config: str = "", key: str = "TRAIN_FILE") -> list[dict]:
    """Read (:func:`read_items`), check (as ``data_format``, detected per file when ``auto``:
    hybrid_ds.data.formats), shuffle (with ``seed``) and subset the items. Raises DataError on a bad item,
    naming the setting ``key``; the format lands in ``report``."""
    report = report if report is not None else DataReport()
    raw = read_items(path, split, config, key)
    report.total = len(raw)
    detected = detect_format(raw, output_field)  # one scan: the format, and whether the file is a text corpus
    fmt = detected if data_format == "auto" else data_format
    report.data_format, report.detected = fmt, data_format == "auto"
    if prompt_template and fmt != "fields":
        raise DataError(f"PROMPT_TEMPLATE applies to the fields format; {key} {path!r} is read as {fmt} "
                        f"({'detected' if data_format == 'auto' else 'DATA_FORMAT'}). Remove PROMPT_TEMPLATE, "
                        f"or set DATA_FORMAT=fields.")
    text_only = detected == "text"
    items = []
    for i, item in enumerate(raw):
        if text_only and not str(item[output_field]).strip():
            report.empty_text_filtered += 1  # a text corpus's blank lines (wikitext)
            continue
        problem = None
        if fmt in ("fields", "text"):  # a text item's other fields are ignored, so never checked
            text_part = fmt == "text" and isinstance(item, dict) and output_field in item
            problem = item_problem({output_field: item[output_field]} if text_part else item, output_field)
        problem = problem or format_problem(item, fmt, output_field, prompt_template)
        if problem:
            if on_bad_item == "error":
                how = "detected; DATA_FORMAT names another" if data_format == "auto" else "from DATA_FORMAT"
                raise DataError(f"{key} {path!r} item {i}: {problem}. Fix the item, or set ON_BAD_ITEM=skip "
                                f"to skip such items (read as the {fmt} format, {how}).")
            report.skipped[problem] = report.skipped.get(problem, 0) + 1
            continue
        items.append(item)
    if not items:
        raise DataError(f"{key} {path!r}: no usable items (of {len(raw)}).")
    if shuffle:
        random.Random(seed).shuffle(items)
    n = num_samples if num_samples > 0 else max(1, math.ceil(len(items) * percent / 100.0))
    items = items[:n]
    report.used = len(items)
    return items






