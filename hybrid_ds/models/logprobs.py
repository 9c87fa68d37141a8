"""Token log-probabilities of a causal LM's outputs: the one place logits become log-probs.

Shared by the policy's rollout and update (:mod:`hybrid_ds.algorithms.ppo`), the reference wherever it
runs (:mod:`hybrid_ds.reference.protocol`) and the sampler's own log-probs. Pure tensor code: no
torch.distributed, no accelerate, no deepspeed.

Shapes: ``B`` sequences, ``P`` prompt length, ``T`` response length, ``V`` vocabulary size.
"""

from __future__ import annotations

import math

import torch

from hybrid_ds.models.policy_value import causal_lm_logits

Tensor = torch.Tensor

#: fp32 elements per chunk in the vocabulary-wide reductions (64 MiB per chunk).
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ----------------------------------------------------------------------------------------------
def _blocks(shape: torch.Size):
    """Yield ``(batch_slice, time_slice)`` pairs covering a ``(B, T, V)`` tensor in blocks of at
    most ``_CHUNK_ELEMENTS`` elements (at least one position). Slicing the first two dims keeps
    every block a view, even of non-contiguous logits such as ``logits[:, :-1]``."""
    b_size, t_size, vocab = shape
    per_block = max(1, _CHUNK_ELEMENTS // max(1, vocab))  # positions per block
    if per_block >= t_size:
        rows = max(1, per_block // max(1, t_size))
        for b in range(0, b_size, rows):
            yield slice(b, b + rows), slice(None)
    else:
        for b in range(b_size):
            for t in range(0, t_size, per_block):
                yield slice(b, b + 1), slice(t, t + per_block)


def _as_3d(logits: Tensor) -> Tensor:
    """View ``(V,)``, ``(T, V)`` or ``(..., T, V)`` logits as ``(B, T, V)``."""
    if logits.dim() == 3:
        return logits
    if logits.dim() < 3:
        return logits.reshape((1,) * (3 - logits.dim()) + tuple(logits.shape))
    return logits.reshape(-1, *logits.shape[-2:])


def _blocked_logsumexp(logits: Tensor, temperature: float) -> Tensor:
    """``logsumexp(logits / temperature, -1)`` ``(B, T, V) -> (B, T)`` in float32, one block at a time."""
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for bs, ts in _blocks(logits.shape):
        block = logits[bs, ts].float()
        if temperature != 1.0:
            block = block / temperature
        out[bs, ts] = torch.logsumexp(block, dim=-1)
    return out


class _BlockedTokenLogProb(torch.autograd.Function):
    """``log_softmax(logits / temperature)`` at ``tokens``, in float32, block by block.

    Forward: the picked logit minus a float32 logsumexp per block. Backward writes
    ``(onehot(token) - softmax) * grad / temperature`` into one gradient buffer of the logits' dtype,
    block by block: one (B, T, V) tensor for the whole backward, where gather + logsumexp as two
    autograd nodes would each make their own and sum them.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:  # (B, T, V), (B, T) -> (B, T)
        lse = _blocked_logsumexp(logits, temperature)
        picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).float()
        if temperature != 1.0:
            picked = picked / temperature
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # (B, T) -> (B, T, V)
        logits, tokens, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits)
        for bs, ts in _blocks(logits.shape):
            block = logits[bs, ts].float()
            if t != 1.0:
                block = block / t
            g = (grad_out[bs, ts] / t).unsqueeze(-1)
            out = torch.exp(block - lse[bs, ts].unsqueeze(-1)).mul_(-g)  # -softmax * g
            out.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), g)  # + onehot * g
            grad[bs, ts] = out.to(grad.dtype)
        return grad, None, None


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)``, in float32.

    Shapes: ``logits`` ``(B, T, V)`` (fp32, bf16 or fp16; may be a non-contiguous slice such as
    ``logits[:, :-1]``), ``tokens`` ``(B, T)`` integer ids -> ``(B, T)`` float32.
    ``logits[:, t]`` must be the logits that *predict* ``tokens[:, t]`` (the caller shifts by
    one). Dividing by the sampling temperature makes the log-probs match the distribution the
    rollout sampled from (docs/ppo.md §4).

    Computed as ``gathered_logit / T - logsumexp(logits / T)`` with the logsumexp done in float32
    over blocks of at most 2**24 elements; a custom autograd function recomputes the softmax in
    backward, so no full fp32 ``(B, T, V)`` copy of bf16/fp16 logits is ever materialised, and the
    backward makes one gradient buffer of the logits' dtype. Ids must be valid indices ``[0, V)``
    everywhere, including padding positions (mask afterwards).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits3 = _as_3d(logits)
    out = _BlockedTokenLogProb.apply(logits3, tokens.long().reshape(logits3.shape[:2]), float(temperature))
    return out.reshape(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position, in float32.

    Shapes: ``logits`` ``(B, T, V)`` -> ``(B, T)``. ``H = -sum(p * log p)`` with
    ``log p = z - logsumexp(z)``, ``z = logits / T`` (``-inf`` logits contribute 0), computed block
    by block so only one fp32 block exists at a time in
    forward. Differentiable through ordinary autograd (which keeps the blocks for backward), so
    use it as a metric under ``torch.no_grad()`` unless an entropy bonus is really wanted.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits3 = _as_3d(logits)
    out = torch.empty(logits3.shape[:2], dtype=torch.float32, device=logits.device)
    for bs, ts in _blocks(logits3.shape):
        z = logits3[bs, ts].float()
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)
        logp = z - lse.unsqueeze(-1)
        p_logp = torch.where(logp > -math.inf, logp.exp() * logp, torch.zeros_like(logp))
        out[bs, ts] = -p_logp.sum(-1)  # slice assignment is tracked by autograd
    return out.reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------------------------
# A prompt + response batch through a model
# ----------------------------------------------------------------------------------------------
def sequence_inputs(query_ids, query_mask, response_ids, response_mask):
    """Prompt + response as one batch: ids, attention mask and position ids ``(B, P+T)``.

    Positions come from the attention mask, so left padding does not shift them (docs/ppo.md, section 3).
    """
    ids = torch.cat([query_ids, response_ids], 1)
    att = torch.cat([query_mask, response_mask.long()], 1)
    pos = (att.cumsum(1) - 1).clamp(min=0)
    return ids, att, pos


def policy_response_outputs(model, ids, att, pos, T: int, with_values: bool = True):
    """The policy/value model's logits ``(B, T, V)`` and values ``(B, T)`` (None without ``with_values``)
    at the positions that predict the ``T`` response tokens (the last prompt token .. the
    second-to-last token); the LM head runs on those ``T + 1`` last positions only."""
    logits, values = model(ids, att, position_ids=pos, with_values=with_values, keep_last=T + 1)
    return logits[:, :T], (values[:, :T] if values is not None else None)


def lm_response_logprobs(lm, ids, att, pos, response_ids, temperature: float):
    """A plain causal LM's (the reference's) log-probs ``(B, T)`` of the response tokens."""
    T = response_ids.shape[1]
    logits = causal_lm_logits(lm, ids, att, pos, keep_last=T + 1)[:, :T]
    return logprobs_from_logits(logits, response_ids, temperature)
