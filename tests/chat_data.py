"""Conversational test data and a tiny model whose tokenizer has a chat template (ChatML-like,
hybrid_ds.data.reference.chatml_tokenizer), shared by the chat-data tests."""

from __future__ import annotations

import json
import os
import tempfile

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
    import torch
    from transformers import AutoModelForCausalLM

    from hybrid_ds.data.reference import chatml_tokenizer
    from tiny_models import family_config

    root = root or os.path.join(tempfile.gettempdir(), f"hybrid_ds-tiny-{os.getuid()}")
    out = os.path.join(root, f"gpt2-chatml-s{seed}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = chatml_tokenizer()
    cfg = family_config("gpt2", len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)  # atomic: parallel test processes race harmlessly
    except OSError:
        pass
    return out
