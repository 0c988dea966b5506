"""The write-ahead journal: what a run may publish is on disk before its first byte goes up.

A run that is killed (preempted, OOM-killed, SIGTERM then SIGKILL) at any instant leaves what it compiled in
the local cache; the journal tells the next run of the same model and task on this host to publish it.

One small JSON file per run under `<root>/.optimum-neuron-cache/journal/`, named
`<key digest>-<host digest>-<pid>-<pid start>-<random>.json`, so that liveness is read from the name and a
warm run writes and removes one file of its own (no read-modify-write shared by 32 ranks). A closed record is
named `...-<random>.closed.json` (its owner renames it so as it closes it), so an enter reads only the records
it may have to act on (closed ones of its key, open ones of dead owners), never the open records of the live runs
beside it: 32 ranks entering together read none of each other's records.
A record says:

- **window**: "every entry that became complete while I ran is mine to publish". Written on enter, before the
  body, when no entry name is known yet. A later run seals the window of a dead owner (the time it noticed
  the death), so entries compiled after the death are not attributed to it.
- **entries**: explicit MODULE names. Written before a publish starts (and by the SIGTERM handler); a name
  leaves the journal only once the bucket holds its commit file.
- **open**: its owner is still running. An open record is another run's business while its owner lives; a
  closed one (the run ended with entries unpublished: the bucket was down) is anyone's.

Records are written atomically (temp file, rename). No fsync: the journal guards against killed processes,
whose writes the kernel keeps; a host that loses power loses its compile cache's recent writes too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import crashpoints
from .atomic import RefusedStateFile, atomic_write, read_state_file
from .local_cache import STATE_DIR_NAME, LocalEntry, commit_time, is_module_name
from .processes import alive, pid_start

log = logging.getLogger("optimum_neuron_cache")

JOURNAL_DIR = "journal"
SCHEMA = 1
#: A journal file is a few kB (MODULE names); anything larger is not ours and is not read.
MAX_JOURNAL_FILE_BYTES = 4 * 1024 * 1024
#: How the name of a closed record ends (an open one ends with plain `.json`).
CLOSED_SUFFIX = ".closed.json"
#: What a refused record file (not a regular file, too large, malformed) is renamed to end with: never read again.
REFUSED_SUFFIX = ".refused"
#: No record of this package's was written before this instant (2025-01-01 UTC), and none is written more than
#: `FUTURE_SLACK` seconds ahead of now (a clock stepped back by that much still reads its records).
EARLIEST_TIME = 1_735_689_600.0
FUTURE_SLACK = 86_400.0


@dataclass(frozen=True)
class JournalKey:
    """Whose entries: one bucket, compiler version, model area (None: the flat area only) and task."""

    bucket: str
    compiler_version: str
    model_folder: str | None
    task: str

    @property
    def text(self) -> str:
        """The key as one string, model folder case-folded (model ids ignore case): what names its journal
        records (`digest`) and its host-wide fetch gate (`fetch.HostFetchGate`)."""
        folder = self.model_folder.lower() if self.model_folder is not None else ""
        return "\0".join((self.bucket, self.compiler_version, folder, self.task))

    @property
    def digest(self) -> str:
        """A short digest of the key's text, the first part of a record's file name."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunRecord:
    """One run's journal record: its key, when it started, what it may publish (a window, names, or both)."""
    key: JournalKey
    started: float
    model_id: str | None = None
    export_config: dict[str, Any] | None = None
    entries: tuple[str, ...] = ()
    window: bool = False
    sealed: float | None = None
    open: bool = True
    #: Where the record lives (set once written).
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> str:
        """The record as written on disk (its path is not part of it)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}  # asdict without its deep copy
        data["key"] = {f.name: getattr(self.key, f.name) for f in fields(self.key)}
        return json.dumps({"schema": SCHEMA, **data}, sort_keys=True)

    def window_entries(self, entries: Iterable[LocalEntry], until: float) -> set[str]:
        """Publishable entries committed while this run could have compiled them: [started, sealed or until]."""
        if not self.window:
            return set()
        end = self.sealed if self.sealed is not None else until
        found = set()
        for entry in entries:
            if entry.state.publishable and entry.compiler_version == self.key.compiler_version:
                committed = commit_time(entry)
                if committed is not None and self.started <= committed <= end:
                    found.add(entry.name)
        return found


_own_starts: dict[int, int | None] = {}


def _own_start(pid: int) -> int | None:
    """This process's start time (`pid_start`), read once per process: it never changes while the process runs
    (keyed by pid, so a forked child reads its own)."""
    if pid not in _own_starts:
        _own_starts[pid] = pid_start(pid)
    return _own_starts[pid]


def _host_digest() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _time(value: Any, now: float) -> float:
    """A record's time: a finite number of seconds within the cache's lifetime (ValueError otherwise: `-inf`,
    `0` or `"nan"` would open a window over every entry of the host)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not EARLIEST_TIME <= value <= now + FUTURE_SLACK:
        raise ValueError(f"time {value!r} is not within the cache's lifetime")
    return float(value)


def _parse(text: str, path: Path, now: float | None = None) -> RunRecord:
    """A record; ValueError for anything else (a foreign file is refused, never trusted)."""
    now = time.time() if now is None else now
    try:
        data = json.loads(text)
        key = JournalKey(str(data["key"]["bucket"]), str(data["key"]["compiler_version"]),
                         None if data["key"]["model_folder"] is None else str(data["key"]["model_folder"]),
                         str(data["key"]["task"]))
        entries = tuple(name for name in data.get("entries", []) if isinstance(name, str) and is_module_name(name))
        config = data.get("export_config")
        sealed = data.get("sealed")
        return RunRecord(key=key, started=_time(data["started"], now), model_id=data.get("model_id"),
                         export_config=config if isinstance(config, dict) else None, entries=entries,
                         window=bool(data.get("window")), sealed=_time(sealed, now) if sealed is not None else None,
                         open=bool(data.get("open")), path=path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a journal record ({type(exc).__name__}: {exc})") from None
    except RecursionError:
        raise ValueError("not a journal record (nested too deeply)") from None


class Journal:
    """The journal of one cache root."""

    def __init__(self, root: Path) -> None:
        self.folder = root / STATE_DIR_NAME / JOURNAL_DIR

    def begin(self, record: RunRecord) -> RunRecord:
        """Write a new record of this process; returns it with its path. The folder is made when missing (the
        first run of a cache root), not checked at every enter."""
        pid = os.getpid()
        name = f"{record.key.digest}-{_host_digest()}-{pid}-{_own_start(pid) or 0}-{uuid.uuid4().hex[:8]}"
        written = replace(record, path=self.folder / (name + (".json" if record.open else CLOSED_SUFFIX)))
        try:
            self._write(written)
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write(written)
        return written

    def update(self, record: RunRecord, **changes: Any) -> RunRecord:
        """Rewrite a record of this process with `changes` (RunRecord fields). Closing it renames it first (to
        `CLOSED_SUFFIX`), then writes it: there is one file at every instant, and a reader that finds the new
        name with the old content takes it for open, as it was a moment before."""
        updated = replace(record, **changes)
        path = updated.path
        if not updated.open and path is not None and not path.name.endswith(CLOSED_SUFFIX):
            closed = path.with_name(path.name[:-len(".json")] + CLOSED_SUFFIX)
            try:
                os.rename(path, closed)
            except FileNotFoundError:  # gone meanwhile: written anew under its closed name, as it was before
                pass
            updated = replace(updated, path=closed)
        self._write(updated)
        return updated

    def settle(self, record: RunRecord, committed: Iterable[str]) -> RunRecord | None:
        """The bucket holds the commit files of `committed`: drop them; drop the record once nothing is left
        to publish and its run is over (or it never had a window). Returns what is left, or None."""
        done = set(committed)
        left = tuple(name for name in record.entries if name not in done)
        if not left and (not record.open or not record.window):
            self.drop(record)
            return None
        return self.update(record, entries=left) if left != record.entries else record

    def drop(self, record: RunRecord) -> None:
        """Remove a record (its names are in the bucket, or covered by another record)."""
        if record.path is not None:
            record.path.unlink(missing_ok=True)

    def _write(self, record: RunRecord) -> None:
        assert record.path is not None
        atomic_write(record.path, record.to_json(), before_rename=lambda: crashpoints.reached("journal-write"))

    # ------------------------------------------------------------------------------------ recovery
    def _names(self) -> list[str]:
        """The names of every record (open ones end with `.json`, closed ones with `CLOSED_SUFFIX`); temp files
        of writers that died are removed."""
        try:
            names = os.listdir(self.folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        host = _host_digest()
        for name in names:  # `.<record name>.<pid>.<random>.tmp` (atomic.temp_name), left by a writer killed before its rename
            if name.startswith(".") and name.endswith(".tmp") and self._dead(name[1:].split(".")[0].split("-"), host):
                try:
                    (self.folder / name).unlink(missing_ok=True)
                except OSError:  # a folder of that name is not ours: left alone
                    pass
        return [name for name in names if name.endswith(".json") and not name.startswith(".")]

    def _read(self, path: Path, *, aside: bool = True) -> RunRecord | None:
        """The record at `path`, or None when it is gone or refused: anything but a regular file (a FIFO never
        blocks the reader), too large, malformed, or with times outside the cache's lifetime. A refused file
        costs one warning and, with `aside`, is renamed to end with `REFUSED_SUFFIX` (never read again)."""
        try:
            return _parse(read_state_file(path, MAX_JOURNAL_FILE_BYTES).decode("utf-8", "replace"), path)
        except FileNotFoundError:
            return None
        except RefusedStateFile as exc:
            why = exc.why
        except OSError as exc:
            log.warning("optimum-neuron-cache: cannot read the journal record %s: %s", path, exc)
            return None
        except ValueError as exc:
            why = str(exc)
        if aside:
            try:
                os.rename(path, path.with_name(path.name + REFUSED_SUFFIX))
            except OSError:
                aside = False
        log.warning("optimum-neuron-cache: ignoring a malformed journal record %s (%s)%s", path, why,
                    f"; renamed to {path.name}{REFUSED_SUFFIX}, which no run reads: remove it" if aside else "")
        return None

    def _dead(self, parts: list[str], host: str) -> bool:
        """Whether the owner named in a record's file name is a process of this host (`host`: _host_digest()) that
        is gone."""
        if len(parts) != 5 or parts[1] != host or not parts[2].isdigit() or not parts[3].isdigit():
            return False  # another host's (a cache root on a shared filesystem): its pids mean nothing here
        pid, start = int(parts[2]), int(parts[3])
        return pid != os.getpid() and not alive(pid, start or None)

    def listed_elsewhere(self, key: JournalKey, names: Iterable[str], mine: RunRecord) -> set[str]:
        """Which of `names` another record of `key` lists: a process publishing them at this instant wrote
        them there before its first byte (and if it dies, the next run recovers them from that record)."""
        wanted, found = set(names), set()
        if not wanted:
            return found
        prefix = key.digest + "-"
        for name in self._names():
            if name.startswith(prefix) and (mine.path is None or name != mine.path.name):
                record = self._read(self.folder / name, aside=False)
                if record is not None and record.key.digest == key.digest:
                    found |= wanted & set(record.entries)
        return found

    def leftovers(self, key: JournalKey, now: float | None = None) -> list[RunRecord]:
        """Records of `key` that nobody will publish: closed ones, and open ones whose owner died. Every dead
        owner's record (of any key) is sealed on the way and renamed closed, so that what this host compiles
        from now on is never attributed to a dead run. Only two kinds of records are read: closed ones of `key`,
        and open ones whose owner is dead (once each: sealed, they are closed). An open one of a live owner is
        its owner's business (32 ranks entering at once read none of each other's), and a closed one of another
        key is its key's: thousands of leftovers of models that never run again cost an enter their names."""
        now = time.time() if now is None else now
        found: dict[str, RunRecord] = {}
        host, digest = _host_digest(), key.digest
        names = self._names()
        closed_names = {name for name in names if name.endswith(CLOSED_SUFFIX)}
        for name in names:
            if name in closed_names:
                if name.startswith(digest + "-") and name.count("-") == 4:
                    record = self._read(self.folder / name)
                    if record is not None and record.key.digest == digest and not record.open:
                        found[name] = record
                continue
            parts = name[:-len(".json")].split("-")
            mine = len(parts) == 5 and parts[0] == digest
            closed_name = name[:-len(".json")] + CLOSED_SUFFIX
            if closed_name in closed_names or not self._dead(parts, host):
                continue  # sealed meanwhile by another enter (its closed copy is read above), or a live run's
            record = self._read(self.folder / name)
            if record is None:
                record = self._read(self.folder / closed_name)  # sealed by another enter since the listing
                if record is not None and mine and record.key.digest == digest and not record.open:
                    found[closed_name] = record
                continue
            sealed = replace(record, open=False, sealed=record.sealed or now if record.window else None,
                             path=self.folder / closed_name)
            try:  # written closed by whoever notices first (a lost race writes the same seal, give or take), then
                self._write(sealed)  # the open name goes: no enter reads this record again unless it is its key's
                (self.folder / name).unlink(missing_ok=True)
            except OSError:
                continue
            if mine and record.key.digest == digest:
                found[closed_name] = sealed
        return list(found.values())


def explicit_and_window(records: Iterable[RunRecord], entries: Mapping[str, LocalEntry], now: float) -> set[str]:
    """The MODULE names leftover records ask to publish, among the publishable local `entries`."""
    names: set[str] = set()
    for record in records:
        names |= set(record.entries) | record.window_entries(entries.values(), now)
    return {name for name in names if name in entries and entries[name].state.publishable}
