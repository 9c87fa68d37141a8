"""Batched sampling for PPO rollouts: ``generate``'s tokens, without ``generate``.

:func:`sample` draws what ``model.generate(do_sample=True, ...)`` draws for the settings the
trainer uses (temperature, top-k, top-p, repetition penalty, no-repeat-n-gram, min_new_tokens,
EOS/pad) and also returns the per-token log-probs PPO needs. The loop, top to bottom:

1. prefill: one forward over the left-padded prompts, position ids from the attention mask,
   logits of the last position only;
2. decode: one forward per step, one token per row, into a KV cache whose buffers are
   allocated once (each layer writes its slot in place and attends to a growing view, so the
   attended length is the one ``generate``'s DynamicCache has); position ids and the 4D mask
   of every step are built up front and sliced. A GPT-2 with SDPA attention decodes through
   :class:`Gpt2Step`, a Llama, Qwen2 or Mistral (no sliding window within the sequence) through
   :class:`LlamaStep`: the same ops called on their weights without the module plumbing
   (bit-identical logits); any other model through its own forward;
3. the logits processors in ``generate``'s order and arithmetic: repetition penalty over the
   prompt (left padding ignored) and response ids -> n-gram ban -> EOS suppression before
   ``min_new_tokens`` -> temperature -> top-k -> top-p -> softmax -> ``torch.multinomial``.
   With top-k on, top-p runs over the k candidates instead of sorting the whole vocabulary,
   and the processed row is rebuilt exactly (see :class:`Processors`);
4. rows that emitted EOS emit ``pad_token_id``; the loop stops once every row has ended,
   unless ``fixed_length``.

Equivalence (tests/test_sampler.py). From the same global seed, with ``generator=None`` and
``hf_rng=True`` (the defaults), the tokens equal ``generate``'s, bit for bit: same logits
(same model ops on the same positions, masks and cache lengths), the processors' float
operations repeated one for one, and the RNG consumed by one ``torch.multinomial`` over the
full ``(B, V)`` distribution per step. Tested for plain sampling, temperature/top-k/top-p,
top-p alone, repetition penalty (> 1 and < 1) with no-repeat-n-gram, min_new_tokens,
fixed_length, ragged left padding, EOS stopping (some or all rows), pad == EOS, GPT-2 with
SDPA and eager attention, a Llama, and one short case for each decoder family of
tests/tiny_models.py (GPT-2, Llama, Qwen2, Mistral with its sliding window, Gemma, Phi-3, GPT-NeoX,
OPT); on CPU in fp32 (and bf16 in a manual check).
``hf_rng=False`` draws each step among the top-k candidates only (the race of exponentials
``torch.multinomial`` runs, restricted to the tokens with non-zero probability): the same
distribution from a different random stream, so its equivalence is tested statistically
(chi-square against the exact processed distribution and against the exact draw). It saves
one V-sized exponential draw per step (~0.7 ms at B=8, V=4096 on one CPU core).
The repetition penalty ignores the left padding as ``generate`` does in transformers 5
(4.x penalised the pad id as well).

Log-probs. ``logprobs[:, t]`` is ``log_softmax(raw_logits / temperature)`` at the chosen token,
float32: the *unprocessed* policy at the sampling temperature, i.e. PPO's old log-prob
(hybrid_ds.models.logprobs.logprobs_from_logits). It equals a recomputed full-sequence forward on
prompt + response (attention mask = prompt mask + response mask, position ids from that mask,
model in eval mode so no dropout) to float32 rounding (~1e-6; the test asserts 1e-5) when the
model runs in float32. In bf16/fp16 the cached decode and the full forward round differently
(~1e-2): recompute them there. ``processed_logprobs`` are the log-probs under the distribution
actually sampled from (after all processors); they equal ``logprobs`` only when no processor
changes it (penalty 1, no n-gram ban, no EOS suppression, top_k 0 or >= V, top_p 1). Both are
0 after a row's EOS.

Speed (bench/bench_sampler.py; the benchmark work unit of bench/README.md: GPT-2 4x256, V=4096, 8 prompts x 32 tokens,
top_p 0.9 / T 0.7 / top_k 50 / no-repeat 3 / penalty 1.15). Decoding this model is bound by
its matmuls (17 MB of weights streamed per step), so what can go is everything else: the full
sort of top-p (about 12% of ``generate``'s time), the per-module overhead of the forward
(~14%), the V-sized random draw (``hf_rng=False``, ~10%). A preallocated vs concatenated vs
static KV cache makes no measurable difference at ~60 positions; the preallocated one avoids
re-copying the whole cache every step as sequences grow. Neither math attention nor a fused
GELU (2%), nor torch.compile of the forward on CPU (~18% of the forward, 40 s compile per
shape, tokens no longer bit-identical) earned a flag; CUDA graphs were not tried (no GPU).

Shared prefill (``repeats=K``, GRPO/RLOO's NUM_GENERATIONS responses per prompt): the ``B`` prompts are
prefilled once each and the prefill's KV cache (only its written positions) and final hidden state
are copied to the ``B*K`` rows, rows ``i*K .. i*K+K-1`` answering prompt ``i``, as ``generate`` on
``input_ids.repeat_interleave(K, 0)``. The hidden states and the cache are bit-identical to a
prefill of the repeated rows (measured on CPU, fp32, every family of tests/tiny_models.py; on CUDA
only the gpu-marked test checks it), but on CPU the LM head's matrix product rounds by the row
count (~1e-6 in the first logits), which could move an exact draw. So the first logits are the head
called on the repeated hidden state as the GPT-2 and Llama steps call it (the forward's very bits),
and where the model has no such step (other families, LoRA or quantised weights, ZeRO-3 partitions
left in place) the exact draw (``hf_rng=True``) prefills every row as before; the candidate draw
shares there with the prefill's own logits (the same distribution, ~1e-6 apart). Not shared into
transformers' StaticCache (sized by its first forward's batch). Each prompt's rows then decode
from their own copies. Measured on the work unit, 1 thread (bench/bench_sampler.py ``--repeats``,
median per-round ratio unshared / shared, 30-token prompts, 32 new tokens, candidate draw / exact
draw): 2 prompts x 4 1.17x / 1.13x (GPT-2), 1.07x / 1.04x (a Llama of its size); 8 prompts x 8
1.47x / 1.36x (GPT-2), 1.28x / 1.22x (Llama), bench/results/sampler_shared_prefill_*.

Integration: pass the bare HF causal LM in eval mode (``engine.module.lm``), inside
``dist.generation_model`` so that ZeRO-3 weights are gathered once for the whole call (no
collective runs inside, so ranks may stop at different steps; left partitioned, GPT-2 falls
back to the module forward and its hooks). Seed ``generator`` differently per rank.
PPO (hybrid_ds.algorithms.ppo.generate) runs it with ``hf_rng=False`` under ``SAMPLER: "lean"`` (the default)
and ``hf_rng=True`` under ``"lean_exact"``, with ``repeats=NUM_GENERATIONS``, and passes the value
head as ``value_fn`` so that in float32 the rollout's own log-probs and values serve as PPO's old
ones (``OLD_LOGPROBS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_ds.models.policy_value import final_hidden, logits_to_keep
from hybrid_ds.rollout.decode import Gpt2Step, LlamaStep, cache_arg, hf_step, make_cache, uses_4d_bool_masks
from hybrid_ds.rollout.processors import Processors
from hybrid_ds.rollout.settings import SamplingSettings

@dataclass
class SampleOutput:
    """One sampled batch. B = rows, T = steps run (``max_new_tokens``, or fewer if all rows ended)."""

    response_ids: Tensor  # (B, T) long, pad_token_id after the first EOS
    response_mask: Tensor  # (B, T) float32, 1 up to and including the first EOS
    logprobs: Tensor  # (B, T) float32, log_softmax(raw_logits / temperature) at the token; 0 after EOS
    processed_logprobs: Tensor  # (B, T) float32, log-prob under the processed distribution; 0 after EOS
    ended: Tensor  # (B,) bool, the row emitted an EOS
    values: Optional[Tensor] = None  # (B, T) float32 from ``value_fn`` (see :func:`sample`); 0 after EOS


# --------------------------------------------------------------------------------------
# the sampling loop


@torch.no_grad()
def sample(model, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings, *,
           generator: Optional[torch.Generator] = None, fixed_length: bool = False, hf_rng: bool = True,
           cache: str = "prealloc", value_fn: Optional[Callable[[Tensor], Tensor]] = None,
           repeats: int = 1) -> SampleOutput:
    """Sample up to ``settings.max_new_tokens`` tokens after each left-padded prompt.

    Shapes: ``input_ids`` ``(B, P)`` left-padded prompt ids, ``attention_mask`` ``(B, P)`` with 1 on
    real tokens -> :class:`SampleOutput` with ``(B, T)`` tensors, ``T <= max_new_tokens``.
    ``model``: a Hugging Face causal LM, in eval mode (set by the caller; this never changes the
    model), on the device of ``input_ids``. ``generator``: the RNG of the draws, on that device;
    None uses the global one, as ``generate`` does.
    ``fixed_length``: exactly ``max_new_tokens`` tokens per row, EOS suppressed throughout (as
    ``min_new_tokens = max_new_tokens``). ``hf_rng``: True draws each step with one
    ``torch.multinomial`` over the whole ``(B, V)`` distribution, as ``generate`` does (same seed,
    same tokens); False draws among the top-k candidates only: the same distribution from another
    random stream, and no ``V``-sized random draw per step (see the module docstring).
    ``cache``: the KV cache to decode with, "prealloc" (default, fastest), "dynamic" or "static"
    (transformers' caches, kept for the benchmark); all give the same tokens.
    ``value_fn``: final hidden states ``(B, C)`` -> values ``(B,)`` (PPO's value head; the hidden
    state is the LM head's input, :func:`hybrid_ds.models.policy_value.final_hidden`); when given,
    ``values[:, t]`` is its value at the position whose logits drew token ``t`` (the last prompt
    token for ``t = 0``), the same positions as the log-probs, so a rollout needs no second forward.
    ``repeats``: responses per prompt (GRPO's NUM_GENERATIONS). The output has ``B * repeats`` rows,
    rows ``i*repeats .. i*repeats+repeats-1`` answering prompt ``i`` (as ``generate`` on
    ``input_ids.repeat_interleave(repeats, 0)``); each prompt is prefilled once and its KV cache and
    final hidden state copied to its rows (the exceptions: "Shared prefill" in the module docstring).
    """
    s = settings
    P = input_ids.shape[1]
    if P == 0 or attention_mask.shape != input_ids.shape or repeats < 1:
        raise ValueError(f"sample needs left-padded prompts (B, P >= 1), a mask of the same shape and repeats >= 1, "
                         f"got input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} "
                         f"and repeats {repeats}")
    N, dev, pad = s.max_new_tokens, input_ids.device, s.pad_token_id
    L = P + N
    attention_mask = attention_mask.to(dev).long()
    # shared prefill (module docstring): not into transformers' StaticCache, sized by its first forward's
    # batch, nor where the exact draw needs generate's logits bits and only the model's head can give them
    lean_head = repeats > 1 and (Gpt2Step.supports(model) or LlamaStep.supports(model, L))
    share = repeats > 1 and cache != "static" and (lean_head or not hf_rng)
    prefill_ids, prefill_mask = input_ids, attention_mask  # (B / repeats, P) when shared
    if repeats > 1:
        input_ids, attention_mask = (x.repeat_interleave(repeats, 0) for x in (input_ids, attention_mask))
        if not share:
            prefill_ids, prefill_mask = input_ids, attention_mask
    B = input_ids.shape[0]
    track_eos = not fixed_length

    # 0. what every step slices, built once
    ids = torch.full((B, L), pad, dtype=torch.long, device=dev)  # prompt + response
    ids[:, :P] = input_ids
    full_mask = torch.ones(B, L, dtype=torch.long, device=dev)
    full_mask[:, :P] = attention_mask
    pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    step_pos = pos[:, -1:] + 1 + torch.arange(N, device=dev)  # (B, N) position of each new token
    padded = not bool(attention_mask.all())  # generate drops an all-ones mask; so do we
    if cache == "static" and not uses_4d_bool_masks(model):
        raise ValueError("cache='static' is only wired for SDPA attention")
    kv = make_cache(model, cache, L)
    out_lp = torch.zeros(B, N, dtype=torch.float32, device=dev)
    out_plp = torch.ones(B, N, dtype=torch.float32, device=dev)
    alive = torch.ones(B, N + 1, dtype=torch.bool, device=dev)  # alive[:, t]: unfinished before step t
    unfinished = alive[:, 0]

    # 1. prefill: the whole prompt, logits of its last position
    keep = logits_to_keep(model, 1)
    want_h = value_fn is not None
    out_v = torch.zeros(B, N, dtype=torch.float32, device=dev) if want_h else None
    need_h = want_h or (share and lean_head)
    with final_hidden(model, on=need_h) as final:
        first = model(input_ids=prefill_ids, attention_mask=prefill_mask if padded else None,
                      position_ids=pos[::repeats] if share else pos, use_cache=True, **cache_arg(model, kv), **keep)
    logits = first.logits[:, -1].float()
    hidden = final.hidden[:, -1] if need_h else None
    del first
    if share:  # each prompt's prefill to its `repeats` rows
        kv.batch_repeat_interleave(repeats)
        hidden = hidden.repeat_interleave(repeats, 0) if need_h else None
        if lean_head:  # the head as the lean steps call it, on all B rows: the forward's very logits
            logits = F.linear(hidden, model.lm_head.weight, model.lm_head.bias).float()
        else:
            logits = logits.repeat_interleave(repeats, 0)
    proc = Processors(s, input_ids, attention_mask, ids, logits.shape[-1], N if fixed_length else s.min_new_tokens,
                       hf_rng, generator)
    if cache == "prealloc" and Gpt2Step.supports(model):
        step = Gpt2Step(model, kv, full_mask if padded else None)
    elif cache == "prealloc" and LlamaStep.supports(model, L):
        step = LlamaStep(model, kv, full_mask if padded else None)
    else:
        step = hf_step(model, kv, full_mask if padded or cache == "static" else None, static=cache == "static",
                        hidden=want_h)

    T = N
    for t in range(N):
        # 2. log-prob of the unprocessed policy, the processors, the draw
        logp = torch.log_softmax(logits / s.temperature, -1)  # before the processors change logits
        tok, p_tok = proc(logits, t)
        if track_eos:
            tok = torch.where(unfinished, tok, pad)  # finished rows emit pad
        proc.push(tok, t)
        out_lp[:, t] = logp.gather(1, tok[:, None]).squeeze(1)
        out_plp[:, t] = p_tok
        if want_h:
            out_v[:, t] = value_fn(hidden).reshape(B).float()
        if track_eos:
            unfinished = alive[:, t + 1] = unfinished & ~proc.is_eos(tok)
            if not bool(unfinished.any()):
                T = t + 1
                break
        if t == N - 1:
            break
        # 3. next logits: one token per row into the cache slot P + t
        logits, hidden = step(tok, step_pos[:, t:t + 1], P + t)
        logits = logits.float()

    mask = alive[:, :T]
    return SampleOutput(response_ids=ids[:, P:P + T].clone(), response_mask=mask.float(),
                        logprobs=out_lp[:, :T].masked_fill(~mask, 0.0),
                        processed_logprobs=out_plp[:, :T].log().masked_fill(~mask, 0.0),
                        ended=~unfinished, values=out_v[:, :T].masked_fill(~mask, 0.0) if want_h else None)
