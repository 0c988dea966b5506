"""`hub_neuronx_cache`: fetch a model's compiled entries on enter, publish the new ones on exit. Best effort.

Bad input (a malformed model id, bucket name or compiler version) raises before the body runs. Anything the
bucket does wrong costs one warning line and the body runs as if there were no bucket; after the first
remote failure the run stops talking to the bucket, and entries it could not publish are retried next run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from . import remote_layout as layout
from . import settings
from .buckets import BucketRef, embedded_default, resolve_bucket
from .client import BucketClient
from .errors import NeuronCacheError
from .fetch import fetch_model
from .host_state import HostState
from .local_cache import EntryState, LocalEntry, resolve_cache_root, scan_entries
from .neuron_sdk import resolve_compiler_version
from .explain import nearest, why_nothing
from .lookup import CachedExport, read_records
from .records import ExportRecord, compile_seconds, compiler_flags, make_record
from .stats import Stats, record_run
from .sync import execute_sync, plan_sync

log = logging.getLogger("optimum_neuron_cache")


@dataclass
class CacheRun:
    """What one `hub_neuronx_cache` block did: read it inside the block (fetch) or after it (sync)."""

    model_id: str | None
    task: str
    compiler_version: str
    bucket: str
    cache_dir: Path | None
    #: False when bucket sync is off for this run (s3:// root, --no_cache): the body still runs.
    enabled: bool = True
    #: Entry keys (`neuronxcc-<ver>/MODULE_...`) installed on enter.
    fetched: list[str] = field(default_factory=list)
    #: Entry keys published on exit.
    synced: list[str] = field(default_factory=list)
    #: Entry keys that became complete during the block (compiled here, or by another process of the host).
    compiled: list[str] = field(default_factory=list)
    #: Export record written on exit, as a bucket path.
    record: str | None = None
    #: One line per problem met (each was also logged as a warning).
    warnings: list[str] = field(default_factory=list)
    #: Why graphs were (or will be) compiled here rather than fetched, one line each (also logged at INFO).
    miss_reasons: list[str] = field(default_factory=list)
    #: Requests sent to the bucket server by this run.
    requests: int = 0
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    #: This run's figures, as added to the host's totals (`neuron-cache stats`); final after the block.
    stats: Stats = field(default_factory=Stats)


class hub_neuronx_cache:  # noqa: N801 - a context manager used like a function, as in optimum-neuron
    """Wrap a compile call or a training run with the bucket cache.

        with hub_neuronx_cache("meta-llama/Llama-3.2-1B", task="text-generation", export_config=cfg) as run:
            compile_the_model()
        print(run.fetched, run.synced)

    model_id: a Hub model id or a local model directory (keyed by content); None syncs the flat area only.
    export_config: a JSON-able dict (batch size, sequence length, tensor parallel size, dtype, target...);
    when given, an export record is written so `lookup` can find this configuration.
    """

    def __init__(self, model_id: str | os.PathLike[str] | None = None, task: str | None = None,
                 export_config: Mapping[str, Any] | None = None, *, compiler_version: str | None = None,
                 bucket: str | BucketRef | None = None, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self._model = layout.model_ref(model_id) if model_id is not None else None
        self._task = layout.task_name(task)
        self._export_config = dict(export_config) if export_config is not None else None
        self._bucket = resolve_bucket(bucket)
        self._root = resolve_cache_root(cache_dir)
        self._version = resolve_compiler_version(compiler_version)
        settings.check_client()  # a bad NEURON_CACHE_* setting is bad input too: it raises here, before the body
        self.run = CacheRun(
            model_id=self._model.model_id if self._model else None, task=self._task, compiler_version=self._version,
            bucket=str(self._bucket), cache_dir=self._root.path, enabled=self._root.path is not None,
        )
        self._client: BucketClient | None = None
        self._remote_ok = True
        self._area: str | None = None
        self._area_modules: set[str] = set()
        self._area_records: set[str] = set()
        self._before: dict[str, EntryState] = {}
        self._records_read: list[CachedExport] = []

    # ------------------------------------------------------------------------- public state
    @property
    def export_config(self) -> dict[str, Any] | None:
        """The export config the record will carry; settable inside the block (exporters often know it
        only after compiling)."""
        return self._export_config

    @export_config.setter
    def export_config(self, value: Mapping[str, Any] | None) -> None:
        self._export_config = dict(value) if value is not None else None

    @property
    def remote_ok(self) -> bool:
        """False once the bucket failed in this run: the run no longer talks to it."""
        return self._remote_ok

    @property
    def model_area(self) -> str | None:
        """The model's area in the bucket, with the casing the bucket has (known after enter)."""
        return self._area

    # ------------------------------------------------------------------------------ helpers
    def _warn(self, message: str) -> None:
        self.run.warnings.append(message)
        log.warning("optimum-neuron-cache: %s", message)

    def _miss(self, reason: str) -> None:
        self.run.miss_reasons.append(reason)
        log.info("optimum-neuron-cache: miss: %s", reason)

    def _remote_failed(self, stage: str, exc: BaseException) -> None:
        self._remote_ok = False
        self.run.stats.remote_errors += 1
        self._warn(f"{stage} skipped, bucket {self._bucket}: {exc} (the run goes on without the bucket; "
                   "what it compiles is published by a later run)")

    def _entries(self) -> list[LocalEntry]:
        assert self._root.path is not None
        return scan_entries(self._root.path, self._version)

    def _count_requests(self) -> None:
        if self._client is not None:
            self.run.requests = self._client.requests

    # -------------------------------------------------------------------------------- enter
    def _is_embedded_default(self) -> bool:
        return self._bucket == embedded_default()

    def __enter__(self) -> CacheRun:
        if self._root.path is None:
            self._warn(f"bucket sync is off: {self._root.disabled_reason}")
            return self.run
        root = self._root.path
        try:
            HostState(root).remove_stale_temp_dirs()
        except OSError:
            pass
        local = {entry.name: entry for entry in self._entries()}
        self._before = {name: entry.state for name, entry in local.items()}
        try:
            self._client = BucketClient(self._bucket)  # refuses a Hub bucket under HF_HUB_OFFLINE
            fetched = fetch_model(self._client, root, self._version, self._model.folder if self._model else None,
                                  self._task, local, missing_bucket_is_empty=self._is_embedded_default())
        except (NeuronCacheError, OSError) as exc:
            self._remote_failed("fetch", exc)
        except Exception as exc:  # a bug of ours must never stop the user's compile
            self._remote_failed("fetch", RuntimeError(f"{type(exc).__name__}: {exc}"))
        else:
            for module in fetched.result.installed_by_others:  # complete before our body ran: not compiled by it
                self._before[module] = EntryState.SUCCESS
            self._area = fetched.area
            self._area_modules, self._area_records = fetched.plan.remote_modules, fetched.plan.records
            self._records_read = fetched.result.records
            prefix = layout.version_prefix(self._version)
            self.run.fetched = [f"{prefix}/{module}" for module in fetched.result.fetched]
            self.run.bytes_downloaded = fetched.result.bytes
            for module, why in fetched.result.failed:
                self._warn(f"entry {prefix}/{module} not fetched: {why}")
            self._explain_enter(fetched.result.fetched, fetched.result.records)
        self.run.stats.fetches = 1 if self._client is not None else 0
        self._count_requests()
        return self.run

    def _records(self) -> list[CachedExport]:
        """The model's export records: those the fetch read along with the entries, else one download (only
        ever on the miss path)."""
        if self._records_read:
            return self._records_read
        if self._client is None or self._area is None or not self._area_records:
            return []
        paths = [f"{self._area}/{layout.EXPORTS_DIR}/{name}" for name in sorted(self._area_records)]
        return read_records(self._client, paths)

    def _explain_enter(self, fetched: list[str], records: list[CachedExport]) -> None:
        """After a fetch: the time the hits save (from the records read with the entries), and why there was
        nothing to fetch. Best effort."""
        assert self._client is not None
        try:
            if fetched:
                durations: dict[str, float] = {}
                for record in records:
                    durations.update(record.compile_seconds)
                known = [durations[name] for name in fetched if name in durations]
                self.run.stats.seconds_saved = float(sum(known))
                self.run.stats.hits_without_duration = len(fetched) - len(known)
            if self._model is not None and not self._area_modules:
                self._miss(why_nothing(self._client, self._version, self._model.folder, self._task, self._model.model_id))
        except (NeuronCacheError, OSError) as exc:
            log.debug("optimum-neuron-cache: could not explain the fetch: %s", exc)

    # --------------------------------------------------------------------------------- exit
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if self._root.path is None:
            return False
        try:
            self._sync(self._root.path)
        except (NeuronCacheError, OSError) as error:
            self.run.stats.remote_errors += 1
            self._warn(f"sync failed, bucket {self._bucket}: {error} (entries stay local and are retried next run)")
        except Exception as error:  # a bug of ours must never mask or replace the body's outcome
            self._warn(f"sync failed unexpectedly: {type(error).__name__}: {error}")
        self._count_requests()
        stats = self.run.stats
        stats.hits, stats.misses, stats.publishes = len(self.run.fetched), len(self.run.compiled), len(self.run.synced)
        stats.bytes_downloaded, stats.bytes_uploaded = self.run.bytes_downloaded, self.run.bytes_uploaded
        record_run(stats)
        return False  # the body's exception, if any, propagates unchanged

    def _pending_key(self) -> str:
        folder = self._model.folder if self._model else "_flat"
        return f"{layout.version_prefix(self._version)}/{folder}/{self._task}"

    def _explain_misses(self, new: set[str]) -> None:
        """Graphs were compiled here although the bucket holds entries of this model: say which record was
        nearest and how it differs, or which entries a record of this very configuration lacked."""
        if not self._area_records:
            return
        try:
            records = self._records()
        except (NeuronCacheError, OSError) as exc:
            log.debug("optimum-neuron-cache: could not read the export records: %s", exc)
            return
        flags = compiler_flags()
        mine = make_record(self._model.model_id, self._task, self._version, self._export_config or {}, []) \
            if self._export_config is not None else None
        same = [r for r in records if mine is not None and r.record_id == mine.record_id]
        if same:
            missing = sorted(set(same[0].modules) - set(self._area_modules))
            self._miss(f"the record of this configuration lists {len(same[0].modules)} entries, the bucket held "
                       f"{len(same[0].modules) - len(missing)}; compiled {len(new)} here")
            return
        best = nearest(records, self._version, flags, self._export_config)
        if best and best[0].differences:
            self._miss(f"compiled {len(new)} graphs here: no record matches; nearest differs in "
                       + "; ".join(best[0].differences))

    def _keep_digests(self, record: ExportRecord) -> ExportRecord:
        """A record rewritten for the same configuration keeps the digests the one it replaces recorded (read
        at enter, with the entries): readers go on checking those files by BLAKE3. Sync adds this run's."""
        previous = next((r for r in self._records_read if r.record_id == record.record_id), None)
        return dataclasses.replace(record, digests=dict(previous.digests)) if previous and previous.digests else record

    def _sync(self, root: Path) -> None:
        state = HostState(root)
        entries = {entry.name: entry for entry in self._entries()}
        fetched = {key.rsplit("/", 1)[1] for key in self.run.fetched}
        new = {name for name, entry in entries.items()
               if entry.state.publishable and not self._before.get(name, EntryState.INCOMPLETE).publishable and name not in fetched}
        self.run.compiled = [f"{layout.version_prefix(self._version)}/{name}" for name in sorted(new)]
        log.debug("optimum-neuron-cache: hits (fetched) %s; misses (compiled here) %s", sorted(fetched), sorted(new))
        if new and self._remote_ok and self._model is not None:
            self._explain_misses(new)
        key = self._pending_key()
        pending = state.pending(key)
        candidates = [entries[name] for name in sorted(new | pending) if name in entries and entries[name].state.publishable]
        record = None
        if self._model is not None and self._export_config is not None:
            # The graphs this configuration compiled; a run that compiled nothing (all hits) cannot tell which
            # of the model's entries it used, so its record names all of them.
            modules = sorted(new) if new else sorted(set(self._area_modules) | fetched)
            seconds = {name: s for name in new if (s := compile_seconds(entries[name].path)) is not None}
            record = make_record(self._model.model_id, self._task, self._version, self._export_config, modules,
                                 compile_seconds=seconds)
        area = self._area
        record_path = None
        if record is not None and area is not None:
            record_path = f"{area}/{layout.EXPORTS_DIR}/{record.record_id}.json"
            if f"{record.record_id}.json" in self._area_records and not new:
                record = None  # this configuration is recorded already and nothing new was compiled
            else:
                record = self._keep_digests(record)
        if not candidates and record is None:
            return
        if not self._remote_ok or self._client is None:
            state.update_pending(key, add={entry.name for entry in candidates})
            log.info("optimum-neuron-cache: %d entries queued for publishing by a later run", len(candidates))
            return
        try:
            if candidates and self._is_embedded_default():
                self._client.create()  # the embedded default is made on first use; real buckets never are
            plan = plan_sync(self._client, candidates, area, self._area_modules)
            plan.record, plan.record_path = record, record_path if record is not None else None
            result = execute_sync(self._client, state, plan) if not plan.empty else None
        except (NeuronCacheError, OSError):
            state.update_pending(key, add={entry.name for entry in candidates})
            raise
        published = set(result.published) if result else set()
        state.update_pending(key, remove={entry.name for entry in candidates} - {name for name, _ in (result.skipped if result else [])})
        prefix = layout.version_prefix(self._version)
        self.run.synced = [f"{prefix}/{name}" for name in sorted(published)]
        self.run.bytes_uploaded = result.bytes_uploaded if result else 0
        self.run.record = result.record_path if result else None
