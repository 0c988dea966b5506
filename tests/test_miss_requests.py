"""A miss explains itself for at most one request: a run for a model the bucket has never seen costs the same
requests in a bucket of one compiler version as in one of six, whatever the models they hold (counted in the
Hub emulator's request log). Comparing other compiler versions is `neuron-cache explain`'s job."""

from __future__ import annotations

from pathlib import Path

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

VERSIONS = [f"2.{16 + i}.1.0+abc" for i in range(6)]


def _fill(bucket: str, cache: Path, versions: list[str], models: list[str]) -> None:
    BucketClient(BucketRef("hf", bucket)).create()
    for version in versions:
        for model in models:
            with hub_neuronx_cache(model, compiler_version=version, bucket=bucket, cache_dir=cache):
                compile_graph(cache, version, make_graphs(1, seed=model + version, neff_size=2000)[0])


def _never_seen(hub, bucket: str, cache: Path, compile_one: bool) -> tuple[list[tuple[str, str]], list[str], int]:
    """(the Hub requests, the miss reasons, the server requests) of one run for a model the bucket lacks."""
    hub.requests.clear()
    with hub_neuronx_cache("org/never-seen", compiler_version=VERSIONS[-1], bucket=bucket, cache_dir=cache) as run:
        if compile_one:
            compile_graph(cache, VERSIONS[-1], make_graphs(1, seed="never-seen", neff_size=2000)[0])
    return hub.requests.snapshot(), run.miss_reasons, run.requests


def test_a_miss_costs_the_same_requests_whatever_the_bucket_holds(tmp_path, hub):
    _fill("test/small", tmp_path / "pub", VERSIONS[-1:], ["org/a"])
    _fill("test/big", tmp_path / "pub", VERSIONS, ["org/a", "org/b", "org/c"])
    for compile_one in (False, True):
        small = _never_seen(hub, "test/small", tmp_path / f"small-{compile_one}", compile_one)
        big = _never_seen(hub, "test/big", tmp_path / f"big-{compile_one}", compile_one)
        assert [(method, path.replace("test/small", "test/big")) for method, path in small[0]] == big[0]
        assert small[2] == big[2]
        requests, reasons, _ = big
        # Before any publish: the model's area, `models/` for the casing, the PR #1102 layout's folder of the
        # model (read-only bridge); the reason needs no more, and no other compiler version is listed.
        reads = [path for method, path in requests if "/tree/" in path]
        assert len(reads) <= 3 and all(f"neuronxcc-{VERSIONS[-1]}".replace("+", "%2B") in path for path in reads)
        if compile_one:
            assert len(reasons) == 1 and "no entries for org/never-seen" in reasons[0]
        else:
            assert reasons == [] and len(requests) == len(reads) <= 3  # nothing compiled: nothing to explain or publish
