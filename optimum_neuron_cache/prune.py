"""Prune: remove from a bucket what a policy says nobody needs. Plan (pure, on a survey), then execute.

Policies (any combination): keep the newest K compiler versions; drop named compiler versions; drop named
models' areas; drop flat entries that no model area or export record references and that are older than an
age; drop entries that never got their commit file (a publisher that died) older than an age; drop export
records whose entries are gone. A plan that would leave the bucket without a single complete entry is
refused unless the caller allows it.

Execution order (docs/remote-layout.md, "Removing"): export records, then commit files, then content, in
batches. A reader therefore never finds a record naming an entry being removed, nor a commit file without
its content. A publisher of the same entry racing the prune is never left with a half entry: the prune asks
the bucket once more, after its last batch, for the commit files it removed, and removes again any that a
publisher wrote back over missing content; the publisher, after its own last batch, checks that its content
is still there (sync._confirm). Whichever of the two acts last sees the other's work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import remote_layout as layout
from .client import BucketClient
from .errors import ConfigurationError, RemoteUnavailableError
from .survey import BucketSurvey, RemoteEntry, VersionSurvey

#: A record whose entries are gone is removed only when it is older than this: a publisher writes its record
#: in its last batch, and a listing walked while it lands may show the record before the entries.
RECORD_GRACE = 3600.0
#: Paths per delete batch: each batch is one request to the server (one Hub commit).
BATCH_PATHS = 1000


class PruneRefused(ConfigurationError):
    """The plan would remove every complete entry of the bucket, and the caller did not allow it."""


@dataclass(frozen=True)
class PrunePolicy:
    """What to remove. Ages are in seconds; None turns a policy off."""

    keep_versions: int | None = None
    drop_versions: tuple[str, ...] = ()
    #: Model folders (as `remote_layout.model_ref` gives them; matched case-insensitively) whose areas go.
    models: tuple[str, ...] = ()
    #: With `models`: only this task's area (None: every task).
    task: str | None = None
    #: With `models`: only under these compiler versions (empty: every version).
    model_versions: tuple[str, ...] = ()
    unreferenced_older_than: float | None = None
    incomplete_older_than: float | None = None
    dangling_records: bool = False

    @property
    def empty(self) -> bool:
        """No policy given: nothing would ever be removed."""
        return (self.keep_versions is None and not self.drop_versions and not self.models
                and self.unreferenced_older_than is None and self.incomplete_older_than is None
                and not self.dangling_records)

    @property
    def needs_records(self) -> bool:
        """Whether planning reads the export records (to know what they reference)."""
        return self.unreferenced_older_than is not None or self.dangling_records


@dataclass(frozen=True)
class RemoveEntry:
    """An entry to remove: its commit file first, then the rest."""

    compiler_version: str
    #: "" for the flat area, else `<model folder>/<task>`.
    area: str
    module: str
    commit_paths: tuple[str, ...]
    content_paths: tuple[str, ...]
    bytes: int
    reason: str

    @property
    def complete(self) -> bool:
        """A reader would install it now (so its commit file goes in the first batches)."""
        return bool(self.commit_paths)


@dataclass(frozen=True)
class RemoveFile:
    """A file to remove that is not part of an entry: an export record, or a name the layout does not allow
    under a compiler version being removed whole."""

    path: str
    bytes: int
    reason: str
    kind: str  # "record", "stray", "manifest" (a digest manifest of what goes) or "stamp" (an area's stamp)


@dataclass(frozen=True)
class PrunePlan:
    """What a prune removes, and why; immutable once planned."""

    records: tuple[RemoveFile, ...] = ()
    entries: tuple[RemoveEntry, ...] = ()
    strays: tuple[RemoveFile, ...] = ()
    #: The stamps of the model areas the plan changes, removed first: hosts that listed an area before list it
    #: again (docs/remote-layout.md#area-stamps) until a publication stamps it anew.
    stamps: tuple[RemoveFile, ...] = ()
    #: Complete entries in the bucket (every area) before and after the plan.
    complete_before: int = 0
    complete_after: int = 0

    @property
    def bytes(self) -> int:
        """Bytes the plan frees (listed sizes; on a Hub bucket, copies share storage, so the bill drops less)."""
        return (sum(r.bytes for r in self.records) + sum(e.bytes for e in self.entries) + sum(s.bytes for s in self.strays)
                + sum(s.bytes for s in self.stamps))

    @property
    def files(self) -> int:
        """Files the plan deletes."""
        return (len(self.records) + len(self.strays) + len(self.stamps)
                + sum(len(e.commit_paths) + len(e.content_paths) for e in self.entries))

    @property
    def empty(self) -> bool:
        """Nothing to remove."""
        return not (self.records or self.entries or self.strays)

    @property
    def removes_everything(self) -> bool:
        """The bucket would be left without a complete entry (it had some)."""
        return self.complete_before > 0 and self.complete_after == 0


def _entry_op(entry: RemoteEntry, reason: str) -> RemoveEntry:
    commit = entry.commit_name if entry.complete else None
    return RemoveEntry(entry.compiler_version, entry.area, entry.module,
                       tuple(entry.paths([commit])) if commit else (),
                       tuple(entry.paths(name for name in entry.files if name != commit)), entry.bytes, reason)


def _versions_dropped(survey: BucketSurvey, policy: PrunePolicy) -> dict[str, str]:
    """Compiler version -> why it goes whole. `keep_versions` counts only the versions in use (a folder that
    holds a stray file is no compiler version: counted, it would push a real one out), and removes no other."""
    dropped: dict[str, str] = {}
    ordered = [version for version in survey.ordered_versions() if survey.versions[version].in_use]
    if policy.keep_versions is not None:
        kept = ordered[len(ordered) - policy.keep_versions:] if policy.keep_versions else []
        for version in ordered:
            if version not in kept:
                dropped[version] = f"not among the newest {policy.keep_versions} compiler versions"
    for version in policy.drop_versions:
        if version in survey.versions:
            dropped.setdefault(version, "compiler version named for removal")
    return dropped


def _area_named(area: str, version: str, policy: PrunePolicy) -> bool:
    if not area or not policy.models or (policy.model_versions and version not in policy.model_versions):
        return False
    folder, _, task = area.partition("/")
    return (folder.lower() in {m.lower() for m in policy.models}
            and (policy.task is None or task == policy.task))


def _stamps_of_changed_areas(found: VersionSurvey, records: list[RemoveFile], entries: list[RemoveEntry],
                             version_dropped: bool) -> list[RemoveFile]:
    """The stamps of the areas of this version that the removals change (all of them when the version goes)."""
    wheres = [layout.split_version_path(found.compiler_version, r.path) for r in records]
    changed = {where.area for where in wheres if where is not None and where.area}
    changed |= {e.area for e in entries if e.compiler_version == found.compiler_version and e.area}
    return [RemoveFile(f.path, f.size, "the area changes: hosts that listed it list it again", "stamp")
            for area, f in sorted(found.stamps.items()) if version_dropped or area in changed]


def _plan_version(found: VersionSurvey, policy: PrunePolicy, dropped_why: str | None, now: float,
                  records: list[RemoveFile], entries: list[RemoveEntry], strays: list[RemoveFile],
                  stamps: list[RemoveFile]) -> None:
    """The removals of one compiler version, appended to the lists."""
    version = found.compiler_version
    if dropped_why is not None:
        records += [RemoveFile(r.file.path, r.file.size, dropped_why, "record") for r in found.records]
        entries += [_entry_op(e, dropped_why) for e in found.entries.values()]
        strays += [RemoveFile(f.path, f.size, dropped_why, "stray") for f in found.bad_names]
        strays += [RemoveFile(f.path, f.size, dropped_why, "manifest") for f in found.manifests]
        stamps += _stamps_of_changed_areas(found, records, entries, True)
        return
    gone: set[tuple[str, str]] = set()
    named_records = set()
    for record in found.records:
        if _area_named(record.area, version, policy):
            records.append(RemoveFile(record.file.path, record.file.size, f"area of a model named for removal ({record.area})", "record"))
            named_records.add(record.file.path)
    for key, entry in sorted(found.entries.items()):
        if _area_named(entry.area, version, policy):
            entries.append(_entry_op(entry, f"area of a model named for removal ({entry.area})"))
            gone.add(key)
        elif (policy.incomplete_older_than is not None and not entry.complete
              and _older(entry.newest_upload, policy.incomplete_older_than, now)):
            entries.append(_entry_op(entry, f"never committed (no {entry.commit_name}), last written "
                                            f"{_age_text(now - (entry.newest_upload or now))} ago"))
            gone.add(key)
    kept_records = [r for r in found.records if r.file.path not in named_records]
    if policy.unreferenced_older_than is not None:
        referenced = {module for (area, module) in found.entries if area and (area, module) not in gone}
        referenced |= {module for r in kept_records if r.record is not None for module in r.record.modules}
        for key, entry in sorted(found.entries.items()):
            if (key[0] == "" and key not in gone and entry.complete and entry.module not in referenced
                    and _older(entry.newest_upload, policy.unreferenced_older_than, now)):
                entries.append(_entry_op(entry, "no model area or export record references it, last written "
                                                f"{_age_text(now - (entry.newest_upload or now))} ago"))
                gone.add(key)
    strays += _manifests_gone(found, gone, policy)
    if policy.dangling_records:
        for record in kept_records:
            if record.record is None or not record.record.modules:
                continue
            present = {module for (area, module), e in found.entries.items()
                       if area == record.area and e.complete and (area, module) not in gone}
            missing = [m for m in record.record.modules if m not in present]
            if missing and _older(record.file.uploaded, RECORD_GRACE, now):
                records.append(RemoveFile(record.file.path, record.file.size,
                                          f"{len(missing)} of its {len(record.record.modules)} entries are gone from its area",
                                          "record"))
    stamps += _stamps_of_changed_areas(found, records, entries, False)


def _manifests_gone(found: VersionSurvey, gone: set[tuple[str, str]], policy: PrunePolicy) -> list[RemoveFile]:
    """Digest manifests that describe only what this prune removes: a removed flat entry's, and those of an
    area named for removal (a manifest left behind binds nothing a reader downloads: harmless, but litter)."""
    version = found.compiler_version
    flat_gone = {module for area, module in gone if not area}
    removed = []
    for listed in found.manifests:
        where = layout.split_version_path(version, listed.path)
        if where is None:
            continue
        if (not where.area and where.manifest[:-len(".json")] in flat_gone) or \
                (where.area and _area_named(where.area, version, policy)):
            removed.append(RemoveFile(listed.path, listed.size, "describes only what this prune removes", "manifest"))
    return removed


def _older(uploaded: float | None, age: float, now: float) -> bool:
    """Written more than `age` seconds ago; an unknown time is never old."""
    return uploaded is not None and now - uploaded > age


def _age_text(seconds: float) -> str:
    days, rest = divmod(max(0, int(seconds)), 86400)
    return f"{days}d" if days else f"{rest // 3600}h{rest % 3600 // 60:02d}m"


def plan_prune(survey: BucketSurvey, policy: PrunePolicy, *, now: float | None = None, allow_all: bool = False) -> PrunePlan:
    """What `policy` removes from the surveyed bucket (pure: no I/O). Raises PruneRefused when the plan would
    leave no complete entry, unless `allow_all`."""
    if policy.needs_records and not all(v.records_read for v in survey.versions.values()):
        raise ValueError("this policy needs the survey's export records (survey_bucket(with_records=True))")
    unread = [path for v in survey.versions.values() for path in v.unread_records]
    if policy.needs_records and unread:  # what they name is unknown: an entry only they reference would go
        raise RemoteUnavailableError(f"{len(unread)} export record(s) did not transfer (e.g. {unread[0]}); this prune "
                                     "needs what they name: run it again")
    now = time.time() if now is None else now
    dropped = _versions_dropped(survey, policy)
    records: list[RemoveFile] = []
    entries: list[RemoveEntry] = []
    strays: list[RemoveFile] = []
    stamps: list[RemoveFile] = []
    for version in survey.ordered_versions():
        _plan_version(survey.versions[version], policy, dropped.get(version), now, records, entries, strays, stamps)
    before = survey.complete_entries()
    plan = PrunePlan(tuple(records), tuple(entries), tuple(strays), tuple(stamps), before,
                     before - sum(1 for e in entries if e.complete))
    if plan.removes_everything and not allow_all:
        raise PruneRefused(f"this prune would remove all {before} complete entries of the bucket; "
                           "pass --all if that is what you want")
    return plan


# ------------------------------------------------------------------------------------------ execute

#: progress(files deleted so far, files to delete).
CountProgress = Callable[[int, int], None]


@dataclass
class PruneResult:
    """What executing a prune did."""

    files_deleted: int = 0
    bytes_freed: int = 0
    #: Commit files a concurrent publisher wrote back over content this prune removed: removed again.
    rewritten_removed: list[str] = field(default_factory=list)
    #: Entries a concurrent publisher published again whole during the prune: left in place.
    republished: list[str] = field(default_factory=list)


def _delete(client: BucketClient, paths: Sequence[str], batch: int, done: list[int], total: int,
            progress: CountProgress | None) -> None:
    for start in range(0, len(paths), batch):
        chunk = list(paths[start:start + batch])
        client.batch(delete=chunk)
        done[0] += len(chunk)
        if progress is not None:
            progress(done[0], total)


def execute_prune(client: BucketClient, plan: PrunePlan, *, batch: int = BATCH_PATHS,
                  progress: CountProgress | None = None) -> PruneResult:
    """Carry out the plan: area stamps, records, then commit files, then content and strays, `batch` paths per
    request; then make sure no commit file a concurrent publisher wrote meanwhile is left over missing content."""
    result = PruneResult()
    done = [0]
    total = plan.files
    first = [s.path for s in plan.stamps] + [r.path for r in plan.records] + [p for e in plan.entries for p in e.commit_paths]
    _delete(client, first, batch, done, total, progress)
    rest = [p for e in plan.entries for p in e.content_paths] + [s.path for s in plan.strays]
    _delete(client, rest, batch, done, total, progress)
    result.files_deleted = done[0]
    result.bytes_freed = plan.bytes
    _settle_races(client, [e for e in plan.entries if e.complete], batch, result)
    return result


def _settle_races(client: BucketClient, removed: Iterable[RemoveEntry], batch: int, result: PruneResult) -> None:
    """After the last delete: a commit file that is listed again was written by a publisher during the prune.
    With its content all there, the entry is whole again and stays; otherwise it is removed again, so that no
    reader installs an entry whose content this prune deleted."""
    removed = list(removed)
    asked = [p for e in removed for p in (*e.commit_paths, *e.content_paths)]
    present: set[str] = set()
    for start in range(0, len(asked), batch):
        present |= {item["path"] for item in client.paths_info(asked[start:start + batch]) if isinstance(item.get("path"), str)}
    again: list[str] = []
    for entry in removed:
        if not any(p in present for p in entry.commit_paths):
            continue
        if all(p in present for p in entry.content_paths):
            result.republished.append(layout.entry_prefix_of(entry.compiler_version, entry.area, entry.module))
        else:
            again += [p for p in entry.commit_paths if p in present]
    if again:
        for start in range(0, len(again), batch):
            client.batch(delete=again[start:start + batch])
        result.rewritten_removed += again
