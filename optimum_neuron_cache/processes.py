"""Whether a process of this host is alive: the one liveness check behind temp folders and journal records.

A pid alone can be reused by a new process; with the pid's start time (clock ticks after boot, from /proc)
a reused pid is told from the one that wrote a file. Without /proc (not Linux), the pid alone is checked.
"""

from __future__ import annotations

import os


def pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None (gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs, and, when its `start` is given and /proc can tell, is still the same process."""
    if start is not None and os.path.isdir("/proc/self"):
        return pid_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
