"""Sync: plan which local success entries the bucket lacks, then publish them, content before commit file.

Planning asks the bucket about the entries' commit files with one paths-info (never a listing). Publishing
is two requests, so that a reader never finds a commit file whose content is missing:
  - a stage: the server uploads every byte (one Xet upload session) and adds nothing yet;
  - a commit of two phases, the second sent by the server only once the first has landed whole:
    1. the content files, into the flat area and the model's area;
    2. the commit files of both areas, the digest manifests, the export records, the areas' stamps;
then one paths-info confirms the content is still there (a concurrent `neuron-cache prune` may have removed
it between the phases: see prune.py), and removes the commit files of any entry it is not.
Every publish leaves digest manifests (docs/remote-layout.md): the server describes each file it uploads
(Xet hash and BLAKE3), and a manifest beside the flat entry and one in the model's area bind the two, so a
reader's bucket server checks those files by BLAKE3, several times cheaper than recomputing a Xet hash.
Export records carry the same bindings (readers of earlier versions use those).
Only allow-listed files of success entries ever leave the machine; a node-wide lock per entry makes many
ranks exiting at once publish each entry once.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from bucket_server.messages import AddFile, BatchRequest, CopyFile

from . import crashpoints
from . import remote_layout as layout
from .client import BucketClient, ProgressCallback
from .errors import RemoteError
from .host_state import HostState
from .local_cache import LocalEntry, scan_entries
from .records import ExportRecord

log = logging.getLogger("optimum_neuron_cache")


@dataclass(frozen=True)
class PublishItem:
    """One entry to publish, and where: the flat area, the model's area, or both."""
    entry: LocalEntry
    to_flat: bool
    #: The model's area prefix to publish to, or None (no model, or it already holds the entry).
    to_model: str | None

    @property
    def files(self) -> list[str]:
        """The entry's files that may leave the machine (the allow-list), sorted."""
        return sorted(name for name in self.entry.files if layout.is_publishable(name))

    @property
    def commit(self) -> str:
        """The file published last: `model.done`, or the NEFF of a legacy entry."""
        return layout.commit_file(self.entry.files, self.entry.compiler_version)


#: An export record to write, and its bucket path.
RecordWrite = tuple[str, ExportRecord]


@dataclass(frozen=True)
class SyncPlan:
    """What to publish and why (each item says where it goes); immutable once planned."""

    items: tuple[PublishItem, ...] = ()
    #: Export records to write in the last batch (their path, the record).
    records: tuple[RecordWrite, ...] = ()
    #: The bucket, and when the bucket was asked (before the paths-info): a publication of the same entry by
    #: another process of this host after that instant makes ours redundant.
    bucket: str = ""
    planned_at: float = field(default_factory=time.time)
    #: Entries the bucket already holds wherever they were asked for: nothing to do.
    present: tuple[str, ...] = ()

    @property
    def bytes_to_upload(self) -> int:
        """Bytes the plan uploads (copies into the model's area move none)."""
        return sum(item.entry.files[name] for item in self.items if item.to_flat for name in item.files)

    @property
    def empty(self) -> bool:
        """Nothing to publish and no record to write."""
        return not self.items and not self.records


@dataclass
class SyncResult:
    """What executing a publish plan did."""
    published: list[str] = field(default_factory=list)  # MODULE names this process published
    #: (module, why) left to another process of this host: publishing it right now, or did meanwhile.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Export records written, as bucket paths.
    record_paths: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    #: Entries another process of this host is publishing at this instant: not committed yet.
    in_progress: list[str] = field(default_factory=list)
    #: Entries whose content a concurrent prune removed before their commit files landed: those commit files
    #: were removed again, and the entries stay journaled.
    unconfirmed: list[str] = field(default_factory=list)


def probe_paths(entries: Iterable[LocalEntry], model_area: str | None, known_in_model_area: Collection[str] = frozenset()) -> list[str]:
    """The commit-file paths to ask the bucket about (one paths-info) before publishing `entries`."""
    probes = []
    for entry in entries:
        if entry.state.publishable:
            commit = layout.commit_file(entry.files, entry.compiler_version)
            probes.append(layout.flat_file_path(entry.compiler_version, entry.name, commit))
            if model_area and entry.name not in known_in_model_area:
                probes.append(layout.area_file_path(model_area, entry.name, commit))
    return probes


def plan_from_presence(entries: Iterable[LocalEntry], model_area: str | None, present: Collection[str], *,
                       known_in_model_area: Collection[str] = frozenset(), records: Iterable[RecordWrite] = (),
                       bucket: str = "", planned_at: float | None = None) -> SyncPlan:
    """The plan, given which probed paths the bucket holds (pure: no I/O). Only success entries are ever
    planned; each goes wherever its commit file is missing."""
    items, already = [], []
    for entry in entries:
        if not entry.state.publishable:
            continue
        commit = layout.commit_file(entry.files, entry.compiler_version)
        flat_missing = layout.flat_file_path(entry.compiler_version, entry.name, commit) not in present
        model_missing = (bool(model_area) and entry.name not in known_in_model_area
                         and layout.area_file_path(model_area, entry.name, commit) not in present)
        if flat_missing or model_missing:
            items.append(PublishItem(entry, flat_missing, model_area if model_missing else None))
        else:
            already.append(entry.name)
    return SyncPlan(tuple(items), tuple(records), bucket, time.time() if planned_at is None else planned_at, tuple(already))


def plan_sync(client: BucketClient, entries: Iterable[LocalEntry], model_area: str | None,
              known_in_model_area: Collection[str] = frozenset(), records: Iterable[RecordWrite] = ()) -> SyncPlan:
    """Which of `entries` (success entries) the flat area and the model's area lack, by one paths-info on
    their commit files. Entries the model's listing already showed complete are not asked about."""
    planned_at = time.time()  # before asking: a publication by another process after this makes ours redundant
    entries = list(entries)
    probes = probe_paths(entries, model_area, known_in_model_area)
    present = {item["path"] for item in client.paths_info(probes) if isinstance(item.get("path"), str)} if probes else set()
    return plan_from_presence(entries, model_area, present, known_in_model_area=known_in_model_area, records=records,
                              bucket=str(client.bucket), planned_at=planned_at)


def execute_sync(client: BucketClient, state: HostState, plan: SyncPlan, progress: ProgressCallback | None = None) -> SyncResult:
    """Publish the plan's items, content before commit files, then its export records. Each entry is taken
    under its host-wide publish lock without waiting: one another process of this host is publishing, or
    published after this plan was made, is left to it (and reported in `skipped`)."""
    result = SyncResult()
    locks = []
    items: list[PublishItem] = []
    try:
        for item in plan.items:
            lock = state.entry_lock(item.entry.compiler_version, item.entry.name, "publish")
            try:
                lock.acquire(timeout=0)
            except Timeout:  # another process of this host is publishing it right now
                result.skipped.append((item.entry.name, "being published by another process on this host"))
                result.in_progress.append(item.entry.name)
                continue
            locks.append(lock)
            # Another process of this host may have published it between our paths-info and our lock.
            flat = item.to_flat and not state.published_since(plan.bucket, _flat_prefix(item), plan.planned_at)
            model = item.to_model if item.to_model and not state.published_since(
                plan.bucket, _model_prefix(item), plan.planned_at) else None
            if not flat and not model:
                result.skipped.append((item.entry.name, "published by another process on this host meanwhile"))
                continue
            items.append(dataclasses.replace(item, to_flat=flat, to_model=model))
        _publish(client, items, result, progress, plan.records)
        confirmed = [item for item in items if item.entry.name not in result.unconfirmed]
        state.mark_published(plan.bucket, [_flat_prefix(item) for item in confirmed if item.to_flat]
                             + [_model_prefix(item) for item in confirmed if item.to_model])
        result.record_paths = [path for path, _ in plan.records]
    finally:
        for lock in locks:
            lock.release()
    return result


def published_meanwhile(state: HostState, plan: SyncPlan, item: PublishItem) -> bool:
    """Whether another process of this host published every destination of `item` after `plan` was made
    (its publication markers, set once its last batch is acknowledged)."""
    return ((not item.to_flat or state.published_since(plan.bucket, _flat_prefix(item), plan.planned_at))
            and (not item.to_model or state.published_since(plan.bucket, _model_prefix(item), plan.planned_at)))


def _flat_prefix(item: PublishItem) -> str:
    """The entry's folder in the flat area, as the host's publication markers name it."""
    return layout.flat_entry_prefix(item.entry.compiler_version, item.entry.name) + "/"


def _model_prefix(item: PublishItem) -> str:
    assert item.to_model is not None
    return layout.area_entry_prefix(item.to_model, item.entry.name) + "/"


def _publish(client: BucketClient, items: list[PublishItem], result: SyncResult, progress: ProgressCallback | None,
             records: tuple[RecordWrite, ...] = ()) -> None:
    """Stage every byte the items upload (their files, commit files included) and get them described; then
    one commit of two phases: the content (to the flat area; to the model's area by the staged bytes, or by a
    copy of the flat area's), then the commit files, the digest manifests that bind the described files, the
    export records and the areas' stamps (last). A record only names entries, and readers install an entry
    only once it is committed."""
    staged: list[AddFile] = []
    for item in items:
        if item.to_flat:
            for name in item.files:
                staged.append(AddFile(layout.flat_file_path(item.entry.compiler_version, item.entry.name, name),
                                      str(item.entry.path / name),
                                      describe=name != item.commit or bool(item.entry.files[name])))
                result.bytes_uploaded += item.entry.files[name]
    described: dict[str, Any] = {}
    stage = ""
    if staged:
        reply = client.stage(staged, progress=progress)
        crashpoints.reached("stage-done")
        stage, described = reply.get("stage") or "", reply.get("described") or {}
    content: list[AddFile] = []
    copies: list[CopyFile] = []
    commits: list[AddFile] = []
    for item in items:
        for name in item.files:
            local = str(item.entry.path / name)
            flat = layout.flat_file_path(item.entry.compiler_version, item.entry.name, name)
            area = layout.area_file_path(item.to_model, item.entry.name, name) if item.to_model else None
            into = commits if name == item.commit else content
            if item.to_flat:
                into.append(AddFile(flat, local))
            if area and (item.to_flat or name == item.commit):
                into.append(AddFile(area, local))  # the bytes staged for the flat area (or the commit file's)
            elif area:  # the flat area holds the entry already: copy its content there, by hash, on the Hub's side
                copies.append(CopyFile(flat, area))
    last = commits + [_record_item(record, path, described) for path, record in records]
    last += _flat_manifests(items, described) + _area_manifests(items, described)
    last += _stamps(items, records)  # last: a reader that sees a new stamp sees everything above
    if not (content or copies or last):
        return
    try:
        client.commit(stage, [BatchRequest(tuple(content), tuple(copies), ()), BatchRequest(tuple(last), (), ())],
                      progress=progress)
        crashpoints.reached("commit-done")
    except RemoteError:
        # The Hub may apply a batch in part: its adds (commit files) land while copies whose source a concurrent
        # prune removed fail. Take back the commit files of entries whose content is not all there, then fail.
        _confirm(client, items)
        raise
    undone = _confirm(client, items)
    result.published.extend(item.entry.name for item in items if item.entry.name not in undone)
    result.unconfirmed.extend(sorted(undone))


def _content_paths(item: PublishItem) -> list[str]:
    """Where the item's content files (all but the commit file) now are: flat area, model area, or both."""
    names = [name for name in item.files if name != item.commit]
    paths = [layout.flat_file_path(item.entry.compiler_version, item.entry.name, n) for n in names] if item.to_flat else []
    return paths + ([layout.area_file_path(item.to_model, item.entry.name, n) for n in names] if item.to_model else [])


def _commit_paths(item: PublishItem) -> list[str]:
    paths = [layout.flat_file_path(item.entry.compiler_version, item.entry.name, item.commit)] if item.to_flat else []
    return paths + ([layout.area_file_path(item.to_model, item.entry.name, item.commit)] if item.to_model else [])


def _confirm(client: BucketClient, items: list[PublishItem]) -> set[str]:
    """After the last batch, is every content file still there? A `neuron-cache prune` of the same entry that
    ran between our batches may have removed content we uploaded before our commit file landed. Entries with
    content missing get their commit files removed again (no reader may install them) and are not counted
    as published, so they stay journaled for the next run. One paths-info. Best effort: when the bucket cannot
    be asked right now, nothing more can be done either; only a prune racing at that very moment could have
    left a half entry, and `neuron-cache scrub` reports it (`--repair` un-commits it)."""
    wanted = {item.entry.name: _content_paths(item) for item in items}
    asked = [path for paths in wanted.values() for path in paths]
    if not asked:
        return set()
    try:
        present = {info["path"] for info in client.paths_info(asked) if isinstance(info.get("path"), str)}
    except RemoteError as exc:
        log.info("optimum-neuron-cache: could not confirm the published content: %s", exc)
        return set()
    undone = {item.entry.name: item for item in items if any(p not in present for p in wanted[item.entry.name])}
    if undone:
        log.warning("optimum-neuron-cache: %d entries lost content to a concurrent prune while they were published "
                    "(e.g. %s); they stay queued for the next run", len(undone), next(iter(undone)))
        try:
            client.batch(delete=[p for item in undone.values() for p in _commit_paths(item)])
        except RemoteError as exc:
            log.info("optimum-neuron-cache: could not take back their commit files: %s", exc)
    return set(undone)


def _bindings(item: PublishItem, described: dict[str, Any]) -> dict[str, str]:
    """Xet hash -> digest of the item's files the server described (a Hub bucket; a directory bucket
    describes no Xet hash: its own sidecars carry the digests)."""
    bindings = {}
    for name in item.files:
        info = described.get(layout.flat_file_path(item.entry.compiler_version, item.entry.name, name))
        if isinstance(info, dict) and info.get("xet_hash") and info.get("digest"):
            bindings[str(info["xet_hash"])] = str(info["digest"])
    return bindings


def _flat_manifests(items: list[PublishItem], described: dict[str, Any]) -> list[AddFile]:
    """The digest manifests of the flat entries published (`digests/MODULE_<key>.json`), from what the stage
    described."""
    return [AddFile(layout.flat_manifest_path(item.entry.compiler_version, item.entry.name),
                    content=layout.digest_manifest(bindings)[1])
            for item in items if item.to_flat if (bindings := _bindings(item, described))]


def _area_manifests(items: list[PublishItem], described: dict[str, Any]) -> list[AddFile]:
    """One digest manifest per model area published to, binding every file of its entries that the
    server described (`<area>/digests/<id>.json`, named by content)."""
    by_area: dict[str, dict[str, str]] = {}
    for item in items:
        if item.to_model:
            by_area.setdefault(item.to_model, {}).update(_bindings(item, described))
    manifests = []
    for area, bindings in sorted(by_area.items()):
        if bindings:
            name, text = layout.digest_manifest(bindings)
            manifests.append(AddFile(f"{layout.area_manifests_prefix(area)}/{name}", content=text))
    return manifests


def _stamps(items: list[PublishItem], records: tuple[RecordWrite, ...]) -> list[AddFile]:
    """A new stamp for every model area this publication writes to (docs/remote-layout.md#area-stamps): the
    hosts that listed the area before see it change, and list it again."""
    areas = {item.to_model for item in items if item.to_model}
    return stamp_items(areas | {area for path, _ in records if (area := layout.record_area(path)) is not None})


def stamp_items(areas: Iterable[str]) -> list[AddFile]:
    """Batch adds of a new stamp for each model area (docs/remote-layout.md#area-stamps), to ride last in the
    batch that changes the area: every writer into an area uses this."""
    return [AddFile(layout.area_stamp_path(area), content=layout.area_stamp(time.time(), secrets.token_hex(16)))
            for area in sorted(set(areas))]


def _record_item(record: ExportRecord, path: str, described: dict[str, Any]) -> AddFile:
    """The export record as a batch add, with the digests the server recorded for the files it uploaded
    added to those it already carries."""
    digests = {info["xet_hash"]: info["digest"] for info in described.values()
               if isinstance(info, dict) and info.get("xet_hash") and info.get("digest")}
    if digests:
        record = dataclasses.replace(record, digests=dict(sorted({**record.digests, **digests}.items())))
    return AddFile(path, content=record.to_json())


@dataclass
class VersionSync:
    """One compiler version of `neuron-cache sync`: its plan, and what was done (None on a dry run)."""
    compiler_version: str
    plan: SyncPlan
    result: SyncResult | None = None


def sync_cache(client: BucketClient, root: Path, *, compiler_version: str | None = None, model_folder: str | None = None,
               task: str = layout.DEFAULT_TASK, dry_run: bool = False, progress: ProgressCallback | None = None) -> list[VersionSync]:
    """Publish every local success entry the bucket lacks (the explicit push of CI jobs and
    neuron_parallel_compile users): to the flat area, and to a model's area when one is named. Journaled like
    every publish; what earlier runs of the same key left in the journal is covered by it."""
    from .journal import JournalKey
    from .publish import publish_leftovers

    by_version: dict[str, list[LocalEntry]] = {}
    for entry in scan_entries(root, compiler_version):
        if entry.state.publishable:
            by_version.setdefault(entry.compiler_version, []).append(entry)
    report = []
    for version, entries in sorted(by_version.items()):
        area = None
        if model_folder is not None:
            models = client.folders(layout.models_prefix(version))
            area = layout.model_area_prefix(version, layout.reuse_casing(model_folder, models), task)
        if dry_run:
            report.append(VersionSync(version, plan_sync(client, entries, area)))
            continue
        key = JournalKey(str(client.bucket), version, model_folder, task)
        publication = publish_leftovers(client, root, key, area=area, with_entries=entries, progress=progress)
        assert publication is not None  # `entries` is never empty here
        report.append(VersionSync(version, publication.plan, publication.result))
    return report
