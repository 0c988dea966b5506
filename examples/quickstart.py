"""Quick start: wrap a (simulated) compile with the bucket cache, on the embedded default bucket.

No account and no Neuron hardware: the bucket is a directory under ~/.cache/optimum-neuron-cache, and the
compiler is the simulated neuronx-cc, which writes cache entries exactly as the real one does.

    uv run python examples/quickstart.py

Machine A compiles (a miss) and the cache syncs the new entries on exit; machine B, with a fresh compile
cache, fetches them on enter and every compile is a hit. Run it twice: the second time, A hits too.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import resolve_bucket
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

MODEL = "meta-llama/Llama-3.2-1B"
TASK = "text-generation"
EXPORT_CONFIG = {"batch_size": 1, "sequence_length": 4096, "tensor_parallel_size": 2, "auto_cast_type": "bf16", "target": "trn1"}
COMPILER_VERSION = "2.21.33363.0+82129205"  # what `neuronx-cc --version` prints; read from the SDK when installed
SECONDS_PER_GRAPH = 1.0  # the real compiler takes 10 s to 4 min per graph


def export(cache_dir: Path, label: str) -> None:
    started = time.monotonic()
    with hub_neuronx_cache(MODEL, TASK, EXPORT_CONFIG, compiler_version=COMPILER_VERSION, cache_dir=cache_dir) as run:
        print(f"[{label}] enter: fetched {len(run.fetched)} entries from {run.bucket}")
        results = [compile_graph(cache_dir, COMPILER_VERSION, graph, seconds=SECONDS_PER_GRAPH)
                   for graph in make_graphs(3, seed=MODEL, hlo_size=64 * 1024, neff_size=2 * 1024 * 1024)]
        hits = sum(result.hit for result in results)
        print(f"[{label}] compile: {hits} cache hits, {len(results) - hits} misses (compiled)")
    print(f"[{label}] exit: synced {len(run.synced)} new entries" + (f", export record {run.record}" if run.record else ""))
    print(f"[{label}] took {time.monotonic() - started:.1f}s")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    print(f"bucket: {resolve_bucket(None)} (set NEURON_CACHE_BUCKET or pass bucket=... to share through the Hub)")
    with tempfile.TemporaryDirectory(prefix="neuron-cache-") as tmp:
        export(Path(tmp) / "machine-a", "machine A")
        export(Path(tmp) / "machine-b", "machine B, fresh cache")


if __name__ == "__main__":
    main()
