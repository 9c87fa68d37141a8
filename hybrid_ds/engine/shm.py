"""DeepSpeed's shared-memory all-reduce segments in /dev/shm: removed at shutdown and after crashes."""

from __future__ import annotations

import os
import time

from hybrid_ds.engine.procfs import paths_in_use

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
    """DeepSpeed segment names that a live process of this machine maps or holds open."""
    return {p[len(SHM_DIR) + 1:] for p in paths_in_use(f"{SHM_DIR}/{SHM_PREFIX}")}
