"""What `extproc up` and `extproc demo` need from the terminal they run in: output lines that never fail, and
Ctrl-C or SIGTERM as a request to stop, so that stopping the children by PID is never cut short."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any


def say(*parts: object) -> None:
    """Print a line now; if stdout is gone (``extproc demo | head``), carry on silently: stopping the
    children must never fail on a broken pipe."""
    try:
        print(*parts, flush=True)
    except OSError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


class StopSignals:
    """SIGINT and SIGTERM only set a flag that the traffic and the idle loop poll, so stopping the children is
    never cut short. While the gateway starts, a first Ctrl-C lets the start finish (a few seconds) and then
    stops everything, leaving no half-started process; a second one aborts the start at once
    (KeyboardInterrupt: start_stack stops what it had started)."""

    def __init__(self) -> None:
        self.requested = False
        self.starting = True
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # SIGINT explicitly too: a process started from a background shell job inherits it ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, _sig: int, _frame: object) -> None:
        self.requested = True
        self.count += 1
        if self.starting and self.count == 2:
            raise KeyboardInterrupt

    def wait(self, duration: float | None = None) -> None:
        """Sleep until a stop is requested or ``duration`` seconds (None: no limit) have passed."""
        deadline = None if duration is None else time.monotonic() + duration
        while not self.requested and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
