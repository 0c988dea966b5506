"""A long run (training) with the bucket cache, aware of ranks: one process per host talks to the bucket.

    with TrainingCacheSession("meta-llama/Llama-3.2-1B", task="training", export_config=cfg) as session:
        for step in range(steps):
            train_step()                      # neuronx-cc runs here, on every rank
            if step % save_every == 0:
                save_checkpoint()
                session.checkpoint()          # publishes what was compiled so far (in the background)

Roles, from LOCAL_RANK / RANK (see `ranks.py`):

- **Local rank 0 fetches** the model's entries on `begin()`, as `hub_neuronx_cache` does on enter, and
  publishes at `checkpoint()` and `end()` (with `publish="world"`, only global rank 0 publishes: for one
  cache dir shared by every host).
- **The other ranks of the host wait** on `begin()` until local rank 0 says its fetch is over, so that no
  rank starts compiling a graph the fetch is about to install. They never talk to the bucket themselves.

Nothing here can make a rank hang on another's trouble:

- the fetch itself is bounded (the bucket server's timeouts and retry budget; after the first remote
  failure the run stops talking to the bucket);
- a rank's wait is bounded by `wait_timeout` (default NEURON_CACHE_LOCK_TIMEOUT, 600 s), after which it
  goes on without the fetch: at worst it compiles a graph it could have downloaded;
- the fetcher's status is a file written when the fetch ends, and the fetcher holds a flock meanwhile,
  which the kernel drops if it dies: no barrier, no collective, nothing that waits for a dead process;
- checkpoint publications run in a background thread of the publisher, so a slow bucket never delays the
  step that comes after a checkpoint (and so never the other ranks, which wait for that step's collectives);
- any failure costs one warning line; the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from filelock import FileLock, Timeout

from .. import remote_layout as layout
from .. import settings
from ..atomic import RefusedStateFile, atomic_write, read_state_json
from ..buckets import BucketRef, embedded_default, resolve_bucket
from ..client import BucketClient
from ..context import CacheRun, hub_neuronx_cache
from ..host_state import foreign_state
from ..journal import JournalKey
from ..local_cache import STATE_DIR_NAME, scan_entries
from ..progress import transfer_line
from ..publish import publish
from .ranks import RankInfo, process_start_time

log = logging.getLogger("optimum_neuron_cache")

#: Slack on "did the fetch end after this process started": the start time read from /proc is exact to
#: a clock tick, but boot time is whole seconds.
_START_SLACK = 2.0


@dataclass
class SessionReport:
    """What this process did in a `TrainingCacheSession`."""

    rank: int
    local_rank: int
    #: This process fetched on begin (local rank 0).
    fetcher: bool
    #: This process publishes at checkpoints and at the end.
    publisher: bool
    #: Seconds this process waited for its host's fetch (0 for the fetcher).
    waited: float = 0.0
    #: How the wait ended: "fetch finished", "timed out", or None (no wait).
    wait_outcome: str | None = None
    #: Entry keys published at checkpoints (the final publication is in `run.synced`).
    checkpoint_published: list[str] = field(default_factory=list)
    #: The cache run of the fetcher / publisher (fetched, synced, record, requests...); None elsewhere.
    run: CacheRun | None = None
    warnings: list[str] = field(default_factory=list)


class TrainingCacheSession:
    """Fetch on begin, publish at checkpoints and at the end, from one process per host. Best effort."""

    def __init__(self, model_id: str | os.PathLike[str] | None = None, task: str | None = "training",
                 export_config: Mapping[str, Any] | None = None, *, bucket: str | BucketRef | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, compiler_version: str | None = None,
                 ranks: RankInfo | None = None, publish: Literal["host", "world"] = "host",
                 wait_timeout: float | None = None, background: bool = True) -> None:
        if publish not in ("host", "world"):
            raise ValueError(f"publish must be 'host' or 'world', not {publish!r}")
        # Every rank validates its input the same way (bad input raises here, on every rank, before training).
        self._ctx = hub_neuronx_cache(model_id, task, export_config, compiler_version=compiler_version,
                                      bucket=bucket, cache_dir=cache_dir)
        self._model_folder = layout.model_ref(model_id).folder if model_id is not None else None
        self.ranks = ranks or RankInfo.from_env()
        self.publish = publish
        self.wait_timeout = settings.lock_timeout() if wait_timeout is None else float(wait_timeout)
        self.background = background
        self.report = SessionReport(
            rank=self.ranks.rank, local_rank=self.ranks.local_rank, fetcher=self.ranks.is_host_main,
            publisher=self.ranks.is_publisher(publish),
        )
        self._entered = False
        self._ended = False
        self._baseline: set[str] = set()
        self._published: set[str] = set()
        self._checkpoint_failed = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ properties
    @property
    def run(self) -> CacheRun:
        """The underlying cache run (meaningful on the fetcher / publisher)."""
        return self._ctx.run

    @property
    def enabled(self) -> bool:
        """False when bucket sync is off for this run (an s3:// cache root, --no_cache)."""
        return self._ctx.run.enabled

    @property
    def _root(self) -> Path:
        assert self._ctx.run.cache_dir is not None
        return Path(self._ctx.run.cache_dir)

    def _warn(self, message: str) -> None:
        self.report.warnings.append(message)
        log.warning("optimum-neuron-cache: %s", message)

    def _coordination_files(self) -> tuple[Path, Path]:
        run = self._ctx.run
        key = hashlib.sha256("\0".join([run.bucket, run.compiler_version, self._model_folder or "_flat", run.task]).encode())
        base = self._root / STATE_DIR_NAME / "sessions"
        base.mkdir(parents=True, exist_ok=True)
        return base / f"{key.hexdigest()[:16]}.lock", base / f"{key.hexdigest()[:16]}.json"

    # ----------------------------------------------------------------------------------- begin
    def begin(self) -> SessionReport:
        """Fetch (local rank 0) or wait, bounded, for this host's fetch (the other ranks)."""
        if self.report.fetcher or self.report.publisher:
            self._enter()
        elif self.enabled:
            self._wait_for_host_fetch()
        return self.report

    def _enter(self) -> None:
        if not self.enabled or not self.report.fetcher:
            self._ctx.__enter__()  # a publisher that is not its host's fetcher (unusual launchers) enters too
            self._after_enter()
            return
        try:
            lock_path, status_path = self._coordination_files()
        except OSError:  # a state folder this user cannot write (another user's cache root): the context says why
            self._ctx.__enter__()
            self._after_enter()
            return
        lock = FileLock(lock_path)
        try:
            lock.acquire(timeout=self.wait_timeout)
        except Timeout:  # another job of this host fetches the same model: the entry locks still dedupe
            lock = None
        try:
            self._ctx.__enter__()
        finally:
            run = self._ctx.run
            _write_json(status_path, {"finished_at": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
                                      "fetched": len(run.fetched), "warnings": len(run.warnings)})
            if lock is not None:
                lock.release()
        self._after_enter()

    def _after_enter(self) -> None:
        self._entered = True
        self.report.run = self._ctx.run
        if self.enabled:
            try:
                self._baseline = {e.name for e in scan_entries(self._root, self._ctx.run.compiler_version) if e.state.publishable}
            except OSError:
                self._baseline = set()

    def _wait_for_host_fetch(self) -> None:
        if (foreign := foreign_state(self._root)) is not None:  # local rank 0 fetches nothing there: no wait
            self._warn(f"bucket sync is off: {foreign}")
            return
        started = time.monotonic()
        deadline = started + self.wait_timeout
        since = process_start_time() - _START_SLACK
        try:
            _, status_path = self._coordination_files()
        except OSError as exc:
            self._warn(f"cannot wait for local rank 0's fetch: {exc}; going on without it")
            return
        delay = 0.05
        refused = False
        while True:
            try:
                finished = _finished_at(status_path)
            except RefusedStateFile as exc:
                finished = None
                if not refused:
                    refused = True
                    self._warn(f"ignoring {status_path} ({exc.why}): not a status file of this package's; waiting "
                               "for local rank 0 to write its own")
            if finished is not None and finished >= since:
                self.report.wait_outcome = "fetch finished"
                break
            if time.monotonic() >= deadline:
                self.report.wait_outcome = "timed out"
                self._warn(f"local rank 0 did not finish fetching within {self.wait_timeout:.0f}s; rank {self.ranks.rank} "
                           "goes on without waiting (graphs it needs are compiled here)")
                break
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)
        self.report.waited = time.monotonic() - started

    # ------------------------------------------------------------------------------ checkpoint
    def checkpoint(self, *, wait: bool = False) -> None:
        """Publish the entries compiled since begin (publisher only; other ranks return at once).

        In the background by default: if the previous checkpoint's publication still runs, this one is
        skipped (the next checkpoint, or `end()`, publishes what it would have)."""
        if not (self.report.publisher and self._entered and self.enabled) or self._ended:
            return
        if not self.background or wait:
            self._join(None)
            self._publish_new()
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                log.info("optimum-neuron-cache: the previous checkpoint is still being published; skipping this one")
                return
            self._thread = threading.Thread(target=self._publish_new, name="neuron-cache-checkpoint", daemon=True)
            self._thread.start()

    def _core_remote_ok(self) -> bool:
        # After a remote failure the core context stops talking to the bucket; so do checkpoints.
        return self._ctx.remote_ok and not self._checkpoint_failed

    def _publish_new(self) -> None:
        if not self._core_remote_ok():
            return
        run = self._ctx.run
        try:
            fetched = {layout.module_of(key) for key in run.fetched}
            new = [entry for entry in scan_entries(self._root, run.compiler_version)
                   if entry.state.publishable and entry.name not in self._baseline and entry.name not in fetched
                   and entry.name not in self._published]
            if not new:
                return
            bucket = resolve_bucket(run.bucket) if isinstance(run.bucket, str) else run.bucket
            client = BucketClient(bucket)
            # The model's area with the casing the bucket has, as found on enter (None: flat area only).
            area = self._ctx.model_area if self._model_folder else None
            if area is None and self._model_folder:
                area = layout.model_area_prefix(run.compiler_version, self._model_folder, run.task)
            key = JournalKey(str(bucket), run.compiler_version, self._model_folder, run.task)
            started = time.monotonic()
            publication = publish(client, self._root, key, new, area=area, create_bucket=bucket == embedded_default())
        except Exception as exc:  # never let a checkpoint publication disturb training
            self._checkpoint_failed = True
            self._warn(f"checkpoint publication skipped, bucket {run.bucket}: {type(exc).__name__}: {exc} "
                       "(what was compiled is published at the end of the run, or by a later run)")
            return
        planned = {item.entry.name for item in publication.plan.items}
        published = set(publication.result.published)
        skipped = {name for name, _ in publication.result.skipped}
        self._published |= published | ({entry.name for entry in new} - planned)
        self.report.checkpoint_published.extend(layout.flat_entry_prefix(run.compiler_version, name) for name in sorted(published))
        if published:  # in the background, beside the trainer's own bar: one line, never a bar
            seconds = time.monotonic() - started
            line = transfer_line("published", len(published), publication.result.bytes_uploaded, seconds)
            log.info("optimum-neuron-cache: checkpoint %s", line)
        if skipped:
            log.info("optimum-neuron-cache: %d entries left to another publisher of this host", len(skipped))

    def _join(self, timeout: float | None) -> bool:
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # ------------------------------------------------------------------------------------- end
    def end(self, exc: BaseException | None = None) -> SessionReport:
        """Publish what is left and write the export record (publisher); a no-op on other ranks."""
        if self._ended:
            return self.report
        self._ended = True
        if self.report.publisher and self._entered:
            if not self._join(self.wait_timeout):
                self._warn("a checkpoint publication is still running; the final publication goes on beside it")
            self._ctx.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
            self.report.run = self._ctx.run
        return self.report

    def __enter__(self) -> TrainingCacheSession:
        self.begin()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        self.end(exc)
        return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        atomic_write(path, json.dumps(data))
    except OSError as exc:
        log.warning("optimum-neuron-cache: could not write %s: %s (other ranks will wait for their timeout)", path, exc)


def _finished_at(path: Path) -> float | None:
    """When local rank 0's fetch finished, from its status file; None when there is none (yet) or it is not one.
    A file that is not a regular file (a FIFO would block the read for ever) raises RefusedStateFile."""
    try:
        status = read_state_json(path)
    except RefusedStateFile:
        raise
    except OSError:
        return None
    finished = status.get("finished_at") if status is not None else None
    if isinstance(finished, bool) or not isinstance(finished, (int, float)) or not math.isfinite(finished):
        return None
    return float(finished)
