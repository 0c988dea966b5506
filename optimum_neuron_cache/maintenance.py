"""The local cache seen from the terminal: what it holds (`status`) and removing what hurts (`cleanup`).

Cleanup removes cached failures (libneuronxla replays them until --retry_failed_compilation), stale locks
(libneuronxla waits on them with no timeout) and leftover downloads. Locks are touched only when no
neuronx-cc process runs on this host: a live compile's lock is not stale.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .host_state import HostState
from .local_cache import LOCK_SUFFIX, STATE_DIR_NAME, EntryState, iter_version_dirs, scan_entries


@dataclass
class VersionStatus:
    """One compiler version of the local cache: entries by state, bytes."""
    compiler_version: str
    states: Counter[str] = field(default_factory=Counter)
    bytes: int = 0


def cache_status(root: Path) -> list[VersionStatus]:
    """Every compiler version of the cache root with its entries by state (folders without entries too)."""
    by_version: dict[str, VersionStatus] = {}
    for entry in scan_entries(root):
        status = by_version.setdefault(entry.compiler_version, VersionStatus(entry.compiler_version))
        status.states[entry.state.value] += 1
        status.bytes += sum(entry.files.values())
    for version, _ in iter_version_dirs(root):
        by_version.setdefault(version, VersionStatus(version))
    return [by_version[v] for v in sorted(by_version)]


@dataclass(frozen=True)
class Removal:
    """One thing cleanup removes, and why."""
    path: Path
    reason: str
    bytes: int


@dataclass
class CleanupPlan:
    """What cleanup would remove, and what it refuses to touch (one line each)."""
    removals: list[Removal] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes the removals free."""
        return sum(removal.bytes for removal in self.removals)


def tree_size(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `path` (symlinks not followed), leaving out folders named in `skip`."""
    total = 0
    for dirpath, dirnames, files in os.walk(path):
        dirnames[:] = [name for name in dirnames if name not in skip]
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def plan_cleanup(root: Path, *, failed: bool, locks: bool, old_versions: bool, keep_version: str | None,
                 compilers: list[int]) -> CleanupPlan:
    """What to remove: cached failures, stale locks (never while one of `compilers`, the pids of the host's
    neuronx-cc processes, runs), other compiler versions, leftover downloads of dead processes."""
    plan = CleanupPlan()
    if locks and compilers:
        plan.refused.append(f"stale locks left alone: neuronx-cc is running on this host (pid {', '.join(map(str, compilers))})")
    for entry in scan_entries(root):
        if old_versions and keep_version and entry.compiler_version != keep_version:
            continue  # the whole version folder goes below
        if failed and entry.state is EntryState.FAILED:
            plan.removals.append(Removal(entry.path, "failed compile (cached failure)", sum(entry.files.values())))
        elif locks and not compilers and entry.state is EntryState.LOCKED:
            for name in sorted(entry.files):
                if name.endswith(LOCK_SUFFIX):
                    plan.removals.append(Removal(entry.path / name, "stale lock", entry.files[name]))
    if old_versions and keep_version:
        for version, path in iter_version_dirs(root):
            if version != keep_version:
                plan.removals.append(Removal(path, f"other compiler version than {keep_version}", tree_size(path)))
    tmp = root / STATE_DIR_NAME / "tmp"
    state = HostState(root)
    for path in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if state.is_stale_temp_dir(path):
            plan.removals.append(Removal(path, "leftover download of a dead process", tree_size(path)))
    return plan


def execute_cleanup(plan: CleanupPlan) -> int:
    """Remove what the plan lists; returns the bytes freed."""
    freed = 0
    for removal in plan.removals:
        if removal.path.is_dir() and not removal.path.is_symlink():
            shutil.rmtree(removal.path, ignore_errors=True)
        else:
            removal.path.unlink(missing_ok=True)
        freed += removal.bytes
    return freed
