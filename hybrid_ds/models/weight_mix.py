"""The reference's step toward the policy (REF_SYNC_EVERY / REF_SYNC_ALPHA), as one pure tensor function.

``ref <- alpha * policy + (1 - alpha) * ref``: alpha 1 copies the policy, alpha < 1 is the exponential
moving average of TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
Alignment", eq. 3, soft update). Both placements of the reference apply it element by element: the
colocated one on each rank's ZeRO-3 partitions or whole weights (``engine/dist.py``
``Dist.copy_weights``), the separate one on each parameter the policy sends over the bridge
(``reference/weights.py``); elementwise, partitioning cannot change a number.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def mix_into(dst: torch.Tensor, src: torch.Tensor, alpha: float) -> torch.Tensor:
    """``dst <- alpha * src + (1 - alpha) * dst`` in place, in ``dst``'s dtype; returns ``dst``.

    ``dst``, ``src``: the same number of elements (any shapes, ``src`` is viewed as ``dst``; any
    dtypes and devices, ``src`` is moved to ``dst``'s). ``alpha == 1`` copies ``src`` exactly (cast
    to ``dst``'s dtype); otherwise the mix is computed in float32 and rounded once to ``dst``'s
    dtype, so a bf16 reference drifts no more than its own rounding allows.
    """
    src = src.to(dst.device).reshape(dst.shape)
    if alpha == 1.0:
        return dst.copy_(src.to(dst.dtype))
    return dst.copy_((alpha * src.float() + (1.0 - alpha) * dst.float()).to(dst.dtype))
