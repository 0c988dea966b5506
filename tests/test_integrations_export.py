"""`cached_compile`: exporter compile calls, the export record derived from the arguments users already pass."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.errors import ConfigurationError, InvalidModelIdError
from optimum_neuron_cache.integrations import cached_compile, derive_export
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs


@pytest.fixture
def bucket(tmp_path) -> BucketRef:
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    clear_lookup_cache()
    return ref


def read_record(bucket: BucketRef, path: str, tmp_path: Path) -> dict:
    out = tmp_path / "record.json"
    BucketClient(bucket).download([{"path": path, "local_path": str(out)}])
    return json.loads(out.read_text())


def test_an_exporter_function_is_cached_from_its_own_arguments(tmp_path, bucket, version, monkeypatch):
    calls = []

    @cached_compile(bucket=bucket, compiler_version=version)
    def export(model_id, task="text-generation", batch_size=1, sequence_length=128, num_cores=2, auto_cast_type="bf16",
               cache_dir=None):
        calls.append(model_id)
        return [compile_graph(cache_dir, version, graph).hit for graph in make_graphs(2, seed=f"{model_id.lower()}:{batch_size}")]

    # cache_dir here is the exporter's own argument; the cache resolves its root as libneuronxla does.
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "A"))
    assert export("Org/Llama", batch_size=4, cache_dir=tmp_path / "A") == [False, False]
    run = export.last_run
    assert len(run.synced) == 2 and run.task == "text-generation"
    record = read_record(bucket, run.record, tmp_path)
    assert record["export_config"] == {"batch_size": 4, "sequence_length": 128, "tensor_parallel_size": 2, "dtype": "bf16"}
    assert record["model_id"] == "Org/Llama"
    # Another machine: a fresh cache fetches the entries on enter; the compile is all hits.
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "B"))
    assert export("org/llama", batch_size=4, cache_dir=tmp_path / "B") == [True, True]
    assert len(export.last_run.fetched) == 2 and export.last_run.synced == []
    # The record makes the configuration findable, with the filters lookup knows.
    found = lookup_cache("org/llama", "text-generation", compiler_version=version, bucket=bucket, batch_size=4,
                         tensor_parallel_size=2, dtype="bf16")
    assert len(found) == 1 and lookup_cache("org/llama", compiler_version=version, bucket=bucket, batch_size=8) == []


def test_explicit_values_win_and_wrap_a_function_you_do_not_own(tmp_path, bucket, version):
    def builder_compile(neuron_config, compiler_args):  # e.g. an NxD model builder's compile
        return compile_graph(tmp_path / "A", version, make_graphs(1, seed="nxd")[0])

    config = SimpleNamespace(batch_size=2, seq_len=256, tp_degree=8, torch_dtype="torch.bfloat16", target="trn2")
    wrapped = cached_compile("org/nxd-model", task="text-generation", export_config={"target": "trn1"}, bucket=bucket,
                             cache_dir=tmp_path / "A", compiler_version=version)(builder_compile)
    wrapped(config, compiler_args="--model-type=transformer -O1")
    record = read_record(bucket, wrapped.last_run.record, tmp_path)
    assert record["export_config"] == {"batch_size": 2, "sequence_length": 256, "tensor_parallel_size": 8, "dtype": "bf16",
                                       "target": "trn1", "compiler_args": ["--model-type=transformer", "-O1"]}
    assert wrapped.__name__ == "builder_compile"


def test_local_model_paths_and_model_objects(tmp_path, bucket, version):
    checkpoint = tmp_path / "checkpoints" / "llama-ft"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')

    @cached_compile(bucket=bucket, cache_dir=tmp_path / "A", compiler_version=version)
    def export(model, batch_size=1):
        compile_graph(tmp_path / "A", version, make_graphs(1, seed=f"local:{batch_size}")[0])

    export(str(checkpoint))
    assert "/models/local--llama-ft-" in export.last_run.record
    # A model object names its checkpoint: the same content gives the same folder, wherever it lives.
    copy = tmp_path / "elsewhere" / "llama-ft"
    copy.mkdir(parents=True)
    (copy / "config.json").write_text((checkpoint / "config.json").read_text())
    first_area = export.last_run.record.split("/exports/")[0]
    export(SimpleNamespace(name_or_path=str(copy), config=SimpleNamespace(_name_or_path=str(copy))), batch_size=2)
    assert export.last_run.record.split("/exports/")[0] == first_area
    # Another checkpoint in a folder of the same name is another model.
    (checkpoint / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}')
    export(str(checkpoint), batch_size=3)
    assert export.last_run.record.split("/exports/")[0] != first_area


def test_an_unusable_derived_model_id_falls_back_to_the_flat_area(tmp_path, bucket, version, caplog):
    @cached_compile(bucket=bucket, cache_dir=tmp_path / "A", compiler_version=version)
    def trace(model, example_inputs):
        return compile_graph(tmp_path / "A", version, make_graphs(1, seed="traced")[0]).hit

    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        assert trace(SimpleNamespace(), example_inputs=None) is False
    run = trace.last_run
    assert run.model_id is None and run.record is None and len(run.synced) == 1
    assert any("names no checkpoint" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        trace(str(tmp_path / "weights.pt"), None)  # a file, not a model directory nor a Hub id
    assert trace.last_run.model_id is None


def test_bad_explicit_input_raises_before_the_compile_runs(tmp_path, version):
    with pytest.raises(InvalidModelIdError):
        cached_compile("not/a/model id", compiler_version=version)
    with pytest.raises(ConfigurationError):
        cached_compile("org/m", task="Text Generation")
    ran = []
    wrapped = cached_compile("org/m", bucket="not a bucket name!", compiler_version=version)(lambda: ran.append(1))
    with pytest.raises(ConfigurationError):
        wrapped()
    assert ran == []


def test_the_body_exception_passes_through_and_its_compiles_are_published(tmp_path, bucket, version, monkeypatch):
    class ExportFailed(Exception):
        pass

    @cached_compile
    def export(model_id, cache_dir):
        compile_graph(cache_dir, version, make_graphs(1, seed="half-export")[0])
        raise ExportFailed("second graph did not compile")

    monkeypatch.setenv("NEURON_CACHE_BUCKET", str(bucket))
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "A"))
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    with pytest.raises(ExportFailed, match="second graph"):
        export("org/half", tmp_path / "A")
    assert len(export.last_run.synced) == 1


def test_derivation_reads_the_names_exporters_use():
    def optimum_export(model_name_or_path, task, static_batch_size, static_sequence_length, tensor_parallel_size,
                       float_dtype, instance_type, **kwargs):
        pass

    derived = derive_export(optimum_export, ("org/m", "feature-extraction", 1, 384, 2, "fp16", "inf2"), {"extra": 1})
    assert derived.model_id == "org/m" and derived.task == "feature-extraction"
    assert derived.export_config == {"batch_size": 1, "sequence_length": 384, "tensor_parallel_size": 2, "dtype": "fp16",
                                     "target": "inf2"}

    def from_kwargs(**kwargs):
        pass

    derived = derive_export(from_kwargs, (), {"model_id": "org/x", "neuron_config": {"batch_size": 8, "max_length": 64}})
    assert derived.model_id == "org/x" and derived.export_config == {"batch_size": 8, "sequence_length": 64}
