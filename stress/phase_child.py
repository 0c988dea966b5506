"""A run that dies where it is told: `python -m stress.phase_child '<json>'`.

It enters `hub_neuronx_cache` for a model (fetching what the bucket holds), compiles `graphs` new graphs in the
body, and exits (publishing them with an export record). NEURON_CACHE_CRASH_AT (crashpoints.py) makes it
SIGKILL itself at a named phase; `"body": "kill"` or `"body": "term"` makes it die in the body, after compiling,
by SIGKILL or SIGTERM (a scheduler stopping the job).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs


def main(spec: dict) -> None:
    graphs = make_graphs(spec["graphs"], seed=spec["seed"], neff_size=spec["neff_size"])
    with hub_neuronx_cache(spec["model"], task=spec["task"], export_config=spec["export_config"],
                           compiler_version=spec["compiler_version"], bucket=spec["bucket"], cache_dir=spec["cache_dir"]):
        for graph in graphs:
            compile_graph(spec["cache_dir"], spec["compiler_version"], graph)
        if spec.get("body") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if spec.get("body") == "term":
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
