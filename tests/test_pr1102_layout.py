"""A bucket written in the layout of optimum-neuron's bucket PR (huggingface/optimum-neuron#1102,
optimum/neuron/cache/bucket_cache.py and bucket_utils.py) is usable as it is: the per-model fetch installs its
model areas' entries, `lookup` reads its records, and the compatibility layer reads the bucket it saved."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef, save_bucket
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.local_cache import EntryState, read_entry, version_dir_name
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, entry_path, make_graphs

MODEL = "meta-llama/Llama-3.1-8B"
CONFIG = {"batch_size": 4, "sequence_length": 4096, "tp_degree": 8, "torch_dtype": "bfloat16", "instance_type": "trn1"}


def write_pr1102_bucket(bucket: BucketRef, origin: Path, version: str, graphs, task: str = "text-generation") -> list[str]:
    """What that PR's sync_cache writes: every file of each new MODULE dir to the flat area and to
    `neuronxcc-<ver>/<org>/<name>/<task>/`, then `exports/<optimum-neuron version>/<sha256(config)[:8]>.json`."""
    adds, modules = [], []
    for graph in graphs:
        compile_graph(origin, version, graph)
        path = entry_path(origin, version, graph)
        modules.append(path.name)
        for item in path.iterdir():
            adds.append({"dest": f"{version_dir_name(version)}/{path.name}/{item.name}", "local_path": str(item)})
            adds.append({"dest": f"{version_dir_name(version)}/{MODEL}/{task}/{path.name}/{item.name}", "local_path": str(item)})
    digest = hashlib.sha256(json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
    adds.append({"dest": f"{version_dir_name(version)}/{MODEL}/{task}/exports/0.4.1/{digest}.json",
                 "content": json.dumps(CONFIG, sort_keys=True, indent=2)})
    BucketClient(bucket).batch(add=adds)
    return modules


def test_per_model_fetch_and_lookup_read_the_pr1102_layout(tmp_path, bucket, version):
    modules = write_pr1102_bucket(bucket, tmp_path / "origin", version, make_graphs(2, seed="pr1102"))
    with hub_neuronx_cache(MODEL, "text-generation", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert sorted(run.fetched) == sorted(f"{version_dir_name(version)}/{module}" for module in modules)
    for module in modules:
        assert read_entry(tmp_path / "B" / version_dir_name(version) / module, version).state is EntryState.SUCCESS
    # Nothing was written into that layout's area: this package writes its own layout only.
    listing = {item["path"] for item in BucketClient(bucket).list(f"{version_dir_name(version)}/{MODEL}", recursive=True)}
    assert all(path.startswith(f"{version_dir_name(version)}/{MODEL}/text-generation/") for path in listing)
    assert [path for path in listing if "/exports/" in path] == [
        path for path in listing if "/exports/0.4.1/" in path] and len([p for p in listing if "/exports/" in p]) == 1

    clear_lookup_cache()
    records = [r for r in lookup_cache(MODEL, "text-generation", compiler_version=version, bucket=bucket)
               if r.path.startswith(f"{version_dir_name(version)}/{MODEL}/")]
    assert len(records) == 1 and records[0].export_config == CONFIG
    assert records[0].model_id == MODEL and records[0].task == "text-generation" and records[0].compiler_version == version
    clear_lookup_cache()
    assert lookup_cache(MODEL, compiler_version=version, bucket=bucket, batch_size=4)  # every task, filtered


def test_a_malformed_pr1102_record_is_skipped(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "b"))
    BucketClient(bucket).create()
    BucketClient(bucket).batch(add=[
        {"dest": f"{version_dir_name(version)}/{MODEL}/default/exports/0.4.1/0123abcd.json", "content": "[1, 2"},
        {"dest": f"{version_dir_name(version)}/{MODEL}/default/exports/0.4.1/not-a-hash.json", "content": "{}"},
        {"dest": f"{version_dir_name(version)}/{MODEL}/default/exports/0.4.1/89abcdef.json", "content": '{"batch_size": 1e309}'},
    ])
    clear_lookup_cache()
    assert lookup_cache(MODEL, compiler_version=version, bucket=bucket) == []


def test_the_compat_layer_reads_the_bucket_that_pr_saved_and_ours_wins(tmp_path, version, monkeypatch, isolated_env):
    from optimum_neuron_cache.integrations.optimum_neuron import get_hub_cached_entries

    theirs = BucketRef("dir", str(tmp_path / "theirs"))
    BucketClient(theirs).create()
    write_pr1102_bucket(theirs, tmp_path / "origin", version, make_graphs(1, seed="pr1102-compat"))
    hf_home = Path(isolated_env["HF_HOME"])
    hf_home.mkdir(parents=True, exist_ok=True)
    (hf_home / "optimum_neuron_cache_bucket").write_text(theirs.location)
    clear_lookup_cache()
    [entry] = get_hub_cached_entries(MODEL, "text-generation", compiler_version=version)
    assert entry["batch_size"] == 4 and entry["tp_degree"] == 8

    ours = BucketRef("dir", str(tmp_path / "ours"))
    BucketClient(ours).create()
    save_bucket(ours)  # our own saved setting wins over theirs
    clear_lookup_cache()
    assert get_hub_cached_entries(MODEL, "text-generation", compiler_version=version) == []
    save_bucket(None)
    monkeypatch.setenv("NEURON_CACHE_BUCKET", ours.location)  # and so does the variable
    clear_lookup_cache()
    assert get_hub_cached_entries(MODEL, "text-generation", compiler_version=version) == []


@pytest.mark.parametrize("text", ["", "   \n", "not a bucket name!"])
def test_an_empty_or_unreadable_saved_setting_is_ignored(tmp_path, isolated_env, text):
    from optimum_neuron_cache.buckets import embedded_default
    from optimum_neuron_cache.integrations.optimum_neuron import _bucket

    hf_home = Path(isolated_env["HF_HOME"])
    hf_home.mkdir(parents=True, exist_ok=True)
    (hf_home / "optimum_neuron_cache_bucket").write_text(text)
    assert _bucket(None, None) == embedded_default()
