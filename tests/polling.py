"""Waiting for something to happen in a test: poll its condition until a deadline, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0, interval: float = 0.01) -> None:
    """Return as soon as `condition()` is true; fail the test naming `what` if it is still false after `timeout`
    seconds. The deadline only bounds a hang: nothing is asserted about how long the wait took."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
