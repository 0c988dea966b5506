"""Whether a libneuronxla compile lock can be told stale: its compile died, and nobody will ever remove it.

libneuronxla marks a compile in progress with a 0-byte `model.hlo_module.pb.lock` (an existence lock, no pid
in it) and waits on it with no timeout, so a lock left by a killed compile strands its entry for good. Only
the absence of a live compiler tells a stale lock from a live one, and that can be told only when:

- no `neuronx-cc` process runs on this host (a compile holds its lock for as long as its compiler runs);
- the lock is older than `MIN_AGE` (libneuronxla takes the lock a moment before it starts the compiler);
- the cache root is on a local filesystem (on NFS, EFS, FSx for Lustre, other hosts' compilers are invisible).

Anything else cannot be told, and is left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .local_cache import LOCK_SUFFIX, LocalEntry

#: Seconds a lock must have existed before its compile can be judged dead.
MIN_AGE = 60.0
#: Filesystems shared between hosts (mount types in /proc/mounts).
SHARED_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "gpfs",
                                "beegfs", "efs", "afs", "ocfs2", "gfs2"})
COMPILER_NAMES = ("neuronx-cc", "neuronxcc")


def running_compilers() -> list[int]:
    """Pids of neuronx-cc processes on this host (Linux /proc; the Neuron SDK is Linux-only)."""
    pids = []
    try:
        procs = os.listdir("/proc")
    except OSError:
        return pids
    for name in procs:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")[:3]
        except OSError:
            continue
        if any(os.path.basename(arg.decode(errors="replace")) in COMPILER_NAMES for arg in argv if arg):
            pids.append(int(name))
    return pids


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path`, from /proc/mounts (the longest mount point above it)."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as handle:
            mounts = [line.split()[1:3] for line in handle if len(line.split()) >= 3]
    except OSError:
        return None
    target = os.path.realpath(path)
    best = max((point for point in mounts if target == point[0] or target.startswith(point[0].rstrip("/") + "/")),
               key=lambda point: len(point[0]), default=None)
    return best[1] if best else None


def why_not_stale(entry: LocalEntry, compilers: list[int] | None = None, now: float | None = None) -> str | None:
    """None when the entry's lock can be told stale; else why it cannot (one phrase, for the user)."""
    compilers = running_compilers() if compilers is None else compilers
    if compilers:
        return f"neuronx-cc is running on this host (pid {', '.join(map(str, compilers[:5]))}): it may hold the lock"
    kind = filesystem_type(entry.path)
    if kind is None or kind.split(".")[0] in SHARED_FILESYSTEMS or kind.startswith("fuse"):
        return f"the cache is on a {kind or 'unknown'} filesystem that other hosts may compile into"
    now = time.time() if now is None else now
    for name in entry.files:
        if name.endswith(LOCK_SUFFIX):
            try:
                age = now - os.lstat(entry.path / name).st_mtime
            except OSError:
                return "its lock changed while it was looked at"
            if age < MIN_AGE:
                return f"its lock is {age:.0f}s old: a compile may be starting"
    return None
