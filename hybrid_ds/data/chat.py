"""Conversations as token ids with assistant-only labels, through the tokenizer's chat template or a
plain rendering, and the ids that end a response.

A conversation is cut into *pieces*, each labelled or not, and each piece is tokenised on its own,
so the prompt PPO generates from is token for token the start of the SFT sequence.

* **With a chat template** (the tokenizer's own, or CHAT_TEMPLATE): for assistant turn ``i`` the
  template renders ``messages[:i]`` with ``add_generation_prompt=True`` (where the turn's content
  starts) and ``messages[:i + 1]`` (where the turn ends); both must be prefixes of the whole
  conversation's rendering. The labelled piece is the turn's content and the template's end of turn;
  its labels stop after the first end-of-turn id (:func:`end_of_turn_id`, e.g. ``<|im_end|>``), so
  what the template writes after it (a newline) is scaffolding, as are the role headers.
* **Without one** (:data:`PLAIN_HEADER`): each turn is ``### <Role>:\\n<content>\\n\\n``; an assistant
  turn's content is followed by EOS, and the content plus EOS are labelled.

Generation stops at any of :func:`stop_token_ids` (EOS and the end-of-turn id), so a model trained
on these labels ends its response where the template ends a turn.
"""

from __future__ import annotations

import os
from typing import Optional

from hybrid_ds.data.items import DataError

PLAIN_HEADER = "### {role}:\n"  # a turn without a chat template: header, content, (EOS), blank line
PLAIN_TURN_END = "\n\n"
PROBE = "\u2063probe\u2063"  # content that no template produces on its own


def use_chat_template(tokenizer, setting: str) -> None:
    """Apply CHAT_TEMPLATE to ``tokenizer``: "" keeps its own, "none" removes it (plain rendering), any
    other value is a Jinja file whose text becomes the template. The run's tokenizer carries the
    choice, so rendering, generation's stop ids and the saved ``inference_lm/`` all agree."""
    if not setting:
        return
    if setting == "none":
        tokenizer.chat_template = None
        return
    path = os.path.expanduser(setting)
    try:
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"CHAT_TEMPLATE {setting!r}: cannot read it ({e}); give a Jinja file, or none.") from None


def chat_template_problem(setting: str) -> Optional[str]:
    """Why CHAT_TEMPLATE cannot be used (checked before anything loads), or None."""
    if setting in ("", "none") or os.path.isfile(os.path.expanduser(setting)):
        return None
    return (f"CHAT_TEMPLATE {setting!r}: no such file; give a Jinja template file, none (plain rendering), or "
            f"leave it empty.")


def render_messages(tokenizer, messages: list, gen: bool) -> str:
    """The chat template's text of ``messages`` (``gen``: with the generation prompt after them)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant turn's content, or None
    (no template, or none such: then EOS is the only stop)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = render_messages(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}],
                       False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation marks no end of turn
        return None
    if PROBE not in text:
        return None
    tail = text[text.rindex(PROBE) + len(PROBE):]
    special = set(tokenizer.all_special_ids)
    return next((i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special), None)


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a generated response: EOS, then the chat template's end-of-turn id if it has one."""
    ids = [int(tokenizer.eos_token_id)]
    eot = end_of_turn_id(tokenizer)
    if eot is not None and eot not in ids:
        ids.append(int(eot))
    return ids


def conversation_pieces(messages: list, first_labelled: int, tokenizer) -> list[tuple]:
    """The conversation as ``(text or token id, labelled)`` pieces (module docstring); the assistant
    turns from message ``first_labelled`` on are labelled. Raises ValueError for a template that does
    not render a conversation's beginnings as prefixes of the whole."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_labelled]
    if not getattr(tokenizer, "chat_template", None):
        pieces, text = [], ""
        for i, m in enumerate(messages):
            text += PLAIN_HEADER.format(role=m["role"].capitalize())
            if m["role"] != "assistant":
                text += m["content"] + PLAIN_TURN_END
                continue
            pieces.append((text, False))
            pieces += [(m["content"], i in turns), (int(tokenizer.eos_token_id), i in turns)]
            text = PLAIN_TURN_END
        return pieces + [(text, False)]
    full = render_messages(tokenizer, messages, False)
    pieces, pos = [], 0
    for i in turns:
        start, end = render_messages(tokenizer, messages[:i], True), render_messages(tokenizer, messages[:i + 1], False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ValueError(f"the chat template renders messages[:{i}] differently inside the whole conversation "
                             f"(it is not a prefix), so turn {i}'s tokens cannot be found; use another template "
                             f"(CHAT_TEMPLATE)")
        pieces += [(full[pos:len(start)], False), (full[len(start):len(end)], True)]
        pos = len(end)
    return pieces + [(full[pos:], False)]


def tokenize_conversation(messages: list, first_labelled: int, tokenizer, stops: list[int]):
    """``(ids, flags, last_start)``: the conversation's ids, a 0/1 label flag per id, and where the last
    labelled turn starts (the PPO prompt is ``ids[:last_start]``).

    A labelled template piece stays labelled through its first id in ``stops`` (the end of turn); the
    template's text after it is not. When the last turn holds no stop id (a template that ends turns in
    plain text) a labelled EOS follows it, so the model still learns to stop. Trailing unlabelled ids
    are dropped: they would teach nothing."""
    pieces = conversation_pieces(messages, first_labelled, tokenizer)
    texts = [p for p, _ in pieces if isinstance(p, str) and p]
    enc = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids, flags = [], []
    for piece, labelled in pieces:
        part = [piece] if isinstance(piece, int) else list(next(enc)) if piece else []
        cut = len(part)
        if labelled and isinstance(piece, str):
            cut = next((k + 1 for k, t in enumerate(part) if t in stops), len(part))
        ids += part
        flags += [int(labelled)] * cut + [0] * (len(part) - cut)
    while flags and not flags[-1]:
        ids.pop()
        flags.pop()
    if flags and ids[-1] not in stops:
        ids.append(int(tokenizer.eos_token_id))
        flags.append(1)
    last_start = len(flags)
    while last_start > 0 and flags[last_start - 1]:
        last_start -= 1
    return ids, flags, last_start
