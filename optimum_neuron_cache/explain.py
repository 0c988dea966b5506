"""Why a compile missed: compare what this machine compiles (compiler version, flags in force, export config)
with what the bucket holds, field by field. Used by `neuron-cache explain`, `fetch` and the context manager.

Every line here costs requests only on the miss path: a warm run never pays for an explanation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import remote_layout as layout
from .client import BucketClient
from .config_fields import canonical, names_of, same_value, value_of
from .records import CachedExport

#: Versions looked at when telling "entries exist only for other compiler versions" (bounded cost).
MAX_VERSIONS_PROBED = 20


@dataclass(frozen=True)
class Comparison:
    """A record and how it differs from this machine's compile, field by field."""
    record: CachedExport
    differences: list[str]


def differences(record: CachedExport, compiler_version: str | None, flags: Sequence[str] | None,
                export_config: Mapping[str, Any] | None, target: str | None = None) -> list[str]:
    """Field by field, how `record` differs from this machine's compile. Fields this machine does not state
    (None) are not compared, nor a target that the record does not know (records from before targets were
    recorded, which name none in their export config either)."""
    diffs = []
    if compiler_version is not None and record.compiler_version != compiler_version:
        diffs.append(f"compiler version: bucket {record.compiler_version}, here {compiler_version}")
    there_target = record.effective_target
    if target is not None and there_target is not None and there_target != target:
        diffs.append(f"target: bucket {there_target}, here {target}")
    if flags is not None and list(record.compile_flags) != list(flags):
        only_bucket = [flag for flag in record.compile_flags if flag not in flags]
        only_here = [flag for flag in flags if flag not in record.compile_flags]
        detail = ", ".join(part for part in (f"bucket only: {' '.join(only_bucket)}" if only_bucket else "",
                                             f"here only: {' '.join(only_here)}" if only_here else "") if part)
        diffs.append(f"compile flags: {detail or 'same flags in another order'}")
    for key, here in sorted((export_config or {}).items()):
        if target is not None and key in names_of("target"):
            continue  # compared above, as a target
        there = record.export_config[key] if key in record.export_config else value_of(record.export_config,
                                                                                       canonical(key))
        if there is None or not same_value(there, here, key):
            diffs.append(f"{key}: bucket {'<absent>' if there is None else there}, here {here}")
    return diffs


def nearest(records: Sequence[CachedExport], compiler_version: str | None, flags: Sequence[str] | None,
            export_config: Mapping[str, Any] | None, limit: int = 3, target: str | None = None) -> list[Comparison]:
    """The `limit` records closest to this machine's compile (fewest differences, then oldest first)."""
    compared = [Comparison(record, differences(record, compiler_version, flags, export_config, target)) for record in records]
    return sorted(compared, key=lambda c: (len(c.differences), c.record.created_at))[:limit]


def time_saved(fetched: Sequence[str], records: Sequence[CachedExport]) -> tuple[float, int]:
    """(compile seconds the fetched entries saved, how many had no recorded duration), from the export records
    read with the entries: no request."""
    durations: dict[str, float] = {}
    for record in records:
        durations.update(record.compile_seconds)
    known = [durations[name] for name in fetched if name in durations]
    return float(sum(known)), len(fetched) - len(known)


def why_area_empty(client: BucketClient, compiler_version: str, folder: str, task: str, model_id: str,
                   known_models: Sequence[str] | None) -> str:
    """One line, for a run that compiled what the bucket did not have: why the model's area under this
    compiler version held nothing. At most one request: the folders of `models/` were listed on enter (to find
    the bucket's casing); only the model's tasks may be asked for. Other compiler versions are `neuron-cache
    explain`'s business (a listing per version)."""
    wanted = folder.lower()
    cased = [name for name in known_models or () if name.lower() == wanted] if known_models is not None else [folder]
    tasks = sorted(name for name in client.folders(layout.model_folder_prefix(compiler_version, cased[0]))
                   if name != task) if cased else []
    if tasks:
        return f"no entries for {model_id} task {task}; the bucket has it for other tasks: {', '.join(tasks)}"
    return (f"no entries for {model_id} under compiler {compiler_version} in this bucket "
            f"(`neuron-cache explain {model_id}` compares the other compiler versions)")


def why_nothing(client: BucketClient, compiler_version: str, folder: str, task: str | None, model_id: str) -> str:
    """One line: why the model's areas under this compiler version (of `task`, or of every task: None) hold
    nothing, looking across compiler versions (a listing per version, at most MAX_VERSIONS_PROBED): for
    `neuron-cache fetch`, never a run."""
    wanted = folder.lower()
    tasks_here = []
    here = [name for name in client.folders(layout.models_prefix(compiler_version)) if name.lower() == wanted]
    if here:
        tasks_here = client.folders(layout.model_folder_prefix(compiler_version, here[0]))
    others = sorted(name for name in tasks_here if name != task)
    if task is not None and task in tasks_here:
        also = f"; the bucket has it for other tasks: {', '.join(others)}" if others else ""
        return f"the area of {model_id} task {task} holds no complete entry (records or unfinished uploads only){also}"
    if task is None and tasks_here:
        return f"the areas of {model_id} (every task: {', '.join(others)}) hold no complete entry"
    if others:
        return f"no entries for {model_id} task {task}; the bucket has it for other tasks: {', '.join(others)}"
    versions = [v for v in layout.versions_in(client.folders("")) if v != compiler_version]
    others = [v for v in versions[-MAX_VERSIONS_PROBED:]
              if any(name.lower() == wanted for name in client.folders(layout.models_prefix(v)))]
    if others:
        return (f"entries for {model_id} exist only for other compiler versions: {', '.join(others)} "
                f"(this one is {compiler_version})")
    return f"no entries for {model_id} under any compiler version in this bucket"
