"""Honest stats for this host: what the cache fetched, compiled, published and saved, per run and in total.

Kept in small files under the user's cache dir, safe under concurrency. A run appends one line to
`stats.log` (one `write` with O_APPEND: no lock, no rename, about 50 microseconds; the warm path cannot afford
a locked read-modify-write with a rename, a few milliseconds on ext4). `stats.json` holds the totals the log
was folded into: a run that finds the log over FOLD_BYTES folds it, under a lock (`_fold`). Readers add the
log to `stats.json`. `neuron-cache stats` shows it; `stats --zero` resets. A figure that is not a finite,
non-negative number within bounds (a poisoned or hand-edited file) reads as 0 with one warning: the files
never crash a reader, and what they hold is always valid JSON.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from filelock import FileLock

from .atomic import RefusedStateFile, atomic_write, open_state_file, read_state_json
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

    def figures(self) -> dict[str, int | float]:
        """The figures as a flat dict (what `asdict` gives, without its deep copy: every field is a number)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

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
    """The host's stats file (the folded totals), under the user's cache dir."""
    return user_cache_dir() / "stats.json"


#: A log larger than this is folded into stats.json by the run that finds it so (about 400 runs).
FOLD_BYTES = 64 * 1024
#: The most of a log (or of a log being folded) that is read: a larger one is not ours.
MAX_LOG_BYTES = 16 * FOLD_BYTES


def _log_path(path: Path) -> Path:
    return path.with_name(path.stem + ".log")


def _folding(path: Path) -> list[Path]:
    """Logs moved aside to be folded (`stats.<random>.folding`), by a fold that may have died meanwhile."""
    try:
        return sorted(path.parent.glob(f"{path.stem}.*.folding"))
    except OSError:
        return []


def _read_json(path: Path) -> tuple[dict, Stats, Stats]:
    """(the document, last run, total) of stats.json; an unreadable one reads as zeros."""
    try:
        data = read_state_json(path)
    except RefusedStateFile as exc:
        log.warning("optimum-neuron-cache: ignoring %s (%s): read as zeros; the next fold replaces it", path, exc.why)
        return {}, Stats(), Stats()
    except OSError:
        return {}, Stats(), Stats()
    if data is None:
        return {}, Stats(), Stats()
    return (data, Stats.from_dict(data.get("last_run"), where=f"{path} (last run)"),
            Stats.from_dict(data.get("total"), where=f"{path} (total)"))


def _read_log(log_path: Path) -> list[Stats]:
    """The runs a log holds, in order. A line that is not a run (a torn write, a hand edit) is skipped."""
    try:
        with open(open_state_file(log_path), "rb") as handle:
            raw = handle.read(MAX_LOG_BYTES)
    except RefusedStateFile as exc:
        log.warning("optimum-neuron-cache: ignoring %s (%s): not a log of this package's", log_path, exc.why)
        return []
    except OSError:
        return []
    runs = []
    for line in raw.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("run"), dict):
            runs.append(Stats.from_dict(data["run"], where=f"{log_path} (a run)"))
    return runs


def read_stats(path: Path | None = None) -> tuple[Stats, Stats]:
    """(last run, total): stats.json, plus the runs logged since it was written."""
    path = path or stats_path()
    data, last, total = _read_json(path)
    folded = data.get("folded") if isinstance(data.get("folded"), list) else []
    for log_path in [*(p for p in _folding(path) if p.name not in folded), _log_path(path)]:
        for run in _read_log(log_path):
            total, last = total.add(run), run
    return last, total


def _write(path: Path, last: Stats, total: Stats, folded: list[str] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"last_run": asdict(last), "total": asdict(total), "folded": list(folded)},
                                  indent=1, allow_nan=False))


#: How long an append keeps trying when folds keep moving the log away from under it (each try is one open).
APPEND_PATIENCE_S = 5.0


def _append(log_path: Path, line: bytes) -> int:
    """Append one line in one write; returns the log's size after it. A shared flock keeps a fold from
    reading the log while the line is being written, and a log a fold moved away meanwhile is not written
    to (its inode is no longer the path's): the line goes to the new log, however many folds run meanwhile
    (bounded by time, not by a count of tries: many writers on one host can make several folds in a row)."""
    deadline = time.monotonic() + APPEND_PATIENCE_S
    while time.monotonic() < deadline:
        try:
            fd = open_state_file(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except RefusedStateFile as exc:  # a FIFO would block the write for ever: it goes, a new log is made
            log.warning("optimum-neuron-cache: removing %s (%s): not a log of this package's", log_path, exc.why)
            os.unlink(log_path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.stat(log_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.write(fd, line)
                return os.fstat(fd).st_size
        finally:
            os.close(fd)
    raise OSError(f"{log_path} kept moving")


def _fold(path: Path) -> None:
    """Fold the log into stats.json, under the lock: move the log aside, wait for writers still appending to
    it (an exclusive flock), add its runs to the totals, then remove it. stats.json names the logs it has
    folded, so a fold that dies before the removal is never counted twice."""
    with FileLock(str(path) + ".lock", timeout=10):
        aside = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:8]}.folding")
        try:
            os.rename(_log_path(path), aside)
        except FileNotFoundError:
            pass
        data, last, total = _read_json(path)
        folded = set(data.get("folded") or []) if isinstance(data.get("folded"), list) else set()
        for log_path in _folding(path):
            if log_path.name in folded:  # counted already, by a fold that died before removing it
                log_path.unlink(missing_ok=True)
        pending = [p for p in _folding(path) if p.name not in folded]
        for log_path in pending:
            try:
                fd = open_state_file(log_path)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # the appenders that opened it before it moved are done
            finally:
                os.close(fd)
            for run in _read_log(log_path):
                total, last = total.add(run), run
        _write(path, last, total, sorted(p.name for p in pending))
        for log_path in pending:
            log_path.unlink(missing_ok=True)


def record_run(run: Stats, path: Path | None = None) -> None:
    """Add one run's figures to the host's: one appended line; never fails the caller. A run with nothing to
    add (a rank that took another process's fetch and compiled nothing: 31 of 32 ranks entering together)
    writes no line, so the last run shown is the last one that did something."""
    path = path or stats_path()
    try:
        figures = run.figures()
        checked = Stats.from_dict(figures, where="this run's stats")  # a bad figure never enters the files
        if checked == Stats():
            return
        if checked != run:
            figures = checked.figures()
        line = b"\n" + json.dumps({"run": figures}, allow_nan=False, separators=(",", ":")).encode() + b"\n"
        try:
            size = _append(_log_path(path), line)
        except FileNotFoundError:  # the first run of the host: no cache dir yet
            path.parent.mkdir(parents=True, exist_ok=True)
            size = _append(_log_path(path), line)
        if size > FOLD_BYTES:
            _fold(path)
    except Exception:  # stats are a convenience: a read-only home or a stuck lock must not break a compile
        pass


def zero_stats(path: Path | None = None) -> None:
    """Reset the host's figures."""
    path = path or stats_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=10):
        for log_path in [_log_path(path), *_folding(path)]:
            log_path.unlink(missing_ok=True)
        _write(path, Stats(), Stats())
