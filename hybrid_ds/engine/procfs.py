"""Which files the live processes of this machine hold open or map, read from /proc."""

from __future__ import annotations

import os


def paths_in_use(prefix: str, *, mapped: bool = True) -> set[str]:
    """Paths under ``prefix`` that a live process of this machine holds open (/proc/<pid>/fd) or, with
    ``mapped``, maps (/proc/<pid>/maps). A file deleted while open keeps its path here. Processes of
    other users are skipped: their /proc entries cannot be read, and they cannot open our files anyway
    where those are private to us."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if mapped:
                with open(f"/proc/{pid}/maps") as f:
                    for line in f:
                        at = line.find(prefix)
                        if at >= 0:
                            out.add(_path(line[at:]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:  # closed meanwhile
                    continue
                if target.startswith(prefix):
                    out.add(_path(target))
        except OSError:  # gone meanwhile, or another user's
            continue
    return out


def _path(text: str) -> str:
    """A path as /proc shows it in ``maps`` and ``fd`` links, without the mark of a deleted file."""
    return text.rstrip("\n").removesuffix(" (deleted)")
