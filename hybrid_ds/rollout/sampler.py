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
   :class:`_Gpt2Step`, the same ops called on its weights without the module plumbing
   (bit-identical logits); any other model through its own forward;
3. the logits processors in ``generate``'s order and arithmetic: repetition penalty over the
   prompt (left padding ignored) and response ids -> n-gram ban -> EOS suppression before
   ``min_new_tokens`` -> temperature -> top-k -> top-p -> softmax -> ``torch.multinomial``.
   With top-k on, top-p runs over the k candidates instead of sorting the whole vocabulary,
   and the processed row is rebuilt exactly (see :class:`_Processors`);
4. rows that emitted EOS emit ``pad_token_id``; the loop stops once every row has ended,
   unless ``fixed_length``.

Equivalence (tests/test_sampler.py). From the same global seed, with ``generator=None`` and
``hf_rng=True`` (the defaults), the tokens equal ``generate``'s, bit for bit: same logits
(same model ops on the same positions, masks and cache lengths), the processors' float
operations repeated one for one, and the RNG consumed by one ``torch.multinomial`` over the
full ``(B, V)`` distribution per step. Tested for plain sampling, temperature/top-k/top-p,
top-p alone, repetition penalty (> 1 and < 1) with no-repeat-n-gram, min_new_tokens,
fixed_length, ragged left padding, EOS stopping (some or all rows), pad == EOS, GPT-2 with
SDPA and eager attention and a Llama; on CPU in fp32 (and bf16 in a manual check).
``hf_rng=False`` draws each step among the top-k candidates only (the race of exponentials
``torch.multinomial`` runs, restricted to the tokens with non-zero probability): the same
distribution from a different random stream, so its equivalence is tested statistically
(chi-square against the exact processed distribution and against the exact draw). It saves
one V-sized exponential draw per step (~0.7 ms at B=8, V=4096 on one CPU core).
The repetition penalty ignores the left padding as ``generate`` does in transformers 5
(4.x penalised the pad id as well).

Log-probs. ``logprobs[:, t]`` is ``log_softmax(raw_logits / temperature)`` at the chosen token,
float32: the *unprocessed* policy at the sampling temperature, i.e. PPO's old log-prob
(hybrid_ds.algorithms.ppo_math.logprobs_from_logits). It equals a recomputed full-sequence forward on
prompt + response (attention mask = prompt mask + response mask, position ids from that mask,
model in eval mode so no dropout) to float32 rounding (~1e-6; the test asserts 1e-5) when the
model runs in float32. In bf16/fp16 the cached decode and the full forward round differently
(~1e-2): recompute them there. ``processed_logprobs`` are the log-probs under the distribution
actually sampled from (after all processors); they equal ``logprobs`` only when no processor
changes it (penalty 1, no n-gram ban, no EOS suppression, top_k 0 or >= V, top_p 1). Both are
0 after a row's EOS.

Speed (bench/bench_sampler.py; the peers' unit: GPT-2 4x256, V=4096, 8 prompts x 32 tokens,
top_p 0.9 / T 0.7 / top_k 50 / no-repeat 3 / penalty 1.15). Decoding this model is bound by
its matmuls (17 MB of weights streamed per step), so what can go is everything else: the full
sort of top-p (about 12% of ``generate``'s time), the per-module overhead of the forward
(~14%), the V-sized random draw (``hf_rng=False``, ~10%). A preallocated vs concatenated vs
static KV cache makes no measurable difference at ~60 positions; the preallocated one avoids
re-copying the whole cache every step as sequences grow. Neither math attention nor a fused
GELU (2%), nor torch.compile of the forward on CPU (~18% of the forward, 40 s compile per
shape, tokens no longer bit-identical) earned a flag; CUDA graphs were not tried (no GPU).

Integration: pass the bare HF causal LM in eval mode (``engine.module.lm``), inside
``dist.generation_model`` so that ZeRO-3 weights are gathered once for the whole call (no
collective runs inside, so ranks may stop at different steps; left partitioned, GPT-2 falls
back to the module forward and its hooks). Seed ``generator`` differently per rank.
PPO (hybrid_ds.algorithms.ppo.generate) runs it with ``hf_rng=False`` under ``SAMPLER: "lean"`` (the default)
and ``hf_rng=True`` under ``"lean_exact"``, and passes the value head as ``value_fn`` so that in
float32 the rollout's own log-probs and values serve as PPO's old ones (``OLD_LOGPROBS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_ds.models.policy_value import logits_to_keep

_NEG_INF = float("-inf")


@dataclass(kw_only=True)
class SamplingSettings:
    """Sampling settings, with ``generate``'s meaning for each (0 / 1.0 disable a processor)."""

    max_new_tokens: int  # tokens to generate at most
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens
    temperature: float = 1.0  # logits are divided by it (sampling and log-probs)
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus mass; 1.0 disables
    repetition_penalty: float = 1.0  # CTRL penalty on every id of prompt + response; 1.0 disables
    no_repeat_ngram_size: int = 0  # forbid repeating an n-gram of the prompt + response; 0 disables
    eos_token_id: Union[int, Sequence[int]]  # id(s) that end a response
    pad_token_id: int  # emitted after EOS

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens < 0:
            problems.append(f"min_new_tokens={self.min_new_tokens} must be >= 0")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0")
        if problems:
            raise ValueError("bad SamplingSettings: " + "; ".join(problems))

    @property
    def eos_ids(self) -> list:
        return [int(e) for e in self.eos_token_id] if isinstance(self.eos_token_id, (list, tuple)) \
            else [int(self.eos_token_id)]

    @classmethod
    def from_gen_config(cls, gen, eos_token_id, pad_token_id) -> "SamplingSettings":
        """From hybrid_ds.config.GenConfig (``cfg.gen``) and the tokenizer's ids."""
        return cls(max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
                   temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                   repetition_penalty=gen.repetition_penalty, no_repeat_ngram_size=gen.no_repeat_ngram_size,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def generate_kwargs(self) -> dict:
        """The same settings as keyword arguments of ``model.generate`` (for comparisons)."""
        eos = self.eos_ids
        return dict(do_sample=True, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                    eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=self.pad_token_id, use_cache=True)


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

        _LAYER_CLASS = PreallocatedLayer
    return Cache(layer_class_to_replicate=lambda: _LAYER_CLASS(capacity))


def _make_cache(model, kind: str, capacity: int):
    if kind == "prealloc":
        return _preallocated_cache(capacity)
    if kind == "static":
        from transformers import StaticCache
        return StaticCache(config=model.config, max_cache_len=capacity)
    from transformers import DynamicCache
    return DynamicCache()


# --------------------------------------------------------------------------------------
# one decode step: the model's forward, or GPT-2's written against its weights


def _uses_4d_bool_masks(model) -> bool:
    """Whether a prebuilt boolean ``(B, 1, 1, kv)`` mask is what the model's attention consumes.

    True for SDPA attention without sliding-window layers; otherwise the model builds its masks
    itself from the 2D mask every step (slower, always right).
    """
    cfg = model.config
    sliding = getattr(cfg, "sliding_window", None) or any(
        "sliding" in str(t) for t in (getattr(cfg, "layer_types", None) or ()))
    return getattr(cfg, "_attn_implementation", None) == "sdpa" and not sliding


def _hf_step(model, kv, full_mask: Optional[Tensor], static: bool = False, hidden: bool = False):
    """``step(tok (B,), pos (B, 1), n) -> (logits (B, V), final hidden state (B, C) or None)`` through
    the model's own forward (``hidden``: ask it for its hidden states).

    ``full_mask`` ``(B, L)``: the attention mask of prompt + all new tokens, None if there is no
    padding (``generate`` then drops the mask too). It is passed as the prebuilt 4D boolean
    mask where the model's attention takes one, as the 2D mask otherwise; ``static``: for
    transformers' StaticCache, which attends over all ``L`` slots, written or not.
    """
    if static:
        slots = torch.arange(full_mask.shape[1], device=full_mask.device)
        masks = full_mask.bool()[:, None, None, :]
    elif full_mask is not None and _uses_4d_bool_masks(model):
        full_mask = full_mask.bool()[:, None, None, :]  # (B, 1, 1, L), sliced to the cache length

    def step(tok, pos, n):
        if static:
            mask = masks & (slots <= n)
        else:
            mask = None if full_mask is None else full_mask[..., :n + 1]
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=kv,
                    use_cache=True, output_hidden_states=hidden)
        return out.logits[:, -1], (out.hidden_states[-1][:, -1] if hidden else None)
    return step


class _Gpt2Step:
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
                # ZeRO-3 partitions left in place (not gathered): only the module hooks can fetch them
                and all(p.numel() > 0 for p in model.parameters()))

    def __init__(self, model, kv, full_mask: Optional[Tensor]):
        tr = model.transformer
        self.wte, self.wpe, self.ln_f, self.head = tr.wte, tr.wpe, tr.ln_f, model.lm_head
        self.blocks = [(blk.ln_1, blk.attn, blk.ln_2, blk.mlp, layer) for blk, layer in zip(tr.h, kv.layers)]
        self.mask = None if full_mask is None else torch.zeros(
            full_mask.shape, dtype=tr.wte.weight.dtype, device=full_mask.device).masked_fill_(
            full_mask == 0, _NEG_INF)[:, None, None, :]  # (B, 1, 1, L)

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
        h = self._norm(self.ln_f, h)  # the final hidden state (hidden_states[-1] of the forward)
        return F.linear(h, self.head.weight, self.head.bias), h


# --------------------------------------------------------------------------------------
# logits processors


class _Processors:
    """generate's sampling pipeline for one batch, as few tensor ops per step as exactness allows.

    Each step modifies the raw logits in place with HF's arithmetic: repetition penalty (one
    gather/scatter over the prompt + response ids) -> n-gram ban -> EOS suppression. Then, when
    ``top_k`` is on, the fast path works on the ``k`` candidates only: ``topk`` of the penalised
    logits, divided by the temperature (the same division generate applies to the whole row),
    top-p's cumulative mass over those ``k`` values, and the final row rebuilt as ``-inf`` plus
    the kept values, bit-identical to generate's processed scores. Sorting all V logits (what
    ``TopPLogitsWarper`` does; 2 ms at B=8, V=4096 on one CPU core) is the one thing skipped, and
    it only decides *which* candidates top-p drops: in a row where that decision could differ
    from generate's (a cumulative mass within float rounding of ``1 - top_p``, equal logits at
    the top-k or top-p boundary, fewer than k finite logits) generate's full-vocabulary ops
    decide instead (a few rows per thousand), and so does every row when ``top_k`` is 0.
    """

    def __init__(self, s: SamplingSettings, input_ids: Tensor, attention_mask: Tensor, ids: Tensor,
                 vocab: int, min_new: int, hf_rng: bool, generator):
        B, P = input_ids.shape
        dev = input_ids.device
        self.s, self.ids, self.P, self.V, self.min_new, self.gen = s, ids, P, vocab, min_new, generator
        self.hf_rng = hf_rng
        self.eos = torch.tensor(s.eos_ids, device=dev)
        self.single_eos = s.eos_ids[0] if len(s.eos_ids) == 1 else None
        self.k = s.top_k if s.top_k < vocab else 0  # top-k of the whole vocabulary removes nothing
        self.wide_ids = s.pad_token_id >= vocab or bool((input_ids >= vocab).any())
        self.ninf, self.pinf = torch.tensor(_NEG_INF, device=dev), torch.tensor(float("inf"), device=dev)
        self.rep = s.repetition_penalty != 1.0
        if self.rep:
            # generate ignores the left padding (prompt_ignore_length = first real position) and ids
            # past the logits' width. The penalty moves every logit the same way (down for a
            # penalty > 1), so it is applied as a scatter-min (scatter-max) in which ignored
            # positions carry +inf (-inf): duplicates and ignored entries cannot disagree.
            first = (attention_mask != 0).int().argmax(dim=1, keepdim=True)
            self.rep_valid = (ids < vocab) & (torch.arange(ids.shape[1], device=dev) >= first)
            self.rep_ids = ids.masked_fill(~self.rep_valid, 0)  # (B, L)
            up = s.repetition_penalty < 1
            self.rep_reduce, self.rep_ignored = ("amax", _NEG_INF) if up else ("amin", float("inf"))
        if self.k:
            self.final = torch.empty(B, vocab, device=dev)  # the processed row, rebuilt each step
            self.threshold = 1 - s.top_p
            # cumulative masses nearer than this to the threshold might round to the other side in
            # generate's float32 sort/softmax/cumsum: take the exact path then
            self.margin = 1e-6 + 8 * max(self.k, 1) * 2.0 ** -24

    def __call__(self, logits: Tensor, t: int):
        """Next tokens ``(B,)`` and their probabilities under the processed distribution ``(B,)``.

        ``logits``: the raw ``(B, V)`` float32 logits of step ``t``; modified in place.
        """
        self.penalize(logits, t)
        if not self.k:
            return self._draw(self.exact_scores(logits))
        vals, idx, ambiguous = self.candidates(logits)
        redo = ambiguous.nonzero().squeeze(1) if bool(ambiguous.any()) else None  # rows generate's ops decide
        if self.hf_rng:
            final = self.final.fill_(_NEG_INF).scatter_(1, idx, vals)
            if redo is not None:
                final[redo] = self.exact_scores(logits[redo])
            return self._draw(final)
        # the race of exponentials torch.multinomial runs (argmax p / q, q ~ Exp(1)), over the candidates only
        probs = vals.softmax(-1)
        choice = (probs / torch.empty_like(probs).exponential_(1, generator=self.gen)).argmax(-1, keepdim=True)
        tok, p_tok = idx.gather(1, choice).squeeze(1), probs.gather(1, choice).squeeze(1)
        if redo is not None:
            tok[redo], p_tok[redo] = self._draw(self.exact_scores(logits[redo]))
        return tok, p_tok

    def penalize(self, logits: Tensor, t: int) -> None:
        """Repetition penalty, n-gram ban and EOS suppression, in place, with generate's arithmetic."""
        s, cur = self.s, self.P + t
        if self.rep:
            idx = self.rep_ids[:, :cur]
            g = logits.gather(1, idx)
            g = torch.where(g < 0, g * s.repetition_penalty, g / s.repetition_penalty)
            logits.scatter_reduce_(1, idx, g.masked_fill_(~self.rep_valid[:, :cur], self.rep_ignored),
                                   reduce=self.rep_reduce)
        n = s.no_repeat_ngram_size
        if n and cur >= n:
            win = self.ids[:, :cur].unfold(1, n, 1)  # (B, W, n) every n-gram so far, padding included as in generate
            last = win[..., -1]
            hit = (win[..., :-1] == self.ids[:, None, cur - n + 1:cur]).all(-1)
            if self.wide_ids:  # generate drops bans of ids past the logits' width
                hit &= last < self.V
                last = last.clamp(max=self.V - 1)
            # scatter-min of -inf (banned) or +inf (no-op): windows sharing a last token cannot disagree
            logits.scatter_reduce_(1, last, torch.where(hit, self.ninf, self.pinf), reduce="amin")
        if t < self.min_new:
            logits.index_fill_(1, self.eos, _NEG_INF)

    def candidates(self, logits: Tensor):
        """``(vals, idx, ambiguous)``: ``vals`` ``(B, k)`` are generate's processed scores at the top-k
        ids ``idx`` ``(B, k)`` (-inf where top-p drops them), every other token's score being -inf;
        except in the rows where ``ambiguous`` ``(B,)`` is set, which generate's own
        full-vocabulary ops must decide (see the class docstring)."""
        s, k = self.s, self.k
        vals, idx = torch.topk(logits, k + 1)  # descending; the (k+1)-th only to see a tie
        vals = vals / s.temperature if s.temperature != 1.0 else vals
        ambiguous = ~(vals[:, k - 1] > vals[:, k])  # generate keeps every tie of the k-th (or: < k finite)
        vals, idx = vals[:, :k], idx[:, :k]
        if s.top_p < 1.0:
            asc = vals.softmax(-1).flip(-1).cumsum(-1)  # generate's ascending cumulative mass
            drop = asc <= self.threshold
            drop[:, -1] = False
            drop = drop.flip(-1)  # back to descending order: True after the kept head
            ambiguous |= ((asc - self.threshold).abs() < self.margin).any(-1)  # could round either way
            ambiguous |= (drop[:, 1:] & ~drop[:, :-1] & (vals[:, 1:] == vals[:, :-1])).any(-1)  # tie at the cut
            vals = vals.masked_fill(drop, _NEG_INF)
        return vals, idx, ambiguous

    def exact_scores(self, logits: Tensor) -> Tensor:
        """generate's temperature, top-k and top-p warpers, op for op, over the whole vocabulary."""
        s = self.s
        scores = logits / s.temperature if s.temperature != 1.0 else logits
        if self.k:
            scores = scores.masked_fill(scores < torch.topk(scores, self.k)[0][..., -1:], _NEG_INF)
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - s.top_p
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), _NEG_INF)
        return scores

    def _draw(self, scores: Tensor):
        probs = torch.softmax(scores, -1)
        tok = torch.multinomial(probs, 1, generator=self.gen)
        return tok.squeeze(1), probs.gather(1, tok).squeeze(1)

    def push(self, tok: Tensor, t: int) -> None:
        """Record the step's tokens (after pad replacement) for the penalty and the n-gram ban."""
        self.ids[:, self.P + t] = tok
        if self.rep:  # generated ids are < V (pad may not be)
            self.rep_valid[:, self.P + t] = tok < self.V
            self.rep_ids[:, self.P + t] = tok.masked_fill(tok >= self.V, 0)

    def is_eos(self, tok: Tensor) -> Tensor:
        return tok == self.single_eos if self.single_eos is not None else torch.isin(tok, self.eos)


# --------------------------------------------------------------------------------------
# the sampling loop


@torch.no_grad()
def sample(model, input_ids: Tensor, attention_mask: Tensor, settings: SamplingSettings, *,
           generator: Optional[torch.Generator] = None, fixed_length: bool = False, hf_rng: bool = True,
           cache: str = "prealloc", value_fn: Optional[Callable[[Tensor], Tensor]] = None) -> SampleOutput:
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
    ``value_fn``: final hidden states ``(B, C)`` -> values ``(B,)`` (PPO's value head); when given,
    ``values[:, t]`` is its value at the position whose logits drew token ``t`` (the last prompt
    token for ``t = 0``), the same positions as the log-probs, so a rollout needs no second forward.
    """
    s = settings
    B, P = input_ids.shape
    if P == 0 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"sample needs left-padded prompts (B, P >= 1) and a mask of the same shape, got "
                         f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)}")
    N, dev, pad = s.max_new_tokens, input_ids.device, s.pad_token_id
    L = P + N
    attention_mask = attention_mask.to(dev).long()
    track_eos = not fixed_length

    # 0. what every step slices, built once
    ids = torch.full((B, L), pad, dtype=torch.long, device=dev)  # prompt + response
    ids[:, :P] = input_ids
    full_mask = torch.ones(B, L, dtype=torch.long, device=dev)
    full_mask[:, :P] = attention_mask
    pos = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    step_pos = pos[:, -1:] + 1 + torch.arange(N, device=dev)  # (B, N) position of each new token
    padded = not bool(attention_mask.all())  # generate drops an all-ones mask; so do we
    if cache == "static" and not _uses_4d_bool_masks(model):
        raise ValueError("cache='static' is only wired for SDPA attention")
    kv = _make_cache(model, cache, L)
    out_lp = torch.zeros(B, N, dtype=torch.float32, device=dev)
    out_plp = torch.ones(B, N, dtype=torch.float32, device=dev)
    alive = torch.ones(B, N + 1, dtype=torch.bool, device=dev)  # alive[:, t]: unfinished before step t
    unfinished = alive[:, 0]

    # 1. prefill: the whole prompt, logits of its last position
    keep = logits_to_keep(model, 1)
    want_h = value_fn is not None
    out_v = torch.zeros(B, N, dtype=torch.float32, device=dev) if want_h else None
    first = model(input_ids=input_ids, attention_mask=attention_mask if padded else None, position_ids=pos,
                  past_key_values=kv, use_cache=True, output_hidden_states=want_h, **keep)
    logits = first.logits[:, -1].float()
    hidden = first.hidden_states[-1][:, -1] if want_h else None
    del first
    proc = _Processors(s, input_ids, attention_mask, ids, logits.shape[-1], N if fixed_length else s.min_new_tokens,
                       hf_rng, generator)
    if cache == "prealloc" and _Gpt2Step.supports(model):
        step = _Gpt2Step(model, kv, full_mask if padded else None)
    else:
        step = _hf_step(model, kv, full_mask if padded or cache == "static" else None, static=cache == "static",
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
