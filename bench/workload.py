"""Realistic workloads: a model's compile cache, and a bucket holding it among many other models.

Everything is deterministic for a seed. Entries are written by the simulated compiler
(`optimum_neuron_cache.testing.simulated_compiler`), so they look on disk exactly as neuronx-cc's do: HLO, flags,
NEFF, `model.done`; failed entries leave `model.log`, killed compiles leave a lock.

Sizes: NEFFs log-normal around `neff_median` (capped at `neff_max`), HLOs log-uniform between `hlo_min` and
`hlo_max`. Sizes come from one random stream and content from another, so two caches generated with the
same `sizes_seed` and different `content_seed` have equal byte counts and distinct bytes (no dedup between a
method and its baseline).

A large bucket is built cheaply: the other models' entries reuse the content of a small pool of distinct
entries (uploaded once). Downloads never dedup identical files (checked with hf_xet 1.8: ten copies of one
hash cost ten transfers), so a baseline that downloads the whole bucket pays for every copy, as it would
on the Hub.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, Graph, compile_graph

FLAGS = ("--model-type=transformer", "--auto-cast=none", "--target=trn1")
TASK = "text-generation"
TARGET_MODEL = "bench-org/Target-Model-7B"
#: The same workload published without an export config (a trainer run without one, the compiler shim, `neuron-cache
#: sync`): no export record, only the digest manifests every publish leaves.
PLAIN_MODEL = "bench-org/Plain-Model-7B"
PUBLISHED_FILES = ("model.hlo_module.pb", "compile_flags.json", "model.neff", "model.done")


@dataclass(frozen=True)
class Sizes:
    """Workload sizes (see bench/config.py for the presets)."""

    entries: int = 16  # MODULE entries of the benchmarked model (the issue: 2 to 40)
    neff_median: int = 3_000_000
    neff_sigma: float = 1.2
    neff_min: int = 64_000
    neff_max: int = 100_000_000
    hlo_min: int = 10_000
    hlo_max: int = 5_000_000
    failed: int = 2  # failed entries mixed into every finished compile
    locked: int = 1  # killed compiles (stale lock) mixed in
    other_entries_min: int = 2  # entries of each other model in the bucket, log-uniform
    other_entries_max: int = 40
    pool: int = 24  # distinct entries whose bytes the other models' entries reuse
    #: The other models' NEFFs are this much smaller than the benchmarked model's: a cheaper bucket to
    #: download whole, so ratios against `hf buckets sync` are conservative.
    other_neff_scale: float = 0.25
    versions: int = 3  # compiler versions in the bucket
    records: int = 3  # export records (configurations) of the benchmarked model


def compiler_versions(count: int) -> list[str]:
    """The benchmarked version first, then older ones (all write `model.done`)."""
    known = ["2.21.33363.0+82129205", "2.20.28227.0+e5c31c5b", "2.19.8089.0+8ab9f450", "2.18.121.0+df4f2c94"]
    return known[: max(1, min(count, len(known)))]


def _neff_size(rng: random.Random, sizes: Sizes) -> int:
    value = int(rng.lognormvariate(math.log(sizes.neff_median), sizes.neff_sigma))
    return max(sizes.neff_min, min(sizes.neff_max, value))


def _hlo_size(rng: random.Random, sizes: Sizes) -> int:
    return int(math.exp(rng.uniform(math.log(sizes.hlo_min), math.log(sizes.hlo_max))))


def make_graphs(count: int, sizes: Sizes, *, sizes_seed: str, content_seed: str) -> list[Graph]:
    """`count` graphs whose sizes depend on `sizes_seed` only and whose bytes depend on `content_seed`."""
    size_rng = random.Random(f"sizes:{sizes_seed}")
    graphs = []
    for index in range(count):
        hlo_size, neff_size = _hlo_size(size_rng, sizes), _neff_size(size_rng, sizes)
        header = f"HloModule {content_seed}.{index}\n".encode()
        body = random.Random(f"content:{content_seed}:{index}").randbytes(max(0, hlo_size - len(header)))
        graphs.append(Graph(hlo=header + body, flags=FLAGS, neff_size=neff_size))
    return graphs


def compile_into(root: Path, version: str, sizes: Sizes, *, sizes_seed: str, content_seed: str,
                 count: int | None = None, noise: bool = True) -> list[Graph]:
    """Write a finished compile into the cache at `root`: `count` success entries plus, with `noise`, the
    failed and killed compiles of `sizes`. Returns the successful graphs."""
    count = sizes.entries if count is None else count
    good = make_graphs(count, sizes, sizes_seed=sizes_seed, content_seed=content_seed)
    for graph in good:
        compile_graph(root, version, graph)
    if noise:
        bad = make_graphs(sizes.failed + sizes.locked, Sizes(neff_median=4096, neff_min=1024, hlo_min=10_000, hlo_max=50_000),
                          sizes_seed=f"{sizes_seed}:noise", content_seed=f"{content_seed}:noise")
        for graph in bad[: sizes.failed]:
            try:
                compile_graph(root, version, graph, outcome="failed")
            except CompileFailed:
                pass
        for graph in bad[sizes.failed :]:
            compile_graph(root, version, graph, outcome="crash")
    return good


def publishable_bytes(root: Path, version: str) -> int:
    """Bytes of the allow-listed files of the success entries: what a sync must upload."""
    return sum(size for entry in scan_entries(root, version) if entry.state.publishable
               for name, size in entry.files.items() if layout.is_publishable(name))


def export_config(index: int) -> dict[str, object]:
    return {"batch_size": [1, 4, 8, 16][index % 4], "sequence_length": 4096, "tensor_parallel_size": 8,
            "auto_cast_type": "bf16", "target": "trn1", "variant": index}


# ------------------------------------------------------------------------------- other models


@dataclass(frozen=True)
class OtherEntry:
    version: str
    folder: str  # per-model folder (`org--name`)
    module: str
    pool_index: int


def other_model_folder(index: int) -> str:
    return f"bench-org--model-{index:04d}"


def other_entries(models: int, sizes: Sizes, pool_modules: list[str], *, seed: str = "bucket") -> list[OtherEntry]:
    """The entries of `models - 1` other models (the benchmarked model is the last one). Each model has a
    log-uniform number of entries; every model is in the first compiler version, some in older ones too."""
    rng = random.Random(seed)
    versions = compiler_versions(sizes.versions)
    result = []
    for index in range(max(0, models - 1)):
        folder = other_model_folder(index)
        model_versions = [versions[0]] + [v for v in versions[1:] if rng.random() < 0.3]
        for version in model_versions:
            low, high = math.log(sizes.other_entries_min), math.log(max(sizes.other_entries_min, sizes.other_entries_max))
            count = int(round(math.exp(rng.uniform(low, high))))
            for entry in range(count):
                key = int.from_bytes(random.Random(f"{seed}:{folder}:{version}:{entry}").randbytes(8), "big")
                pool_index = rng.randrange(len(pool_modules))
                flags_hash = pool_modules[pool_index].rsplit("+", 1)[1]
                result.append(OtherEntry(version, folder, f"MODULE_{key}+{flags_hash}", pool_index))
    return result


def other_entry_paths(entry: OtherEntry) -> list[tuple[str, str]]:
    """(remote path, file name) of an other model's entry, in the flat area and in its model's area."""
    flat = layout.flat_entry_prefix(entry.version, entry.module)
    area = layout.model_entry_prefix(entry.version, entry.folder, TASK, entry.module)
    return [(f"{prefix}/{name}", name) for prefix in (flat, area) for name in PUBLISHED_FILES]


def other_record_paths(entries: list[OtherEntry]) -> list[str]:
    """One export record per (model, version) of the other models."""
    seen = sorted({(entry.version, entry.folder) for entry in entries})
    return [f"{layout.exports_prefix(version, folder, TASK)}/{random.Random(f'{version}{folder}').randbytes(8).hex()}.json"
            for version, folder in seen]


def populate_dir_bucket(bucket: Path, pool_root: Path, pool_version: str, entries: list[OtherEntry],
                        pool_modules: list[str], record_source: Path) -> int:
    """Add the other models' entries to a directory bucket by hard links to the pool (same filesystem).
    Returns the number of files added."""
    added = 0
    for entry in entries:
        source = pool_root / f"neuronxcc-{pool_version}" / pool_modules[entry.pool_index]
        for path, name in other_entry_paths(entry):
            target = bucket / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(source / name, target)
                added += 1
    for path in other_record_paths(entries):
        target = bucket / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(record_source, target)
            added += 1
    return added


def link_tree(source: Path, dest: Path) -> None:
    """A copy of `source` at `dest` made of hard links (immutable content: buckets, Xet stores)."""
    shutil.copytree(source, dest, copy_function=os.link)
