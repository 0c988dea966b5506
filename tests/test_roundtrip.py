"""The cache end to end: compile in cache A inside the context, fetch into a fresh cache B.

Runs on both backends through the real bucket server: `hf` (the real huggingface_hub and hf_xet against the
local Hub emulator) and `dir` (a directory used as a bucket).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.remote_layout import PUBLISHABLE_FILES, split_version_path
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, compile_graph, make_graphs

EXPORT_CONFIG = {"batch_size": 1, "sequence_length": 128, "tensor_parallel_size": 2, "auto_cast_type": "bf16", "target": "trn1"}


def remote_paths(bucket: BucketRef) -> dict[str, int]:
    return {item["path"]: item["size"] for item in BucketClient(bucket).list("", recursive=True)}


def entry_bytes(root: Path, version: str) -> dict[str, dict[str, bytes]]:
    return {e.name: {name: (e.path / name).read_bytes() for name in e.files} for e in scan_entries(root, version)
            if e.state.publishable}


def test_round_trip_shares_entries_and_nothing_else(tmp_path, bucket, version, monkeypatch):
    monkeypatch.setenv("NEURON_CC_FLAGS", "--model-type=transformer --cache_dir=/ignored/by/argument -O1")
    cache_a, cache_b = tmp_path / "A", tmp_path / "B"
    good = make_graphs(3, seed="llama")
    failed, crashed, extracted = make_graphs(3, seed="noise")
    with hub_neuronx_cache("Org/Model", "text-generation", EXPORT_CONFIG, compiler_version=version, bucket=bucket, cache_dir=cache_a) as run_a:
        assert run_a.fetched == []
        for graph in good:
            assert compile_graph(cache_a, version, graph).hit is False
        with pytest.raises(CompileFailed):
            compile_graph(cache_a, version, failed, outcome="failed")
        compile_graph(cache_a, version, crashed, outcome="crash")
        compile_graph(cache_a, version, extracted, outcome="todo")
        (scan_entries(cache_a, version)[0].path / "model.log").write_text("a stray log")  # never published
    assert len(run_a.synced) == 3 and run_a.warnings == []
    assert run_a.record and run_a.record.endswith(".json")

    paths = remote_paths(bucket)
    def metadata(path: str) -> bool:  # export records, digest manifests, area stamps: written by the publish, not local files
        where = split_version_path(version, path)
        return where is not None and bool(where.record or where.manifest or where.stamp)

    assert all(path.rsplit("/", 1)[1] in PUBLISHABLE_FILES or metadata(path) for path in paths), paths
    modules = {path.split("/")[1] for path in paths if path.split("/")[1].startswith("MODULE_")}
    assert modules == {Path(e).name for e in run_a.synced}
    # One per-model folder, in the casing first used.
    model_dirs = {item["path"] for item in BucketClient(bucket).list(f"neuronxcc-{version}/models", recursive=False)}
    assert model_dirs == {f"neuronxcc-{version}/models/Org--Model"}

    with hub_neuronx_cache("org/model", "text-generation", EXPORT_CONFIG, compiler_version=version, bucket=bucket, cache_dir=cache_b) as run_b:
        assert sorted(run_b.fetched) == sorted(run_a.synced)
        for graph in good:
            assert compile_graph(cache_b, version, graph).hit is True
    assert run_b.synced == [] and run_b.warnings == []
    a_bytes = entry_bytes(cache_a, version)
    b_bytes = entry_bytes(cache_b, version)
    assert set(b_bytes) == {Path(e).name for e in run_a.synced}
    for name, files in b_bytes.items():
        assert files == {k: v for k, v in a_bytes[name].items() if k in PUBLISHABLE_FILES}
    # Lower-case usage created no second per-model folder.
    model_dirs = {item["path"] for item in BucketClient(bucket).list(f"neuronxcc-{version}/models", recursive=False)}
    assert model_dirs == {f"neuronxcc-{version}/models/Org--Model"}

    record_path = run_a.record
    out = tmp_path / "record.json"
    BucketClient(bucket).download([{"path": record_path, "local_path": str(out)}])
    record = json.loads(out.read_text())
    assert record["model_id"] == "Org/Model" and record["task"] == "text-generation"
    assert record["compiler_version"] == version and record["export_config"] == EXPORT_CONFIG
    assert record["compile_flags"] == ["--model-type=transformer", "-O1"]
    assert sorted(record["modules"]) == sorted(Path(e).name for e in run_a.synced)


def test_a_second_run_with_nothing_new_is_cheap(tmp_path, bucket, version):
    cache = tmp_path / "A"
    with hub_neuronx_cache("gpt2", compiler_version=version, bucket=bucket, cache_dir=cache):
        for graph in make_graphs(2, seed="gpt2"):
            compile_graph(cache, version, graph)
    with hub_neuronx_cache("gpt2", compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in make_graphs(2, seed="gpt2"):
            assert compile_graph(cache, version, graph).hit
    assert run.fetched == [] and run.synced == []
    assert run.requests == 1  # one listing of the model's area, nothing on exit


def test_legacy_compiler_entries_round_trip(tmp_path, bucket, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_PUBLISH_LEGACY", "1")  # NEFF-only entries are published on opt-in only
    old = "2.14.227.0+2d4f85be"
    graphs = make_graphs(2, seed="legacy")
    with hub_neuronx_cache("org/old", compiler_version=old, bucket=bucket, cache_dir=tmp_path / "A") as run_a:
        for graph in graphs:
            compile_graph(tmp_path / "A", old, graph)
    assert len(run_a.synced) == 2
    with hub_neuronx_cache("org/old", compiler_version=old, bucket=bucket, cache_dir=tmp_path / "B") as run_b:
        pass
    assert sorted(run_b.fetched) == sorted(run_a.synced)
    assert all(e.state is EntryState.LEGACY_SUCCESS for e in scan_entries(tmp_path / "B", old))


def test_todo_entries_are_filled_from_the_flat_area(tmp_path, bucket, version):
    graphs = make_graphs(2, seed="shared-graphs")
    with hub_neuronx_cache("org/model-a", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
        for graph in graphs:
            compile_graph(tmp_path / "A", version, graph)
    # Another model (or neuron_parallel_compile's extraction) left HLO and flags only for the same graphs.
    for graph in graphs:
        compile_graph(tmp_path / "C", version, graph, outcome="todo")
    with hub_neuronx_cache(None, compiler_version=version, bucket=bucket, cache_dir=tmp_path / "C") as run:
        pass
    assert len(run.fetched) == 2
    assert {e.state for e in scan_entries(tmp_path / "C", version)} == {EntryState.SUCCESS}
    for graph in graphs:
        assert compile_graph(tmp_path / "C", version, graph).hit


def test_existing_local_entries_are_never_overwritten(tmp_path, bucket, version):
    graph = make_graphs(1, seed="keep")[0]
    with hub_neuronx_cache("org/keep", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
        compile_graph(tmp_path / "A", version, graph)
    mine = compile_graph(tmp_path / "B", version, graph).path
    (mine / "model.neff").write_bytes(b"my own neff")
    with hub_neuronx_cache("org/keep", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert run.fetched == []
    assert (mine / "model.neff").read_bytes() == b"my own neff"


def test_the_body_exception_passes_through_and_compiled_entries_are_kept(tmp_path, bucket, version):
    class TrainingCrashed(Exception):
        pass

    error = TrainingCrashed("rank 3 died")
    with pytest.raises(TrainingCrashed) as info:
        with hub_neuronx_cache("org/crashy", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
            compile_graph(tmp_path / "A", version, make_graphs(1, seed="crashy")[0])
            raise error
    assert info.value is error
    assert len(run.synced) == 1


def test_a_truncated_remote_file_is_never_installed(tmp_path, version, caplog):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    graph = make_graphs(1, seed="trunc")[0]
    with hub_neuronx_cache("org/trunc", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run_a:
        compile_graph(tmp_path / "A", version, graph)
    remote = Path(bucket.location) / f"neuronxcc-{version}/models/org--trunc/default" / Path(run_a.synced[0]).name
    neff = remote / "model.neff"
    listed = neff.stat().st_size
    # The listing says one size, the transfer delivers fewer bytes: emulate by truncating after listing.
    from optimum_neuron_cache import fetch as fetch_module

    real_download = fetch_module.BucketClient.download

    def truncating_download(self, files, **kwargs):
        result = real_download(self, files, **kwargs)
        for item in files:  # DownloadFile requests, as the fetch sends them
            if item.path.endswith("model.neff"):
                Path(item.local_path).write_bytes(b"short")
        return result

    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        fetch_module.BucketClient.download = truncating_download
        try:
            with hub_neuronx_cache("org/trunc", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run_b:
                pass
        finally:
            fetch_module.BucketClient.download = real_download
    assert run_b.fetched == []
    assert any("model.neff has 5 bytes, the bucket lists" in w and str(listed) in w for w in run_b.warnings)
    assert scan_entries(tmp_path / "B", version) == []  # nothing partial, not even an empty folder


def test_s3_cache_root_turns_sync_off_with_one_warning(tmp_path, version, monkeypatch, caplog):
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", "s3://team-bucket/neuron-cache")
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=str(tmp_path / "b")) as run:
            ran = True
    assert ran and run.enabled is False
    assert len(caplog.records) == 1 and "s3://team-bucket" in caplog.records[0].getMessage()
    assert running_server() is None  # nothing was started for nothing


def test_offline_mode_is_honoured_for_hub_buckets(tmp_path, version, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket="org/bucket", cache_dir=tmp_path / "A") as run:
            compile_graph(tmp_path / "A", version, make_graphs(1)[0])
    assert run.fetched == [] and run.synced == []
    assert any("HF_HUB_OFFLINE" in w for w in run.warnings)
    assert running_server() is None


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_endpoint_leaves_the_body_untouched_and_a_later_run_publishes(tmp_path, version, monkeypatch, caplog, request):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    graphs = make_graphs(2, seed="offline-run")
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket="org/bucket", cache_dir=tmp_path / "A") as run:
            results = [compile_graph(tmp_path / "A", version, graph) for graph in graphs]
    assert [r.hit for r in results] == [False, False]
    assert run.fetched == [] and run.synced == [] and len(run.compiled) == 2
    assert len(caplog.records) == 1 and len(run.warnings) == 1
    assert "\n" not in run.warnings[0] and "org/bucket" in run.warnings[0]
    # The endpoint comes back: the next run publishes what the failed one compiled.
    from optimum_neuron_cache.client import stop_server

    stop_server()
    request.getfixturevalue("hub")
    BucketClient(BucketRef("hf", "org/bucket")).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket="org/bucket", cache_dir=tmp_path / "A") as later:
        pass
    assert sorted(later.synced) == sorted(run.compiled)
