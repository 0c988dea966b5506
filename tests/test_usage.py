"""`neuron-cache du`: a bucket's bytes per compiler version, per model, unreferenced, and what a prune would
free, equal to what was published; hostile listings never become a figure. Emulator (hf) and directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.prune import PrunePolicy, plan_prune
from optimum_neuron_cache.survey import BucketSurvey, add_listing, survey_bucket
from optimum_neuron_cache.sync import sync_cache
from optimum_neuron_cache.testing.invariants import reference_entries, reference_sizes
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.usage import bucket_usage
from tests.lifecycle_helpers import run, uri

OLD = "2.20.1.0+aaaa"


def publish_model(root: Path, ref: BucketRef, version: str, model: str, seed: str, count: int) -> None:
    with hub_neuronx_cache(model, task="text-generation", export_config={"batch_size": 1}, compiler_version=version,
                           bucket=ref, cache_dir=root):
        for graph in make_graphs(count, seed=seed, neff_size=30_000):
            compile_graph(root, version, graph)


def entry_bytes(root: Path, version: str) -> int:
    return sum(sum(files.values()) for files in reference_sizes(root, version).values())


def test_bytes_per_version_model_and_unreferenced_match_what_was_published(tmp_path, bucket, version):
    publish_model(tmp_path / "old", bucket, OLD, "org/a", "a", 2)
    publish_model(tmp_path / "a", bucket, version, "org/a", "a", 2)
    publish_model(tmp_path / "b", bucket, version, "org/b", "b", 1)
    for graph in make_graphs(3, seed="flat", neff_size=30_000):
        compile_graph(tmp_path / "flat", version, graph)
    sync_cache(BucketClient(bucket), tmp_path / "flat")
    a, b, flat, old = (entry_bytes(tmp_path / name, v) for name, v in
                       (("a", version), ("b", version), ("flat", version), ("old", OLD)))

    usage = json.loads(run("du", "--bucket", uri(bucket), "--json", "--keep-versions", "1"))
    by_version = {v["compiler_version"]: v for v in usage["versions"]}
    new = by_version[version]
    assert new["entries"] == 3 + 3 + 3  # a's and b's entries twice (flat, area), the flat-only ones once
    assert new["flat_bytes"] == a + b + flat and new["model_bytes"] == a + b
    assert new["unreferenced_entries"] == 3 and new["unreferenced_bytes"] == flat
    assert new["bytes"] == new["flat_bytes"] + new["model_bytes"] + new["record_bytes"] and new["other_bytes"] == 0
    # Each content counts once: a model area's copy, or a file identical across entries, costs no more storage.
    contents = {sha: (tmp_path / name).joinpath(f"neuronxcc-{version}", module, file).stat().st_size
                for name in ("a", "b", "flat") for module, files in reference_entries(tmp_path / name, version).items()
                for file, sha in files.items()}
    assert new["unique_bytes"] == sum(contents.values()) + new["record_bytes"] < a + b + flat + new["record_bytes"]
    assert by_version[OLD]["flat_bytes"] == old
    models = {(m["compiler_version"], m["model"]): m for m in usage["models"]}
    assert models[(version, "org--a")]["entries"] == 2 and models[(version, "org--b")]["records"] == 1
    assert models[(version, "org--a")]["tasks"] == ["text-generation"]
    assert usage["prune"]["bytes"] == by_version[OLD]["bytes"] and usage["prune"]["entries"] == 4
    assert usage["bytes"] == sum(v["bytes"] for v in usage["versions"])

    out = run("du", "--bucket", uri(bucket), "--unreferenced-older-than", "0s")
    assert out.startswith("COMPILER ") and "org--a" in out and "org--b" in out
    assert "this prune would remove 3 entries and 0 export records" in out
    out = run("du", "--bucket", uri(bucket), "--compiler-version", OLD)
    assert OLD in out and version not in out


def test_an_empty_bucket_and_bad_input(bucket):
    assert "holds no compiler version folder" in run("du", "--bucket", uri(bucket))
    assert json.loads(run("du", "--bucket", uri(bucket), "--json"))["versions"] == []
    run("du", "--bucket", uri(bucket), "--compiler-version", "latest", code=2)


def test_hostile_sizes_and_times_never_become_figures(version):
    prefix = f"neuronxcc-{version}/MODULE_1+2"
    good = {"type": "file", "size": 10, "xet_hash": None, "digest": None, "uploaded": 1_800_000_000.0}
    listing = [
        {**good, "path": f"{prefix}/model.done"},
        {**good, "path": f"{prefix}/model.neff", "uploaded": math.nan},
        {**good, "path": f"{prefix}/model.hlo_module.pb", "size": -1},
        {**good, "path": f"{prefix}/compile_flags.json", "size": True},
        {**good, "path": f"{prefix}/wrapped_neff.hlo", "size": "12"},
        {**good, "path": f"{prefix}/model.hlo.pb", "size": 2**41},
        {**good, "path": f"neuronxcc-{version}/MODULE_3+4/model.done", "uploaded": 1e309},
        {**good, "path": f"neuronxcc-{version}/MODULE_3+4/model.neff", "uploaded": "yesterday"},
        {**good, "path": f"neuronxcc-{version}/../etc/passwd"},
    ]
    survey = BucketSurvey()
    found = add_listing(survey, version, listing)
    found.records_read = True  # (it has none)
    assert len(survey.bad_sizes) == 4
    entry = found.entries[("", "MODULE_1+2")]
    assert sorted(entry.files) == ["model.done", "model.neff"] and entry.bytes == 20
    assert entry.newest_upload is None  # one time is not a time: the entry is never judged old
    assert found.entries[("", "MODULE_3+4")].newest_upload is None
    assert [f.path for f in found.bad_names] == [f"neuronxcc-{version}/../etc/passwd"]
    usage = bucket_usage(survey, PrunePolicy(unreferenced_older_than=0.0, incomplete_older_than=0.0))
    assert usage.prune is not None and usage.prune.entries == 0  # unknown times: nothing is old enough
    json.dumps([usage.bytes, usage.unique_bytes, usage.unreferenced_bytes], allow_nan=False)
    assert layout.listed_time({"uploaded": 1_800_000_000}) == 1_800_000_000.0
    assert layout.listed_time({"mtime": 1_800_000_000}) is None  # the Hub's mtime is the uploader's file time


def test_listings_say_when_each_file_landed(tmp_path, bucket, version):
    publish_model(tmp_path / "a", bucket, version, "org/a", "t", 1)
    survey = survey_bucket(BucketClient(bucket))
    entries = list(survey.versions[version].entries.values())
    assert entries and all(entry.newest_upload is not None for entry in entries)
    assert plan_prune(survey, PrunePolicy(incomplete_older_than=0.0)).empty  # every entry is complete
