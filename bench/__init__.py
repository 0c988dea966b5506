"""Benchmark harness of optimum-neuron-cache: `python -m bench` (docs/performance.md).

It generates realistic workloads, runs this project and its baselines in one run on the same data (the
local Hub emulator with the real huggingface_hub + hf_xet, and directory buckets), and prints tables (and
writes JSON) of medians over repeated runs, each figure with its ratio to its baseline. Not a test: CI runs
it in smoke mode only (`--smoke`), to keep it working.
"""

#: Figure groups, in run order, and the figure ids each produces per backend ("{backend}.{name}").
FIGURES = {
    "fetch": ("fetch_cold",),
    "verify": ("verify_cost", "verify_cost_link"),  # the link figure is hf only
    "sync": ("sync_new", "sync_again"),
    "noop": ("noop_warm",),
    "cold": ("noop_cold_server",),  # hf only: a dir bucket needs no endpoint, its cold start is the same server
    "concurrent": ("concurrent",),
    "lookup": ("lookup",),
    "leases": ("lease_one", "lease_many"),  # hf only: hosts compiling through the shim, on a Hub bucket
}


def expected_figures(backends: tuple[str, ...] = ("hf", "dir")) -> list[str]:
    """Every figure id a full run produces."""
    return [f"{backend}.{name}" for backend in backends for group, names in FIGURES.items() for name in names
            if not (backend == "dir" and (group in ("cold", "leases") or name == "verify_cost_link"))]
