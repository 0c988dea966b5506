"""One rank of a stress scenario, in its own process: `python -m stress.worker '<json>'`.

Ranks meet at file barriers so that they enter (and exit) the context at the same instant, and report what
they saw as one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs


def barrier(folder: Path, name: str, rank: int, ranks: int, timeout: float = 300.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{name}.*"))) < ranks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name} timed out")
        time.sleep(0.01)


def main(spec: dict) -> dict:
    rank, ranks = spec["rank"], spec["ranks"]
    cache, version = Path(spec["cache_dir"]), spec["compiler_version"]
    barriers = Path(spec["barriers"])
    graphs = make_graphs(spec["graphs"], seed=spec["seed"], neff_size=spec.get("neff_size"))
    barrier(barriers, "enter", rank, ranks)
    with hub_neuronx_cache(spec["model"], compiler_version=version, bucket=spec["bucket"], cache_dir=cache) as run:
        states = {e.name: e.state for e in scan_entries(cache, version)}
        complete_at_start = sum(state is EntryState.SUCCESS for state in states.values())
        if spec.get("compile_rank") == rank:
            for graph in graphs:
                compile_graph(cache, version, graph)
        barrier(barriers, "exit", rank, ranks)
    return {"rank": rank, "fetched": run.fetched, "bytes": run.bytes_downloaded, "synced": run.synced,
            "complete_at_start": complete_at_start, "warnings": run.warnings}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
