"""Lookup: which export configurations of a model were compiled already, from the export records.

Cheap by construction: for one model, task and compiler version it costs one listing of the `exports/`
folder and one download of the records (a listing of `models/` more when the casing differs), whatever the
size of the bucket. Results are memoized in-process, keyed by bucket, endpoint, a fingerprint of the token
(never the token) and the query; failed lookups are not memoized.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from bucket_server.messages import TRANSFER, DownloadFile, DownloadRequest
from bucket_server.protocol import MAX_RECORD_BYTES

from . import remote_layout as layout
from .config_fields import ALIASES
from .buckets import BucketRef, resolve_bucket
from .client import BucketClient, read_token
from .errors import CompilerVersionError, RemoteUnavailableError
from .neuron_sdk import resolve_compiler_version, validate_compiler_version
from .records import CachedExport, parse_record
from .records import record_from_pr1102
from .server_launcher import hub_endpoint

log = logging.getLogger("optimum_neuron_cache")

#: Filter name -> the export-config keys that carry it (config_fields.py).
FILTER_KEYS = ALIASES


_memo: dict[tuple[Any, ...], list[CachedExport]] = {}
_memo_lock = threading.Lock()


def _upstreams_key() -> tuple[str, ...]:
    from .upstreams import configured_upstreams

    return tuple(map(str, configured_upstreams()))


def clear_lookup_cache() -> None:
    """Forget the memoized lookups of this process."""
    with _memo_lock:
        _memo.clear()


def _token_fingerprint(bucket: BucketRef) -> str | None:
    token = read_token() if bucket.kind == "hf" else None
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else None


def _versions(client: BucketClient, compiler_version: str | None, all_versions: bool) -> list[str]:
    if compiler_version and not all_versions:
        return [compiler_version]
    return layout.versions_in(client.folders(""))


def _export_paths(client: BucketClient, version: str, folder: str, tasks: list[str]) -> list[str]:
    paths: list[str] = []
    for task in tasks:
        listing = client.list(layout.exports_prefix(version, folder, task), recursive=False)
        paths += [item["path"] for item in listing if item.get("type") == "file" and item["path"].endswith(".json")
                  and 0 < (layout.listed_size(item) or 0) <= MAX_RECORD_BYTES]
    return paths


def _record_paths(client: BucketClient, version: str, folder: str, tasks: list[str] | None) -> list[str]:
    """Where the model's records are under one compiler version (listings only). When the exact casing finds
    nothing, `models/` is listed once for the casing the bucket has."""
    models = layout.models_prefix(version)
    if tasks is None:
        task_names = client.folders(f"{models}/{folder}")
        if not task_names:
            cased = layout.reuse_casing(folder, client.folders(models))
            if cased == folder:
                return []
            folder, task_names = cased, client.folders(f"{models}/{cased}")
        return _export_paths(client, version, folder, task_names)
    paths = _export_paths(client, version, folder, tasks)
    if not paths:
        cased = layout.reuse_casing(folder, client.folders(models))
        if cased != folder:
            paths = _export_paths(client, version, cased, tasks)
    return paths


def read_records(client: BucketClient, paths: list[str], *, unread: set[str] | None = None) -> list[CachedExport]:
    """Download and parse export records, all in one request; malformed ones are skipped with a warning. With
    `unread`, those that did not transfer are asked for once more, and the paths still not read are added to it
    (a record that never came is not a malformed one: nothing is known of it)."""
    if not paths:
        return []
    with tempfile.TemporaryDirectory(prefix="neuron-cache-records-") as tmp:
        files = [DownloadFile(path, str(Path(tmp) / f"{index}.json")) for index, path in enumerate(paths)]
        failed = client.send(DownloadRequest(tuple(files))).failed
        again = {failure.path for failure in failed if failure.kind == TRANSFER}
        if unread is not None and again:
            try:
                failed = client.send(DownloadRequest(tuple(item for item in files if item.path in again))).failed
                again = {failure.path for failure in failed if failure.kind == TRANSFER}
            except RemoteUnavailableError:  # none of them came through this time either
                pass
            unread.update(again)
        records = [parse_record(Path(item.local_path).read_text(encoding="utf-8", errors="replace"), item.path)
                   for item in files if Path(item.local_path).exists()]
    return [record for record in records if record is not None]


def pr1102_records(client: BucketClient, versions: list[str], model: layout.ModelRef,
                   tasks: list[str] | None) -> list[CachedExport]:
    """The records of the layout of optimum-neuron's bucket PR (#1102: `neuronxcc-<ver>/<org>/<name>/<task>/
    exports/<optimum-neuron version>/<8 hex>.json`, the bare export config), for the versions where this
    layout has none: a listing per task (and one for the tasks when none is given), one download."""
    if model.is_local or not versions:
        return []
    found: list[tuple[str, str, str]] = []  # (path, task, version)
    for version in versions:
        base = f"{layout.version_prefix(version)}/{model.model_id}"
        for task in tasks if tasks is not None else client.folders(base):
            area = layout.pr1102_area_prefix(version, model.model_id, task)
            if area is None:
                continue
            listing = client.list(layout.pr1102_exports_prefix(area), recursive=True)
            found += [(item["path"], task, version) for item in listing if item.get("type") == "file"
                      and layout.is_pr1102_record_path(area, item["path"]) and 0 < (layout.listed_size(item) or 0) <= MAX_RECORD_BYTES]
    if not found:
        return []
    records = []
    with tempfile.TemporaryDirectory(prefix="neuron-cache-records-") as tmp:
        files = [DownloadFile(path, str(Path(tmp) / f"{index}.json")) for index, (path, _, _) in enumerate(found)]
        client.download(files)
        for item, (path, task, version) in zip(files, found):
            local = Path(item.local_path)
            if local.exists():
                records.append(record_from_pr1102(local.read_text(encoding="utf-8", errors="replace"), path,
                                                  model.model_id, task, version))
    return [record for record in records if record is not None]


def read_bucket_records(client: BucketClient, model: layout.ModelRef, tasks: list[str] | None,
                        compiler_version: str | None, all_versions: bool) -> list[CachedExport]:
    """A bucket's records of the model: this layout's (every version's in one download), and optimum-neuron PR
    #1102's for the versions where this layout has none."""
    versions = _versions(client, compiler_version, all_versions)
    by_version = {version: _record_paths(client, version, model.folder, tasks) for version in versions}
    cached = read_records(client, [path for version in versions for path in by_version[version]])
    return cached + pr1102_records(client, [version for version in versions if not by_version[version]], model, tasks)


def upstream_records(model: layout.ModelRef, tasks: list[str] | None, versions: list[str] | None) -> list[CachedExport]:
    """The records the read-only upstreams hold of the model (see upstreams.py); none when none is set."""
    from .upstreams import configured_upstreams, upstream_records as read

    return read(model, tasks, versions) if configured_upstreams() else []


def lookup_cache(model_id: str, task: str | None = None, *, compiler_version: str | None = None,
                 all_versions: bool = False, bucket: str | BucketRef | None = None, client: BucketClient | None = None,
                 **filters: Any) -> list[CachedExport]:
    """Cached export configurations of `model_id`, newest first.

    compiler_version: default the installed compiler's (or NEURON_CC_VERSION); when none is known, or with
    all_versions=True, every version in the bucket. filters: target, batch_size, sequence_length,
    tensor_parallel_size, dtype (matched against the names exporters use), or any export-config key.
    """
    ref = bucket if isinstance(bucket, BucketRef) else resolve_bucket(bucket)
    model = layout.model_ref(model_id)
    tasks = [layout.task_name(task)] if task else None
    if compiler_version is not None:  # "latest" is refused here as everywhere, not answered with "nothing"
        compiler_version = validate_compiler_version(compiler_version, source="compiler_version")
    if compiler_version is None and not all_versions:
        try:
            compiler_version = resolve_compiler_version(None)
        except CompilerVersionError:
            all_versions = True
    key = (str(ref), hub_endpoint(), _token_fingerprint(ref), model.folder.lower(), tuple(tasks or ()), compiler_version, all_versions,
           _upstreams_key())
    with _memo_lock:
        cached = _memo.get(key)
    if cached is None:
        client = client or BucketClient(ref)
        cached = read_bucket_records(client, model, tasks, compiler_version, all_versions)
        cached += upstream_records(model, tasks, None if all_versions else [compiler_version])
        cached.sort(key=lambda record: record.created_at, reverse=True)
        with _memo_lock:
            _memo[key] = cached
    return [record for record in cached if record.matches(filters)]
