"""Conversational test data and a tiny model whose tokenizer has a chat template (ChatML-like,
hybrid_ds.data.reference.chatml_tokenizer), shared by the chat-data tests."""

from __future__ import annotations

import json

WORDS = ["apple", "river", "stone", "cloud", "tree", "lamp", "bird", "road"]


def conversations(n: int = 16) -> list[dict]:
    """``n`` two-turn reversal conversations: a system turn, and two user/assistant exchanges."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 8], WORDS[(i + 3) % 8], WORDS[(i + 5) % 8]
        out.append({"messages": [
            {"role": "system", "content": "Reverse the words."},
            {"role": "user", "content": f"{a} {b}"},
            {"role": "assistant", "content": f"{b} {a}"},
            {"role": "user", "content": f"{b} {c}"},
            {"role": "assistant", "content": f"{c} {b}"}]})
    return out


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def chat_model_dir(root: str | None = None, seed: int = 0) -> str:
    """A saved tiny GPT-2 whose vocabulary covers the ChatML tokens, with the ChatML tokenizer (its
    template saved alongside), loadable as MODEL; built once per root."""
    from hybrid_ds.data.reference import chatml_tokenizer
    from tiny_models import tiny_model_dir

    return tiny_model_dir("gpt2", root, seed, make_tokenizer=chatml_tokenizer, tag="-chatml")
