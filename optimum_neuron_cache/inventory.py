"""What a bucket holds, by compiler version and area (flat, or model and task): for `neuron-cache ls`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bucket_server.protocol import MAX_RECORD_BYTES

from . import remote_layout as layout
from .client import BucketClient
from .local_cache import version_from_dir_name

log = logging.getLogger("optimum_neuron_cache")


@dataclass
class AreaSummary:
    """One area of one compiler version: complete entries, incomplete ones, bytes, records."""
    compiler_version: str
    #: "" for the flat area, else `<model folder>/<task>`.
    area: str
    entries: int = 0
    incomplete: int = 0
    bytes: int = 0
    records: int = 0
    #: The bucket paths of the area's export records (for `ls`, which reads their targets).
    record_paths: list[str] = field(default_factory=list)


@dataclass
class Inventory:
    """What a bucket holds, area by area."""
    areas: list[AreaSummary] = field(default_factory=list)

    @property
    def versions(self) -> list[str]:
        """The compiler versions that hold anything."""
        return sorted({area.compiler_version for area in self.areas})


def summarize(version: str, listing: Iterable[Mapping[str, Any]]) -> list[AreaSummary]:
    """Group one version's recursive listing into areas; entries count only when complete."""
    modules: dict[tuple[str, str], dict[str, layout.RemoteFile]] = {}
    records: dict[str, list[str]] = {}
    bad_sizes: list[str] = []
    for item in listing:
        path = str(item.get("path", ""))
        where = layout.split_version_path(version, path) if item.get("type", "file") == "file" else None
        if where is None or where.manifest:
            continue
        if where.record:
            # a record too large to be one is counted, never read (`ls` downloads the listed paths)
            sane = 0 < (layout.listed_size(item) or 0) <= MAX_RECORD_BYTES
            records.setdefault(where.area, []).append(path if sane else "")
            continue
        size = layout.listed_size(item)
        if size is None:
            bad_sizes.append(path)
            continue
        files = modules.setdefault((where.area, where.module), {})
        files[where.filename] = layout.RemoteFile(where.filename, path, size, item.get("xet_hash"))
    if bad_sizes:
        log.warning("optimum-neuron-cache: skipped %d listed file(s) whose size is not a valid number of bytes, "
                    "e.g. %s", len(bad_sizes), bad_sizes[0])
    summaries: dict[str, AreaSummary] = {}
    for (area, _module), files in modules.items():
        summary = summaries.setdefault(area, AreaSummary(version, area))
        if layout.complete_remote_entry(files, version):
            summary.entries += 1
            summary.bytes += sum(f.size for f in files.values())
        else:
            summary.incomplete += 1
    for area, paths in records.items():
        summary = summaries.setdefault(area, AreaSummary(version, area))
        summary.records, summary.record_paths = len(paths), sorted(path for path in paths if path)
    return sorted(summaries.values(), key=lambda s: (s.area != "", s.area.lower()))


def bucket_inventory(client: BucketClient, *, compiler_version: str | None = None, model_folder: str | None = None) -> Inventory:
    """One listing per compiler version (of the model's folder only, with `model_folder`)."""
    if compiler_version:
        versions = [compiler_version]
    else:
        versions = sorted(v for v in map(version_from_dir_name, client.folders("")) if v)
    inventory = Inventory()
    for version in versions:
        if model_folder:
            models = layout.models_prefix(version)
            folders = client.folders(models)
            cased = layout.reuse_casing(model_folder, folders)
            if cased not in folders:
                continue
            listing = client.list(f"{models}/{cased}", recursive=True)
        else:
            listing = client.list(layout.version_prefix(version), recursive=True)
        inventory.areas += summarize(version, listing)
    return inventory
