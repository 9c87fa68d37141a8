"""DeepSpeed's all-gather under the name the installed torch gives it.

torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` (the old name is now a wrapper
that raises a FutureWarning on its first call; hybrid_ds's own gather, ``engine/dist.py``, calls the new
name where it exists). :func:`prefer_all_gather_single` points DeepSpeed's torch comm backend,
which looks the old name up when it starts (``deepspeed/comm/torch.py``, ``get_all_gather_function``),
at the same function under its new name, so ZeRO's parameter all-gathers stop warning too.
"""

from __future__ import annotations

import torch.distributed as tdist


def prefer_all_gather_single() -> None:
    """DeepSpeed's started comm backend gathers with ``all_gather_single`` (no-op without DeepSpeed's
    backend, or a torch without the new name)."""
    new = getattr(tdist, "all_gather_single", None)
    if new is None:
        return
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:  # DeepSpeed is a dependency; a broken install shows elsewhere
        return
    backend = getattr(ds_comm, "cdb", None)
    if getattr(backend, "all_gather_function", None) is getattr(tdist, "all_gather_into_tensor", None):
        backend.all_gather_function = new
