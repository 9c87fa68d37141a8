"""One run per OUTPUT_DIR: the main rank holds an flock on OUTPUT_DIR/.lock for the whole run.

The lock file names the holder (pid, host, start time); the kernel drops an flock when its process
dies, so a lock left by a killed run is simply taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from hybrid_ds.run.checkpoint_dir import ResumeError, log

LOCK_FILE, RESUME_JOURNAL = ".lock", "resume-pending.json"  # the journal: hybrid_ds.run.resume


_held_lock: Optional[int] = None  # descriptor of the OUTPUT_DIR lock this process holds


def lock_output_dir(out: str) -> None:
    """Hold OUTPUT_DIR for this process (flock on OUTPUT_DIR/.lock until release or exit). Raises
    ResumeError naming the holder when another process holds it; a lock whose holder died is
    taken over, and said so."""

    global _held_lock
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise ResumeError(_busy_message(out, holder)) from None
    stale = _lock_holder(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    if _held_lock is not None:  # RESUME=fresh moved the old directory (and its lock) aside
        release_output_dir()
    _held_lock = fd
    if stale and (stale.get("pid"), stale.get("host")) != (me["pid"], me["host"]):
        log(f"OUTPUT_DIR {out}: took over the lock of pid {stale.get('pid')} on host {stale.get('host')} "
             f"(started {stale.get('started')}), which ended without releasing it (killed or crashed)")


def release_output_dir() -> None:
    """Drop the OUTPUT_DIR lock (a clean end leaves no holder in the file)."""
    global _held_lock
    if _held_lock is None:
        return
    fd, _held_lock = _held_lock, None
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing drops the flock


def output_dir_busy(out: str) -> str:
    """The refusal when another process holds OUTPUT_DIR's lock, else "" (a probe: takes no lock)."""

    try:
        fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return ""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probing ranks never block each other
        except BlockingIOError:
            holder = _lock_holder(fd)
            return "" if holder and holder.get("pid") == os.getpid() else _busy_message(out, holder)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> Optional[dict]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _busy_message(out: str, holder: Optional[dict]) -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}" if holder
           else "its pid is not recorded yet")
    return (f"OUTPUT_DIR {out} is in use by another hybrid_ds run ({who}; it holds {os.path.join(out, LOCK_FILE)}). "
            f"Two runs in one OUTPUT_DIR would overwrite each other's checkpoints and metrics: wait for that run to "
            f"end or stop it, or choose another OUTPUT_DIR.")
