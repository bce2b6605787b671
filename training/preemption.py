"""Stopping a run on request: SIGTERM or SIGINT finishes the step in flight on every rank, rank 0 writes
``last.pt``, and every process exits with ``EXIT_PREEMPTED`` after one log line; a second signal exits at once.

    spot / preemptible machine: SIGTERM, then ~30 s before it goes    -> a checkpoint of the current step, exit 75
    torchrun got the signal: it forwards it to every worker and waits 30 s for them before SIGKILL
    Ctrl-C in a terminal, Slurm's scancel: the signal reaches torchrun and the workers directly, too

The signal handler only records the request; whether to stop is agreed by all ranks after each step
(``training.distributed.any_rank``), so that no rank stops alone and leaves the others waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

# EX_TEMPFAIL of sysexits.h ("a temporary failure; the user is invited to retry"): preempted, rerun to continue.
EXIT_PREEMPTED = 75
# A second signal within this many seconds of the first is the same notice delivered twice (torchrun forwards what
# it got, and a terminal's Ctrl-C or Slurm reaches the workers directly as well); a later one means "now".
SAME_NOTICE_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint (exit code EXIT_PREEMPTED)."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"preempted at step {step} ({signal_name}), checkpoint written: rerun the same command "
                         "to continue")
        self.step = step


class StopSignals:
    """Records SIGTERM / SIGINT while the run trains (a context manager); a later second signal exits at once.

    Attributes:
        received: the first signal's name (``"SIGTERM"``), or None.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._first_at = name, time.monotonic()
            return
        if time.monotonic() - self._first_at > SAME_NOTICE_S:
            # The user insists: no checkpoint. An atomic write in flight leaves last.pt as it was.
            os.write(2, f"\nsecond {name}: stopping now without a checkpoint\n".encode())
            os._exit(128 + signum)
