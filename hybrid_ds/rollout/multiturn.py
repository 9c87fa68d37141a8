"""Multi-turn rollouts: the policy talks with an environment (ENV) for up to MAX_TURNS turns.

An environment is a plain Python callable named ``package.module:function`` (ENV; imported, never a
string evaluated)::

    def env(messages: list[dict], item: dict) -> dict | str | None

``messages`` is the conversation so far, a fresh copy of ``{"role", "content"}`` dicts: the item's
history (for a conversation, the turns before its first assistant turn to learn; otherwise one user
turn holding the prompt) followed by the policy's and the environment's turns, the policy's last.
``item`` is a shallow copy of the data item (its fields: the word to recall, ...). It returns the next
message, ``{"role": "user" | "tool" | "system", "content": str}`` or a string (a user turn), or
:data:`DONE` (``None``) to end the dialogue. A dict reply may also carry ``"reward"``, a number added
to the reward of the policy's turn it answers (``{"reward": x}`` alone ends the dialogue with it).
After the policy's MAX_TURNS-th turn it is not called.

The dialogue is one token sequence: the prompt, then ``[policy turn 1, env turn 1, policy turn 2,
...]``. Policy turns are the sampled ids themselves (up to and including the stop id), never decoded
and re-tokenised. Environment turns are the ids the chat template (or the plain rendering) writes
between the end of one assistant turn and the start of the next, the message's content included
(:func:`env_segment_ids`), so the sequence equals the SFT tokenisation of the same conversation
(:func:`hybrid_ds.data.chat.tokenize_conversation`, tests/test_multiturn.py) and the action mask
(1 on policy tokens) equals its labels. MAXSEQ bounds prompt + the whole dialogue: a turn is cut at
MAXSEQ, and a dialogue whose next environment turn would not leave room for one more token ends there.

Layer 4: no torch here; the policy's turn is a callable the PPO phase passes in (the lean sampler,
hybrid_ds/algorithms/ppo.py ``generate_dialogues``), batched over the rows still talking.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from hybrid_ds.config.imports import import_named
from hybrid_ds.data.batches import IGNORE_INDEX
from hybrid_ds.data.chat import PROBE, PLAIN_HEADER, PLAIN_TURN_END, render_messages

DONE = None  # what an environment returns to end the dialogue
ENV_ROLES = ("user", "tool", "system")


class EnvError(RuntimeError):
    """An environment returned something that is not a message or DONE."""


@functools.lru_cache(maxsize=None)  # imported once per process: preflight checks it, every update calls it
def load_env(spec: str) -> Callable:
    """The callable ENV names (``package.module:function``). Raises ValueError saying what is wrong:
    the form, the import, a missing or non-callable attribute, or a signature that cannot take
    ``(messages, item)``."""
    fn = import_named(spec, f"ENV {spec!r}")
    attr = spec.partition(":")[2]
    try:
        inspect.signature(fn).bind([], {})
    except TypeError:
        raise ValueError(f"ENV {spec!r}: {attr}{inspect.signature(fn)} cannot be called as "
                         f"{attr}(messages, item)") from None
    except ValueError:  # no signature to inspect (some builtins): the first call will tell
        pass
    return fn


def env_problem(spec: str) -> Optional[str]:
    """Why ENV cannot be used (None when it is empty or loads)."""
    if not spec:
        return None
    try:
        load_env(spec)
    except ValueError as e:
        return str(e)
    return None


def parse_reply(reply, spec: str = "ENV") -> tuple:
    """An environment's reply as ``(message dict or None for DONE, reward for the turn it answers)``.
    A dict may carry ``"reward"`` (a finite number); ``{"reward": x}`` alone ends the dialogue with
    it. Raises EnvError for anything else."""
    if reply is DONE:
        return None, 0.0
    if isinstance(reply, str):
        return {"role": "user", "content": reply}, 0.0
    if isinstance(reply, dict):
        reward = reply.get("reward", 0.0)
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise EnvError(f"{spec} returned reward {reward!r:.60}: give a finite number")
        if set(reply) == {"reward"}:
            return None, float(reward)
        if reply.get("role") in ENV_ROLES and isinstance(reply.get("content"), str):
            return {"role": reply["role"], "content": reply["content"]}, float(reward)
    raise EnvError(f"{spec} returned {reply!r:.120}: give a string, a dict with role in {ENV_ROLES} and a string "
                   f"content (and optionally a reward), {{'reward': x}} or None to end the dialogue")


def env_segment_ids(tokenizer, history: list, message: dict, stops: list, last_policy_id: Optional[int]) -> list:
    """The ids between the end of the policy's turn and the start of its next: the rest of the
    assistant turn's scaffolding, the environment's ``message``, and the header of the next assistant
    turn (all masked out of the loss).

    With a chat template, that is the text the template writes after an assistant turn's content
    when ``message`` and a generation prompt follow it (the content replaced by a probe, so it does
    not depend on how the policy's words render). Its end-of-turn id is dropped when the policy's
    turn already ended with it. Without one, the plain rendering: EOS (unless the policy's turn
    ended with it), then ``\\n\\n### <Role>:\\n<content>\\n\\n### Assistant:\\n`` (hybrid_ds/data/chat.py)."""
    if not getattr(tokenizer, "chat_template", None):
        text = (PLAIN_TURN_END + PLAIN_HEADER.format(role=message["role"].capitalize()) + message["content"]
                + PLAIN_TURN_END + PLAIN_HEADER.format(role="Assistant"))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = int(tokenizer.eos_token_id)
        return list(ids) if last_policy_id == eos else [eos] + list(ids)
    rendered = render_messages(tokenizer, list(history) + [{"role": "assistant", "content": PROBE}, message], True)
    if PROBE not in rendered:
        raise EnvError("the chat template does not render an assistant turn's content, so the environment's turn "
                       "cannot be placed after it; use another template (CHAT_TEMPLATE)")
    ids = list(tokenizer(rendered[rendered.rindex(PROBE) + len(PROBE):], add_special_tokens=False)["input_ids"])
    if ids and last_policy_id is not None and last_policy_id in stops and ids[0] == last_policy_id:
        ids = ids[1:]
    return ids


@dataclass
class Dialogue:
    """One row's dialogue after its prompt."""

    ids: list = field(default_factory=list)  # policy and environment ids, in order
    actions: list = field(default_factory=list)  # 1 on the policy's ids, 0 on the environment's
    turns: list = field(default_factory=list)  # the policy's turns as decoded text
    messages: list = field(default_factory=list)  # the whole conversation (history included)
    ended: bool = False  # the policy's last turn ended with a stop id
    turn_ends: list = field(default_factory=list)  # per policy turn, the index in ``ids`` of its last id
    turn_rewards: list = field(default_factory=list)  # per policy turn, the reward the environment gave it


# ids of each row's context (prompt + dialogue so far) -> each row's sampled ids (stop id included)
PolicyTurn = Callable[[list, int], list]


def roll_dialogues(policy_turn: PolicyTurn, env: Callable, tokenizer, prompts: list, histories: list, items: list,
                   *, max_turns: int, max_len: int, max_new_tokens: int, stops: list) -> list:
    """Play each row's dialogue: the policy answers (``policy_turn(contexts, n)`` samples at most ``n``
    new ids for every row still talking, in one batch), then ``env`` replies, up to ``max_turns`` policy
    turns. A row is done when the environment returns DONE, after its last turn, or when MAXSEQ
    (``max_len``, prompt + dialogue) leaves no room. Returns one :class:`Dialogue` per row."""
    dialogues = [Dialogue(messages=[dict(m) for m in h]) for h in histories]
    talking = list(range(len(prompts)))
    for turn in range(max_turns):
        talking = [r for r in talking if len(prompts[r]) + len(dialogues[r].ids) < max_len]
        if not talking:
            break
        contexts = [prompts[r] + dialogues[r].ids for r in talking]
        n = min(max_new_tokens, max_len - min(len(c) for c in contexts))
        sampled = policy_turn(contexts, n)
        still = []
        for r, ctx, ids in zip(talking, contexts, sampled):
            d = dialogues[r]
            ids = list(ids)[:max_len - len(ctx)]  # MAXSEQ cuts the turn
            d.ids += ids
            d.actions += [1] * len(ids)
            d.ended = bool(ids) and ids[-1] in stops
            text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
            d.turns.append(text)
            d.turn_ends.append(len(d.ids) - 1)
            d.turn_rewards.append(0.0)
            history = [dict(m) for m in d.messages]
            d.messages.append({"role": "assistant", "content": text})
            if turn == max_turns - 1:
                continue
            message, d.turn_rewards[-1] = parse_reply(env([dict(m) for m in d.messages], dict(items[r])))
            if message is None:
                continue
            seg = env_segment_ids(tokenizer, history, message, stops, ids[-1] if ids else None)
            if len(ctx) + len(ids) + len(seg) >= max_len:
                continue  # no room left for the policy to answer: the dialogue ends at its turn
            d.ids += seg
            d.actions += [0] * len(seg)
            d.messages.append(message)
            still.append(r)
        talking = still
    return dialogues


def dialogue_start(example) -> tuple:
    """``(prompt ids, history messages)`` a dialogue starts from: for a conversation, everything before
    its first labelled assistant turn (the SFT sequence up to its first label, so the template's
    generation prompt included), the later turns being the environment's to play; otherwise the
    PPO prompt as one user turn."""
    if example.sft_ids is None:
        return list(example.prompt_ids), [{"role": "user", "content": example.prompt}]
    first = next(k for k, label in enumerate(example.sft_labels) if label != IGNORE_INDEX)
    item = example.item
    msgs = item["messages"] if "messages" in item else list(item["prompt"]) + list(item["completion"])
    skip = 0 if "messages" in item else len(item["prompt"])
    turn = next(i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= skip)
    return list(example.sft_ids[:first]), [{"role": m["role"], "content": m["content"]} for m in msgs[:turn]]
