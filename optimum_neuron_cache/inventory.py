"""What a bucket holds, by compiler version and area (flat, or model and task): for `neuron-cache ls`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bucket_server.protocol import MAX_RECORD_BYTES

from . import remote_layout as layout
from .client import BucketClient
from .survey import BucketSurvey, add_listing

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
    """Group one version's recursive listing into areas; entries count only when complete. The listing is
    classified as `prune`, `scrub` and `du` classify it (survey.add_listing)."""
    survey = BucketSurvey()
    found = add_listing(survey, version, listing)
    if survey.bad_sizes:
        log.warning("optimum-neuron-cache: skipped %d listed file(s) whose size is not a valid number of bytes, "
                    "e.g. %s", len(survey.bad_sizes), survey.bad_sizes[0])
    summaries: dict[str, AreaSummary] = {}
    for (area, _module), entry in found.entries.items():
        summary = summaries.setdefault(area, AreaSummary(version, area))
        if entry.complete:
            summary.entries += 1
            summary.bytes += entry.bytes
        else:
            summary.incomplete += 1
    records: dict[str, list[str]] = {}
    for record in found.records:
        # a record too large to be one is counted, never read (`ls` downloads the listed paths)
        records.setdefault(record.area, []).append(record.file.path if 0 < record.file.size <= MAX_RECORD_BYTES else "")
    for area, paths in records.items():
        summary = summaries.setdefault(area, AreaSummary(version, area))
        summary.records, summary.record_paths = len(paths), sorted(path for path in paths if path)
    return sorted(summaries.values(), key=lambda s: (s.area != "", s.area.lower()))


def bucket_inventory(client: BucketClient, *, compiler_version: str | None = None, model_folder: str | None = None) -> Inventory:
    """One listing per compiler version (of the model's folder only, with `model_folder`)."""
    if compiler_version:
        versions = [compiler_version]
    else:
        versions = layout.versions_in(client.folders(""))
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
