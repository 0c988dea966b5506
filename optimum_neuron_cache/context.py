"""`hub_neuronx_cache`: fetch a model's compiled entries on enter, publish the new ones on exit. Best effort.

Bad input (a malformed model id, bucket name or compiler version) raises before the body runs. Anything the
bucket does wrong costs one warning line and the body runs as if there were no bucket; after the first
remote failure the run stops talking to the bucket, and entries it could not publish are retried next run.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from . import remote_layout as layout
from . import settings
from .buckets import BucketRef, embedded_default, resolve_bucket
from .client import BucketClient
from .errors import NeuronCacheError
from .fetch import FetchNote, FetchPlan, HostFetchGate, fetch_model, heal_line, stamp_request
from .host_state import HostState, foreign_state
from .journal import Journal, JournalKey, RunRecord, explicit_and_window
from .local_cache import EntryState, LocalEntry, is_module_name, read_entry, resolve_cache_root, scan_entries, version_dir_name
from .neuron_sdk import resolve_compiler_version, unpinned_target_warning
from .progress import BAR_MIN_BYTES, terminal_progress, transfer_line
from .explain import nearest, time_saved, why_area_empty
from .lookup import read_records
from .publish import close, publish
from .records import CachedExport, ExportFilter, compiler_flags, exit_records, record_id_for
from .sigterm import SigtermHook
from .stats import Stats, record_run
from .sync import RecordWrite

#: File times are stamped at the kernel's clock tick and may read a little earlier than time.time(): a journal
#: window opens this much before enter, so an entry committed right after enter is never left out of it.
CLOCK_SLACK = 1.0

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
    #: Entry keys that earlier runs of this model and task on this host compiled and did not publish (killed,
    #: or the bucket was down): published on exit with this run's.
    recovered: list[str] = field(default_factory=list)
    #: Export record written on exit, as a bucket path.
    record: str | None = None
    #: One line per problem met (each was also logged as a warning).
    warnings: list[str] = field(default_factory=list)
    #: Why graphs were (or will be) compiled here rather than fetched, one line each (also logged at INFO).
    miss_reasons: list[str] = field(default_factory=list)
    #: Requests sent to the bucket server by this run.
    requests: int = 0
    #: True when another process of this host was fetching the same area: this run waited, then took what
    #: that fetch found (no request, no plan).
    waited_for_host_fetch: bool = False
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
        self._root.require_directory("the cache_dir argument" if cache_dir is not None else None)
        self._version = resolve_compiler_version(compiler_version)
        settings.check_client()  # a bad NEURON_CACHE_* setting is bad input too: it raises here, before the body
        self.run = CacheRun(
            model_id=self._model.model_id if self._model else None, task=self._task, compiler_version=self._version,
            bucket=str(self._bucket), cache_dir=self._root.path, enabled=self._root.path is not None,
        )
        self._client: BucketClient | None = None
        #: Whether the bucket is the embedded default (a missing one is then created, never an error).
        self._embedded = self._bucket == embedded_default()
        self._client_later = False
        self._remote_ok = True
        self._area: str | None = None
        self._area_modules: set[str] = set()
        self._area_records: set[str] = set()
        #: The area's entries this run's configuration needs, as its export records list them (None: all).
        self._chosen: frozenset[str] | None = None
        self._before: dict[str, EntryState] = {}
        self._local: dict[str, LocalEntry] = {}
        self._records_read: list[CachedExport] = []
        self._known_models: tuple[str, ...] | None = None
        self._plan: FetchPlan | None = None  # the fetch's plan (this process fetched), for the note it leaves
        self._journal_record: RunRecord | None = None
        #: Journal records of earlier runs of this key that nobody will publish, read on enter.
        self._leftovers: list[RunRecord] = []
        self._sigterm = SigtermHook(self._journal_on_sigterm)

    # ------------------------------------------------------------------------- public state
    @property
    def export_config(self) -> dict[str, Any] | None:
        """The export config the record will carry; settable inside the block (exporters often know it
        only after compiling)."""
        return self._export_config

    @export_config.setter
    def export_config(self, value: Mapping[str, Any] | None) -> None:
        """The export config the record will carry; settable inside the block (exporters often know it only after
        compiling)."""
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
    def __enter__(self) -> CacheRun:
        if self._root.path is None:
            self._warn(f"bucket sync is off: {self._root.disabled_reason}")
            return self.run
        root = self._root.path
        if (foreign := foreign_state(root)) is not None:  # another user's root: nothing here may be written
            self._root = replace(self._root, path=None, disabled_reason=foreign)
            self.run.enabled = False
            self._warn(f"bucket sync is off: {foreign}")
            return self.run
        gate = self._gate(root)
        leading = gate is None or self._lead(gate)
        if leading:  # this process fetches: its first request runs while it reads its cache below
            self._connect_ahead(gate.previous if gate is not None else None)
        if not self._embedded and (line := unpinned_target_warning(self._version, str(self._bucket))):
            self._warn(line)  # compilers up to 2.15: the target is not in the MODULE name (once per process)
        try:
            HostState(root).remove_stale_temp_dirs()
        except OSError:
            pass
        local = {entry.name: entry for entry in self._entries()}
        self._local = local
        self._before = {name: entry.state for name, entry in local.items()}
        self._open_journal(root, local)
        if gate is not None and not leading:
            note = self._wait(gate)
            if note is not None:  # another process of this host fetched this very area meanwhile: take its note
                self._take_note(note)
                self._count_requests()
                return self.run
            gate = gate if self._lead(gate) else None  # it died or gave up: fetch here
        upstreams = self._upstreams()  # read while the request sent ahead is out, not after its reply
        note: FetchNote | None = None
        progress, end_bar = terminal_progress("neuron-cache fetch", min_total=BAR_MIN_BYTES)  # this host's one bar
        started = time.monotonic()
        try:
            if self._client is None:
                self._client = BucketClient(self._bucket)  # refuses a Hub bucket under HF_HUB_OFFLINE
            fetched = fetch_model(self._client, root, self._version, self._model.folder if self._model else None,
                                  self._task, local, missing_bucket_is_empty=self._embedded,
                                  memo=gate.previous if gate is not None else None, wanted=self._wanted(),
                                  progress=progress)
            end_bar()
        except NeuronCacheError as exc:
            self._remote_failed("fetch", exc)
            note = self._note(ok=False, error=str(exc))
        except OSError as exc:
            self._remote_failed("fetch", exc)
        except Exception as exc:  # a bug of ours must never stop the user's compile
            self._remote_failed("fetch", RuntimeError(f"{type(exc).__name__}: {exc}"))
        else:
            for module in fetched.result.installed_by_others:  # complete before our body ran: not compiled by it
                self._before[module] = EntryState.SUCCESS
            self._area = fetched.area
            self._area_modules, self._area_records = fetched.plan.remote_modules, fetched.plan.record_names
            self._known_models = fetched.plan.known_models
            self._plan = fetched.plan
            chosen = ""
            if fetched.plan.choice is not None:
                self._chosen = fetched.plan.choice.modules
                if fetched.plan.choice.records:  # chosen now, from the records (not from this host's note)
                    chosen = f" for {fetched.plan.choice.line()}"
            if fetched.result.fetched or chosen:
                result = fetched.result
                line = transfer_line("fetched", len(result.fetched), result.bytes, time.monotonic() - started)
                log.info("optimum-neuron-cache: %s%s", line, chosen)
            self._records_read = fetched.result.exports_read
            note = self._note(ok=True)
            prefix = layout.version_prefix(self._version)
            self.run.fetched = [layout.flat_entry_prefix(self._version, module) for module in fetched.result.fetched]
            self.run.bytes_downloaded = fetched.result.bytes
            for module, why in fetched.result.failed:
                self._warn(f"entry {prefix}/{module} not fetched: {why}")
            for module in fetched.result.replaced:
                self._warn(f"entry {prefix}/{module} was locked by a compile that died: replaced by the bucket's complete entry")
            if line := heal_line(fetched.result.healed, self._version):
                self._warn(line)
            for module, why in fetched.plan.stranded:
                self._warn(f"entry {prefix}/{module} is complete in the bucket but locked here, and the lock cannot be "
                           f"told stale ({why}); if no compile is running, run `neuron-cache cleanup --locks` and run again")
                self._miss(f"{layout.flat_entry_prefix(self._version, module)} is locked here (a compile in progress, or a stale lock)")
            saved = time_saved(fetched.result.fetched, fetched.result.exports_read)
            self.run.stats.seconds_saved, self.run.stats.hits_without_duration = saved
            try:
                self._read_through(root, upstreams)
            except Exception as exc:  # upstreams are a bonus: never a reason to stop the user's compile
                self._warn(f"upstreams not read: {exc}")
        finally:
            end_bar()
            if gate is not None:
                gate.release(note)
        self.run.stats.fetches = 1 if self._client is not None else 0
        self._count_requests()
        return self.run

    # -------------------------------------------------------------------------- one fetch per host
    def _gate(self, root: Path) -> HostFetchGate | None:
        """This area's host-wide fetch gate (None when it cannot be made: then every process fetches, and the
        entry locks still download each file once)."""
        try:
            key = self._journal_key().text
            return HostFetchGate(HostState(root).fetch_gate_path(key), key)
        except OSError:
            return None

    def _connect_ahead(self, memo: FetchNote | None) -> None:
        """The fetching process's client, connecting to a running server at once (`BucketClient.connect_ahead`),
        with the paths-info of the area's stamp right behind the handshake when this host's last fetch of the
        area may stand in for a listing (`fetch.stamp_request`): a warm run's one request overlaps its local scan
        and journal. A client that cannot be made is made again in the fetch, which meets the error there."""
        try:
            self._client = BucketClient(self._bucket)
        except Exception:
            return
        first = stamp_request(memo, self._version, time.time()) if self._model is not None else None
        self._client.connect_ahead(first)

    @staticmethod
    def _wait(gate: HostFetchGate) -> FetchNote | None:
        """The note of the fetch this process waited for, or None (then it fetches itself)."""
        try:
            return gate.wait(settings.lock_timeout())
        except OSError:
            return None

    @staticmethod
    def _lead(gate: HostFetchGate) -> bool:
        """Whether this process fetches (it took the gate, or the gate cannot be used)."""
        try:
            return gate.lead()
        except OSError:
            return True

    def _note(self, *, ok: bool, error: str = "") -> FetchNote:
        """What this fetch found, for the processes of this host waiting on the gate."""
        text = self._journal_key().text
        if not ok:
            return FetchNote(text, time.time(), False, error)
        plan = self._plan
        choice = plan.choice if plan is not None else None
        needed = None if choice is None or choice.modules is None else \
            tuple(sorted(choice.modules & self._area_modules))
        return FetchNote(text, time.time(), True, "", self._area, tuple(sorted(self._area_modules)),
                         tuple(sorted(self._area_records)), self._known_models,
                         plan.stamp if plan is not None else None, plan.listed_at if plan is not None else 0.0,
                         choice.wanted.key if choice is not None else None, needed)

    def _wanted(self) -> ExportFilter | None:
        """The configuration this run fetches for: its export config, when known on enter (None: the whole area)."""
        return ExportFilter.of(self._export_config) if self._export_config else None

    def _take_note(self, note: FetchNote) -> None:
        """Another process of this host fetched this area while this one waited: what it found stands for this
        run (no request), and what it installed was there before this run's body."""
        self.run.waited_for_host_fetch = True
        if not note.ok:
            self._remote_ok = False
            self.run.stats.remote_errors += 1
            self._warn(f"fetch skipped, bucket {self._bucket}: {note.error} (this host's fetch met it; the run goes "
                       "on without the bucket, and what it compiles is published by a later run)")
            return
        self._client_later = True  # made on exit, only if there is something to publish or explain: connecting
        self._area, self._known_models = note.area, note.known_models  # costs the server a handshake per rank
        self._area_modules, self._area_records = frozenset(note.remote_modules), frozenset(note.record_names)
        wanted = self._wanted()
        if wanted is not None and note.wanted == wanted.key and note.needed is not None:
            self._chosen = frozenset(note.needed)
        self._local = self._exit_entries()  # what exit compares with; entries complete at enter are not read again
        for entry in self._local.values():
            if entry.state.publishable:
                self._before.setdefault(entry.name, entry.state)
                if not self._before[entry.name].publishable:
                    self._before[entry.name] = entry.state

    def _late_client(self) -> None:
        """The client of a run that took its host's fetch note, made when exit first needs the bucket."""
        if self._client is None and self._client_later and self._remote_ok:
            self._client_later = False
            try:
                self._client = BucketClient(self._bucket)
            except NeuronCacheError as exc:
                self._remote_failed("sync", exc)

    @staticmethod
    def _upstreams() -> bool | Exception:
        """Whether read-through upstreams are configured, or why they cannot be read (`_read_through` says it)."""
        from .upstreams import configured_upstreams

        try:
            return bool(configured_upstreams())
        except Exception as exc:
            return exc

    def _read_through(self, root: Path, upstreams: bool | Exception) -> None:
        """What the bucket lacked, from the read-only upstreams (upstreams.py; `upstreams`: whether any are
        configured, read before the fetch): the model's area of upstream buckets, todo entries from any
        upstream. Published to the bucket before the body, so the next run finds them at home; counted as
        fetched, never as compiled by this run."""
        from .upstreams import read_through

        if isinstance(upstreams, Exception):
            raise upstreams
        if not upstreams or self._client is None:
            return
        got = read_through(self._client, root, self._version, self._model.folder if self._model else None, self._task,
                           self._journal_key(), self._area)
        for warning in got.warnings:
            self._warn(warning)
        for module in got.filled:
            self._before[module] = EntryState.SUCCESS
            self.run.fetched.append(layout.flat_entry_prefix(self._version, module))

    # ------------------------------------------------------------------------------- journal
    def _journal_key(self) -> JournalKey:
        return JournalKey(str(self._bucket), self._version, self._model.folder if self._model else None, self._task)

    def _open_journal(self, root: Path, local: dict[str, LocalEntry]) -> None:
        """Before the body: read what earlier runs of this key left unpublished, and write this run's record
        (a window: whatever becomes complete from now on is this run's to publish, even if it is killed)."""
        journal = Journal(root)
        try:
            now = time.time()
            self._leftovers = journal.leftovers(self._journal_key(), now)
            recovered = explicit_and_window(self._leftovers, local, now)
            self.run.recovered = [layout.flat_entry_prefix(self._version, name) for name in sorted(recovered)]
            self._journal_record = journal.begin(RunRecord(
                key=self._journal_key(), started=now - CLOCK_SLACK, model_id=self._model.model_id if self._model else None,
                export_config=self._export_config, window=True, open=True))
        except OSError as exc:
            self._warn(f"cannot write the publish journal in {journal.folder}: {exc} (if this run is killed, "
                       "what it compiled is published only by `neuron-cache sync`)")
            return
        if self.run.recovered:
            log.info("optimum-neuron-cache: %d entries compiled by earlier runs of this model are published on exit",
                     len(self.run.recovered))
        self._sigterm.install()

    def _new_entries(self, entries: dict[str, LocalEntry]) -> set[str]:
        """Entries that became complete during the block and were not fetched: compiled here (or by another
        process of the host meanwhile)."""
        fetched = {layout.module_of(key) for key in self.run.fetched}
        return {name for name, entry in entries.items()
                if entry.state.publishable and not self._before.get(name, EntryState.INCOMPLETE).publishable
                and name not in fetched}

    def _journal_on_sigterm(self) -> None:
        """SIGTERM (a scheduler stopping the job): name what was compiled so far in the journal, at once."""
        if self._journal_record is None or self._root.path is None:
            return
        new = self._new_entries({entry.name: entry for entry in self._entries()})
        names = tuple(sorted(set(self._journal_record.entries) | new))
        self._journal_record = Journal(self._root.path).update(self._journal_record, entries=names,
                                                               export_config=self._export_config)

    def _records(self) -> list[CachedExport]:
        """The model's export records: those the fetch read along with the entries, else one download (only
        ever on the miss path)."""
        if self._records_read:
            return self._records_read
        if self._client is None or self._area is None or not self._area_records:
            return []
        paths = [layout.area_record_path(self._area, name) for name in sorted(self._area_records)]
        return read_records(self._client, paths)

    # --------------------------------------------------------------------------------- exit
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if self._root.path is None:
            return False
        self._sigterm.uninstall()
        try:
            self._sync(self._root.path)
        except (NeuronCacheError, OSError) as error:
            self.run.stats.remote_errors += 1
            self._warn(f"sync failed, bucket {self._bucket}: {error} (entries stay local and are retried next run)")
        except Exception as error:  # a bug of ours must never mask or replace the body's outcome
            self._warn(f"sync failed unexpectedly: {type(error).__name__}: {error}")
        finally:
            self._close_journal(self._root.path)
        self._count_requests()
        stats = self.run.stats
        stats.hits, stats.misses, stats.publishes = len(self.run.fetched), len(self.run.compiled), len(self.run.synced)
        stats.bytes_downloaded, stats.bytes_uploaded = self.run.bytes_downloaded, self.run.bytes_uploaded
        record_run(stats)
        return False  # the body's exception, if any, propagates unchanged

    def _close_journal(self, root: Path) -> None:
        """The run is over: what it could not publish stays journaled for the next run; nothing else does."""
        try:
            close(root, self._journal_record)
        except OSError as exc:
            log.debug("optimum-neuron-cache: could not close the journal record: %s", exc)
        self._journal_record = None

    def _explain_misses(self, new: set[str]) -> None:
        """Graphs were compiled here: say why the bucket did not have them. An empty area costs at most one
        request (its tasks); else the records say which was nearest and how it differs, or which entries a
        record of this very configuration lacked (read with the entries, else one download)."""
        assert self._model is not None and self._client is not None
        if not self._area_modules:
            try:
                self._miss(why_area_empty(self._client, self._version, self._model.folder, self._task,
                                          self._model.model_id, self._known_models))
            except (NeuronCacheError, OSError) as exc:
                log.debug("optimum-neuron-cache: could not explain the miss: %s", exc)
            return
        if not self._area_records:
            return
        try:
            records = self._records()
        except (NeuronCacheError, OSError) as exc:
            log.debug("optimum-neuron-cache: could not read the export records: %s", exc)
            return
        flags = compiler_flags()
        mine = record_id_for(self._export_config) if self._export_config is not None else None
        same = [r for r in records if r.record_id == mine]
        if same:
            missing = sorted(set(same[0].modules) - set(self._area_modules))
            self._miss(f"the record of this configuration lists {len(same[0].modules)} entries, the bucket held "
                       f"{len(same[0].modules) - len(missing)}; compiled {len(new)} here")
            return
        best = nearest(records, self._version, flags, self._export_config)
        if best and best[0].differences:
            self._miss(f"compiled {len(new)} graphs here: no record matches; nearest differs in "
                       + "; ".join(best[0].differences))

    def _export_records(self, entries: dict[str, LocalEntry], new: set[str], recovered: set[str]) -> list[RecordWrite]:
        """The export records this exit writes (records.exit_records): this run's configuration, and those of
        earlier runs whose entries are published now."""
        if self._model is None or self._area is None:
            return []
        earlier = [(leftover.export_config, explicit_and_window([leftover], entries, time.time()) & recovered)
                   for leftover in self._leftovers if leftover.export_config is not None]
        # A run that compiled nothing used what its fetch chose: the entries its configuration's records list.
        area = set(self._area_modules) if self._chosen is None else set(self._area_modules) & self._chosen
        used = area | {layout.module_of(key) for key in self.run.fetched}
        return exit_records(self._model.model_id, self._task, self._version, self._area, entries,
                            config=self._export_config, compiled=new, used=used, earlier=earlier,
                            recorded=self._area_records, previous=self._records_read)

    def _exit_entries(self) -> dict[str, LocalEntry]:
        """The entries now (at exit, or when a waiting run takes its host's fetch note), from one listing of the
        version folder: those complete at enter are taken as they were (nothing rewrites a complete entry:
        compiles and fetches only add entries), the others are read again. A warm run thus reads its version
        folder, not every entry's files a second time."""
        assert self._root.path is not None
        folder = self._root.path / version_dir_name(self._version)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):  # as scan_entries: a symlinked version folder is not read
                return {}
            with os.scandir(folder) as items:
                names = sorted(item.name for item in items if is_module_name(item.name) and item.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return {}
        except OSError:
            return {entry.name: entry for entry in self._entries()}
        entries = {}
        for name in names:
            known = self._local.get(name)
            entries[name] = known if known is not None and known.state.publishable else read_entry(folder / name, self._version)
        return entries

    def _sync(self, root: Path) -> None:
        entries = self._exit_entries()
        new = self._new_entries(entries)
        fetched = {layout.module_of(key) for key in self.run.fetched}
        self.run.compiled = [layout.flat_entry_prefix(self._version, name) for name in sorted(new)]
        log.debug("optimum-neuron-cache: hits (fetched) %s; misses (compiled here) %s", sorted(fetched), sorted(new))
        if new:
            self._late_client()
        if new and self._remote_ok and self._model is not None and self._client is not None:
            self._explain_misses(new)
        recovered = {layout.module_of(key) for key in self.run.recovered}
        candidates = [entries[name] for name in sorted(new | recovered) if name in entries and entries[name].state.publishable]
        journal = Journal(root)
        if self._journal_record is not None and (candidates or self._leftovers):
            # Write-ahead: the names go on disk (explicit now, no more window) before anything goes up; the
            # leftovers of earlier runs are covered by them, so their own records can go. (With neither, the
            # record only goes, in _close_journal: a warm run writes it once and removes it.)
            self._journal_record = journal.update(self._journal_record, entries=tuple(e.name for e in candidates),
                                                  window=False, export_config=self._export_config)
            for leftover in self._leftovers:
                journal.drop(leftover)
        if candidates or self._leftovers or self._export_config is not None:
            self._late_client()
        if not self._remote_ok or self._client is None:
            if candidates:
                log.info("optimum-neuron-cache: %d entries queued for publishing by a later run", len(candidates))
            return
        writes = self._export_records(entries, new, recovered)
        if not candidates and not writes:
            return
        progress, end_bar = terminal_progress("neuron-cache publish", min_total=BAR_MIN_BYTES)
        started = time.monotonic()
        try:
            publication = publish(self._client, root, self._journal_key(), candidates, area=self._area,
                                  known_in_area=self._area_modules, records=writes, record=self._journal_record,
                                  create_bucket=self._embedded, progress=progress)
        finally:
            end_bar()
        result = publication.result
        if result.published:
            line = transfer_line("published", len(result.published), result.bytes_uploaded, time.monotonic() - started)
            log.info("optimum-neuron-cache: %s", line)
        self._journal_record = publication.record
        self.run.synced = [layout.flat_entry_prefix(self._version, name) for name in sorted(publication.result.published)]
        self.run.bytes_uploaded = publication.result.bytes_uploaded
        own = [path for path, record in writes if record.export_config == self._export_config]
        self.run.record = own[0] if own and own[0] in publication.result.record_paths else None
