"""Validation of HEADS, the task heads' specs (hybrid_ds/models/heads.py), on the config alone.

Each problem names ``HEADS[i].key`` so a user finds the entry at once. No torch is imported.
"""

from __future__ import annotations

import re
from typing import Any

HEAD_TYPES = ("classification", "regression")
HEAD_KEYS = ("name", "type", "field", "num_labels", "labels", "weight")
# a head's name is also its file name under OUTPUT_DIR/heads/ and a parameter name
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def head_problems(i: int, spec: Any) -> list[str]:
    """The problems of one HEADS entry ``spec`` at index ``i``."""
    at = f"HEADS[{i}]"
    if not isinstance(spec, dict):
        return [f"{at}: expected an object {{\"name\", \"type\", \"field\", ...}}, got {type(spec).__name__}."]
    problems = [f"{at}.{k}: unknown key; valid: {', '.join(HEAD_KEYS)}." for k in spec if k not in HEAD_KEYS]
    name, kind, field = spec.get("name"), spec.get("type"), spec.get("field")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"{at}.name: expected an identifier (letters, digits, _), got {name!r}.")
    if kind not in HEAD_TYPES:
        problems.append(f"{at}.type: expected one of {', '.join(HEAD_TYPES)}, got {kind!r}.")
    if not isinstance(field, str) or not field:
        problems.append(f"{at}.field: expected the name of the item field holding the label, got {field!r}.")
    weight = spec.get("weight", 1.0)
    if not _number(weight) or not weight > 0 or weight == float("inf"):
        problems.append(f"{at}.weight: expected a finite number > 0 (the head loss's weight), got {weight!r}.")
    n, labels = spec.get("num_labels"), spec.get("labels")
    if kind == "classification":
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            problems.append(f"{at}.num_labels: a classification head needs an integer >= 2, got {n!r}.")
        if labels is not None:
            if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)
                    and len(set(labels)) == len(labels)):
                problems.append(f"{at}.labels: expected a list of distinct strings, got {labels!r}.")
            elif isinstance(n, int) and len(labels) != n:
                problems.append(f"{at}.labels: {len(labels)} labels for num_labels={n}; give one name per label.")
    elif kind == "regression":
        if n not in (None, 1):
            problems.append(f"{at}.num_labels: a regression head predicts one number; omit it or give 1, got {n!r}.")
        if labels is not None:
            problems.append(f"{at}.labels: applies to classification heads only.")
    return problems


def heads_problems(heads: Any) -> list[str]:
    """Every problem of the HEADS list, names unique."""
    if not isinstance(heads, list):
        return [f"HEADS: expected a list of head specs, got {type(heads).__name__}."]
    problems = [p for i, spec in enumerate(heads) for p in head_problems(i, spec)]
    names = [s.get("name") for s in heads if isinstance(s, dict)]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(f"HEADS[{i}].name: {name!r} is used by an earlier head; names must be unique.")
    return problems
