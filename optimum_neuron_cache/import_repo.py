"""`neuron-cache import`: bring an optimum-neuron Git cache repo (e.g. aws-neuron/optimum-neuron-cache) into a bucket.

The repo's layout (optimum-neuron's `optimum/neuron/cache/hub_cache.py`): entries at `neuronxcc-<ver>/MODULE_*/`,
as the local cache has them, and a registry at `neuronxcc-<ver>/0_REGISTRY/...` of export configurations.
The entries go to the bucket's flat area, the registry entries become export records of their models.

Plan, then execute. `plan_import` reads the repo at one commit (its revision is pinned first) and asks the
bucket which entries and records it already has (paths-info): it returns typed operations with reasons, which
a dry run prints. `execute_import` carries them out in chunks, each entry content first and commit file last,
so the bucket never lists a partial entry as complete, and an interrupted import resumes where it stopped (the
next plan skips what the bucket holds). Xet-backed files go into a Hub bucket by a server-side copy by Xet hash
(huggingface_hub's `batch_bucket_files(copy=[("model", repo, xet_hash, dest)])`, no byte moved); other files,
and every file going to a directory bucket, are streamed: downloaded through the bucket server (verified),
then uploaded.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bucket_server.messages import AddFile
from bucket_server.protocol import MAX_RECORD_BYTES

from . import remote_layout as layout
from ._version import __version__
from .buckets import BucketRef
from .client import BucketClient
from .hub_repos import RepoClient, RepoRef
from .records import ExportRecord, record_from_registry
from .sync import stamp_items
from .remote_layout import RemoteFile, complete_remote_entry

log = logging.getLogger("optimum_neuron_cache")

#: Entries per execution chunk: each chunk is a few requests (copy, download, upload; then the commit files).
CHUNK = 100


class ImportAction(str, enum.Enum):
    """What an import does about one entry or record of the repo."""

    COPY = "copy"  # an entry whose files all go by a server-side copy by Xet hash
    STREAM = "stream"  # an entry with files that are downloaded and uploaded (non-Xet files, directory buckets)
    RECORD = "record"  # a registry entry written as an export record
    SKIP = "skip"  # the bucket has it already


@dataclass(frozen=True)
class ImportOp:
    """One operation of an import plan, and why."""

    action: ImportAction
    compiler_version: str
    #: The MODULE name of an entry, or the bucket path of a record.
    name: str
    reason: str
    #: The repo's files of an entry (allow-listed names only).
    files: tuple[RemoteFile, ...] = ()
    record: ExportRecord | None = None


@dataclass(frozen=True)
class ImportPlan:
    """What an import will do, immutable: the repo at one commit, into one bucket."""

    repo: RepoRef
    bucket: BucketRef
    ops: tuple[ImportOp, ...] = ()
    #: Repo paths under a compiler version folder that are neither an entry's file nor a registry entry.
    ignored: tuple[str, ...] = ()
    #: Entries of the repo left out because the repo holds them incomplete (no commit file or no NEFF).
    incomplete: tuple[str, ...] = ()

    @property
    def entries(self) -> tuple[ImportOp, ...]:
        return tuple(op for op in self.ops if op.action in (ImportAction.COPY, ImportAction.STREAM))

    @property
    def records(self) -> tuple[ImportOp, ...]:
        return tuple(op for op in self.ops if op.action is ImportAction.RECORD)

    @property
    def skipped(self) -> tuple[ImportOp, ...]:
        return tuple(op for op in self.ops if op.action is ImportAction.SKIP)

    def by_copy(self, remote: RemoteFile) -> bool:
        """Whether a file goes by a server-side copy (Xet-backed, into a Hub bucket) rather than streamed."""
        return self.bucket.kind == "hf" and bool(remote.xet_hash)

    @property
    def bytes_copied(self) -> int:
        return sum(f.size for op in self.entries for f in op.files if self.by_copy(f))

    @property
    def bytes_streamed(self) -> int:
        return sum(f.size for op in self.entries for f in op.files if not self.by_copy(f))


@dataclass
class ImportResult:
    """What executing a plan did."""

    imported: list[str] = field(default_factory=list)  # `neuronxcc-<ver>/MODULE_...` entries now complete in the bucket
    records: list[str] = field(default_factory=list)  # bucket paths of the records written
    failed: list[tuple[str, str]] = field(default_factory=list)  # (entry, why): left for the next run
    bytes_copied: int = 0
    bytes_streamed: int = 0


# ------------------------------------------------------------------------------------- planning


def _group_by_module(listing: Iterable[Mapping[str, Any]], prefix: str) -> dict[str, dict[str, RemoteFile]]:
    """Entry files of a flat-area listing: module -> file name -> file (unsafe names and bad items left out)."""
    modules: dict[str, dict[str, RemoteFile]] = {}
    for item in listing:
        parsed = layout.parse_area_path(str(item.get("path", "")), prefix)
        remote = layout.remote_file(item) if parsed is not None else None
        if parsed is not None and remote is not None:
            modules.setdefault(parsed.module, {})[parsed.filename] = remote
    return modules


def _entry_ops(plan_bucket: BucketRef, version: str, complete: Mapping[str, Mapping[str, RemoteFile]],
               present: set[str]) -> list[ImportOp]:
    ops = []
    for module in sorted(complete):
        files = tuple(complete[module][name] for name in sorted(complete[module]))
        if module in present:
            ops.append(ImportOp(ImportAction.SKIP, version, module, "the bucket's flat area has it complete already", files))
            continue
        copied = [f for f in files if plan_bucket.kind == "hf" and f.xet_hash]
        if len(copied) == len(files):
            ops.append(ImportOp(ImportAction.COPY, version, module, f"{len(files)} files copied by Xet hash on the Hub", files))
        else:
            why = (f"{len(files) - len(copied)} of {len(files)} files streamed (not Xet-backed)" if plan_bucket.kind == "hf"
                   else "a directory bucket: every file streamed")
            ops.append(ImportOp(ImportAction.STREAM, version, module, why, files))
    return ops


def _bucket_has(bucket: BucketClient, paths: list[str]) -> set[str]:
    return {str(item.get("path")) for item in bucket.paths_info(paths)} if paths else set()


def _read_registry(repo: RepoClient, version: str, files: list[RemoteFile]) -> list[ExportRecord]:
    """The registry entries of a compiler version as export records (one download; bad ones skipped, said)."""
    if not files:
        return []
    with tempfile.TemporaryDirectory(prefix="neuron-cache-import-") as tmp:
        local = {f.path: Path(tmp) / f"registry-{index}.json" for index, f in enumerate(files)}
        reply = repo.download([{"path": f.path, "local_path": str(local[f.path]), "size": f.size,
                                "xet_hash": f.xet_hash, "digest": f.digest} for f in files]) or {}
        refused = {str(item.get("path")) for item in reply.get("failed", []) if isinstance(item, dict)}
        records = []
        for remote in files:
            if remote.path in refused or not local[remote.path].is_file():
                log.warning("optimum-neuron-cache: registry entry %s did not download; skipped", remote.path)
                continue
            parsed = record_from_registry(local[remote.path].read_text(encoding="utf-8", errors="replace"), remote.path, version)
            if parsed is not None:
                fields = {f.name for f in dataclasses.fields(ExportRecord)}
                record = ExportRecord(**{name: value for name, value in dataclasses.asdict(parsed).items() if name in fields})
                records.append(dataclasses.replace(
                    record, package_version=__version__,
                    created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
        return records


def _record_ops(bucket: BucketClient, version: str, records: Iterable[ExportRecord]) -> list[ImportOp]:
    """Model ids are case-insensitive on the Hub: one model folder per model, in the casing the bucket has
    (else the first one the registry gives), so that `Meta-Llama/X` and `meta-llama/X` share one area."""
    records = list(records)
    casing: dict[str, str] = {}
    if records:  # the bucket's casing wins (one listing of the version's model folders)
        casing = {name.lower(): name for name in sorted(bucket.folders(layout.models_prefix(version)), reverse=True)}
    by_path: dict[str, ExportRecord] = {}
    for record in records:  # a registry entry and its aliases are one record
        folder = layout.hub_model_folder(record.model_id)
        if folder is not None:
            folder = casing.setdefault(folder.lower(), folder)
            by_path.setdefault(layout.export_record_path(version, folder, record.task, record.record_id), record)
    present = _bucket_has(bucket, sorted(by_path))
    return [ImportOp(ImportAction.SKIP if path in present else ImportAction.RECORD, version, path,
                     "the bucket has this record already" if path in present
                     else f"registry entry of {record.model_id} ({record.task}) as an export record", record=record)
            for path, record in sorted(by_path.items())]


def plan_import(repo: RepoClient, bucket: BucketClient, *, versions: Iterable[str] | None = None) -> ImportPlan:
    """Read the repo (pinned to one commit) and the bucket; return what importing would do. Requests: one
    repo_info, one listing of the repo's root and one per compiler version folder, one download of the
    registry entries, one bucket listing of its model folders and one bucket paths-info each for the entries
    and the records."""
    pinned = repo.pinned()
    wanted = set(versions) if versions is not None else None
    ops: list[ImportOp] = []
    ignored: list[str] = []
    incomplete: list[str] = []
    for folder in sorted(pinned.folders("")):
        version = layout.parse_version_prefix(folder)
        if version is None or (wanted is not None and version not in wanted):
            continue
        prefix = layout.version_prefix(version)
        listing = pinned.list(prefix, recursive=True)
        grouped = _group_by_module(listing, prefix)
        complete = {module: files for module, files in grouped.items() if complete_remote_entry(files, version)}
        incomplete += [f"{prefix}/{module}" for module in sorted(set(grouped) - set(complete))]
        registry: list[RemoteFile] = []
        for item in listing:
            path = str(item.get("path", ""))
            if layout.parse_area_path(path, prefix) is not None:
                continue
            remote = layout.remote_file(item)
            if layout.parse_registry_path(version, path) is not None and remote is not None and remote.size <= MAX_RECORD_BYTES:
                registry.append(remote)
            else:
                ignored.append(path)
        commit_paths = {layout.flat_file_path(version, module, layout.commit_file(files, version)): module
                        for module, files in complete.items()}
        present = {commit_paths[path] for path in _bucket_has(bucket, sorted(commit_paths)) if path in commit_paths}
        ops += _entry_ops(bucket.bucket, version, complete, present)
        ops += _record_ops(bucket, version, _read_registry(pinned, version, registry))
    return ImportPlan(pinned.repo, bucket.bucket, tuple(ops), tuple(ignored), tuple(incomplete))


# ------------------------------------------------------------------------------------ execution

#: progress(units done since the last call): one unit per entry or record.
Progress = Callable[[int], None]


def _put(plan: ImportPlan, repo: RepoClient, bucket: BucketClient, files: list[tuple[str, RemoteFile]],
         tmp: Path, result: ImportResult) -> set[str]:
    """Put repo files at bucket paths (dest, file): copies by hash where possible, the rest streamed.
    Returns the destinations that did not make it (their entries must not get a commit file)."""
    copies = [(dest, f) for dest, f in files if plan.by_copy(f)]
    streams = [(dest, f) for dest, f in files if not plan.by_copy(f)]
    if copies:
        repo.copy_into(bucket.bucket, [{"xet_hash": f.xet_hash, "dest": dest} for dest, f in copies])
        result.bytes_copied += sum(f.size for _, f in copies)
    failed: set[str] = set()
    if streams:
        local = {dest: tmp / f"{index}-{f.filename}" for index, (dest, f) in enumerate(streams)}
        reply = repo.download([{"path": f.path, "local_path": str(local[dest]), "size": f.size, "xet_hash": f.xet_hash,
                                "digest": f.digest} for dest, f in streams]) or {}
        refused = {str(item.get("path")) for item in reply.get("failed", []) if isinstance(item, dict)}
        ready = []
        for dest, f in streams:
            path = local[dest]
            if f.path in refused or not path.is_file() or path.stat().st_size != f.size:
                failed.add(dest)
            else:
                ready.append(AddFile(dest, str(path)))
        if ready:
            bucket.batch(add=ready)
            result.bytes_streamed += sum(f.size for dest, f in streams if dest not in failed)
        for path in local.values():
            path.unlink(missing_ok=True)
    return failed


def execute_import(plan: ImportPlan, repo: RepoClient, bucket: BucketClient, *, progress: Progress | None = None) -> ImportResult:
    """Carry out the plan: entries chunk by chunk, content then commit files; then the records. A remote
    failure raises (what is done stays done; running the import again resumes)."""
    pinned = RepoClient(plan.repo, repo.environ)
    result = ImportResult()
    entries = list(plan.entries)
    with tempfile.TemporaryDirectory(prefix="neuron-cache-import-") as tmp_dir:
        tmp = Path(tmp_dir)
        for start in range(0, len(entries), CHUNK):
            chunk = entries[start:start + CHUNK]
            commits = {op.name: layout.commit_file([f.filename for f in op.files], op.compiler_version) for op in chunk}
            content = [(layout.flat_file_path(op.compiler_version, op.name, f.filename), f)
                       for op in chunk for f in op.files if f.filename != commits[op.name]]
            failed = _put(plan, pinned, bucket, content, tmp, result)
            ready = []
            for op in chunk:
                lost = [dest for dest, _ in content if dest in failed and dest.startswith(layout.flat_entry_prefix(op.compiler_version, op.name) + "/")]
                if lost:
                    result.failed.append((layout.flat_entry_prefix(op.compiler_version, op.name), f"{len(lost)} file(s) did not transfer"))
                else:
                    ready.append(op)
            commit_files = [(layout.flat_file_path(op.compiler_version, op.name, commits[op.name]),
                             next(f for f in op.files if f.filename == commits[op.name])) for op in ready]
            failed = _put(plan, pinned, bucket, commit_files, tmp, result)
            for op, (dest, _) in zip(ready, commit_files):
                if dest in failed:
                    result.failed.append((layout.flat_entry_prefix(op.compiler_version, op.name), "its commit file did not transfer"))
                else:
                    result.imported.append(layout.flat_entry_prefix(op.compiler_version, op.name))
            if progress is not None:
                progress(len(chunk))
    records = list(plan.records)
    for start in range(0, len(records), CHUNK):
        chunk = records[start:start + CHUNK]
        writes = [AddFile(op.name, content=op.record.to_json()) for op in chunk if op.record is not None]
        areas = {area for write in writes if (area := layout.record_area(write.dest)) is not None}
        bucket.batch(add=writes + stamp_items(areas))  # the stamps last: hosts that listed those areas list again
        result.records += [op.name for op in chunk]
        if progress is not None:
            progress(len(chunk))
    return result


def describe_plan(plan: ImportPlan, size: Callable[[int], str]) -> list[str]:
    """The plan in lines, for a dry run and the report before executing; `size` writes a byte count (the CLI's,
    so that a dry run says sizes as the run does)."""
    lines = [f"import {plan.repo} into {plan.bucket}:",
             f"  {len(plan.entries)} entries to import ({sum(op.action is ImportAction.COPY for op in plan.entries)} by "
             f"server-side copy), {len(plan.records)} export records to write, {len(plan.skipped)} already in the bucket",
             f"  {size(plan.bytes_copied)} copied by Xet hash, {size(plan.bytes_streamed)} streamed"]
    if plan.incomplete:
        lines.append(f"  {len(plan.incomplete)} incomplete entries of the repo left out (e.g. {plan.incomplete[0]})")
    if plan.ignored:
        lines.append(f"  {len(plan.ignored)} other paths ignored (e.g. {plan.ignored[0][:200]!r})")
    lines += [f"  {op.action.value:6} {layout.version_prefix(op.compiler_version)}/{op.name}: {op.reason}"
              if op.record is None else f"  {op.action.value:6} {op.name}: {op.reason}" for op in plan.ops]
    return lines


def import_repo(repo: RepoRef, bucket: BucketRef, *, environ: Mapping[str, Any] | None = None,
                dry_run: bool = False, progress: Progress | None = None) -> tuple[ImportPlan, ImportResult | None]:
    """Plan, then (unless `dry_run`) execute: the library form of `neuron-cache import`."""
    repo_client = RepoClient(repo, environ)
    bucket_client = BucketClient(bucket, environ)
    plan = plan_import(repo_client, bucket_client)
    if dry_run:
        return plan, None
    return plan, execute_import(plan, repo_client, bucket_client, progress=progress)
