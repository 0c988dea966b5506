"""The invariants the reliability tests and the stress script check after every trial (docs/reliability.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.local_cache import DONE, EntryState, scan_entries


def digest(path: Path) -> str:
    """The sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_entries(root: Path, version: str) -> dict[str, dict[str, str]]:
    """module -> {file: sha256} of a cache's success entries: the truth a fetched copy must equal."""
    return {e.name: {name: digest(e.path / name) for name in e.files if layout.is_publishable(name)}
            for e in scan_entries(root, version) if e.state.publishable}


def local_violations(root: Path, version: str, reference: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Entries libneuronxla would take as a hit (model.done) that are not complete and byte-identical to the
    reference; plus leftovers that are not entries at all."""
    problems = []
    for entry in scan_entries(root, version):
        if DONE not in entry.files:
            continue
        expected = reference.get(entry.name)
        if expected is None:
            problems.append(f"{entry.name}: a hit that no reference entry has")
            continue
        got = {name: digest(entry.path / name) for name in entry.files if layout.is_publishable(name)}
        if got != expected:
            problems.append(f"{entry.name}: hit differs from the reference ({sorted(set(got) ^ set(expected)) or 'bytes'})")
        if entry.state is not EntryState.SUCCESS:
            problems.append(f"{entry.name}: has model.done but is {entry.state.value}")
    return problems


def bucket_violations(listing: Iterable[Mapping[str, Any]], version: str,
                      reference: Mapping[str, Mapping[str, int]] | None = None) -> list[str]:
    """Commit files whose entry is missing files or has short ones, anywhere in the bucket; anything that is
    not allow-listed. `reference`: module -> {file: size} of the source entries."""
    prefix = layout.version_prefix(version) + "/"
    entries: dict[tuple[str, str], dict[str, int]] = {}
    problems = []
    for item in listing:
        path = str(item["path"])
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        where = layout.split_version_path(version, path)
        if where is not None and (where.record or where.manifest or where.stamp):  # metadata the publish writes, not entries
            continue
        if parts[-1] not in layout.PUBLISHABLE_FILES:
            problems.append(f"{path}: not an allow-listed file")
            continue
        entries.setdefault(("/".join(parts[:-2]), parts[-2]), {})[parts[-1]] = int(item["size"])
    for (area, module), files in entries.items():
        commit = layout.commit_file(files, version)
        if commit not in files:
            continue  # not committed: invisible to readers, healed by the next sync
        if "model.neff" not in files:
            problems.append(f"{area}/{module}: {commit} without model.neff")
        if reference is not None:
            expected = reference.get(module, {})
            for name, size in expected.items():
                if files.get(name) != size:
                    problems.append(f"{area}/{module}/{name}: {files.get(name)} bytes, expected {size}")
    return problems


def reference_sizes(root: Path, version: str) -> dict[str, dict[str, int]]:
    """module -> {file: size} of a cache's success entries (allow-listed files): what a bucket's copies must equal."""
    return {e.name: {n: s for n, s in e.files.items() if layout.is_publishable(n)}
            for e in scan_entries(root, version) if e.state.publishable}
