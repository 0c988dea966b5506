"""Fetch: plan what the local cache lacks of the bucket's entries, then install each one whole.

`plan_fetch` reads one listing of the model's area (plus one paths-info for local todo entries) and returns an
immutable `FetchPlan`: one typed operation per entry, each with its reason (install, fill a todo entry,
replace an entry a dead compile left locked, heal a cached failure; or why nothing is done); `narrow_plan`
leaves out what the export records matching a configuration do not list (`choose_entries`). `execute_fetch`
carries out the operations that move bytes: every needed file in one download request, into a temporary
folder on the cache's filesystem, sizes checked against the listing, each entry renamed into place. An
existing complete entry is never overwritten. Per-entry node-wide locks make 32 ranks download each file
once: the others wait, then find it installed. Dry runs, progress and reports read the plan.

The model area's digest manifests (docs/remote-layout.md) ride along with the first download, for the server
to check files by BLAKE3; they land in the temporary folder, never in an entry. `HostFetchGate` makes the
processes of one host that enter the same area together fetch once: the others take the fetcher's note.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from filelock import Timeout

from bucket_server.messages import DownloadFile, PathsInfoRequest
from bucket_server.protocol import MAX_RECORD_BYTES

from . import atomic, crashpoints
from . import remote_layout as layout
from . import settings
from .atomic import RefusedStateFile, open_state_file
from .client import BucketClient, ProgressCallback
from .compile_locks import running_compilers, why_not_stale
from .errors import BucketNotFoundError, RemoteError, RemoteUnavailableError
from .host_state import HostState
from .local_cache import LOCK_SUFFIX, EntryState, LocalEntry, read_entry, version_dir_name
from .lookup import read_records
from .records import CachedExport, ExportFilter, parse_record
from .remote_layout import RemoteFile, complete_remote_entry

log = logging.getLogger("optimum_neuron_cache")



class Action(str, enum.Enum):
    """What a fetch does about one entry of the bucket."""

    INSTALL = "install"  # not here: the whole entry is renamed into place
    FILL = "fill"  # a todo entry here (HLO and flags only): the missing files are added, commit file last
    REPLACE = "replace"  # stranded here by a compile lock that can be told stale: replaced whole
    HEAL = "heal"  # a cached failure here (model.log), complete in the bucket: swapped whole for the bucket's
    PRESENT = "present"  # complete here already
    LOCKED = "locked"  # a compile lock here that cannot be told stale: left alone, and said
    KEEP = "keep"  # anything else here (an incomplete entry): never overwritten
    UNLISTED = "unlisted"  # the bucket's, but no export record matching the configuration asked for lists it


#: The actions that download files.
TRANSFERS = frozenset({Action.INSTALL, Action.FILL, Action.REPLACE, Action.HEAL})


@dataclass(frozen=True)
class FetchOp:
    """One entry of the plan: what to do and why."""

    module: str
    action: Action
    reason: str
    #: The files to download (transfers only).
    files: tuple[RemoteFile, ...] = ()
    #: Where they come from: the model's area (whole entries) or the flat area (filling todo entries).
    source: Literal["model", "flat"] = "model"


#: Why an entry is left out of a fetch asked for one configuration.
UNLISTED_REASON = "not listed by the matching export record"


@dataclass(frozen=True)
class Choice:
    """Which entries of the model's area a configuration needs, from its export records (`choose_entries`)."""

    wanted: ExportFilter
    #: The records that match `wanted`, and every record read (for digests, durations, miss reasons).
    matching: tuple[CachedExport, ...] = ()
    records: tuple[CachedExport, ...] = ()
    #: The entries the matching records list; None: the whole area (no record matches, or those that match
    #: list no entries, as records imported from optimum-neuron's registry).
    modules: frozenset[str] | None = None

    def line(self) -> str:
        """What was chosen, for the one line a fetch prints."""
        if self.modules is None:
            return f"no export record matches {self.wanted}: the whole area" if not self.matching else \
                f"the matching records of {self.wanted} list no entries: the whole area"
        count = len(self.matching)
        return f"{count} matching configuration{'s' if count != 1 else ''} ({self.wanted})"


@dataclass(frozen=True)
class FetchPlan:
    """What a fetch will do: one operation per entry of the model's area (and filled todo entries), immutable."""
    compiler_version: str
    #: The model's area, with the casing the bucket has (None: no model, flat area only).
    area: str | None = None
    ops: tuple[FetchOp, ...] = ()
    #: Complete entries the model's area holds (whether or not they are needed here).
    remote_modules: frozenset[str] = frozenset()
    #: Export record files present in the model's area (file names).
    record_names: frozenset[str] = frozenset()
    #: The records themselves (small JSON, under the size cap): downloaded in the same request as the
    #: entries, for what they tell about them (compile durations, digests).
    record_files: tuple[RemoteFile, ...] = ()
    #: Digest manifests that bind Xet hashes of the files to BLAKE3 digests recorded at publish (the model
    #: area's newest, and those of filled flat entries): downloaded with the first transfer, read by the
    #: server only, never installed.
    manifest_files: tuple[RemoteFile, ...] = ()
    #: Paths in the listing that the layout does not allow (skipped; said once).
    ignored: tuple[str, ...] = ()
    #: The folders under this version's `models/`, when the model's area was empty and they were listed to find
    #: the casing the bucket has (None: not listed). A miss explains itself from them.
    known_models: tuple[str, ...] | None = None
    #: The area's stamp as it was when the area was listed (`layout.stamp_token`; None: the area has none), and
    #: when that listing was made: what a later run of this host compares to skip the listing (`memo_plan`).
    stamp: str | None = None
    listed_at: float = 0.0
    #: The configuration asked for and what its records chose (`narrow_plan`); None: every entry of the area.
    choice: Choice | None = None

    @property
    def items(self) -> tuple[FetchOp, ...]:
        """The operations that download files."""
        return tuple(op for op in self.ops if op.action in TRANSFERS)

    @property
    def stranded(self) -> list[tuple[str, str]]:
        """(module, why) of entries the bucket holds complete that a live-looking compile lock holds here."""
        return [(op.module, op.reason) for op in self.ops if op.action is Action.LOCKED]

    @property
    def bytes_needed(self) -> int:
        """Bytes the plan's transfers download."""
        return sum(file.size for op in self.items for file in op.files)


@dataclass
class FetchResult:
    """What executing a plan did, entry by entry."""
    fetched: list[str] = field(default_factory=list)  # MODULE names installed by this process
    installed_by_others: list[str] = field(default_factory=list)  # found installed after waiting on a lock
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, why): nothing wrong, just not needed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (module, why): the remote copy failed a check
    #: Entries whose stale compile lock was replaced by the bucket's complete copy (also in `fetched`).
    replaced: list[str] = field(default_factory=list)
    #: Cached failures (model.log) swapped for the bucket's complete copy (also in `fetched`).
    healed: list[str] = field(default_factory=list)
    #: The model's export records, read in the same request as the entries (when entries were downloaded).
    exports_read: list[CachedExport] = field(default_factory=list)
    bytes: int = 0


# ------------------------------------------------------------------------------------- planning


def _group_by_module(listing: Iterable[Mapping[str, Any]], area_prefix: str) -> dict[str, dict[str, RemoteFile]]:
    modules: dict[str, dict[str, RemoteFile]] = {}
    for item in listing:
        if item.get("type", "file") != "file":
            continue
        parsed = layout.parse_area_path(str(item.get("path", "")), area_prefix)
        remote = layout.remote_file(item) if parsed is not None else None
        if parsed is None or remote is None:
            continue
        modules.setdefault(parsed.module, {})[parsed.filename] = remote
    return modules


#: Why a cached failure is replaced: libneuronxla replays it ("Got a cached failed neff") until it is removed.
HEAL_REASON = "a cached failure here (model.log), which libneuronxla would replay: swapped for the bucket's"


def heal_line(healed: Sequence[str], compiler_version: str) -> str | None:
    """The one line that says cached failures were replaced by the bucket's entries (None: none were)."""
    if not healed:
        return None
    noun = "entry" if len(healed) == 1 else "entries"
    shown = ", ".join(f"{version_dir_name(compiler_version)}/{module}" for module in sorted(healed)[:3])
    more = f" and {len(healed) - 3} more" if len(healed) > 3 else ""
    return f"replaced {len(healed)} failed local {noun} with the bucket's complete copy ({shown}{more})"


def _local_op(module: str, files: Mapping[str, RemoteFile], entry: LocalEntry | None,
              lock_verdicts: Mapping[str, str | None]) -> FetchOp:
    if entry is None:
        return FetchOp(module, Action.INSTALL, "missing here", tuple(files.values()))
    if entry.state is EntryState.TODO:
        missing = tuple(f for name, f in files.items() if name not in entry.files)
        return FetchOp(module, Action.FILL, "a todo entry here (HLO and flags only)", missing)
    if entry.state is EntryState.LOCKED:
        why = lock_verdicts.get(module, "its lock was not examined")
        if why is None:
            return FetchOp(module, Action.REPLACE, "a compile that died left its lock here", tuple(files.values()))
        return FetchOp(module, Action.LOCKED, why)
    if entry.state is EntryState.FAILED:
        return FetchOp(module, Action.HEAL, HEAL_REASON, tuple(files.values()))
    if entry.state.publishable:
        return FetchOp(module, Action.PRESENT, "complete here")
    return FetchOp(module, Action.KEEP, f"{entry.state.value} here: never overwritten")


def plan_model_area(compiler_version: str, area_prefix: str, listing: Iterable[Mapping[str, Any]],
                    local: Mapping[str, LocalEntry], lock_verdicts: Mapping[str, str | None] | None = None) -> FetchPlan:
    """The plan for one listing of the model's area (pure: no I/O). `lock_verdicts`: for locally locked
    entries, None when the lock can be told stale, else why it cannot."""
    exports = layout.area_exports_prefix(area_prefix) + "/"
    stamp_path = layout.area_stamp_path(area_prefix)
    record_names, record_files, manifests, ignored = set(), [], [], []
    modules: dict[str, dict[str, RemoteFile]] = {}
    stamp: str | None = None
    for item in listing:  # each path parsed once: a warm run's listing is most of its client-side work
        path = str(item.get("path", ""))
        is_file = item.get("type", "file") == "file"
        parsed = layout.parse_area_path(path, area_prefix) if is_file else None
        if parsed is not None:
            remote = layout.remote_file(item)
            if remote is not None:
                modules.setdefault(parsed.module, {})[parsed.filename] = remote
        elif path.startswith(exports) and path.endswith(".json") and "/" not in path[len(exports):]:
            record_names.add(path[len(exports):])
            remote = layout.remote_file(item)
            if remote is not None and 0 < remote.size <= MAX_RECORD_BYTES:
                record_files.append(remote)
        elif layout.is_area_manifest(path, area_prefix):
            remote = layout.remote_file(item)
            if remote is not None and 0 < remote.size <= MAX_RECORD_BYTES:
                manifests.append((_listed_time(item), remote))
        elif path == stamp_path:
            stamp = layout.stamp_token(item)
        elif is_file:
            ignored.append(path)
    newest = tuple(remote for _, remote in sorted(manifests, key=lambda pair: (-pair[0], pair[1].path)))
    ops, complete = [], set()
    for module, files in sorted(modules.items()):
        if complete_remote_entry(files, compiler_version):
            complete.add(module)
            ops.append(_local_op(module, files, local.get(module), lock_verdicts or {}))
    return FetchPlan(compiler_version, area_prefix, tuple(ops), frozenset(complete), frozenset(record_names),
                     tuple(record_files), newest[:layout.MAX_AREA_MANIFESTS], tuple(ignored), stamp=stamp)


def _listed_time(item: Mapping[str, Any]) -> float:
    """A listed modification time, for ordering only (a hostile or missing one reads as 0)."""
    mtime = item.get("mtime")
    return float(mtime) if isinstance(mtime, (int, float)) and not isinstance(mtime, bool) and 0 <= mtime < 1e11 else 0.0


def flat_probe_paths(compiler_version: str, modules: Iterable[str]) -> list[str]:
    """The flat-area paths to ask about (one paths-info) to learn what the flat area holds of `modules`, and
    their digest manifests."""
    return [path for module in modules
            for path in [*(layout.flat_file_path(compiler_version, module, name) for name in sorted(layout.PUBLISHABLE_FILES)),
                         layout.flat_manifest_path(compiler_version, module)]]


def todo_probe_paths(compiler_version: str, todo: Iterable[LocalEntry]) -> list[str]:
    """Flat-area paths to ask about for local todo entries the model's area did not cover."""
    return flat_probe_paths(compiler_version, (entry.name for entry in todo))


def complete_flat_entries(compiler_version: str, paths_info: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, RemoteFile]]:
    """The complete entries in a paths-info answer about the flat area: module -> file name -> file (pure)."""
    found = _group_by_module(paths_info, layout.version_prefix(compiler_version))
    return {module: files for module, files in found.items() if complete_remote_entry(files, compiler_version)}


def flat_manifests(compiler_version: str, paths_info: Iterable[Mapping[str, Any]],
                   modules: Iterable[str]) -> tuple[RemoteFile, ...]:
    """The digest manifests of `modules` in a paths-info answer about the flat area (pure)."""
    wanted = {layout.flat_manifest_path(compiler_version, module) for module in modules}
    found = [layout.remote_file(item) for item in paths_info if item.get("path") in wanted]
    return tuple(remote for remote in found if remote is not None and 0 < remote.size <= MAX_RECORD_BYTES)


def plan_todo_fill(plan: FetchPlan, entries: Iterable[LocalEntry],
                   paths_info: Iterable[Mapping[str, Any]]) -> FetchPlan:
    """`plan` with operations for the local entries whose complete copy the flat area holds (pure): a fill for
    each todo entry, a heal for each cached failure (the compiler shim's lookup); others are left out."""
    version = plan.compiler_version
    paths_info = list(paths_info)
    found = complete_flat_entries(version, paths_info)
    fills = []
    for entry in entries:
        files = found.get(entry.name, {})
        if files and entry.state is EntryState.TODO:
            missing = tuple(f for name, f in files.items() if name not in entry.files)
            fills.append(FetchOp(entry.name, Action.FILL, "a todo entry here, filled from the flat area", missing, "flat"))
        elif files and entry.state is EntryState.FAILED:
            fills.append(FetchOp(entry.name, Action.HEAL, HEAL_REASON, tuple(files.values()), "flat"))
    manifests = flat_manifests(version, paths_info, (op.module for op in fills))
    return replace(plan, ops=plan.ops + tuple(fills), manifest_files=plan.manifest_files + manifests)


def choose_entries(records: Iterable[CachedExport], wanted: ExportFilter) -> Choice:
    """The entries a configuration needs (pure): those the records matching `wanted` list; the whole area when
    none matches, or when those that match list no entries."""
    records = tuple(records)
    matching = tuple(record for record in records if wanted.matches(record))
    listed = frozenset(module for record in matching for module in record.modules)
    return Choice(wanted, matching, records, listed if listed else None)


def narrow_plan(plan: FetchPlan, choice: Choice) -> FetchPlan:
    """`plan` for the entries `choice` lists only (pure): the model area's other entries that would be transferred
    (or are locked here) are left out, each with its reason; todo entries filled from the flat area stay (this
    host started them). Only the matching records ride along with the download, as digest manifests."""
    if choice.modules is None:
        return replace(plan, choice=choice)
    left_out = TRANSFERS | {Action.LOCKED}
    ops = tuple(FetchOp(op.module, Action.UNLISTED, UNLISTED_REASON)
                if op.source == "model" and op.action in left_out and op.module not in choice.modules else op
                for op in plan.ops)
    paths = {record.path for record in choice.matching}
    return replace(plan, ops=ops, choice=choice, record_files=tuple(f for f in plan.record_files if f.path in paths))


def needs_choice(plan: FetchPlan) -> bool:
    """Whether choosing could change `plan` (pure): it would transfer (or leaves locked) entries of the model's
    area, and the area has records to choose by. A warm plan reads no record."""
    return plan.choice is None and bool(plan.record_files) and \
        any(op.source == "model" and op.action in TRANSFERS | {Action.LOCKED} for op in plan.ops)


def choose(client: BucketClient, plan: FetchPlan, wanted: ExportFilter) -> FetchPlan:
    """`plan` narrowed to what `wanted` needs: the area's records in one download, then `narrow_plan`."""
    return narrow_plan(plan, choose_entries(read_records(client, [f.path for f in plan.record_files]), wanted))


def resolve_model_area(client: BucketClient, compiler_version: str, folder: str,
                       task: str) -> tuple[str, list[dict[str, Any]], tuple[str, ...] | None]:
    """List the model's area; reuse the casing the bucket already has for the model (ids are case-insensitive).
    Returns the area, its listing, and the folders of `models/` when they were listed.

    Warm path: one listing. Only when the exact casing holds nothing is the `models/` folder listed to find
    another casing.
    """
    area = layout.model_area_prefix(compiler_version, folder, task)
    listing = client.list(area, recursive=True)
    if listing:
        return area, listing, None
    existing = tuple(client.folders(layout.models_prefix(compiler_version)))
    cased = layout.reuse_casing(folder, existing)
    if cased == folder:
        return area, [], existing
    area = layout.model_area_prefix(compiler_version, cased, task)
    return area, client.list(area, recursive=True), existing


def model_tasks(client: BucketClient, compiler_version: str, model: layout.ModelRef) -> list[str]:
    """The tasks the bucket holds the model under for this compiler (what a fetch without a task reads): one
    listing of the model's folder; `models/` once more when the casing differs, and the model's folder in
    optimum-neuron PR #1102's layout when this layout has none."""
    tasks = client.folders(layout.model_folder_prefix(compiler_version, model.folder))
    if not tasks:
        cased = layout.reuse_casing(model.folder, client.folders(layout.models_prefix(compiler_version)))
        if cased != model.folder:
            tasks = client.folders(layout.model_folder_prefix(compiler_version, cased))
    if not tasks and not model.is_local:
        tasks = client.folders(f"{layout.version_prefix(compiler_version)}/{model.model_id}")
    return sorted({task for task in tasks if layout.is_task_name(task)})  # listed names are hostile input


def pr1102_model_area(client: BucketClient, compiler_version: str, folder: str,
                      task: str) -> tuple[str, list[dict[str, Any]]] | None:
    """The model's area in the layout of optimum-neuron's bucket PR (#1102: `neuronxcc-<ver>/<org>/<name>/<task>/`)
    and its listing without that layout's records (lookup reads those), or None when the bucket has none
    there. Asked only when this layout's area is empty: a cold miss costs one more listing."""
    if folder.startswith("local--"):
        return None
    area = layout.pr1102_area_prefix(compiler_version, "/".join(folder.split("--")), task)
    if area is None:
        return None
    listing = [item for item in client.list(area, recursive=True)
               if not layout.is_pr1102_record_path(area, str(item.get("path", "")))]
    return (area, listing) if listing else None


def with_pr1102_area(client: BucketClient, plan: FetchPlan, folder: str, task: str, local: Mapping[str, LocalEntry],
                     verdicts: Mapping[str, str | None]) -> FetchPlan:
    """`plan` (of an empty model area) with the entries of the model's area in optimum-neuron PR #1102's layout,
    when the bucket has one: installed as any others. The plan keeps this layout's area, where the run
    publishes and records (the other layout is only read)."""
    found = pr1102_model_area(client, plan.compiler_version, folder, task)
    if found is None:
        return plan
    other = plan_model_area(plan.compiler_version, found[0], found[1], local, verdicts)
    return replace(plan, ops=other.ops, ignored=other.ignored, remote_modules=other.remote_modules)


#: A host lists a model's area at least this often, even while its stamp is unchanged: what writers that leave
#: no stamp publish (earlier versions of this package, a publication killed before its last batch) is seen
#: within this time.
MEMO_SECONDS = 600.0


def memo_fresh(memo: FetchNote | None, compiler_version: str, now: float) -> bool:
    """What `memo_applies` asks of the note alone (pure): it listed an area of this compiler less than
    MEMO_SECONDS ago and found a stamp there."""
    return (memo is not None and memo.ok and memo.stamp is not None and memo.area is not None
            and memo.area.startswith(layout.models_prefix(compiler_version) + "/")
            and 0 <= now - memo.listed_at < MEMO_SECONDS)


def memo_needed(memo: FetchNote, wanted: ExportFilter | None) -> tuple[str, ...]:
    """The entries of the note's area a fetch asked for `wanted` needs (pure): those its records chose when the
    note's fetch was asked the same, else every complete entry it found."""
    if memo.needed is not None and wanted is not None and memo.wanted == wanted.key:
        return memo.needed
    return memo.remote_modules


def memo_applies(memo: FetchNote | None, compiler_version: str, local: Mapping[str, LocalEntry], now: float,
                 wanted: ExportFilter | None = None) -> bool:
    """Whether this host's last fetch of the area (its note) may stand in for a listing, provided the area's stamp
    is still the one it saw (pure): the note is fresh (`memo_fresh`), and every entry it found that this fetch
    needs (`memo_needed`) is complete here (else there is something to install or replace)."""
    return (memo_fresh(memo, compiler_version, now) and memo is not None
            and all((entry := local.get(module)) is not None and entry.state.publishable
                    for module in memo_needed(memo, wanted)))


def stamp_request(memo: FetchNote | None, compiler_version: str, now: float) -> PathsInfoRequest | None:
    """The request `plan_fetch` sends first when `memo` applies (the paths-info of `read_stamp`), or None when the
    note alone shows it cannot apply. A warm run sends it ahead, behind its handshake, before reading its local
    cache (`BucketClient.connect_ahead`); when the local cache then shows the memo does not apply, its reply is
    dropped and the area listed, one request more."""
    if not memo_fresh(memo, compiler_version, now):
        return None
    assert memo is not None and memo.area is not None
    return PathsInfoRequest((layout.area_stamp_path(memo.area),))


def memo_plan(memo: FetchNote, compiler_version: str, wanted: ExportFilter | None = None) -> FetchPlan:
    """The plan for an area whose stamp is the one `memo`'s listing saw, when `memo_applies` (pure): everything
    that listing found complete and this fetch needs is complete here; the rest, its records did not list."""
    assert memo.area is not None
    why = "complete here (the area's stamp is unchanged since this host listed it)"
    needed = set(memo_needed(memo, wanted))
    ops = tuple(FetchOp(module, Action.PRESENT, why) if module in needed
                else FetchOp(module, Action.UNLISTED, UNLISTED_REASON) for module in sorted(memo.remote_modules))
    choice = Choice(wanted, modules=frozenset(needed)) if wanted is not None and memo.wanted == wanted.key \
        and memo.needed is not None else None
    return FetchPlan(compiler_version, memo.area, ops, frozenset(memo.remote_modules), frozenset(memo.record_names),
                     stamp=memo.stamp, listed_at=memo.listed_at, choice=choice)


def read_stamp(client: BucketClient, area: str) -> str | None:
    """The area's stamp as the bucket lists it now (`layout.stamp_token`), or None when it has none. One paths-info."""
    path = layout.area_stamp_path(area)
    return next((layout.stamp_token(item) for item in client.paths_info([path]) if item.get("path") == path), None)


def plan_fetch(client: BucketClient, compiler_version: str, model_folder: str | None, task: str,
               local: Mapping[str, LocalEntry], *, missing_bucket_is_empty: bool = False,
               memo: FetchNote | None = None, wanted: ExportFilter | None = None) -> FetchPlan:
    """Ask the bucket what the model's area holds, and plan. Requests: one listing of the model's area
    (three when the casing differs from the bucket's), one paths-info when there are todo entries. With
    `memo` (this host's last fetch of the area, see `memo_applies`; `wanted`: the configuration this fetch is
    for, as that fetch's), one paths-info of the area's stamp first: unchanged, it replaces the listing."""
    plan = FetchPlan(compiler_version)
    if model_folder is not None:
        asked_at = time.time()  # before any request: a change after this instant changes the stamp read below
        try:
            pre_read = None
            if memo is not None and memo.area is not None and \
                    memo_applies(memo, compiler_version, local, asked_at, wanted):
                pre_read = (memo.area, read_stamp(client, memo.area))
            if memo is not None and pre_read is not None and pre_read[1] is not None and pre_read[1] == memo.stamp:
                plan = memo_plan(memo, compiler_version, wanted)
            else:
                plan = _plan_listed(client, compiler_version, model_folder, task, local, asked_at, pre_read)
        except BucketNotFoundError:
            if not missing_bucket_is_empty:
                raise
            return FetchPlan(compiler_version, layout.model_area_prefix(compiler_version, model_folder, task), known_models=())
    covered = {op.module for op in plan.ops}
    todo = [entry for entry in local.values() if entry.state is EntryState.TODO and entry.name not in covered]
    if todo:
        plan = plan_todo_fill(plan, todo, client.paths_info(todo_probe_paths(compiler_version, todo)))
    return plan


def _plan_listed(client: BucketClient, compiler_version: str, model_folder: str, task: str, local: Mapping[str, LocalEntry],
                 asked_at: float, pre_read: tuple[str, str | None] | None) -> FetchPlan:
    """The plan from a listing of the model's area. The stamp kept for the next run is the one read before the
    listing when there was one (`pre_read`: an area and its stamp), else the listing's own (sorted first in it)."""
    area, listing, known_models = resolve_model_area(client, compiler_version, model_folder, task)
    locked = [entry for entry in local.values() if entry.state is EntryState.LOCKED]
    verdicts: dict[str, str | None] = {}
    if locked:
        compilers = running_compilers()
        verdicts = {entry.name: why_not_stale(entry, compilers) for entry in locked}
    plan = plan_model_area(compiler_version, area, listing, local, verdicts)
    if pre_read is not None and pre_read[0] == area:
        plan = replace(plan, stamp=pre_read[1])
    plan = replace(plan, known_models=known_models, listed_at=asked_at)
    if not listing:
        plan = with_pr1102_area(client, plan, model_folder, task, local, verdicts)
    return plan


# ------------------------------------------------------------------------------------ execution


def _still_needed(op: FetchOp, target: Path, version: str) -> bool:
    """Whether the operation still applies to what is on disk now (another process may have acted)."""
    entry = read_entry(target, version)
    if op.action is Action.REPLACE:
        return entry.state is EntryState.LOCKED
    if op.action is Action.HEAL:
        return entry.state is EntryState.FAILED
    if not entry.files:
        return op.action is Action.INSTALL
    return op.action is Action.FILL and entry.state is EntryState.TODO


def _read_state(target: Path, version: str) -> EntryState:
    return read_entry(target, version).state


def _size_problem(item: FetchOp, staged: Path) -> str | None:
    """Why the staged copy of `item` cannot be installed by size, or None when every file has its listed size
    (the content itself was checked by the server against its digest)."""
    for remote in item.files:
        try:
            info = os.lstat(f"{staged}{os.sep}{remote.filename}")
        except FileNotFoundError:
            return f"{remote.filename} was not downloaded"
        if info.st_size != remote.size:
            return f"{remote.filename} has {info.st_size} bytes, the bucket lists {remote.size}"
    return None


def _install_whole(staged: Path, target: Path) -> bool:
    """Rename a complete entry into place; False if something appeared there meanwhile (kept as is). The
    version folder is made only when the rename finds it missing (one syscall per entry, not two)."""
    for attempt in (1, 2):
        try:
            os.rename(staged, target)  # fails on a non-empty target: never overwrites an entry
            return True
        except FileNotFoundError:
            if attempt == 2 or not os.path.isdir(staged):
                raise
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
    return False


def _install_replace(staged: Path, target: Path, aside: Path) -> bool:
    """Move an entry stranded by a stale lock aside (into the run's temp folder, removed with it), then rename
    the complete entry into place. False when anything else appeared there meanwhile (kept as is)."""
    try:
        os.rename(target, aside)
    except OSError:
        return False
    return _install_whole(staged, target)


def _install_heal(staged: Path, target: Path, aside: Path, version: str) -> bool:
    """Swap a cached failure for the bucket's complete entry, whole: one `renameat2(RENAME_EXCHANGE)` where the
    filesystem has it (the failure lands in the run's temp folder, removed with it), else moved aside, then the
    complete entry renamed in. Only a failure with no compile lock is touched: one that gained a lock meanwhile
    (a compile retrying it) is put back. False when the entry is no longer a cached failure (kept as is)."""
    if _read_state(target, version) is not EntryState.FAILED:
        return False
    try:
        swapped = atomic.exchange(staged, target)
    except OSError:  # the failure went away between the look and the swap
        return False
    if swapped:
        crashpoints.reached("heal")
        if any(name.endswith(LOCK_SUFFIX) for name in read_entry(staged, version).files):
            with contextlib.suppress(OSError):  # a compile took the failure between the look and the swap
                atomic.exchange(staged, target)
            return False
        return True
    try:
        os.rename(target, aside)
    except OSError:
        return False
    if any(name.endswith(LOCK_SUFFIX) for name in read_entry(aside, version).files):
        with contextlib.suppress(OSError):
            os.rename(aside, target)
        return False
    crashpoints.reached("heal")
    return _install_whole(staged, target)


def _install_fill(item: FetchOp, staged: Path, target: Path, version: str) -> bool:
    """Add the downloaded files to a todo entry, the commit file last; existing files are never replaced."""
    entry = read_entry(target, version)
    if entry.state is not EntryState.TODO or any(name.endswith(LOCK_SUFFIX) for name in entry.files):
        return False
    commit = layout.commit_file([f.filename for f in item.files] + list(entry.files), version)
    ordered = sorted(item.files, key=lambda f: f.filename == commit)
    for remote in ordered:
        try:
            os.link(staged / remote.filename, target / remote.filename)
        except FileExistsError:
            continue
    return True


def _request(remote: RemoteFile, local_path: Path | str, *, manifest: bool = False) -> DownloadFile:
    """One file of a download request: size and hash let the server skip a metadata request, the digest
    is what the server checks the bytes against (no digest, no check)."""
    return DownloadFile(remote.path, str(local_path), remote.size, remote.xet_hash,
                        remote.digest if settings.verify() else None, manifest)


def _manifest_requests(manifests: Sequence[RemoteFile], folder: Path) -> list[DownloadFile]:
    """Digest manifests to download into `folder` (never into an entry), for the server to read; none when
    verification is off (nothing would read them)."""
    if not settings.verify():
        return []
    return [_request(remote, folder / f"manifest-{index}.json", manifest=True) for index, remote in enumerate(manifests)]


def download_checked(client: BucketClient, files: Sequence[tuple[RemoteFile, Path]],
                     manifests: Sequence[RemoteFile] = ()) -> dict[Path, str]:
    """Download single files to the given local paths, in one request: each checked by the server against its
    digest (a mismatch is removed there; `manifests` bind cheaper digests, see plan_fetch) and by size here.
    The manifests land beside the first file, and are removed. Returns local path -> why it cannot be used;
    a failing request raises (RemoteError)."""
    extra = _manifest_requests(manifests, files[0][1].parent) if files else []
    try:
        reply = client.download([_request(remote, path) for remote, path in files] + extra) or {}
    finally:
        for item in extra:
            Path(item.local_path).unlink(missing_ok=True)
    refused = {str(item.get("path")): str(item.get("reason")) for item in reply.get("failed", []) if isinstance(item, dict)}
    problems: dict[Path, str] = {}
    for remote, path in files:
        if remote.path in refused:
            problems[path] = f"{remote.filename} {refused[remote.path]}"
            continue
        try:
            size = os.lstat(path).st_size
        except OSError:
            size = None
        if size != remote.size:
            problems[path] = f"{remote.path} has {size if size is not None else 'no'} bytes, the bucket lists {remote.size}"
    return problems


def heal_from_flat(client: BucketClient, root: Path, compiler_version: str, entries: Iterable[LocalEntry],
                   paths_info: Iterable[Mapping[str, Any]]) -> FetchResult:
    """Swap the cached failures among `entries` whose complete copy a paths-info answer about the flat area shows
    (the compiler shim's lookup asks for them with its own graph: no request but the download)."""
    failed = [entry for entry in entries if entry.state is EntryState.FAILED]
    return execute_fetch(client, root, plan_todo_fill(FetchPlan(compiler_version), failed, paths_info))


def execute_fetch(client: BucketClient, root: Path, plan: FetchPlan, progress: ProgressCallback | None = None) -> FetchResult:
    """Carry out the plan's transfers: download, check, install each entry whole."""
    return _Fetcher(client, root, plan.compiler_version).execute(plan, progress)


class _Fetcher:
    def __init__(self, client: BucketClient, root: Path, compiler_version: str) -> None:
        self.client = client
        self.root = root
        self.version = compiler_version
        self.state = HostState(root)

    def target(self, module: str) -> Path:
        return self.root / version_dir_name(self.version) / module

    def execute(self, plan: FetchPlan, progress: ProgressCallback | None = None) -> FetchResult:
        """Lock the entries without waiting and transfer those held; then wait (bounded) for the others,
        which their holders usually install meanwhile, and transfer those whose holder failed."""
        result = FetchResult()
        if not plan.items:
            return result
        locks = {item.module: self.state.entry_lock(self.version, item.module, "fetch") for item in plan.items}
        held: list[FetchOp] = []
        waiting: list[FetchOp] = []
        try:
            for item in plan.items:
                try:
                    locks[item.module].acquire(timeout=0)
                    held.append(item)
                except Timeout:
                    waiting.append(item)
            # The model's export records and digest manifests ride along with the first download (one request).
            self._download_and_install(held, result, progress, plan.record_files, plan.manifest_files)
            for lock in (locks[item.module] for item in held):
                lock.release()
            held = []
            deadline = time.monotonic() + settings.lock_timeout()
            for item in waiting:
                # Most of the time the holder installs the entry: then there is nothing to wait for, and
                # waiters do not pass every lock along one by one.
                if not _still_needed(item, self.target(item.module), self.version):
                    result.installed_by_others.append(item.module)
                    continue
                try:
                    locks[item.module].acquire(timeout=max(0.0, deadline - time.monotonic()), poll_interval=0.01)
                except Timeout:
                    result.failed.append((item.module, f"another process held its lock for over {settings.lock_timeout():.0f}s "
                                          "(set NEURON_CACHE_LOCK_TIMEOUT to wait longer)"))
                    continue
                if not _still_needed(item, self.target(item.module), self.version):
                    locks[item.module].release()
                    result.installed_by_others.append(item.module)
                    continue
                held.append(item)  # the holder failed: this process fetches it itself
            if held:
                self._download_and_install(held, result, progress, (), plan.manifest_files)
        finally:
            for item in held:
                locks[item.module].release()
        return result

    @staticmethod
    def _requests(items: list[FetchOp], tmp: Path) -> list[DownloadFile]:
        # Paths joined as text: a fetch names every file of every entry, and Path joins cost several times more.
        return [_request(remote, f"{tmp}{os.sep}{item.module}{os.sep}{remote.filename}") for item in items for remote in item.files]

    @staticmethod
    def _reject_unverified(items: list[FetchOp], reply: dict[str, Any], result: FetchResult) -> list[FetchOp]:
        """Drop the items with a file the server found corrupt (it removed that file): never installed."""
        bad = {str(failure.get("path")): str(failure.get("reason")) for failure in (reply or {}).get("failed", [])}
        kept = []
        for item in items:
            problems = [f"{remote.filename} {bad[remote.path]}" for remote in item.files if remote.path in bad]
            if problems:
                result.failed.append((item.module, "; ".join(problems)))
            else:
                kept.append(item)
        return kept

    def _download(self, items: list[FetchOp], tmp: Path, result: FetchResult, progress: ProgressCallback | None,
                  record_files: Sequence[RemoteFile] = (), manifest_files: Sequence[RemoteFile] = ()) -> list[FetchOp]:
        """Download every item in one request. If that fails, one bad entry (a corrupt or lying remote copy)
        must not cost the others: retry entry by entry, giving up after two failures in a row (then the
        bucket itself is failing, and the error goes up as one). Returns the items downloaded."""
        # The records are also digest manifests: the server checks files whose Xet hash they bind by BLAKE3.
        records = [_request(remote, tmp / f"record-{index}.json", manifest=settings.verify())
                   for index, remote in enumerate(record_files)]
        try:
            reply = self.client.download(self._requests(items, tmp) + records + _manifest_requests(manifest_files, tmp),
                                         progress=progress)
            for record in records:
                local = Path(record.local_path)
                if local.exists():
                    parsed = parse_record(local.read_text(encoding="utf-8", errors="replace"), record.path)
                    if parsed is not None:
                        result.exports_read.append(parsed)
            return self._reject_unverified(items, reply, result)
        except RemoteUnavailableError:
            raise  # the bucket failed as a whole (a file that does not transfer is reported in `failed`)
        except RemoteError as exc:
            if len(items) == 1:
                raise
            first_error = exc
        downloaded: list[FetchOp] = []
        failures_in_a_row = 0
        for index, item in enumerate(items):
            if failures_in_a_row >= 2:
                result.failed.extend((other.module, "not tried: the bucket failed twice in a row") for other in items[index:])
                break
            try:
                reply = self.client.download(self._requests([item], tmp))
            except RemoteError as exc:
                failures_in_a_row += 1
                result.failed.append((item.module, f"download failed: {exc}"))
                continue
            failures_in_a_row = 0
            downloaded += self._reject_unverified([item], reply, result)
        if not downloaded:
            result.failed.clear()
            raise first_error
        return downloaded

    def _download_and_install(self, items: list[FetchOp], result: FetchResult, progress: ProgressCallback | None,
                              record_files: Sequence[RemoteFile] = (), manifest_files: Sequence[RemoteFile] = ()) -> None:
        needed = [item for item in items if _still_needed(item, self.target(item.module), self.version)]
        result.installed_by_others.extend(item.module for item in items if item not in needed)
        if not needed:
            return
        with self.state.temp_dir() as tmp:
            for item in needed:
                (tmp / item.module).mkdir()
            downloaded = self._download(needed, tmp, result, progress, record_files, manifest_files)
            for item in downloaded:
                staged = tmp / item.module
                problem = _size_problem(item, staged)
                if problem:
                    result.failed.append((item.module, problem))
                    continue
                target = self.target(item.module)
                crashpoints.reached("install")
                if item.action is Action.FILL:
                    installed = _install_fill(item, staged, target, self.version)
                elif item.action is Action.REPLACE:
                    installed = _read_state(target, self.version) is EntryState.LOCKED and \
                        _install_replace(staged, target, tmp / f"stale-{item.module}")
                elif item.action is Action.HEAL:
                    installed = _install_heal(staged, target, tmp / f"failed-{item.module}", self.version)
                else:
                    installed = _install_whole(staged, target)
                if installed:
                    result.fetched.append(item.module)
                    if item.action is Action.REPLACE:
                        result.replaced.append(item.module)
                    elif item.action is Action.HEAL:
                        result.healed.append(item.module)
                    result.bytes += sum(f.size for f in item.files)
                else:
                    result.skipped.append((item.module, "a local entry appeared meanwhile; kept it"))


@dataclass
class ModelFetch:
    """What fetching a model's entries found and did."""

    #: The model's area in the bucket (with the casing the bucket has), None without a model.
    area: str | None
    plan: FetchPlan
    result: FetchResult


def fetch_model(client: BucketClient, root: Path, compiler_version: str, model_folder: str | None, task: str,
                local: Mapping[str, LocalEntry], *, missing_bucket_is_empty: bool = False,
                progress: ProgressCallback | None = None, memo: FetchNote | None = None,
                wanted: ExportFilter | None = None) -> ModelFetch:
    """Plan, then execute: install the model's entries the local cache lacks (with `wanted`, those its matching
    export records list: `choose`), and fill local todo entries from the flat area. Requests: those of
    `plan_fetch`, one download of the records when there is something to choose, then one download (none when
    nothing is needed)."""
    plan = plan_fetch(client, compiler_version, model_folder, task, local, missing_bucket_is_empty=missing_bucket_is_empty,
                      memo=memo, wanted=wanted)
    if plan.ignored:
        log.warning("optimum-neuron-cache: skipped %d name(s) the layout does not allow in %s (e.g. %r)",
                    len(plan.ignored), plan.area, plan.ignored[0][:200])
    if wanted and needs_choice(plan):
        plan = choose(client, plan, wanted)
    result = execute_fetch(client, root, plan, progress)
    if plan.choice is not None and plan.choice.records:
        result.exports_read = list(plan.choice.records)  # every record, read before the entries
    return ModelFetch(plan.area, plan, result)


# ------------------------------------------------------------------------------ one fetch per host


@dataclass(frozen=True)
class FetchNote:
    """What a host's fetch of a model area found, left for the processes that waited for it: they take it
    instead of listing the bucket and planning again."""

    key: str
    finished_at: float
    #: False when the fetch failed as a whole (the bucket unavailable): `error` says why, once for everyone.
    ok: bool
    error: str = ""
    area: str | None = None
    remote_modules: tuple[str, ...] = ()
    record_names: tuple[str, ...] = ()
    known_models: tuple[str, ...] | None = None
    #: The area's stamp when it was last listed, and when (`FetchPlan.stamp`, `listed_at`): the next run of this
    #: host compares the stamp instead of listing again (`memo_applies`).
    stamp: str | None = None
    listed_at: float = 0.0
    #: The configuration that fetch was asked for (`ExportFilter.key`), and the entries its records listed
    #: (None: every complete entry of the area): the next run asked the same needs only those (`memo_needed`).
    wanted: str | None = None
    needed: tuple[str, ...] | None = None

    def to_json(self) -> bytes:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes, key: str) -> FetchNote | None:
        """The note in a gate file, or None when it is not one of `key` (torn, foreign, malformed)."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("key") != key:
                return None
            names = [data.get(name) for name in ("remote_modules", "record_names")]
            known = data.get("known_models")
            if not all(isinstance(items, list) and all(isinstance(n, str) for n in items) for items in names) or \
                    not (known is None or (isinstance(known, list) and all(isinstance(n, str) for n in known))) or \
                    not isinstance(data.get("finished_at"), (int, float)) or not isinstance(data.get("ok"), bool) or \
                    not isinstance(data.get("error", ""), str) or not (data.get("area") is None or isinstance(data["area"], str)) or \
                    not (data.get("stamp") is None or isinstance(data["stamp"], str)) or \
                    isinstance(data.get("listed_at", 0.0), bool) or not isinstance(data.get("listed_at", 0.0), (int, float)):
                return None
            wanted, needed = data.get("wanted"), data.get("needed")
            if not (wanted is None or isinstance(wanted, str)) or \
                    not (needed is None or (isinstance(needed, list) and all(isinstance(n, str) for n in needed))):
                return None
            return cls(key, float(data["finished_at"]), data["ok"], data.get("error", ""), data.get("area"),
                       tuple(names[0]), tuple(names[1]), tuple(known) if known is not None else None,
                       data.get("stamp"), float(data.get("listed_at", 0.0)), wanted,
                       tuple(needed) if needed is not None else None)
        except (ValueError, TypeError):
            return None


class HostFetchGate:
    """One fetch of a model area per host at a time: 32 ranks entering together make one listing, one plan and
    one download; the other 31 wait on the gate, then take the fetcher's note (no request, no plan).

    The gate is a lock file (`HostState.fetch_gate_path`). `lead` takes it exclusively without waiting: the
    holder fetches, then `release`s it with its note written into the same file (one pwrite, no rename: a
    warm run pays microseconds for it). A process that cannot lead `wait`s for a shared lock (the fetcher is
    done), reads the note, and lets go at once. The kernel releases a dead holder's lock: waiters then find a
    note that is not fresh, and fetch themselves."""

    #: A note older than this when the wait began is another fetch's: the waiter fetches itself.
    FRESH_SECONDS = 5.0

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self._fd: int | None = None
        self._size = 0  # of the gate file when taken: a shorter note is padded to it, never truncated
        #: The note the last fetch of this area on this host left (read by `lead`): its listing may stand in for
        #: this one's while the area's stamp is unchanged (`memo_applies`).
        self.previous: FetchNote | None = None

    def lead(self) -> bool:
        """Take the gate if nobody holds it: True means this process fetches (then `release`)."""
        try:
            fd = open_state_file(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except RefusedStateFile as exc:  # a FIFO there would block waiters: it goes (a lock file of ours)
            log.warning("optimum-neuron-cache: removing %s (%s): not a fetch gate of this package's", self.path,
                        exc.why)
            os.unlink(self.path)
            fd = open_state_file(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raw = os.pread(fd, MAX_RECORD_BYTES + 1, 0)
            self._size = len(raw)
            self.previous = FetchNote.parse(raw, self.key)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self, note: FetchNote | None) -> None:
        """Leave the note (None: a fetch that did not finish: waiters fetch themselves), then let go."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            data = note.to_json() if note is not None else b""
            if len(data) < self._size:  # JSON allows trailing blanks; all blanks is no note: no ftruncate
                data += b" " * (self._size - len(data))
            os.pwrite(fd, data, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock

    def wait(self, timeout: float) -> FetchNote | None:
        """Wait (bounded) until the fetcher lets go, and return its note; None when there is none to take (it
        died, failed before planning, or the wait timed out): then the caller fetches itself.

        The wait is a blocking flock on a helper thread (a waiting rank uses no CPU, and wakes the moment the
        fetcher lets go); the thread owns the file, and one that outlives a timed-out wait closes it when it
        gets the lock."""
        began = time.time()
        fd = open_state_file(self.path)
        read: list[bytes] = []
        done = threading.Event()

        def block() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                read.append(os.pread(fd, MAX_RECORD_BYTES, 0))
            except OSError:
                pass
            finally:
                os.close(fd)
                done.set()

        threading.Thread(target=block, name="fetch-gate", daemon=True).start()
        if not done.wait(timeout) or not read:
            return None
        note = FetchNote.parse(read[0], self.key)
        return note if note is not None and note.finished_at >= began - self.FRESH_SECONDS else None
