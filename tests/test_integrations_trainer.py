"""Training runs: the rank-aware session (several real processes on one host), and the Trainer callback.

The session and the callback's hooks are tested without transformers. The end-to-end test runs a real
`transformers.Trainer` on a tiny model on CPU; it needs `transformers` and `torch` and is skipped only when
they are not installed (`pip install "optimum-neuron-cache[trainer]" torch`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.integrations.ranks import RankInfo
from optimum_neuron_cache.integrations.session import TrainingCacheSession
from optimum_neuron_cache.integrations.trainer import NeuronCacheCallback, export_config_from_args, model_id_from_model
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

ROOT = Path(__file__).parent.parent


@pytest.fixture
def bucket(tmp_path) -> BucketRef:
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    return ref


def remote(bucket: BucketRef) -> set[str]:
    return {item["path"] for item in BucketClient(bucket).list("", recursive=True)}


RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from optimum_neuron_cache.integrations.session import TrainingCacheSession
    from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
    out, cache, bucket, version = sys.argv[1:5]
    session = TrainingCacheSession("org/llama", export_config={"sequence_length": 128}, bucket=bucket,
                                   cache_dir=cache, compiler_version=version, wait_timeout=60)
    session.begin()
    began = time.time()
    hits = [compile_graph(cache, version, graph).hit for graph in make_graphs(3, seed="llama-train")]
    session.checkpoint(wait=True)
    report = session.end()
    json.dump({"fetcher": report.fetcher, "publisher": report.publisher, "wait": report.wait_outcome,
               "fetched": len(report.run.fetched) if report.fetcher else 0,
               "requests": session.run.requests, "hits": hits, "began": began, "warnings": report.warnings}, open(out, "w"))
    """
)


def test_one_process_per_host_fetches_and_the_others_wait_then_hit(tmp_path, bucket, version):
    # An earlier run compiled and published the model's graphs.
    with hub_neuronx_cache("org/llama", "training", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "earlier"):
        for graph in make_graphs(3, seed="llama-train"):
            compile_graph(tmp_path / "earlier", version, graph)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cache = tmp_path / "host-cache"
    ranks = []
    for rank in range(4):
        env = {**os.environ, "LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
               "PYTHONPATH": str(ROOT)}
        ranks.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"r{rank}.json"), str(cache),
                                       str(bucket), version], env=env))
    assert [p.wait(timeout=120) for p in ranks] == [0, 0, 0, 0]
    reports = [json.loads((tmp_path / f"r{rank}.json").read_text()) for rank in range(4)]
    assert reports[0]["fetcher"] and reports[0]["publisher"] and reports[0]["fetched"] == 3
    for report in reports[1:]:
        assert not report["fetcher"] and not report["publisher"]
        assert report["wait"] == "fetch finished"
        assert report["requests"] == 0  # only local rank 0 talked to the bucket
    assert all(all(report["hits"]) for report in reports)  # nobody compiled what the fetch brought
    assert all(report["warnings"] == [] for report in reports)


def test_checkpoints_publish_what_was_compiled_so_far(tmp_path, bucket, version):
    cache = tmp_path / "cache"
    graphs = make_graphs(3, seed="ckpt")
    session = TrainingCacheSession("org/ckpt", export_config={"batch_size": 2}, bucket=bucket, cache_dir=cache,
                                   compiler_version=version, ranks=RankInfo())
    session.begin()
    first = [compile_graph(cache, version, graph).path.name for graph in graphs[:2]]
    session.checkpoint()  # in the background
    assert session._join(60)
    flat = {p.split("/")[1] for p in remote(bucket) if p.count("/") == 2}
    assert flat == set(first)
    assert {p.split("/")[4] for p in remote(bucket) if "/models/org--ckpt/training/MODULE_" in p} == set(first)
    last = compile_graph(cache, version, graphs[2]).path.name
    report = session.end()
    assert sorted(report.checkpoint_published) == sorted(f"neuronxcc-{version}/{name}" for name in first)
    assert report.run.synced == [f"neuronxcc-{version}/{last}"]
    out = tmp_path / "record.json"
    BucketClient(bucket).download([{"path": report.run.record, "local_path": str(out)}])
    record = json.loads(out.read_text())
    assert sorted(record["modules"]) == sorted([*first, last]) and record["export_config"] == {"batch_size": 2}


def test_a_rank_never_waits_longer_than_its_timeout(tmp_path, bucket, version):
    """Local rank 0 is stuck (it holds the fetch lock and never finishes): rank 1 goes on after its timeout,
    without ever talking to the bucket itself."""
    from filelock import FileLock

    rank0 = TrainingCacheSession("org/stuck", bucket=bucket, cache_dir=tmp_path / "c", compiler_version=version, ranks=RankInfo())
    lock_path, _ = rank0._coordination_files()
    with FileLock(lock_path) as stuck:
        rank1 = TrainingCacheSession("org/stuck", bucket=bucket, cache_dir=tmp_path / "c", compiler_version=version,
                                     ranks=RankInfo(rank=1, local_rank=1, world_size=2, local_world_size=2), wait_timeout=1)
        report = rank1.begin()
        assert stuck.is_locked  # rank 1 went on while rank 0 was still stuck
    assert report.wait_outcome == "timed out" and len(report.warnings) == 1
    rank1.checkpoint()
    assert rank1.end().run is None
    assert rank1.run.requests == 0  # never talked to the bucket


def test_a_rank_does_not_retry_the_network_trouble_of_its_host_fetcher(tmp_path, version, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "1")
    kwargs = dict(bucket="org/down", cache_dir=tmp_path / "c", compiler_version=version)
    rank0 = TrainingCacheSession("org/m", ranks=RankInfo(local_rank=0, world_size=2, local_world_size=2), **kwargs)
    rank0.begin()
    assert len(rank0.report.warnings) == 0 and len(rank0.run.warnings) == 1  # one line: the fetch was skipped
    rank1 = TrainingCacheSession("org/m", ranks=RankInfo(rank=1, local_rank=1, world_size=2, local_world_size=2), **kwargs)
    report1 = rank1.begin()
    assert report1.wait_outcome == "fetch finished" and report1.warnings == []
    assert rank1.run.requests == 0  # rank 0's trouble is not retried: rank 1 never asked the bucket anything
    compile_graph(tmp_path / "c", version, make_graphs(1, seed="down")[0])
    rank0.checkpoint(wait=True)  # the bucket is known down for this run: no new attempt, no new warning
    report = rank0.end()
    assert report.run.synced == [] and len(report.run.compiled) == 1
    assert report.checkpoint_published == [] and len(report.run.warnings) == 1


def test_with_one_shared_cache_dir_only_global_rank_zero_publishes(tmp_path, bucket, version):
    cache = tmp_path / "fsx"
    other_host = TrainingCacheSession("org/w", bucket=bucket, cache_dir=cache, compiler_version=version, publish="world",
                                      ranks=RankInfo(rank=8, local_rank=0, world_size=16, local_world_size=8))
    other_host.begin()
    compile_graph(cache, version, make_graphs(1, seed="world")[0])
    other_host.checkpoint(wait=True)
    assert other_host.end().run.synced == [] and remote(bucket) == set()
    main = TrainingCacheSession("org/w", bucket=bucket, cache_dir=cache, compiler_version=version, publish="world",
                                ranks=RankInfo(rank=0, local_rank=0, world_size=16, local_world_size=8))
    main.begin()
    compile_graph(cache, version, make_graphs(1, seed="world-2")[0])
    assert len(main.end().run.synced) == 1


def test_bad_input_raises_when_the_callback_is_built(tmp_path, version):
    from optimum_neuron_cache.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        NeuronCacheCallback("not a model id!", compiler_version=version)
    with pytest.raises(ConfigurationError):
        NeuronCacheCallback(bucket="s3://nope", compiler_version=version)
    with pytest.raises(ConfigurationError):
        NeuronCacheCallback(task="Text Generation", compiler_version=version)


def test_callback_hooks_without_transformers(tmp_path, bucket, version):
    """The hooks as Trainer calls them: args, state, control, model=..."""
    cache = tmp_path / "cache"
    local_model = tmp_path / "my-llama"
    local_model.mkdir()
    (local_model / "config.json").write_text('{"model_type": "llama"}')
    model = SimpleNamespace(name_or_path=str(local_model), config=SimpleNamespace(_name_or_path=str(local_model)))
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1, bf16=True, fp16=False,
                           tensor_parallel_size=2)
    assert export_config_from_args(args) == {"batch_size": 4, "gradient_accumulation_steps": 2, "world_size": 1,
                                             "tensor_parallel_size": 2, "dtype": "bf16"}
    assert model_id_from_model(model) == str(local_model)
    assert model_id_from_model(SimpleNamespace(name_or_path="")) is None
    callback = NeuronCacheCallback(export_config={"sequence_length": 512}, bucket=bucket, cache_dir=cache,
                                   compiler_version=version, ranks=RankInfo())
    callback.on_train_begin(args, None, None, model=model)
    compile_graph(cache, version, make_graphs(1, seed="hooks")[0])
    callback.on_save(args, None, None)
    callback.session._join(60)
    callback.on_train_end(args, None, None)
    report = callback.report
    assert len(report.checkpoint_published) == 1 and report.run.record
    assert "/models/local--my-llama-" in report.run.record and "/training/exports/" in report.run.record
    out = tmp_path / "record.json"
    BucketClient(bucket).download([{"path": report.run.record, "local_path": str(out)}])
    assert json.loads(out.read_text())["export_config"] == {**export_config_from_args(args), "sequence_length": 512}


# ------------------------------------------------------------------------------- a real Trainer on CPU


def test_a_real_trainer_fetches_before_the_first_step_and_publishes_at_checkpoints(tmp_path, bucket, version):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    script = ROOT / "examples" / "train_tiny_cpu.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEURON_CACHE_BUCKET": str(bucket), "NEURON_CC_VERSION": version}
    first = subprocess.run([sys.executable, str(script), "--output-dir", str(tmp_path / "run1"), "--cache-dir",
                            str(tmp_path / "host1"), "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout.strip().splitlines()[-1])
    assert one["fetched"] == 0 and one["compiled_at_steps"] == [1, 2, 3] and one["warnings"] == []
    published = one["published_at_checkpoints"] + one["published_at_end"]
    assert len(published) == len(set(published)) == 4 and one["record"]
    # Graphs of steps 1 and 2 went out with the checkpoint of step 2; the evaluation graph compiled after the
    # last checkpoint went out at the end.
    assert len(one["published_at_checkpoints"]) >= 2 and len(one["published_at_end"]) >= 1
    # A second machine: the fetch before the first step makes every step's graph a hit.
    second = subprocess.run([sys.executable, str(script), "--output-dir", str(tmp_path / "run2"), "--cache-dir",
                             str(tmp_path / "host2"), "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    two = json.loads(second.stdout.strip().splitlines()[-1])
    assert two["fetched"] == 4 and two["compiled_at_steps"] == [] and two["hits"] == 4
    assert two["published_at_checkpoints"] == [] and two["published_at_end"] == []
    assert len(scan_entries(tmp_path / "host2", version)) == 4
