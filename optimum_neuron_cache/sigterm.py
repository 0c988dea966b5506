"""Run a last step on SIGTERM, then let the signal do what it did before: never swallow it.

Schedulers stop jobs with SIGTERM, then SIGKILL after a grace period. A run uses the grace period to journal
what it compiled (journal.py). Whatever handled SIGTERM before (the default, which ends the process; a
framework's handler; SIG_IGN) still does, right after.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("optimum_neuron_cache")


class SigtermHook:
    """Install with `install()`, remove with `uninstall()` (only if still the installed handler)."""

    def __init__(self, last_step: Callable[[], None]) -> None:
        self.last_step = last_step
        self.previous: Any = None
        self.installed = False

    def install(self) -> None:
        """Become the SIGTERM handler (main thread only), remembering the previous one."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; a run in a thread relies on the journal's window
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        except (ValueError, OSError):
            self.installed = False

    def uninstall(self) -> None:
        """Put the previous handler back, if this one is still installed."""
        if not self.installed:
            return
        self.installed = False
        try:
            if signal.getsignal(signal.SIGTERM) == self._handle:
                signal.signal(signal.SIGTERM, self.previous)
        except (ValueError, OSError):
            pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        try:
            self.last_step()
        except Exception as exc:  # the signal must go on whatever happens here
            log.warning("optimum-neuron-cache: could not journal this run's entries on SIGTERM: %s", exc)
        previous = self.previous
        self.uninstall()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL or previous is None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered as soon as this handler returns: the default end
        # SIG_IGN: ignored before, ignored now
