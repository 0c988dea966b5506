"""Lookup as the benchmark measures it, and its baseline.

The figure measures `optimum_neuron_cache.lookup.lookup_cache` (the `neuron-cache lookup` CLI's engine)
whenever it can be imported. `interim_lookup` is the stand-in written before it landed, kept only so the
harness runs on a tree without it: it reads the remote layout directly (docs/remote-layout.md), the way lookup
is specified to:

1. list the bucket's root once (non-recursive) to find the `neuronxcc-<ver>` folders;
2. per version, list `neuronxcc-<ver>/models/<folder>/<task>/exports/` (non-recursive);
3. download every export record found, in one request, and parse them.

`naive_lookup` is the baseline: list every version's whole tree and filter.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.client import BucketClient

try:  # pragma: no cover - depends on another engineer's work
    from optimum_neuron_cache.lookup import lookup_cache as LOOKUP_CACHE
except ImportError:
    LOOKUP_CACHE = None


def _read_records(client: BucketClient, paths: list[str]) -> list[dict[str, Any]]:
    if not paths:
        return []
    with tempfile.TemporaryDirectory(prefix="onc-lookup-") as tmp:
        files = [{"path": path, "local_path": str(Path(tmp) / f"{index}.json")} for index, path in enumerate(paths)]
        client.download(files)
        return [json.loads(Path(item["local_path"]).read_text()) for item in files]


def interim_lookup(client: BucketClient, model_id: str, task: str) -> list[dict[str, Any]]:
    """Export records of `model_id` / `task` in every compiler version of the bucket."""
    folder = layout.model_ref(model_id).folder
    versions = []
    for item in client.list("", recursive=False):
        if item.get("type") == "directory":
            version = layout.parse_version_prefix(item["path"].rsplit("/", 1)[-1])
            if version:
                versions.append(version)
    paths = []
    for version in versions:
        prefix = layout.exports_prefix(version, folder, task)
        paths += [item["path"] for item in client.list(prefix, recursive=False)
                  if item.get("type") == "file" and item["path"].endswith(".json")]
    return _read_records(client, paths)


def naive_lookup(client: BucketClient, model_id: str, task: str) -> list[dict[str, Any]]:
    """The baseline: what one does without an index, e.g. `hf buckets ls -R`: list every compiler version's
    tree and keep the model's export records."""
    folder = layout.model_ref(model_id).folder
    versions = [item["path"] for item in client.list("", recursive=False)
                if item.get("type") == "directory" and layout.parse_version_prefix(item["path"])]
    paths = []
    for prefix in versions:
        wanted = f"{layout.exports_prefix(layout.parse_version_prefix(prefix) or '', folder, task)}/"
        paths += [item["path"] for item in client.list(prefix, recursive=True) if item["path"].startswith(wanted)]
    return _read_records(client, paths)
