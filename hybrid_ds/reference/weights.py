"""The policy's weights over the bridge, for REF_SYNC_EVERY with the reference on its own ranks.

The SYNC message of ``reference/protocol.py`` carries them: a manifest, int64 ``(n, 2)`` of each
parameter's ``[numel, dtype code]`` (codes index :data:`DTYPES`), then ``n`` flat payloads, one per
parameter in ``named_parameters`` order, each in the policy's own dtype. The reference checks the
manifest against its own parameters before it takes a weight, then receives one parameter at a time
and mixes it into its own with :func:`hybrid_ds.models.weight_mix.mix_into`, the arithmetic of the
colocated ``Dist.copy_weights``; neither side holds more than one parameter in flight.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from hybrid_ds.engine.placement import TAG_HEADER, TAG_PAYLOAD, Bridge
from hybrid_ds.models.weight_mix import mix_into

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def manifest_tensor(manifest: Sequence[tuple[int, torch.dtype]]) -> torch.Tensor:
    """int64 ``(n, 2)``: ``[numel, dtype code]`` per parameter; a dtype the wire does not carry (a
    quantised weight) raises ValueError before anything is sent."""
    bad = sorted({str(d) for _, d in manifest if d not in DTYPES})
    if bad:
        raise ValueError(f"reference sync sends float weights only ({', '.join(map(str, DTYPES))}); the "
                         f"policy has {', '.join(bad)}")
    return torch.tensor([[int(n), DTYPES.index(d)] for n, d in manifest], dtype=torch.int64).reshape(-1, 2)


def send_sync(bridge: Bridge, peer: int, header: torch.Tensor, table: Optional[torch.Tensor],
              weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """A client's side of a SYNC round (``reference/protocol.py``): send ``header``; with ``table``
    (the reference's sending client) the manifest and the weights, else only walk ``weights`` (under
    ZeRO-3 the sending rank's gathers need every policy rank); returns the reference's reply header."""
    bridge.wait(bridge.isend(header, peer, TAG_HEADER), peer, "sending SYNC")
    if table is not None:
        send_weights(bridge, peer, table, weights)
    else:
        for _ in weights:
            pass
    reply = torch.zeros_like(header)
    bridge.wait(bridge.irecv(reply, peer, TAG_HEADER), peer, "waiting for the reference to take the weights")
    return reply


def send_weights(bridge: Bridge, peer: int, table: torch.Tensor, weights: Iterable[torch.Tensor]) -> None:
    """Send the manifest ``table`` (:func:`manifest_tensor`), then each tensor of ``weights`` flat; each
    send is waited for (bounded by the bridge timeout) before the next weight is taken."""
    n = table.shape[0]
    bridge.wait(bridge.isend(table, peer, TAG_PAYLOAD), peer, "sending the weights' manifest")
    sent = 0
    for i, w in enumerate(weights):
        buf = w.detach().to("cpu").contiguous().reshape(-1)
        if i >= n or buf.numel() != int(table[i, 0]) or buf.dtype != DTYPES[int(table[i, 1])]:
            raise ValueError(f"weight {i + 1} ({buf.numel()} x {buf.dtype}) is not the manifest's")
        bridge.wait(bridge.isend(buf, peer, TAG_PAYLOAD), peer, f"sending weight {i + 1} of {n}")
        sent += 1
    if sent != n:
        raise ValueError(f"sent {sent} weights, the manifest announced {n}")


def manifest_problem(table: torch.Tensor, params: Sequence[torch.Tensor]) -> str:
    """Why ``table`` does not fit ``params`` ("" when it does): the policy and the reference must be
    the same architecture (both load MODEL)."""
    if table.shape[0] != len(params):
        return f"the policy sends {table.shape[0]} parameters, the reference has {len(params)}"
    for i, ((numel, code), p) in enumerate(zip(table.tolist(), params)):
        if not 0 <= code < len(DTYPES):
            return f"parameter {i + 1}: unknown dtype code {code}"
        if numel != p.numel():
            return f"parameter {i + 1}: the policy's has {numel} elements, the reference's {p.numel()}"
    return ""


def receive_weights(bridge: Bridge, peer: int, params: Sequence[torch.Tensor], n: int, alpha: float) -> None:
    """Take the manifest and ``n`` weights from ``peer`` and mix each into ``params`` (same order):
    ``param <- alpha * weight + (1 - alpha) * param``. A manifest that does not fit raises ValueError
    after the weights were received and dropped, so the sender is left waiting for no receive and
    reads the error the server sends it."""
    table = torch.empty(n, 2, dtype=torch.int64)
    bridge.wait(bridge.irecv(table, peer, TAG_PAYLOAD), peer, "receiving the weights' manifest")
    problem = manifest_problem(table, params)
    for i, (numel, code) in enumerate(table.tolist()):
        buf = torch.empty(numel, dtype=DTYPES[code] if 0 <= code < len(DTYPES) else torch.uint8)
        bridge.wait(bridge.irecv(buf, peer, TAG_PAYLOAD), peer, f"receiving weight {i + 1} of {n}")
        if not problem:
            mix_into(params[i].data, buf, alpha)
    if problem:
        raise ValueError(f"reference sync: {problem}")
