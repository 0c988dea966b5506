"""Honest stats for this host: what the cache fetched, compiled, published and saved, per run and in total.

Kept in one small JSON file under the user's cache dir, updated under a file lock so that concurrent
processes add up instead of overwriting each other. `neuron-cache stats` shows it; `stats --zero` resets. A figure that is not a finite, non-negative number
within bounds (a poisoned or hand-edited file) reads as 0 with one warning: the file never crashes a reader,
and what it holds is always valid JSON.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from filelock import FileLock

from .atomic import atomic_write
from .buckets import user_cache_dir

log = logging.getLogger("optimum_neuron_cache")

#: Beyond these a figure is corrupt, not large (2**53: where floats stop counting exactly).
MAX_COUNT = 2**53
MAX_SECONDS = 1e12


@dataclass
class Stats:
    #: Context runs and CLI fetches that asked the bucket for entries.
    """One run's figures, or a host's totals."""
    fetches: int = 0
    #: Entries the bucket served (installed instead of compiled).
    hits: int = 0
    #: Entries compiled here (not in the local cache nor the bucket).
    misses: int = 0
    #: Entries this host published.
    publishes: int = 0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    #: Compile time the hits saved, from the compile durations recorded in export records (where known).
    seconds_saved: float = 0.0
    #: Hits whose compile duration is unknown (not counted in seconds_saved).
    hits_without_duration: int = 0
    #: Remote failures met (each cost a warning line).
    remote_errors: int = 0
    #: Compile leases (compile_leases.py): graphs compiled here under a lease, fetched after waiting on
    #: another host's lease, and compiled here although another host compiled them too.
    lease_compiled: int = 0
    lease_fetched_after_wait: int = 0
    lease_compiled_twice: int = 0

    def add(self, other: "Stats") -> "Stats":
        """The sum of two sets of figures."""
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(Stats)})

    @classmethod
    def from_dict(cls, data: object, *, where: str = "stats") -> "Stats":
        """The figures in `data`; each one that is not a valid figure reads as 0, with one warning in all."""
        stats, bad = cls._parse(data)
        if bad:
            log.warning("optimum-neuron-cache: %s: read as 0, not finite non-negative figures within bounds: %s",
                        where, ", ".join(bad))
        return stats

    @classmethod
    def _parse(cls, data: object) -> "tuple[Stats, list[str]]":
        if not isinstance(data, dict):
            return cls(), []
        values: dict[str, int | float] = {}
        bad: list[str] = []
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad.append(f"{f.name}={value!r}")
                continue
            bound = MAX_SECONDS if f.name == "seconds_saved" else MAX_COUNT
            if not (math.isfinite(value) and 0 <= value <= bound):
                bad.append(f"{f.name}={value!r}")
                continue
            values[f.name] = float(value) if f.name == "seconds_saved" else int(value)
        return cls(**values), bad


def stats_path() -> Path:
    """The host's stats file, under the user's cache dir."""
    return user_cache_dir() / "stats.json"


def read_stats(path: Path | None = None) -> tuple[Stats, Stats]:
    """(last run, total)."""
    path = path or stats_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Stats(), Stats()
    if not isinstance(data, dict):
        return Stats(), Stats()
    return (Stats.from_dict(data.get("last_run"), where=f"{path} (last run)"),
            Stats.from_dict(data.get("total"), where=f"{path} (total)"))


def _write(path: Path, last: Stats, total: Stats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"last_run": asdict(last), "total": asdict(total)}, indent=1, allow_nan=False))


def record_run(run: Stats, path: Path | None = None) -> None:
    """Add one run's figures to the total, under the lock; never fails the caller."""
    path = path or stats_path()
    try:
        run = Stats.from_dict(asdict(run), where="this run's stats")  # a bad figure never enters the totals
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=10):
            _, total = read_stats(path)
            _write(path, run, total.add(run))
    except Exception:  # stats are a convenience: a read-only home or a stuck lock must not break a compile
        pass


def zero_stats(path: Path | None = None) -> None:
    """Reset the host's figures."""
    path = path or stats_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=10):
        _write(path, Stats(), Stats())
