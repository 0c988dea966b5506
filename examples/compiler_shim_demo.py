"""The neuronx-cc shim: a graph compiled for one model is a cache hit for another, at the compiler.

    uv run python examples/compiler_shim_demo.py

No SDK needed: the "real" neuronx-cc is the simulated one, installed as an executable named `neuronx-cc`,
and libneuronxla's side (lock, HLO and flags into the cache entry, compiler call on
`model.MODULE_<key>+<hash>.hlo_module.pb`, NEFF in, `model.done`) is simulated by `jit_compile`. On a real
host, only the two lines marked "on Trainium" matter: install the shim, put it first on PATH.

Machine A compiles a model whose decoder layers share graphs with another model; the shim publishes each
NEFF to the bucket's flat area as it is compiled. Machine B compiles the *other* model with a fresh cache:
the shared graphs are found in the flat area by their MODULE key and never reach the compiler.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.integrations.compiler_shim import install_compiler_shim
from optimum_neuron_cache.testing.simulated_neuronx_cc import install_simulated_compiler, jit_compile
from optimum_neuron_cache.testing.simulated_compiler import make_graphs

VERSION = "2.21.33363.0+82129205"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="shim-demo-"))
    install_simulated_compiler(work / "sdk-bin")                      # stands in for the Neuron SDK's neuronx-cc
    shim = install_compiler_shim(work / "shim-bin")                    # on Trainium: the same line
    os.environ["PATH"] = os.pathsep.join([str(shim.parent), str(work / "sdk-bin"), os.environ["PATH"]])  # on Trainium: PATH=shim-bin:$PATH
    bucket = BucketRef("dir", str(work / "bucket"))
    BucketClient(bucket).create()
    os.environ.update(NEURON_CACHE_BUCKET=str(bucket), NEURON_CC_VERSION=VERSION,
                      SIMULATED_NEURONX_CC_LOG=str(work / "compiles.log"), SIMULATED_NEURONX_CC_SECONDS="0.5")

    shared = make_graphs(3, seed="shared-llama-decoder-layers")
    for machine, graphs in (("A", [*shared, *make_graphs(1, seed="model-a-head")]),
                            ("B", [*shared, *make_graphs(1, seed="model-b-head")])):
        cache = work / f"machine-{machine}"
        os.environ["NEURON_COMPILE_CACHE_URL"] = str(cache)
        before = len((work / "compiles.log").read_text().split()) if (work / "compiles.log").exists() else 0
        for graph in graphs:
            jit_compile(cache, VERSION, graph)
        after = len((work / "compiles.log").read_text().split())
        print(f"machine {machine}: {len(graphs)} graphs, {after - before} reached the compiler, "
              f"{len(graphs) - (after - before)} came from the bucket's flat area")
    flat = {item["path"].split("/")[1] for item in BucketClient(bucket).list(f"neuronxcc-{VERSION}")}
    print(f"bucket {bucket}: {len(flat)} entries in neuronxcc-{VERSION}/ (the flat area)")


if __name__ == "__main__":
    main()
