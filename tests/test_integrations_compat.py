"""The optimum-neuron compatibility layer: code written against optimum-neuron's cache API, with an import change."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.integrations.optimum_neuron import (
    get_hub_cached_entries,
    hub_neuronx_cache,
    select_hub_cached_entries,
    synchronize_hub_cache,
)
from optimum_neuron_cache.lookup import clear_lookup_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs


@pytest.fixture
def bucket(tmp_path, monkeypatch, version) -> str:
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    clear_lookup_cache()
    return str(ref)


def flat_modules(bucket: str, version: str) -> set[str]:
    return {item["path"].split("/")[1] for item in BucketClient(BucketRef("dir", bucket)).list(f"neuronxcc-{version}")
            if item["path"].split("/")[1].startswith("MODULE_")}


def test_the_three_generations_of_hub_neuronx_cache(tmp_path, bucket, version):
    cache = tmp_path / "cache"
    # 1. Model-repo cache with an entry: hub_neuronx_cache(entry=..., cache_repo_id=..., cache_dir=...)
    entry = SimpleNamespace(model_id="org/llama", task="text-generation",
                            neuron_config={"batch_size": 1, "sequence_length": 128, "tp_degree": 2, "torch_dtype": "bfloat16",
                                           "target": "trn1"})
    with hub_neuronx_cache(entry=entry, cache_repo_id=bucket, cache_dir=cache) as ctx:
        compile_graph(cache, version, make_graphs(1, seed="gen1")[0])
    assert len(ctx.run.synced) == 1 and ctx.run.record and "/org--llama/text-generation/" in ctx.run.record
    # 2. With a mode: hub_neuronx_cache("training", entry=None, cache_repo_id=..., cache_dir=...)
    with hub_neuronx_cache("training", cache_repo_id=bucket, cache_dir=cache) as ctx:
        compile_graph(cache, version, make_graphs(1, seed="gen2")[0])
    assert len(ctx.synced) == 1 and ctx.model_id is None and ctx.task == "training"
    # 3. The bucket cache, positionally, with the export config set inside the block once it is known.
    with hub_neuronx_cache("org/llama", "text-generation", None, version, bucket, cache) as ctx:
        compile_graph(cache, version, make_graphs(1, seed="gen3")[0])
        ctx.export_config = {"batch_size": 4, "sequence_length": 128, "tp_degree": 2, "torch_dtype": "bfloat16", "target": "trn1"}
    out = tmp_path / "record.json"
    BucketClient(BucketRef("dir", bucket)).download([{"path": ctx.run.record, "local_path": str(out)}])
    import json

    assert json.loads(out.read_text())["export_config"]["batch_size"] == 4
    assert len(flat_modules(bucket, version)) == 3


def test_cached_entries_and_their_selection(tmp_path, bucket, version):
    cache = tmp_path / "cache"
    for batch_size, dtype in ((1, "bfloat16"), (4, "float16")):
        config = {"batch_size": batch_size, "sequence_length": 256, "tensor_parallel_size": 2, "auto_cast_type": dtype,
                  "instance_type": "trn1"}
        with hub_neuronx_cache(model_id="org/qwen", task="text-generation", export_config=config, bucket_id=bucket, cache_dir=cache):
            compile_graph(cache, version, make_graphs(1, seed=f"qwen{batch_size}")[0])
    entries = get_hub_cached_entries("org/qwen", "text-generation", cache_repo_id=bucket)
    assert sorted(e["batch_size"] for e in entries) == [1, 4]
    for entry in entries:  # optimum-neuron's names, as its callers index them
        assert entry["tp_degree"] == 2 and entry["target"] == "trn1" and entry["torch_dtype"] in ("bfloat16", "float16")
        assert entry["task"] == "text-generation" and entry["compiler_version"] == version
    assert len(get_hub_cached_entries("org/qwen", "inference", bucket)) == 2  # the older (model_id, mode) form
    assert get_hub_cached_entries("org/qwen", "feature-extraction", cache_repo_id=bucket) == []
    select = lambda **kw: select_hub_cached_entries("org/qwen", "text-generation", cache_repo_id=bucket, **kw)  # noqa: E731
    assert [e["batch_size"] for e in select(torch_dtype="bf16")] == [1]
    assert [e["batch_size"] for e in select(torch_dtype="torch.float16", tensor_parallel_size=2)] == [4]
    assert select(tensor_parallel_size=8) == [] and select(instance_type="inf2") == []
    assert len(select(instance_type="trn1", sequence_length=256)) == 2
    assert [e["batch_size"] for e in select(batch_size=4, instance_type="trn1")] == [4]


def test_the_recorded_target_selects_entries_whose_config_names_none(tmp_path, bucket, version, monkeypatch):
    """A config without a target, compiled for trn2 (pinned in NEURON_CC_FLAGS): optimum-neuron's
    `instance_type` filter finds it by the record's target."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEURON_CC_FLAGS", "--target=trn2")
    config = {"batch_size": 2, "sequence_length": 64, "tensor_parallel_size": 2}
    with hub_neuronx_cache(model_id="org/phi", task="text-generation", export_config=config, bucket_id=bucket, cache_dir=cache):
        compile_graph(cache, version, make_graphs(1, seed="phi")[0])
    select = lambda **kw: select_hub_cached_entries("org/phi", "text-generation", cache_repo_id=bucket, **kw)  # noqa: E731
    assert [e["target"] for e in select(instance_type="trn2")] == ["trn2"]
    assert select(instance_type="trn1") == []


def test_synchronize_hub_cache_pushes_what_was_compiled_outside_any_block(tmp_path, bucket, version):
    cache = tmp_path / "cache"
    for graph in make_graphs(2, seed="sync"):
        compile_graph(cache, version, graph)
    compile_graph(cache, version, make_graphs(1, seed="sync-broken")[0], outcome="crash")  # a stale lock: never pushed
    synchronize_hub_cache(cache, cache_repo_id=bucket)
    assert len(flat_modules(bucket, version)) == 2
    compile_graph(cache, version, make_graphs(1, seed="sync-later")[0])
    thread = synchronize_hub_cache(str(cache), bucket, non_blocking=True)
    thread.join(60)
    assert len(flat_modules(bucket, version)) == 3
    with pytest.raises(ValueError, match="does not exist"):
        synchronize_hub_cache(tmp_path / "missing", cache_repo_id=bucket)


def test_a_bucket_that_is_down_gives_no_entries_and_one_warning(tmp_path, monkeypatch, version, caplog):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "1")
    clear_lookup_cache()
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        assert get_hub_cached_entries("org/m", cache_repo_id="org/down", compiler_version=version) == []
        with hub_neuronx_cache("org/m", bucket_id="org/down", compiler_version=version, cache_dir=tmp_path / "c") as ctx:
            compile_graph(tmp_path / "c", version, make_graphs(1, seed="down")[0])
    assert len(ctx.warnings) == 1 and ctx.synced == []
    with pytest.raises(Exception, match="not a Hub model id"):
        get_hub_cached_entries("not a model id", cache_repo_id="org/down", compiler_version=version)
