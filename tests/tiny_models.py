"""Tiny random-init causal LMs of the decoder families hybrid_ds supports, built from configs (no hub).

Each family is configured so that what sets it apart is present: Llama's RoPE, RMSNorm and grouped
KV heads; Qwen2's qkv bias; Mistral's sliding window; Gemma's tied and scaled embeddings; Phi-3's
fused qkv/gate-up projections; GPT-NeoX's parallel residual and partial rotary; OPT's learned
positions with their offset of 2; GPT-2's Conv1D layers. All share the builtin tokenizer, so one
data set serves every family; a model dir is written once per (family, process) and reused.
"""

from __future__ import annotations

import os
import tempfile

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma", "phi3", "gpt_neox", "opt")

_HIDDEN, _LAYERS, _HEADS, _INTER, _POS = 64, 2, 4, 128, 512


def family_config(family: str, vocab_size: int, *, eos: int, pad: int):
    """The transformers config of a tiny ``family`` model over a ``vocab_size`` vocabulary."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    rope = dict(hidden_size=_HIDDEN, intermediate_size=_INTER, num_hidden_layers=_LAYERS,
                num_attention_heads=_HEADS, max_position_embeddings=_POS)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=_LAYERS, n_embd=_HIDDEN, n_head=_HEADS, n_positions=_POS, **ids)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **rope, **ids)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **rope, **ids)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=16, tie_word_embeddings=False, **rope, **ids)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=16, **rope, **ids)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, tie_word_embeddings=False, **rope, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                                **rope, **ids)
    if family == "opt":
        return tf.OPTConfig(hidden_size=_HIDDEN, ffn_dim=_INTER, num_hidden_layers=_LAYERS,
                            num_attention_heads=_HEADS, max_position_embeddings=_POS, word_embed_proj_dim=_HIDDEN,
                            **ids)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def tiny_model_dir(family: str, root: str | None = None, seed: int = 0, make_tokenizer=None, tag: str = "") -> str:
    """A saved tiny ``family`` model + the builtin tokenizer (or ``make_tokenizer()``'s, named by ``tag``),
    loadable as ``MODEL``; built once per root."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrid_ds.assets import TOKENIZER_DIR

    root = root or os.path.join(tempfile.gettempdir(), f"hybrid_ds-tiny-{os.getuid()}")
    out = os.path.join(root, f"{family}{tag}-s{seed}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = make_tokenizer() if make_tokenizer else AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = family_config(family, len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=_mkdir(root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)  # atomic: parallel test processes race harmlessly
    except OSError:
        pass
    return out


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
