"""Embedded assets: the builtin models (tokenizer files shipped here, weights made locally)
and the demo task data. Nothing here downloads anything."""

from __future__ import annotations

import os
import shutil
import tempfile

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_TASKS = os.path.join(ASSETS_DIR, "demo_tasks.json")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tiny-gpt2")

# name -> GPT-2 shape. Weights are a seeded random init: the demo teaches them from scratch.
BUILTIN_MODELS = {
    "builtin:tiny-gpt2": dict(n_layer=2, n_embd=128, n_head=4, n_positions=512),
    "builtin:small-gpt2": dict(n_layer=4, n_embd=256, n_head=4, n_positions=512),
}
_VERSION = "v1"  # bump when the shapes, the init or the tokenizer change


def cache_root() -> str:
    return os.environ.get("HYBRID_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hybrid_ds"))


def resolve_model(name: str) -> str:
    """A loadable directory for MODEL: builtins are materialised once into the cache, others pass through."""
    if not name.startswith("builtin:"):
        return name
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; available: {', '.join(BUILTIN_MODELS)}")
    target = os.path.join(cache_root(), "builtin", f"{name.split(':', 1)[1]}-{_VERSION}")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        _materialise(name, tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent ranks race harmlessly
        except OSError:
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _materialise(name: str, out: str) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, **BUILTIN_MODELS[name])
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
