"""Reward functions with TRL's ``reward_funcs`` signature, named by tests as ``reward_fns:<name>`` (pytest
puts tests/ on sys.path), and functions whose signature or return a ``python`` leaf must refuse."""

import math

CALLS: list[dict] = []  # every call of keyword_hits: its keyword arguments


def keyword_hits(prompts, completions, **item_fields):
    """Fraction of the item's ``keywords`` found in the completion's text (a conversational completion
    is a one-message list); records each call in CALLS."""
    CALLS.append({"prompts": prompts, "completions": completions, **item_fields})
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(k in t for k in kws) / len(kws) if kws else 0.0
            for t, kws in zip(texts, item_fields.get("keywords", [None] * len(texts)))]


def prompt_length(completions, **kwargs):
    """Characters of the completion per character of the prompt (prompts arrive in ``kwargs``)."""
    return [len(c) / max(len(p), 1) for c, p in zip(completions, kwargs["prompts"])]


def one_short(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def not_finite(prompts, completions, **kwargs):
    return [math.nan if c == "bad" else 1.0 for c in completions]


def not_a_list(prompts, completions, **kwargs):
    return "1.0"


def raises(prompts, completions, **kwargs):
    raise KeyError("solution")


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)


def positional_only(prompts, completions, /, **kwargs):
    return [0.0] * len(completions)


NOT_CALLABLE = 3


def length_per_answer(prompts, completions, output, **item_fields):
    """Characters of the completion per character of the item's ``output`` (+1); records each call."""
    CALLS.append({"prompts": prompts, "completions": completions, "output": output, **item_fields})
    return [len(c) / (len(o) + 1) for c, o in zip(completions, output)]
