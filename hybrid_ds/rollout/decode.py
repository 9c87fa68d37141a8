"""One decode step of the lean sampler, and the KV cache it writes into.

:func:`make_cache` gives a cache whose buffers are allocated once for the whole response;
:func:`hf_step` runs any transformers causal LM for one step, :class:`Gpt2Step` runs GPT-2 and
:class:`LlamaStep` the Llama family (Llama, Qwen2, Mistral) against their own weights with fewer
kernels (the same arithmetic, tests/test_sampler.py). Used by
:func:`hybrid_ds.rollout.sampler.sample`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_ds.models.policy_value import final_hidden
from hybrid_ds.rollout.settings import NEG_INF

# --------------------------------------------------------------------------------------
# KV cache with buffers allocated once


_LAYER_CLASS = None


def _preallocated_cache(capacity: int):
    """A transformers ``Cache`` whose layers write into ``capacity``-long buffers and return views.

    ``DynamicCache`` concatenates the whole cache anew at every step (O(length) copies and an
    allocation per layer per step); this writes one position in place. The views keep the
    attended length equal to the tokens seen, as with ``DynamicCache``, so attention runs on the
    same shapes and masks as in ``generate``.
    """
    global _LAYER_CLASS
    from transformers.cache_utils import Cache, DynamicLayer

    if _LAYER_CLASS is None:
        class PreallocatedLayer(DynamicLayer):  # keeps its own state: the base class differs across versions
            def __init__(self, capacity: int):
                super().__init__()
                self.capacity, self.length, self.is_initialized = capacity, 0, False

            def lazy_initialization(self, key_states, value_states=None):
                value_states = key_states if value_states is None else value_states
                self.dtype, self.device = key_states.dtype, key_states.device
                b, h, _, dk = key_states.shape
                self._k = key_states.new_empty(b, h, self.capacity, dk)
                self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
                self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
                self.is_initialized = True

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                start, self.length = self.length, self.length + key_states.shape[-2]
                self._k[:, :, start:self.length] = key_states
                self._v[:, :, start:self.length] = value_states
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
                return self.keys, self.values

            def get_seq_length(self, *args) -> int:
                return self.length

            def batch_repeat_interleave(self, repeats: int) -> None:
                """Each row's cache ``repeats`` times, rows ``i*repeats .. i*repeats+repeats-1`` copying row
                ``i`` (``Cache.batch_repeat_interleave``; the sampler's shared prefill): only the written
                positions are copied, by broadcasting, and the capacity stays."""
                if not self.is_initialized:
                    return
                for name in ("_k", "_v"):
                    old = getattr(self, name)
                    b, h, cap, d = old.shape
                    new = old.new_empty(b * repeats, h, cap, d)
                    new.view(b, repeats, h, cap, d)[:, :, :, :self.length] = old[:, None, :, :self.length]
                    setattr(self, name, new)
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        _LAYER_CLASS = PreallocatedLayer
    return Cache(layer_class_to_replicate=lambda: _LAYER_CLASS(capacity))


def make_cache(model, kind: str, capacity: int):
    if kind == "prealloc":
        return _preallocated_cache(capacity)
    if kind == "static":
        from transformers import StaticCache
        return StaticCache(config=model.config, max_cache_len=capacity)
    from transformers import DynamicCache
    return DynamicCache()


# --------------------------------------------------------------------------------------
# one decode step: the model's forward, or GPT-2's written against its weights


def cache_arg(model, kv) -> dict:
    """The KV cache as the model's forward names it: ``cache`` in transformers 5.2x, where
    ``past_key_values`` is deprecated (a FutureWarning per run), ``past_key_values`` before that.
    A peft wrapper passes keyword arguments through: its base model's forward decides."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values": kv}


def uses_4d_bool_masks(model) -> bool:
    """Whether a prebuilt boolean ``(B, 1, 1, kv)`` mask is what the model's attention consumes.

    True for SDPA attention without sliding-window layers; otherwise the model builds its masks
    itself from the 2D mask every step (slower, always right).
    """
    cfg = model.config
    sliding = getattr(cfg, "sliding_window", None) or any(
        "sliding" in str(t) for t in (getattr(cfg, "layer_types", None) or ()))
    return getattr(cfg, "_attn_implementation", None) == "sdpa" and not sliding


def hf_step(model, kv, full_mask: Optional[Tensor], static: bool = False, hidden: bool = False):
    """``step(tok (B,), pos (B, 1), n) -> (logits (B, V), final hidden state (B, C) or None)`` through
    the model's own forward (``hidden``: catch its final hidden state, the LM head's input:
    :func:`hybrid_ds.models.policy_value.final_hidden`).

    ``full_mask`` ``(B, L)``: the attention mask of prompt + all new tokens, None if there is no
    padding (``generate`` then drops the mask too). It is passed as the prebuilt 4D boolean
    mask where the model's attention takes one, as the 2D mask otherwise; ``static``: for
    transformers' StaticCache, which attends over all ``L`` slots, written or not.
    """
    if static:
        slots = torch.arange(full_mask.shape[1], device=full_mask.device)
        masks = full_mask.bool()[:, None, None, :]
    elif full_mask is not None and uses_4d_bool_masks(model):
        full_mask = full_mask.bool()[:, None, None, :]  # (B, 1, 1, L), sliced to the cache length

    cache = cache_arg(model, kv)

    def step(tok, pos, n):
        if static:
            mask = masks & (slots <= n)
        else:
            mask = None if full_mask is None else full_mask[..., :n + 1]
        if not hidden:
            return model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                         **cache).logits[:, -1], None
        with final_hidden(model) as final:
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        return out.logits[:, -1], final.hidden[:, -1]
    return step


def plain_weights(model) -> bool:
    """Whether every weight is used as stored, so a lean step may call it directly: no LoRA layer
    (models/lora.py; peft wraps a layer as ``base_layer`` and only its forward adds the adapter) and
    no quantised one (bitsandbytes' ``Linear4bit``/``Linear8bitLt`` subclass ``nn.Linear`` with packed
    weights that only their forward unpacks)."""
    return not any(hasattr(m, "base_layer") or (isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear)
                   for m in model.modules())


class Gpt2Step:
    """One GPT-2 decode step computed from the model's own modules' weights, for the preallocated cache.

    The ops, their order and their shapes are those of transformers' GPT-2 forward with SDPA
    attention (``addmm`` of each Conv1D, ``layer_norm``, SDPA with the layer's scaling, the
    model's activation module), so the logits are bit-identical to the model's forward (the
    tests check it). What goes is the per-step cost around them: ~50 module calls, the mask and
    cache plumbing and the output objects (about a quarter of a decode step of a 4-layer,
    256-wide model on CPU), and SDPA's conversion of a boolean mask: the additive float mask it
    would build is built once. It writes the cache layers' buffers directly (their ``keys`` views
    and lengths are left as the prefill set them). Used only where :meth:`supports` holds; any
    other model decodes through its forward.
    """

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        return (type(model).__name__ == "GPT2LMHeadModel" and not model.training
                and getattr(cfg, "_attn_implementation", None) == "sdpa" and not cfg.add_cross_attention
                and all(hasattr(blk.attn, "scaling") for blk in model.transformer.h)  # transformers >= 5
                and plain_weights(model)
                # ZeRO-3 partitions left in place (not gathered): only the module hooks can fetch them
                and all(p.numel() > 0 for p in model.parameters()))

    def __init__(self, model, kv, full_mask: Optional[Tensor]):
        tr = model.transformer
        self.wte, self.wpe, self.ln_f, self.head = tr.wte, tr.wpe, tr.ln_f, model.lm_head
        self.blocks = [(blk.ln_1, blk.attn, blk.ln_2, blk.mlp, layer) for blk, layer in zip(tr.h, kv.layers)]
        self.mask = None if full_mask is None else torch.zeros(
            full_mask.shape, dtype=tr.wte.weight.dtype, device=full_mask.device).masked_fill_(
            full_mask == 0, NEG_INF)[:, None, None, :]  # (B, 1, 1, L)

    @staticmethod
    def _conv1d(conv, x):  # transformers' Conv1D: x @ W + b with W stored (in, out)
        return torch.addmm(conv.bias, x, conv.weight)

    @staticmethod
    def _norm(ln, x):
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def __call__(self, tok, pos, n):
        B = tok.shape[0]
        mask = None if self.mask is None else self.mask[..., :n + 1]
        h = F.embedding(tok, self.wte.weight) + F.embedding(pos[:, 0], self.wpe.weight)  # (B, C)
        for ln_1, attn, ln_2, mlp, layer in self.blocks:
            q, k, v = self._conv1d(attn.c_attn, self._norm(ln_1, h)).split(attn.split_size, dim=1)
            layer._k[:, :, n] = k.view(B, -1, attn.head_dim)
            layer._v[:, :, n] = v.view(B, -1, attn.head_dim)
            o = F.scaled_dot_product_attention(q.view(B, -1, 1, attn.head_dim), layer._k[:, :, :n + 1],
                                               layer._v[:, :, :n + 1], attn_mask=mask, scale=attn.scaling)
            h = self._conv1d(attn.c_proj, o.view(B, -1)) + h
            h = h + self._conv1d(mlp.c_proj, mlp.act.forward(self._conv1d(mlp.c_fc, self._norm(ln_2, h))))
        h = self._norm(self.ln_f, h)  # the final hidden state (the LM head's input in the forward)
        return F.linear(h, self.head.weight, self.head.bias), h


class LlamaStep:
    """One decode step of the Llama family (Llama, Qwen2, Mistral: RMSNorm, RoPE, grouped KV heads,
    SwiGLU) from the model's own weights, for the preallocated cache; :class:`Gpt2Step`'s twin.

    The arithmetic is that of transformers' forward with SDPA attention, op for op: the RMSNorm's
    float32 statistics, the rotary embedding from the model's own ``rotary_emb`` module (so scaled
    RoPE variants come along), ``x * cos + rotate_half(x) * sin``, SDPA called as transformers'
    ``sdpa_attention_forward`` calls it for one query token (grouped KV heads through
    ``enable_gqa`` where it would use it, else queries packed to ``(B, kv_heads, groups, D)``; the
    same boolean mask as :func:`hf_step`), ``down(act(gate(x)) * up(x))``. So the logits are
    bit-identical to the forward's (tests/test_sampler.py). Two changes of layout keep every
    value: the projections run on ``(B, C)`` rather than ``(B, 1, C)`` (transformers folds the step
    axis into the same matrix product), and queries and keys are rotated as one tensor (the
    rotation is elementwise). What goes is the plumbing: the mask builder, the cache and output
    objects, the output-capture decorators and about 15 module calls per layer. A sliding window
    is honoured only where it cannot bite: the whole sequence (``capacity``) fits in it.
    """

    FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

    @staticmethod
    def supports(model, capacity: int) -> bool:
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        return (type(model).__name__ in LlamaStep.FAMILIES and not model.training
                and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and (window is None or capacity <= window)
                and getattr(cfg, "pretraining_tp", 1) == 1
                and plain_weights(model)
                # ZeRO-3 partitions left in place (not gathered): only the module hooks can fetch them
                and all(p.numel() > 0 for p in model.parameters()))

    def __init__(self, model, kv, full_mask: Optional[Tensor]):
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

        base, cfg = model.model, model.config
        self.embed, self.norm, self.rotary, self.head = base.embed_tokens, base.norm, base.rotary_emb, model.lm_head
        self.blocks = [(blk.input_layernorm, blk.self_attn, blk.post_attention_layernorm, blk.mlp, layer)
                       for blk, layer in zip(base.layers, kv.layers)]
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = self.blocks[0][1].head_dim
        self.groups = self.heads // self.kv_heads
        self.mask = None if full_mask is None else full_mask.bool()[:, None, None, :]  # (B, 1, 1, L), as hf_step
        # grouped heads as transformers' sdpa_attention_forward runs one query token: SDPA's enable_gqa
        # where it would use it (no mask, on CPU and CUDA), else queries packed to (B, kv_heads, groups, D)
        layer = kv.layers[0]  # written by the prefill
        self.gqa = self.groups > 1 and use_gqa_in_sdpa(self.mask, layer._k, layer._v)
        self.pack = self.groups > 1 and not self.gqa

    @staticmethod
    def _norm(norm, x):  # RMSNorm: float32 statistics, weight times the input dtype
        h = x if x.dtype == torch.float32 else x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))

    def __call__(self, tok, pos, n):
        B, H, D = tok.shape[0], self.heads, self.head_dim
        mask = None if self.mask is None else self.mask[..., :n + 1]
        h = F.embedding(tok, self.embed.weight)  # (B, C): the forward's (B, 1, C) with the step axis dropped
        cos, sin = self.rotary(h, pos)  # (B, 1, D)
        cos, sin, half = cos[:, None], sin[:, None], D // 2  # against (B, heads, 1, D)
        for ln_1, attn, ln_2, mlp, layer in self.blocks:
            x = self._norm(ln_1, h)
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias)
            qk = torch.cat((q, k), 1).view(B, -1, 1, D)  # queries and keys rotated together (elementwise)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            layer._k[:, :, n:n + 1] = qk[:, H:]
            layer._v[:, :, n:n + 1] = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, -1, 1, D)
            q, keys, values = qk[:, :H], layer._k[:, :, :n + 1], layer._v[:, :, :n + 1]
            if self.pack:
                q = q.reshape(B, self.kv_heads, self.groups, D)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=self.gqa)
            h = h + F.linear(o.reshape(B, -1), attn.o_proj.weight, attn.o_proj.bias)
            x = self._norm(ln_2, h)
            gate = mlp.act_fn(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
            h = h + F.linear(gate * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight,
                             mlp.down_proj.bias)
        h = self._norm(self.norm, h)  # the final hidden state (the LM head's input in the forward)
        return F.linear(h, self.head.weight, self.head.bias), h
