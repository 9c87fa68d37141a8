"""transformers generate's logits processors for one sampled batch, in as few tensor ops as exactness allows.

Used by :func:`hybrid_ds.rollout.sampler.sample`; tests/test_sampler.py compares every setting with
transformers' own ``LogitsProcessorList``.
"""

from __future__ import annotations


import torch
from torch import Tensor

from hybrid_ds.rollout.settings import NEG_INF, SamplingSettings

# --------------------------------------------------------------------------------------
# logits processors


class Processors:
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
        self.ninf, self.pinf = torch.tensor(NEG_INF, device=dev), torch.tensor(float("inf"), device=dev)
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
            self.rep_reduce, self.rep_ignored = ("amax", NEG_INF) if up else ("amin", float("inf"))
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
            final = self.final.fill_(NEG_INF).scatter_(1, idx, vals)
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
            logits.index_fill_(1, self.eos, NEG_INF)

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
            vals = vals.masked_fill(drop, NEG_INF)
        return vals, idx, ambiguous

    def exact_scores(self, logits: Tensor) -> Tensor:
        """generate's temperature, top-k and top-p warpers, op for op, over the whole vocabulary."""
        s = self.s
        scores = logits / s.temperature if s.temperature != 1.0 else logits
        if self.k:
            scores = scores.masked_fill(scores < torch.topk(scores, self.k)[0][..., -1:], NEG_INF)
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - s.top_p
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)
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
