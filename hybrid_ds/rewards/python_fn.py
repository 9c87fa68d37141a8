"""The ``python`` reward leaf: a function of the user's with the signature of TRL's ``reward_funcs``,

    fn(prompts, completions, **item_fields) -> list[float]

called once per batch with keyword arguments, as TRL's GRPOTrainer calls it. ``item_fields`` are the
items' other fields as lists aligned with the batch (TRL passes the dataset's columns the same way).
A conversational item (``messages``, or ``prompt`` + ``completion`` as message lists; docs/data.md)
gives its prompt as the list of turns before the response and its completion as
``[{"role": "assistant", "content": response}]``, TRL's conversational format; any other item gives
both as strings. The function is imported and its signature checked when the spec is validated;
nothing in a spec is evaluated as code.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Callable

from hybrid_ds.config.imports import import_named

from .models import chat_history
from .text import BatchFn

NOT_FIELDS = ("prompt", "completion")  # passed as prompts/completions; TRL never passes them as fields
RESERVED = ("prompts", "completions")  # the two arguments every call passes; no item field may take them


@functools.lru_cache(maxsize=None)  # imported once per process: validation checks it, building reuses it
def load_reward_function(spec: str) -> Callable:
    """The callable ``spec`` names (``package.module:name``). Raises ValueError saying what is wrong: the
    form, the import, a missing or non-callable attribute, or a signature that cannot take
    ``(prompts=..., completions=..., **item_fields)``."""
    fn = import_named(spec, repr(spec))
    problem = signature_problem(fn)
    if problem:
        raise ValueError(f"{spec!r}: {problem}")
    return fn


def signature_problem(fn: Callable) -> str | None:
    """Why ``fn`` cannot be called as ``fn(prompts=..., completions=..., **item_fields)``, or None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to inspect (some builtins): the first call will tell
        return None
    params = sig.parameters.values()
    call = f"{getattr(fn, '__name__', 'fn')}{sig}"
    for p in params:
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty:
            return f"{call} has the positional-only parameter {p.name!r}; rewards are called with keywords"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return f"{call} cannot be called as fn(prompts, completions, **item_fields): it needs a **kwargs parameter"
    for name in RESERVED:
        p = sig.parameters.get(name)
        if p is not None and p.kind is inspect.Parameter.POSITIONAL_ONLY:
            return f"{call}: {name!r} is positional-only; rewards pass it as a keyword"
    return None


def check_python_spec(spec: dict, path: str) -> list[str]:
    """Validation of a ``python`` leaf: the function imports and its signature fits."""
    name = spec.get("function")
    if not isinstance(name, str):
        return []  # the parameter check reports a missing or mistyped function
    try:
        load_reward_function(name)
    except ValueError as e:
        return [f"{path}.function: {e}"]
    return []


def is_conversational(item) -> bool:
    """Whether ``item`` holds its conversation as messages (docs/data.md)."""
    if not isinstance(item, dict):
        return False
    return isinstance(item.get("messages"), list) or (
        isinstance(item.get("prompt"), list) and isinstance(item.get("completion"), list))


def item_fields(items: list, name: str) -> dict[str, list]:
    """Every field of the items except ``prompt`` and ``completion`` (TRL's), as lists aligned with the
    batch; an item that lacks a field (or is None) gives None there."""
    keys = list(dict.fromkeys(k for it in items if isinstance(it, dict) for k in it if k not in NOT_FIELDS))
    clash = [k for k in keys if k in RESERVED]
    if clash:
        raise ValueError(f"python reward {name}: item field {clash[0]!r} would clash with the argument of that name")
    return {k: [it.get(k) if isinstance(it, dict) else None for it in items] for k in keys}


def checked_scores(out, n: int, name: str) -> list[float]:
    """``out`` as ``n`` finite floats; a ValueError naming the function otherwise."""
    if hasattr(out, "tolist"):  # a numpy array or a tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"python reward {name} returned {type(out).__name__}, not a list of floats (one per sample)")
    if len(out) != n:
        raise ValueError(f"python reward {name} returned {len(out)} scores for {n} samples")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"python reward {name} returned {s!r} as a score; every score must be a finite number")
    return [float(s) for s in out]


def build_python(p: dict, ctx) -> BatchFn:
    """The batch function around the named function: one call per batch, its return checked."""
    return trl_batch(load_reward_function(p["function"]), p["function"])


def trl_batch(fn: Callable, name: str) -> BatchFn:
    """``fn`` (TRL's reward-function signature) as a reward's ``(responses, targets, prompts, items)``
    batch function: one keyword call per batch, TRL's conversational format for chat items, the
    return checked. The ``python`` leaf and ``hybrid_ds.train(..., reward_fns=...)`` both use it."""
    def score(responses, targets, prompts, items):
        conv = [is_conversational(it) for it in items]
        prompt_args = [chat_history(q, it) if c else q for q, it, c in zip(prompts, items, conv)]
        completions = [[{"role": "assistant", "content": r}] if c else r for r, c in zip(responses, conv)]
        fields = item_fields(items, name)
        try:
            out = fn(prompts=prompt_args, completions=completions, **fields)
        except Exception as e:  # noqa: BLE001 - the user's function failing: name it, the fault policy decides
            raise ValueError(f"python reward {name} raised {type(e).__name__}: {e}") from e
        return checked_scores(out, len(responses), name)
    return score
