"""DeepSpeed's shared-memory all-reduce segments in /dev/shm: removed at shutdown and after crashes."""

from __future__ import annotations

import os
import time

# DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp, switched on when the
# launcher sets LOCAL_SIZE to the world size, as the deepspeed launcher does) creates one segment per
# rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (about 68 MiB),
# and never unlinks it. hybrid_ds never calls that all-reduce; it removes its own segments at
# shutdown and, at start, the segments of runs that died (no live process maps them or holds them
# open: DeepSpeed keeps the descriptor of every segment it opens, from creation on).
SHM_DIR, SHM_PREFIX = "/dev/shm", "deepspeed_allreduce_buffer_"


def remove_shm_segments(own: bool, min_age_s: float = 5.0) -> list[str]:
    """Unlink DeepSpeed all-reduce segments of this user: this run's own (``own``: named by this
    process's MASTER_ADDR/MASTER_PORT), else those no live process maps or holds open, older than
    ``min_age_s``. Returns the names removed."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{os.getuid()}_")]
    except OSError:
        return []
    if own:
        mine = f"{SHM_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
        doomed = [n for n in names if n.startswith(mine) and n[len(mine):].isdigit()]
    else:
        mapped = _used_shm_names() if names else set()
        now, doomed = time.time(), []
        for n in names:
            try:
                old = now - os.stat(os.path.join(SHM_DIR, n)).st_mtime > min_age_s
            except OSError:
                continue
            if old and n not in mapped:
                doomed.append(n)
    removed = []
    for n in doomed:
        try:
            os.unlink(os.path.join(SHM_DIR, n))
            removed.append(n)
        except OSError:  # another rank or run was first, or it is not ours to remove
            pass
    return removed


def _used_shm_names() -> set[str]:
    """DeepSpeed segment names that a live process of this machine maps or holds open (/proc/<pid>/)."""
    out, tag = set(), f"{SHM_DIR}/{SHM_PREFIX}"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find(tag)
                    if at >= 0:
                        out.add(line[at + len(SHM_DIR) + 1:].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:  # closed meanwhile
                    continue
                if target.startswith(tag):
                    out.add(target[len(SHM_DIR) + 1:].split()[0])
        except OSError:  # gone, or another user's (which cannot open our 0600 segments)
            continue
    return out


def shm_op_unbuilt() -> bool:
    """Whether starting DeepSpeed's comm backend on CPU will compile its shared-memory all-reduce op first.

    DeepSpeed's torch backend loads the op when it starts (``build_shm_op`` in deepspeed/comm/torch.py),
    JIT-compiling it with ninja into torch's extension directory (``TORCH_EXTENSIONS_DIR`` or
    ``~/.cache/torch_extensions``) on first use, which takes a while; later runs load the built library."""
    import glob

    import torch

    if torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import get_default_build_root

    return not glob.glob(os.path.join(get_default_build_root(), "*", "deepspeed_shm_comm", "deepspeed_shm_comm*.so"))
