"""Stopping every rank together: SIGTERM/SIGINT set a flag that the ranks agree on between steps."""

from __future__ import annotations

import signal

import torch


class Guard:
    """Per-process stop state: the signal SIGTERM/SIGINT delivered, and the one all ranks agreed on."""

    def __init__(self):
        self.requested = 0  # signal number received on this rank (0 = none)
        self.stopped_by = ""  # set when all ranks agreed to stop
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag here (printing from a handler can re-enter stdout); a second signal of the
        # same kind gets the previous behaviour, i.e. stops at once.
        self.requested = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL) or signal.SIG_DFL)

    def agreed_stop(self, dist) -> int:
        """The signal any rank received (0 = none); the same answer on every rank."""
        return int(dist.all_reduce_max(torch.tensor([float(self.requested)]))[0])
