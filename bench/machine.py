"""What the machine did beside the benchmark: how much of it other work took while the benchmark ran, and
how much free memory the guest handed back to its host (free page reporting, on VMs whose kernel counts it).

The load average cannot say: on 2 cores the benchmark's own client, emulator and bucket server keep it near 3
by themselves. What can: the CPU time the whole machine spent (`/proc/stat`) minus the CPU time of the
benchmark's own process tree (this process and every descendant, reaped). A bucket server outlives the worker
that spawned it, so this process makes itself the subreaper of its orphaned descendants; their CPU is then
counted when it reaps them at the end.
"""

from __future__ import annotations

import ctypes
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

#: prctl(2) option: orphaned descendants are reparented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36

#: A run in which other processes took more than this share of the machine's CPUs is flagged as busy.
BUSY_SHARE = 0.10


def adopt_orphans() -> bool:
    """Become the reaper of orphaned descendants (Linux); False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, summed over CPUs (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def reap_orphans() -> None:
    """Reap every finished child, adopted ones included, so that their CPU reaches RUSAGE_CHILDREN."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def own_cpu_s() -> float:
    """CPU seconds of this process and of its reaped descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass(frozen=True)
class MachineMark:
    """A point in time, the machine's busy CPU and the benchmark's own at it."""

    wall_s: float
    busy_s: float | None
    own_s: float

    @classmethod
    def now(cls) -> MachineMark:
        return cls(time.monotonic(), machine_busy_s(), own_cpu_s())


def others_share(start: MachineMark, cpus: int) -> float | None:
    """The share of the machine's CPUs (0 to 1) that processes outside the benchmark used since `start`.

    Call it once everything the benchmark started has stopped: it reaps them first.
    """
    reap_orphans()
    end = MachineMark.now()
    wall = end.wall_s - start.wall_s
    if start.busy_s is None or end.busy_s is None or wall <= 0 or cpus <= 0:
        return None
    others = (end.busy_s - start.busy_s) - (end.own_s - start.own_s)
    return round(max(others, 0.0) / (wall * cpus), 3)


#: Where Linux's free page reporting shows its parameters (and, on some kernels, counters).
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")


@dataclass(frozen=True)
class PageReporting:
    """Linux free page reporting: the guest hands free blocks of 2^order pages to its host, and the next write
    into one waits for the host to give it back. `passes` and `reported_kib` are counters that some kernels
    export beside the order (this project's development VM does; mainline does not): None where absent."""

    order: int
    passes: int | None
    reported_kib: int | None


def page_reporting(parameters: Path = PAGE_REPORTING) -> PageReporting | None:
    """The machine's free page reporting now, or None where the kernel has none (bare metal, most VMs)."""

    def number(name: str) -> int | None:
        try:
            return int((parameters / name).read_text().strip())
        except (OSError, ValueError):
            return None

    order = number("page_reporting_order")
    return None if order is None else PageReporting(order, number("passes"), number("reported_kib"))


def reported_mb(before: PageReporting | None, after: PageReporting | None) -> float | None:
    """MB the guest reported to its host between two readings, where the kernel counts it."""
    if before is None or after is None or before.reported_kib is None or after.reported_kib is None:
        return None
    return round((after.reported_kib - before.reported_kib) / 1024, 1)
