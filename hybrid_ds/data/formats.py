"""The shapes an item may have, detected per file (DATA_FORMAT=auto) or named, each with one check.

* ``fields``: a JSON object whose output field (SELECT_OUTPUT) is the target; the prompt is
  PROMPT_TEMPLATE over the other fields, or the seed template (:func:`hybrid_ds.data.items.render_prompt`).
* ``text``: a text corpus, ``{"text": ...}`` with SELECT_OUTPUT=text: the seed template over the
  text, and the text as the target.
* ``prompt_completion``: TRL's ``{"prompt": ..., "completion": ...}``, both text (concatenated as they
  are) or both message lists (rendered as a conversation, only the completion's assistant turns labelled).
* ``messages``: TRL's conversational ``{"messages": [{"role": ..., "content": ...}, ...]}``: every
  assistant turn is labelled; PPO's prompt is the history before the last assistant turn, its target
  that turn.

The checks of ``fields`` and ``text`` items themselves are :func:`hybrid_ds.data.items.item_problem`'s;
this module adds PROMPT_TEMPLATE's and the other formats'. Every item the original data shape accepts
has its output field, and auto-detection picks ``prompt_completion`` or ``messages`` only for objects
without one, so seed data reads as before.
How each format is rendered and labelled: docs/data.md.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any, Optional

FORMATS = ("fields", "text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    """One item as text, before tokenisation: a plain prompt and target, or a conversation."""

    target: str  # what the reward compares a response with (conversations: the last assistant turn)
    prompt: str = ""  # plain formats: the prompt text
    messages: Optional[list] = None  # conversations: role/content dicts, ending with an assistant turn
    first_labelled: int = 0  # conversations: assistant turns from this message index on are labelled


# --------------------------------------------------------------------------------------
# PROMPT_TEMPLATE


def template_fields(template: str) -> list[str]:
    """The field names of a PROMPT_TEMPLATE such as ``"Q: {question}\\nA: "``; ValueError says what is wrong.

    Only plain ``{field}`` placeholders: the template is split here and filled by
    :func:`render_template`, never passed to ``str.format``, so no attribute or index lookup, conversion
    or format spec can run (``{{`` and ``}}`` are literal braces).
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{e}; write {{field}} for a field and {{{{ or }}}} for a literal brace") from None
    names = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            raise ValueError(f"{shown} is positional; name the item's field, e.g. {{question}}")
        if "." in name or "[" in name:
            raise ValueError(f"{shown} looks up an attribute or index; only plain {{field}} names are allowed")
        if conv or spec:
            raise ValueError(f"{shown} has a conversion or format spec; only plain {{{name}}} is allowed")
        names.append(name)
    if not names:
        raise ValueError("names no field; write e.g. \"Q: {question}\\nA: \"")
    return names


def render_template(template: str, item: dict) -> str:
    """PROMPT_TEMPLATE filled from ``item``: each value as in the seed template (lists joined by commas)."""
    def text(v):
        return ", ".join(str(x).strip() for x in v) if isinstance(v, list) else str(v).strip()

    return "".join(lit + ("" if name is None else text(item[name]))
                   for lit, name, _, _ in string.Formatter().parse(template))


def prompt_template_problem(template: str, output_field: str) -> Optional[str]:
    """Why PROMPT_TEMPLATE cannot be used on its own (before any data is read), or None."""
    if not template:
        return None
    try:
        names = template_fields(template)
    except ValueError as e:
        return f"PROMPT_TEMPLATE {template!r}: {e}."
    if output_field in names:
        return (f"PROMPT_TEMPLATE {template!r} uses the output field {{{output_field}}} (SELECT_OUTPUT), which "
                f"would show the model its target; leave it out of the prompt.")
    return None


# --------------------------------------------------------------------------------------
# detection and checks


def detect_format(raw: list, output_field: str) -> str:
    """The format of a file's items: ``text`` when every item holds only the output field; else by the
    first object's keys (objects that have the output field are always ``fields``)."""
    if raw and all(isinstance(r, dict) and set(r) == {output_field} for r in raw):
        return "text"
    first = next((r for r in raw if isinstance(r, dict)), None)
    if first is None or output_field in first:
        return "fields"
    if "messages" in first:
        return "messages"
    if "prompt" in first and "completion" in first:
        return "prompt_completion"
    return "fields"


def _messages_problem(msgs: Any, where: str) -> Optional[str]:
    if not isinstance(msgs, list) or not msgs:
        return f"{where} is {'an empty list' if msgs == [] else 'a ' + type(msgs).__name__}, not a list of messages"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"{where}[{j}] is a {type(m).__name__}, not a {{\"role\": ..., \"content\": ...}} object"
        if m.get("role") not in ROLES:
            return f"{where}[{j}].role is {m.get('role')!r}; roles are {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return (f"{where}[{j}].content is {'missing' if 'content' not in m else type(m['content']).__name__}; "
                    f"it must be text")
    return None


def _conversation_end_problem(msgs: list, where: str) -> Optional[str]:
    if msgs[-1]["role"] != "assistant":
        return (f"{where} ends with a {msgs[-1]['role']!r} turn; the last turn must be the assistant's "
                f"(the target), so drop the trailing turns")
    if not msgs[-1]["content"].strip():
        return f"{where}[{len(msgs) - 1}].content (the last assistant turn) is empty"
    return None


def format_problem(item: Any, fmt: str, output_field: str, template: str = "") -> Optional[str]:
    """Why ``item`` cannot be read as format ``fmt``, naming the field, or None (for ``fields`` and
    ``text`` only what :func:`hybrid_ds.data.items.item_problem` does not check: PROMPT_TEMPLATE's fields)."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if fmt == "text":
        return None
    if fmt == "fields":
        if not template:
            return None
        missing = [n for n in template_fields(template) if n not in item]
        if missing:
            return (f"PROMPT_TEMPLATE names field {missing[0]!r}, which the item lacks (fields: "
                    f"{', '.join(map(str, item))})")
        return None
    if fmt == "messages":
        if "messages" not in item:
            return f"missing field 'messages' (fields: {', '.join(map(str, item)) or 'none'})"
        return _messages_problem(item["messages"], "messages") or _conversation_end_problem(item["messages"],
                                                                                           "messages")
    for key in ("prompt", "completion"):
        if key not in item:
            return f"missing field {key!r} (fields: {', '.join(map(str, item)) or 'none'})"
    p, c = item["prompt"], item["completion"]
    if isinstance(p, str) and isinstance(c, str):
        return "field 'completion' is empty" if not c.strip() else None
    if isinstance(p, list) and isinstance(c, list):
        return (_messages_problem(p, "prompt") or _messages_problem(c, "completion")
                or _conversation_end_problem(c, "completion"))
    return (f"fields 'prompt' ({type(p).__name__}) and 'completion' ({type(c).__name__}) must both be text or "
            f"both message lists")


# --------------------------------------------------------------------------------------
# preference pairs (hybrid_ds/data/pairs.py)

PAIR_KEYS = ("prompt", "chosen", "rejected")


def pair_problem(item: Any) -> Optional[str]:
    """Why ``item`` is not a preference pair, naming the field, or None.

    A pair is TRL's explicit-prompt preference item: ``prompt``, ``chosen`` and ``rejected`` all text
    (each response is appended to the prompt as written), or all message lists (the prompt is the
    shared conversation; ``chosen`` and ``rejected`` are the assistant turns that continue it, rendered
    as the ``prompt_completion`` format's conversations are). An optional numeric ``margin`` is the
    amount by which MODE=rm's reward of ``chosen`` should beat ``rejected``'s (Llama 2's margin)."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    missing = [k for k in PAIR_KEYS if k not in item]
    if missing:
        return (f"missing field {missing[0]!r} (fields: {', '.join(map(str, item)) or 'none'}); a preference "
                f"pair has prompt, chosen and rejected")
    margin = item.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return f"field 'margin' is {margin!r}; it must be a finite number (MODE=rm's Bradley-Terry margin)"
    p, c, r = (item[k] for k in PAIR_KEYS)
    if all(isinstance(x, str) for x in (p, c, r)):
        empty = [k for k in ("chosen", "rejected") if not item[k].strip()]
        return f"field {empty[0]!r} is empty" if empty else None
    if all(isinstance(x, list) for x in (p, c, r)):
        for key in ("chosen", "rejected"):
            problem = _messages_problem(item[key], key) or _conversation_end_problem(item[key], key)
            if problem:
                return problem
            other = next((j for j, m in enumerate(item[key]) if m["role"] != "assistant"), None)
            if other is not None:
                return (f"{key}[{other}].role is {item[key][other]['role']!r}; {key} holds the assistant turns "
                        f"that answer the prompt conversation")
        return _messages_problem(p, "prompt")
    kinds = ", ".join(f"{k} {type(item[k]).__name__}" for k in PAIR_KEYS)
    return f"fields prompt, chosen and rejected must all be text or all message lists (got {kinds})"
