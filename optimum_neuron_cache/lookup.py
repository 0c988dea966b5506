"""Lookup: which export configurations of a model were compiled already, from the export records.

Cheap by construction: for one model, task and compiler version it costs one listing of the `exports/`
folder and one download of the records (a listing of `models/` more when the casing differs), whatever the
size of the bucket. Results are memoized in-process, keyed by bucket, endpoint, a fingerprint of the token
(never the token) and the query; failed lookups are not memoized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bucket_server.protocol import MAX_RECORD_BYTES

from . import remote_layout as layout
from .config_fields import ALIASES, names_of
from .buckets import BucketRef, resolve_bucket
from .client import BucketClient, read_token
from .errors import CompilerVersionError
from .local_cache import version_from_dir_name
from .neuron_sdk import resolve_compiler_version, validate_compiler_version
from .records import ExportRecord
from .server_launcher import hub_endpoint

log = logging.getLogger("optimum_neuron_cache")

#: No compile of one graph takes a month: a larger duration in a record is corrupt or hostile, not slow.
MAX_COMPILE_SECONDS = 30 * 24 * 3600.0

#: Filter name -> the export-config keys that carry it (config_fields.py).
FILTER_KEYS = ALIASES


@dataclass(frozen=True)
class CachedExport(ExportRecord):
    """An export record found in the bucket, and where it lives there."""

    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """What `lookup --json` prints: the configuration, not the digests kept for the bucket server."""
        return {key: value for key, value in asdict(self).items() if key != "digests"}

    def matches(self, filters: Mapping[str, Any]) -> bool:
        """Whether every given filter matches one of the config keys that carry it (numbers compared as numbers)."""
        for name, wanted in filters.items():
            if wanted is None:
                continue
            keys = names_of(name)
            values = [self.export_config[key] for key in keys if key in self.export_config]
            if not any(_same(value, wanted) for value in values):
                return False
        return True


def _same(value: Any, wanted: Any) -> bool:
    try:
        return int(value) == int(wanted)
    except (TypeError, ValueError):
        return str(value).strip().lower() == str(wanted).strip().lower()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_bucket_json(text: str) -> Any:
    """JSON from the bucket: NaN, Infinity and numbers that overflow to them (1e309) are refused, so no
    figure read from a bucket can poison a sum, a comparison or the JSON we print."""
    return json.loads(text, parse_float=_finite, parse_constant=_not_a_number)


def _compile_seconds(value: object) -> dict[str, float]:
    """compile_seconds: MODULE name -> seconds, each finite, from 0 to MAX_COMPILE_SECONDS."""
    if not isinstance(value, dict):
        raise ValueError("compile_seconds is not an object")
    seconds: dict[str, float] = {}
    for name, number in value.items():
        if not layout.is_module_name(name):
            raise ValueError(f"compile_seconds names {name!r}, not a MODULE entry")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= MAX_COMPILE_SECONDS:
            raise ValueError(f"compile_seconds of {name} is {number!r}, not a number of seconds from 0 to {MAX_COMPILE_SECONDS:.0f}")
        seconds[name] = float(number)
    return seconds


def parse_record(text: str, path: str) -> CachedExport | None:
    """A record, or None (with a warning) when it is not one: buckets hold whatever someone put there.
    Every number in it is finite, and its compile durations are bounded, or the whole record is skipped."""
    try:
        data = load_bucket_json(text)
        if not isinstance(data, dict) or not isinstance(data.get("export_config"), dict):
            raise ValueError("not an export record")
        flags = data.get("compile_flags", [])
        modules = data.get("modules", [])
        if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise ValueError("compile_flags is not a list of strings")
        if not (isinstance(modules, list) and all(isinstance(m, str) and layout.is_module_name(m) for m in modules)):
            raise ValueError("modules is not a list of MODULE names")
        seconds = _compile_seconds(data.get("compile_seconds", {}))
        digests = data.get("digests", {})  # checked where it is used: by the bucket server
        if not (isinstance(digests, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
            digests = {}
        return CachedExport(
            model_id=str(data["model_id"]), task=str(data["task"]), compiler_version=str(data["compiler_version"]),
            export_config=data["export_config"], compile_flags=flags, modules=modules, compile_seconds=seconds,
            digests=digests,
            created_at=str(data.get("created_at", "")), package_version=str(data.get("package_version", "")), path=path,
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("optimum-neuron-cache: ignoring malformed export record %s: %s", path, exc)
        return None


_memo: dict[tuple[Any, ...], list[CachedExport]] = {}
_memo_lock = threading.Lock()


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
    return sorted(v for v in (version_from_dir_name(name) for name in client.folders("")) if v)


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


def read_records(client: BucketClient, paths: list[str]) -> list[CachedExport]:
    """Download and parse export records, all in one request; malformed ones are skipped with a warning."""
    if not paths:
        return []
    with tempfile.TemporaryDirectory(prefix="neuron-cache-records-") as tmp:
        files = [{"path": path, "local_path": str(Path(tmp) / f"{index}.json")} for index, path in enumerate(paths)]
        client.download(files)
        records = [parse_record(Path(item["local_path"]).read_text(encoding="utf-8", errors="replace"), item["path"])
                   for item in files if Path(item["local_path"]).exists()]
    return [record for record in records if record is not None]


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
    key = (str(ref), hub_endpoint(), _token_fingerprint(ref), model.folder.lower(), tuple(tasks or ()), compiler_version, all_versions)
    with _memo_lock:
        cached = _memo.get(key)
    if cached is None:
        client = client or BucketClient(ref)
        paths = [path for version in _versions(client, compiler_version, all_versions)
                 for path in _record_paths(client, version, model.folder, tasks)]
        cached = read_records(client, paths)  # every version's records in one download
        cached.sort(key=lambda record: record.created_at, reverse=True)
        with _memo_lock:
            _memo[key] = cached
    return [record for record in cached if record.matches(filters)]
