"""Ctrl-C and SIGTERM as a flag the loop checks between steps, so a stop always lands on a checkpoint.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before they kill a job; it is handled like a
Ctrl-C. A second signal aborts at once (the checkpoint being written, if any, is atomic).
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


class InterruptFlag:
    """Set by the first SIGINT or SIGTERM while installed; `restore()` puts the previous handlers back."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}
        for number in HANDLED:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever handles them
                pass

    def _handle(self, signum, frame):
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signum
        log.warning("%s: finishing this step, saving a checkpoint, then stopping (again aborts at once)", self.name)

    def set(self, signum: int = signal.SIGINT) -> None:
        """As if `signum` had come (another process of the run was signalled: every one stops)."""
        if self.signal_number is None:
            self.signal_number = signum

    @property
    def name(self) -> str:
        """'Ctrl-C' or the signal's name."""
        return "Ctrl-C" if self.signal_number == signal.SIGINT else signal.Signals(self.signal_number).name

    def __bool__(self) -> bool:
        return self.signal_number is not None

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
