"""A whole bucket, classified: every entry of every area, every export record, every name the layout does not
allow. What `neuron-cache prune`, `scrub` and `du` read (they plan on it; they never list on their own).

One non-recursive listing of the root, then one recursive listing per compiler version, and (when asked) one
download of every export record. Everything listed is hostile input: sizes and times go through
`remote_layout.listed_size` and `listed_time`, names through `remote_layout.classify_path`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bucket_server.messages import DownloadFile

from . import remote_layout as layout
from .client import BucketClient
from .local_cache import version_from_dir_name
from .lookup import read_records
from .neuron_sdk import version_tuple
from .records import CachedExport

log = logging.getLogger("optimum_neuron_cache")


@dataclass(frozen=True)
class ListedFile:
    """A file as the listing gave it, validated."""

    path: str
    size: int
    xet_hash: str | None
    digest: str | None
    #: When the bucket got it (None: the listing did not say; ages then never judge it old).
    uploaded: float | None

    def download_item(self, local_path: str, *, manifest: bool = False) -> DownloadFile:
        """The `download` request item that reads it back, checked against its digest by the server (a
        `manifest`: read by the server for the digests it binds)."""
        return DownloadFile(self.path, local_path, self.size, self.xet_hash or None, self.digest or None, manifest)


@dataclass
class RemoteEntry:
    """One MODULE folder of one area (flat, or a model's) of one compiler version."""

    compiler_version: str
    #: "" for the flat area, else `<model folder>/<task>`.
    area: str
    module: str
    files: dict[str, ListedFile] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Its commit file and NEFF are listed: a reader would install it."""
        return layout.complete_remote_entry(self.files, self.compiler_version)

    @property
    def commit_name(self) -> str:
        """Its commit file's name (`model.done`, or the NEFF for compilers up to 2.14)."""
        return layout.commit_file(self.files, self.compiler_version)

    @property
    def has_commit(self) -> bool:
        """Its commit file is listed (with or without the content it vouches for)."""
        return self.commit_name in self.files

    @property
    def bytes(self) -> int:
        """The listed size of all its files."""
        return sum(f.size for f in self.files.values())

    @property
    def newest_upload(self) -> float | None:
        """When its latest file landed; None if any file's time is unknown (so it is never judged old)."""
        times = [f.uploaded for f in self.files.values()]
        return None if not times or any(t is None for t in times) else max(t for t in times if t is not None)

    def paths(self, names: Iterable[str]) -> list[str]:
        """The bucket paths of some of its files."""
        return [self.files[name].path for name in sorted(names) if name in self.files]


@dataclass(frozen=True)
class RecordFile:
    """An export record file of a model's area, and (once read) what it says."""

    compiler_version: str
    area: str
    file: ListedFile
    #: The parsed record; None when not read, or unreadable (see VersionSurvey.records_read).
    record: CachedExport | None = None


@dataclass
class VersionSurvey:
    """Everything under `neuronxcc-<ver>/`."""

    compiler_version: str
    entries: dict[tuple[str, str], RemoteEntry] = field(default_factory=dict)
    records: list[RecordFile] = field(default_factory=list)
    #: Listed files the layout does not allow under this version (and their sizes, when valid).
    bad_names: list[ListedFile] = field(default_factory=list)
    #: Digest manifests (docs/remote-layout.md): metadata publishes write, neither entries nor strays.
    manifests: list[ListedFile] = field(default_factory=list)
    #: Model areas' stamps (docs/remote-layout.md#area-stamps), by area (`<model folder>/<task>`).
    stamps: dict[str, ListedFile] = field(default_factory=dict)
    #: Whether the records were downloaded and parsed (their `record` is then None only when unreadable).
    records_read: bool = False
    #: Records that did not transfer (asked for twice): nothing is known of them, not even that they are bad.
    unread_records: list[str] = field(default_factory=list)

    def areas(self) -> list[str]:
        """The model areas (`<model folder>/<task>`) holding anything: entries or records."""
        return sorted({area for area, _ in self.entries if area} | {r.area for r in self.records})

    @property
    def in_use(self) -> bool:
        """A compiler version a reader would use: it holds a complete entry or an export record. A folder with
        only names the layout does not allow, or content that never got its commit file, is not one."""
        return bool(self.records) or any(entry.complete for entry in self.entries.values())

    def complete_in(self, area: str) -> set[str]:
        """The modules of `area` a reader would install."""
        return {module for (where, module), entry in self.entries.items() if where == area and entry.complete}

    @property
    def bytes(self) -> int:
        """Every listed byte under the version folder."""
        return (sum(e.bytes for e in self.entries.values()) + sum(r.file.size for r in self.records)
                + sum(f.size for f in self.bad_names))


@dataclass
class BucketSurvey:
    """A whole bucket, version by version (oldest first)."""

    versions: dict[str, VersionSurvey] = field(default_factory=dict)
    #: Top-level names that are not `neuronxcc-<ver>` folders: files and folders the layout does not allow.
    bad_top_level: list[str] = field(default_factory=list)
    #: Listed files whose size is not a valid number of bytes (skipped, never planned on).
    bad_sizes: list[str] = field(default_factory=list)

    def ordered_versions(self) -> list[str]:
        """Compiler versions, oldest first."""
        return sorted(self.versions, key=version_order)

    def complete_entries(self) -> int:
        """Entries a reader would install, in every version and area."""
        return sum(1 for v in self.versions.values() for e in v.entries.values() if e.complete)


def version_order(version: str) -> tuple[tuple[int, ...], str]:
    """Oldest first; two builds of one version number (other hashes) in a fixed order."""
    return version_tuple(version), version


def listed_file(item: Mapping[str, Any]) -> ListedFile | None:
    """A listing item as a ListedFile, or None when its size, hash or digest cannot be trusted."""
    remote = layout.remote_file(item)
    if remote is None:
        return None
    return ListedFile(remote.path, remote.size, remote.xet_hash, remote.digest, layout.listed_time(item))


def add_listing(survey: BucketSurvey, version: str, listing: Iterable[Mapping[str, Any]]) -> VersionSurvey:
    """Classify one version's recursive listing into `survey` (pure: no I/O)."""
    found = survey.versions.setdefault(version, VersionSurvey(version))
    for item in listing:
        if item.get("type", "file") != "file" or not isinstance(item.get("path"), str):
            continue
        listed = listed_file(item)
        if listed is None:
            survey.bad_sizes.append(str(item["path"]))
            continue
        where = layout.split_version_path(version, listed.path)
        if where is None:
            found.bad_names.append(listed)
        elif where.record:
            found.records.append(RecordFile(version, where.area, listed))
        elif where.manifest:
            found.manifests.append(listed)
        elif where.stamp:
            found.stamps[where.area] = listed
        else:
            entry = found.entries.setdefault((where.area, where.module), RemoteEntry(version, where.area, where.module))
            entry.files[where.filename] = listed
    return found


def survey_bucket(client: BucketClient, *, compiler_version: str | None = None, with_records: bool = False) -> BucketSurvey:
    """List the bucket (every compiler version, or one) and classify it; with_records: read every export
    record too (one download)."""
    survey = BucketSurvey()
    top = client.list("", recursive=False)
    versions = []
    for item in top:
        path = item.get("path")
        if not isinstance(path, str):
            continue
        version = version_from_dir_name(path) if item.get("type") == "directory" else None
        if version is None and path == layout.LEASES_DIR and item.get("type") == "directory":
            continue  # compile leases (compile_leases.py): short-lived, swept by `neuron-cache leases --sweep`
        if version is None:
            survey.bad_top_level.append(path)
        elif compiler_version is None or version == compiler_version:
            versions.append(version)
    if compiler_version is not None and compiler_version not in versions:
        return survey
    for version in sorted(versions, key=version_order):
        found = add_listing(survey, version, client.list(layout.version_prefix(version), recursive=True))
        if not (found.entries or found.records or found.bad_names):  # an empty folder (a directory bucket keeps
            del survey.versions[version]                             # the folders of what was removed)
    if survey.bad_sizes:
        log.warning("optimum-neuron-cache: skipped %d listed file(s) whose size is not a valid number of bytes, e.g. %s",
                    len(survey.bad_sizes), survey.bad_sizes[0])
    if with_records:
        read_all_records(client, survey)
    return survey


def read_all_records(client: BucketClient, survey: BucketSurvey) -> None:
    """Download and parse every export record of the survey, in one request; an unreadable one keeps
    `record=None` (read_records warns)."""
    from bucket_server.protocol import MAX_RECORD_BYTES

    wanted = [r.file.path for v in survey.versions.values() for r in v.records if 0 < r.file.size <= MAX_RECORD_BYTES]
    unread: set[str] = set()
    parsed = {record.path: record for record in read_records(client, wanted, unread=unread)} if wanted else {}
    for version in survey.versions.values():
        version.records = [RecordFile(r.compiler_version, r.area, r.file, parsed.get(r.file.path)) for r in version.records]
        version.unread_records = sorted(r.file.path for r in version.records if r.file.path in unread)
        version.records_read = True
