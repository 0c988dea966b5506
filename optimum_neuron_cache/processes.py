"""Whether a process of this host is alive: the one liveness check behind temp folders and journal records.

A pid alone can be reused by a new process; with the pid's start time (clock ticks after boot, from /proc)
a reused pid is told from the one that wrote a file. Without /proc (not Linux), the pid alone is checked.
"""

from __future__ import annotations

import os


#: Whether /proc tells processes' start times (Linux). Read once: it does not change while we run.
_HAS_PROC = os.path.isdir("/proc/self")
#: /proc/<pid>/stat is one line; its start time (field 22) lies well inside its first 4 kB.
_STAT_BYTES = 4096


def pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None (gone, or no /proc). One raw read: an enter
    checks the owner of every journal record beside its own (32 ranks: 31 each)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, _STAT_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return int(raw.rsplit(b")", 1)[1].split()[19])
    except (ValueError, IndexError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs, and, when its `start` is given and /proc can tell, is still the same process."""
    if start is not None and _HAS_PROC:
        return pid_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
