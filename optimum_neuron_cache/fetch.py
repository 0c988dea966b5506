"""Fetch: plan which remote entries the local cache lacks, then install each one whole.

Planning reads one listing of the model's area (plus one paths-info for local todo entries); executing
downloads every needed file in one request, into a temporary folder on the cache's filesystem, checks sizes
against the listing, and renames each entry into place. An existing complete entry is never overwritten.
Per-entry node-wide locks make 32 ranks download each file once: the others wait, then find it installed.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import Timeout

from . import remote_layout as layout
from . import settings
from .errors import BucketNotFoundError, RemoteError
from .lookup import MAX_RECORD_BYTES, CachedExport, parse_record
from .client import BucketClient, ProgressCallback
from .host_state import HostState, lock_timeout
from .local_cache import LOCK_SUFFIX, EntryState, LocalEntry, read_entry, version_dir_name

ENV_VERIFY = settings.VERIFY


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    path: str
    size: int
    xet_hash: str | None
    #: What the bytes must hash to (`xet:<hex>`, `blake3:<hex>` or `sha256:<hex>`); the server checks it
    #: before handing the file over.
    digest: str | None = None


@dataclass(frozen=True)
class FetchItem:
    """One entry to install: from the per-model area (whole entry) or the flat area (filling a todo entry)."""

    module: str
    source: Literal["model", "flat"]
    files: tuple[RemoteFile, ...]
    #: True when a local todo entry exists: add the missing files into it instead of renaming a folder.
    fill: bool
    reason: str


@dataclass
class FetchPlan:
    compiler_version: str
    items: list[FetchItem] = field(default_factory=list)
    #: Complete entries the model's area holds (whether or not they were needed here).
    remote_modules: set[str] = field(default_factory=set)
    #: Export record files present in the model's area (file names).
    records: set[str] = field(default_factory=set)
    #: The records' bucket paths (small JSON, under the size cap): fetched along with the entries, in the
    #: same request, for what they tell about the entries (compile durations).
    record_files: list[RemoteFile] = field(default_factory=list)

    @property
    def bytes_needed(self) -> int:
        return sum(file.size for item in self.items for file in item.files)


@dataclass
class FetchResult:
    fetched: list[str] = field(default_factory=list)  # MODULE names installed by this process
    installed_by_others: list[str] = field(default_factory=list)  # found installed after waiting on a lock
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, why): nothing wrong, just not needed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (module, why): the remote copy failed a check
    #: The model's export records, read in the same request as the entries (when entries were downloaded).
    records: list[CachedExport] = field(default_factory=list)
    bytes: int = 0


# ------------------------------------------------------------------------------------- planning


def _group_by_module(listing: Iterable[Mapping[str, Any]], area_prefix: str) -> dict[str, dict[str, RemoteFile]]:
    modules: dict[str, dict[str, RemoteFile]] = {}
    for item in listing:
        if item.get("type", "file") != "file":
            continue
        parsed = layout.parse_area_path(str(item.get("path", "")), area_prefix)
        if parsed is None:
            continue
        size = layout.listed_size(item)
        if size is None:
            continue
        modules.setdefault(parsed.module, {})[parsed.filename] = RemoteFile(
            parsed.filename, item["path"], size, item.get("xet_hash"), item.get("digest"))
    return modules


def complete_remote_entry(files: Mapping[str, RemoteFile], compiler_version: str) -> bool:
    """A remote entry can be installed only if its commit file (model.done, or the NEFF for compilers up to
    2.14) is there, and with it the NEFF: anything less is a partial upload."""
    return "model.neff" in files and layout.commit_file(files, compiler_version) in files


def plan_from_model_area(compiler_version: str, area_prefix: str, listing: list[Mapping[str, Any]],
                         local: Mapping[str, LocalEntry]) -> FetchPlan:
    plan = FetchPlan(compiler_version)
    exports = layout.EXPORTS_DIR
    for item in listing:
        path = str(item.get("path", ""))
        if path.startswith(f"{area_prefix}/{exports}/") and path.endswith(".json"):
            plan.records.add(path.rsplit("/", 1)[1])
            if 0 < (size := layout.listed_size(item) or 0) <= MAX_RECORD_BYTES:
                plan.record_files.append(RemoteFile(path.rsplit("/", 1)[1], path, size, item.get("xet_hash"), item.get("digest")))
    for module, files in sorted(_group_by_module(listing, area_prefix).items()):
        if not complete_remote_entry(files, compiler_version):
            continue
        plan.remote_modules.add(module)
        entry = local.get(module)
        if entry is None:
            plan.items.append(FetchItem(module, "model", tuple(files.values()), fill=False, reason="missing locally"))
        elif entry.state is EntryState.TODO:
            missing = tuple(f for name, f in files.items() if name not in entry.files)
            plan.items.append(FetchItem(module, "model", missing, fill=True, reason="todo entry (HLO and flags only)"))
    return plan


def todo_probe_paths(compiler_version: str, todo: Iterable[LocalEntry]) -> list[str]:
    """Flat-area paths to ask about (one paths-info) for local todo entries the model's area did not cover."""
    return [
        f"{layout.flat_entry_prefix(compiler_version, entry.name)}/{name}"
        for entry in todo
        for name in sorted(layout.PUBLISHABLE_FILES)
    ]


def plan_todo_fill(plan: FetchPlan, todo: Iterable[LocalEntry], paths_info: list[Mapping[str, Any]]) -> None:
    version = plan.compiler_version
    found = _group_by_module(paths_info, layout.version_prefix(version))
    for entry in todo:
        files = found.get(entry.name, {})
        if not complete_remote_entry(files, version):
            continue
        missing = tuple(f for name, f in files.items() if name not in entry.files)
        plan.items.append(FetchItem(entry.name, "flat", missing, fill=True, reason="todo entry filled from the flat area"))


# ------------------------------------------------------------------------------------ execution


def _still_needed(item: FetchItem, target: Path, version: str) -> bool:
    entry = read_entry(target, version)
    if not entry.files:
        return not item.fill
    return item.fill and entry.state is EntryState.TODO


def _verify(item: FetchItem, staged: Path) -> str | None:
    """Why the staged copy of `item` cannot be installed, or None when every file has its listed size."""
    for remote in item.files:
        try:
            info = os.lstat(staged / remote.filename)
        except FileNotFoundError:
            return f"{remote.filename} was not downloaded"
        if info.st_size != remote.size:
            return f"{remote.filename} has {info.st_size} bytes, the bucket lists {remote.size}"
    return None


def _install_whole(staged: Path, target: Path) -> bool:
    """Rename a complete entry into place; False if something appeared there meanwhile (kept as is)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged, target)  # fails on a non-empty target: never overwrites an entry
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def _install_fill(item: FetchItem, staged: Path, target: Path, version: str) -> bool:
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


def verification_enabled() -> bool:
    """Downloads are checked against their digests unless NEURON_CACHE_VERIFY=0 (as Bazel's
    --remote_verify_downloads): for measuring what the check costs, never for everyday use."""
    return settings.verify()


def _request(remote: RemoteFile, local_path: Path) -> dict[str, Any]:
    """One file of a download request: size and hash let the server skip a metadata request, the digest
    is what the server checks the bytes against (no digest, no check)."""
    return {"path": remote.path, "local_path": str(local_path), "size": remote.size, "xet_hash": remote.xet_hash,
            "digest": remote.digest if verification_enabled() else None}


class Fetcher:
    def __init__(self, client: BucketClient, root: Path, compiler_version: str) -> None:
        self.client = client
        self.root = root
        self.version = compiler_version
        self.state = HostState(root)

    def target(self, module: str) -> Path:
        return self.root / version_dir_name(self.version) / module

    def execute(self, plan: FetchPlan, progress: ProgressCallback | None = None) -> FetchResult:
        result = FetchResult()
        if not plan.items:
            return result
        locks = {item.module: self.state.entry_lock(self.version, item.module, "fetch") for item in plan.items}
        held: list[FetchItem] = []
        waiting: list[FetchItem] = []
        try:
            for item in plan.items:
                try:
                    locks[item.module].acquire(timeout=0)
                    held.append(item)
                except Timeout:
                    waiting.append(item)
            # The model's export records ride along with the first download (one request, no extra session).
            self._download_and_install(held, result, progress, plan.record_files)
            for lock in (locks[item.module] for item in held):
                lock.release()
            held = []
            deadline = time.monotonic() + lock_timeout()
            for item in waiting:
                # Most of the time the holder installs the entry: then there is nothing to wait for, and
                # waiters do not pass every lock along one by one.
                if not _still_needed(item, self.target(item.module), self.version):
                    result.installed_by_others.append(item.module)
                    continue
                try:
                    locks[item.module].acquire(timeout=max(0.0, deadline - time.monotonic()), poll_interval=0.01)
                except Timeout:
                    result.failed.append((item.module, f"another process held its lock for over {lock_timeout():.0f}s "
                                          "(set NEURON_CACHE_LOCK_TIMEOUT to wait longer)"))
                    continue
                if not _still_needed(item, self.target(item.module), self.version):
                    locks[item.module].release()
                    result.installed_by_others.append(item.module)
                    continue
                held.append(item)  # the holder failed: this process fetches it itself
            if held:
                self._download_and_install(held, result, progress)
        finally:
            for item in held:
                locks[item.module].release()
        return result

    @staticmethod
    def _requests(items: list[FetchItem], tmp: Path) -> list[dict[str, Any]]:
        return [_request(remote, tmp / item.module / remote.filename) for item in items for remote in item.files]

    @staticmethod
    def _reject_unverified(items: list[FetchItem], reply: dict[str, Any], result: FetchResult) -> list[FetchItem]:
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

    def _download(self, items: list[FetchItem], tmp: Path, result: FetchResult, progress: ProgressCallback | None,
                  record_files: Sequence[RemoteFile] = ()) -> list[FetchItem]:
        """Download every item in one request. If that fails, one bad entry (a corrupt or lying remote copy)
        must not cost the others: retry entry by entry, giving up after two failures in a row (then the
        bucket itself is failing, and the error goes up as one). Returns the items downloaded."""
        # The records are also digest manifests: the server checks files whose Xet hash they bind by BLAKE3.
        records = [{**_request(remote, tmp / f"record-{index}.json"), "manifest": verification_enabled()}
                   for index, remote in enumerate(record_files)]
        try:
            reply = self.client.download(self._requests(items, tmp) + records, progress=progress)
            for record in records:
                local = Path(record["local_path"])
                if local.exists():
                    parsed = parse_record(local.read_text(encoding="utf-8", errors="replace"), record["path"])
                    if parsed is not None:
                        result.records.append(parsed)
            return self._reject_unverified(items, reply, result)
        except RemoteError as exc:
            if len(items) == 1:
                raise
            first_error = exc
        downloaded: list[FetchItem] = []
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

    def _download_and_install(self, items: list[FetchItem], result: FetchResult, progress: ProgressCallback | None,
                              record_files: Sequence[RemoteFile] = ()) -> None:
        todo = [item for item in items if _still_needed(item, self.target(item.module), self.version)]
        result.installed_by_others.extend(item.module for item in items if item not in todo)
        if not todo:
            return
        with self.state.temp_dir() as tmp:
            for item in todo:
                (tmp / item.module).mkdir()
            downloaded = self._download(todo, tmp, result, progress, record_files)
            for item in downloaded:
                staged = tmp / item.module
                problem = _verify(item, staged)
                if problem:
                    result.failed.append((item.module, problem))
                    continue
                target = self.target(item.module)
                installed = _install_fill(item, staged, target, self.version) if item.fill else _install_whole(staged, target)
                if installed:
                    result.fetched.append(item.module)
                    result.bytes += sum(f.size for f in item.files)
                else:
                    result.skipped.append((item.module, "a local entry appeared meanwhile; kept it"))


def resolve_model_area(client: BucketClient, compiler_version: str, folder: str, task: str) -> tuple[str, list[dict[str, Any]]]:
    """List the model's area; reuse the casing the bucket already has for the model (ids are case-insensitive).

    Warm path: one listing. Only when the exact casing holds nothing is the `models/` folder listed to find
    another casing.
    """
    area = layout.model_area_prefix(compiler_version, folder, task)
    listing = client.list(area, recursive=True)
    if listing:
        return area, listing
    existing = [item["path"].rsplit("/", 1)[-1] for item in client.list(layout.models_prefix(compiler_version), recursive=False)
                if item.get("type") == "directory"]
    cased = layout.reuse_casing(folder, existing)
    if cased == folder:
        return area, []
    area = layout.model_area_prefix(compiler_version, cased, task)
    return area, client.list(area, recursive=True)


@dataclass
class ModelFetch:
    """What fetching a model's entries found and did."""

    #: The model's area in the bucket (with the casing the bucket has), None without a model.
    area: str | None
    plan: FetchPlan
    result: FetchResult


def fetch_model(client: BucketClient, root: Path, compiler_version: str, model_folder: str | None, task: str,
                local: Mapping[str, LocalEntry], *, missing_bucket_is_empty: bool = False,
                progress: ProgressCallback | None = None) -> ModelFetch:
    """Install the model's entries the local cache lacks, and fill local todo entries from the flat area.

    Requests: one listing of the model's area (three when the casing differs from the bucket's), one
    paths-info when there are todo entries, one download.
    """
    area = layout.model_area_prefix(compiler_version, model_folder, task) if model_folder else None
    listing: list[dict[str, Any]] = []
    if model_folder is not None:
        try:
            area, listing = resolve_model_area(client, compiler_version, model_folder, task)
        except BucketNotFoundError:
            if not missing_bucket_is_empty:
                raise
            return ModelFetch(area, FetchPlan(compiler_version), FetchResult())
    plan = plan_from_model_area(compiler_version, area, listing, local) if area else FetchPlan(compiler_version)
    planned = {item.module for item in plan.items}
    todo = [entry for entry in local.values() if entry.state is EntryState.TODO and entry.name not in planned]
    if todo:
        plan_todo_fill(plan, todo, client.paths_info(todo_probe_paths(compiler_version, todo)))
    return ModelFetch(area, plan, Fetcher(client, root, compiler_version).execute(plan, progress))
