"""The bucket server keeps the transfer buffers hf_xet frees for the next download of a burst (a fetch then
faults in almost no fresh pages), and gives them back to the system once no download has run for a while."""

from __future__ import annotations

import os
import pytest

from bucket_server.backends import hf
from tests.polling import wait_until

BUFFER = 96 << 20  # larger than any Xorb range buffer (64 MiB), as hf_xet allocates them


def _rss() -> int:
    with open("/proc/self/statm") as stats:
        return int(stats.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc() or not os.path.exists("/proc/self/statm"),
                    reason="the server tunes glibc's malloc only (Linux)")
def test_freed_transfer_buffers_are_kept_during_a_burst_and_given_back_when_idle(monkeypatch):
    monkeypatch.setattr(hf, "MALLOC_KEEP_IDLE", 0.05)
    round_ = hf._download_started()  # the first download tunes malloc
    try:
        before = _rss()
        buffer = bytearray(b"x") * BUFFER  # written: its pages are resident
        assert _rss() - before > BUFFER // 2
        del buffer
        kept = _rss()
        assert kept - before > BUFFER // 2, "a freed transfer buffer was given back at once (unmapped or trimmed)"
    finally:
        hf._download_ended(round_)
    wait_until(lambda: kept - _rss() > BUFFER // 2, "the idle server to give the kept buffer back")


@pytest.mark.skipif(not _glibc(), reason="the server tunes glibc's malloc only")
def test_a_burst_of_downloads_keeps_one_trim_pending_not_one_thread_each(monkeypatch):
    """Each download's end schedules the trim anew: the earlier one is cancelled, so a server that serves a
    burst of a thousand fetches does not hold a thousand sleeping timer threads for MALLOC_KEEP_IDLE."""
    import threading

    monkeypatch.setattr(hf, "MALLOC_KEEP_IDLE", 60.0)

    def timers() -> int:
        return sum(isinstance(thread, threading.Timer) for thread in threading.enumerate())

    before = timers()
    for _ in range(20):
        hf._download_ended(hf._download_started())
    try:  # a cancelled timer's thread ends as soon as it wakes
        wait_until(lambda: timers() <= max(before, 1), "the cancelled trims' threads to end")
    finally:
        hf._trim_timer.cancel()
