"""neuron_parallel_compile flows: fetch before collection, todo entries filled from the flat area, publish after.

`neuron_parallel_compile` is the simulated one, with the real tool's modes (`collect` runs the command with
NEURON_EXTRACT_GRAPHS_ONLY=1; `compile` compiles every todo entry through `neuronx-cc` on PATH;
`collect-and-compile` both); the training command JIT-compiles a model's graphs as libneuronxla.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.integrations.parallel_compile import fill_todo_entries, run_parallel_compile
from optimum_neuron_cache.testing.simulated_neuronx_cc import (
    install_simulated_compiler,
    install_simulated_parallel_compile,
    jit_compile,
)
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

TRAIN = [sys.executable, "-m", "optimum_neuron_cache.testing.simulated_neuronx_cc"]


@pytest.fixture
def bucket(tmp_path) -> BucketRef:
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    return ref


@pytest.fixture
def sdk(tmp_path, monkeypatch, version) -> Path:
    """neuronx-cc and neuron_parallel_compile (simulated) on PATH; returns the compile log."""
    install_simulated_compiler(tmp_path / "sdk")
    install_simulated_parallel_compile(tmp_path / "sdk")
    monkeypatch.setenv("PATH", f"{tmp_path / 'sdk'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SIMULATED_NEURONX_CC_LOG", str(tmp_path / "compiles.log"))
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    return tmp_path / "compiles.log"


def compiled(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def another_model_published_the_shared_graphs(tmp_path: Path, bucket: BucketRef, version: str) -> None:
    with hub_neuronx_cache("org/other-model", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "other") as run:
        for graph in make_graphs(2, seed="shared"):
            compile_graph(tmp_path / "other", version, graph)
    assert len(run.synced) == 2


def test_one_neuron_parallel_compile_call_fetches_hits_through_the_shim_and_publishes(tmp_path, bucket, version, sdk):
    another_model_published_the_shared_graphs(tmp_path, bucket, version)
    command = ["neuron_parallel_compile", *TRAIN, "--seed", "shared:2", "--seed", "own:1"]
    report = run_parallel_compile(command, model_id="org/b", export_config={"batch_size": 1}, bucket=bucket,
                                  cache_dir=tmp_path / "B", compiler_version=version)
    assert report.returncode == 0
    assert compiled(sdk) == 1  # the two graphs of the other model came from the flat area
    assert {e.state for e in scan_entries(tmp_path / "B", version)} == {EntryState.SUCCESS}
    run = report.run
    assert run.fetched == [] and len(run.compiled) == 3 and len(run.synced) == 3 and run.record
    # Of the three that became complete, the shim served two from the bucket: one was compiled.
    assert len(report.served) == 2 and report.compiled == [key for key in run.compiled if key not in report.served]
    assert len(report.compiled) == 1
    # Another host of the same job: the per-model fetch before extraction makes everything local.
    report = run_parallel_compile(command, model_id="org/b", export_config={"batch_size": 1}, bucket=bucket,
                                  cache_dir=tmp_path / "C", compiler_version=version)
    assert report.returncode == 0 and compiled(sdk) == 1
    assert len(report.run.fetched) == 3 and report.run.compiled == [] and report.run.synced == []


def test_explicit_phases_fill_todo_entries_between_collection_and_compilation(tmp_path, bucket, version, sdk):
    another_model_published_the_shared_graphs(tmp_path, bucket, version)
    train = [*TRAIN, "--seed", "shared:2", "--seed", "d-own:1"]
    report = run_parallel_compile(collect_command=["neuron_parallel_compile", "--command", "collect", *train],
                                  compile_command=["neuron_parallel_compile", "--command", "compile"],
                                  model_id="org/d", bucket=bucket, cache_dir=tmp_path / "D", compiler_version=version,
                                  shim=False)
    assert report.returncode == 0 and compiled(sdk) == 1
    assert report.fill is not None and len(report.fill.todo) == 3 and len(report.fill.filled) == 2
    assert len(report.run.synced) == 3
    assert sorted(report.served) == sorted(report.fill.filled) and len(report.compiled) == 1


def test_a_failing_command_keeps_its_exit_code_and_what_compiled_is_published(tmp_path, bucket, version, sdk, monkeypatch):
    monkeypatch.setenv("SIMULATED_NEURONX_CC_FAIL", make_graphs_module("e-bad", version))
    report = run_parallel_compile(["neuron_parallel_compile", *TRAIN, "--seed", "e-good:1", "--seed", "e-bad:1"],
                                  model_id="org/e", bucket=bucket, cache_dir=tmp_path / "E", compiler_version=version)
    assert report.returncode == 1
    states = sorted(e.state.value for e in scan_entries(tmp_path / "E", version))
    assert states == ["failed", "success"]
    assert len(report.run.synced) == 1  # the failed entry never leaves the machine


def make_graphs_module(seed: str, version: str) -> str:
    from optimum_neuron_cache.testing.simulated_compiler import module_name

    return module_name(version, make_graphs(1, seed=seed)[0])


def test_fill_todo_on_its_own_and_from_the_command_line(tmp_path, bucket, version, sdk, monkeypatch):
    another_model_published_the_shared_graphs(tmp_path, bucket, version)
    env = {**os.environ, "NEURON_EXTRACT_GRAPHS_ONLY": "1"}
    for graph in [*make_graphs(2, seed="shared"), *make_graphs(1, seed="f-own")]:
        jit_compile(tmp_path / "F", version, graph, env=env)
    assert {e.state for e in scan_entries(tmp_path / "F", version)} == {EntryState.TODO}
    done = subprocess.run([sys.executable, "-m", "optimum_neuron_cache.integrations.parallel_compile", "fill-todo",
                           "--bucket", str(bucket), "--cache-dir", str(tmp_path / "F"), "--compiler-version", version],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "filled 2 of 3 todo entries from the flat area"
    assert sorted(e.state.value for e in scan_entries(tmp_path / "F", version)) == ["success", "success", "todo"]
    again = fill_todo_entries(bucket=bucket, cache_dir=tmp_path / "F", compiler_version=version)
    assert len(again.todo) == 1 and again.filled == [] and again.warnings == []


def test_the_run_command_line(tmp_path, bucket, version, sdk):
    """What the shim served from the bucket while the command ran is said as fetched, not as compiled."""
    another_model_published_the_shared_graphs(tmp_path, bucket, version)
    done = subprocess.run([sys.executable, "-m", "optimum_neuron_cache.integrations.parallel_compile", "run", "--model",
                           "org/cli", "--bucket", str(bucket), "--cache-dir", str(tmp_path / "G"), "--compiler-version", version,
                           "--export-config", '{"batch_size": 1}', "--", "neuron_parallel_compile", *TRAIN,
                           "--seed", "g:2", "--seed", "shared:2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert compiled(sdk) == 2
    assert ("neuron-cache: fetched 2 (0 before the command, 2 while it ran), compiled 2, published 4, record neuronxcc-"
            in done.stderr)
    listing = {item["path"] for item in BucketClient(bucket).list(f"neuronxcc-{version}/models/org--cli/training/exports")}
    assert len(listing) == 1
    record = tmp_path / "r.json"
    BucketClient(bucket).download([{"path": listing.pop(), "local_path": str(record)}])
    assert json.loads(record.read_text())["task"] == "training"


def test_the_stand_in_speaks_the_real_modes(tmp_path, version, sdk, monkeypatch):
    """collect leaves HLO and flags only; scan lists them; compile compiles what was collected; clear-neffs
    and clear-locks clean up; collect-and-compile compiles only what its own collection extracted; clean
    removes the cache dir; an unknown mode is refused as argparse would."""
    cache = tmp_path / "M"
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(cache))

    def npc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["neuron_parallel_compile", *args], capture_output=True, text=True, timeout=120)

    done = npc("--command", "collect", *TRAIN, "--seed", "m:2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("for ahead-of-time parallel compilation. No compilation was done.") == 2
    assert {e.state for e in scan_entries(cache, version)} == {EntryState.TODO} and compiled(sdk) == 0
    assert "todo[2]:" in npc("--command", "scan").stdout
    done = npc("--command", "compile", "--num_parallel", "2")
    assert done.returncode == 0, done.stderr
    assert {e.state for e in scan_entries(cache, version)} == {EntryState.SUCCESS} and compiled(sdk) == 2
    assert npc("--command=clear-neffs").returncode == 0
    assert {e.state for e in scan_entries(cache, version)} == {EntryState.TODO}
    jit_compile(cache, version, make_graphs(1, seed="left-todo")[0], env={**os.environ, "NEURON_EXTRACT_GRAPHS_ONLY": "1"})
    lock = next(e.path for e in scan_entries(cache, version)) / "model.hlo_module.pb.lock"
    lock.write_bytes(b"")
    assert npc("--command", "clear-locks").returncode == 0 and not lock.exists()
    done = npc(*TRAIN, "--seed", "m:2")  # collect-and-compile: the two graphs it collected, not the left-over one
    assert done.returncode == 0, done.stderr
    assert sorted(e.state.value for e in scan_entries(cache, version)) == ["success", "success", "todo"]
    assert "done[2]" in npc("--command", "scan-with-failed").stdout
    assert npc("--command", "clean").returncode == 0 and not cache.exists()
    refused = npc("--command", "extract", *TRAIN)
    assert refused.returncode == 2 and "invalid choice: 'extract'" in refused.stderr


def test_phases_split_a_neuron_parallel_compile_call_into_its_two_modes():
    from optimum_neuron_cache.integrations.parallel_compile import _without_cache_dir, split_phases

    collect, compile_ = split_phases(["/opt/bin/neuron_parallel_compile", "--num_parallel=8", "torchrun", "train.py"])
    assert collect == ["/opt/bin/neuron_parallel_compile", "--command", "collect", "--num_parallel=8", "torchrun", "train.py"]
    assert compile_ == ["/opt/bin/neuron_parallel_compile", "--command", "compile", "--num_parallel=8"]
    for bad, said in ((["torchrun", "train.py"], "runs a neuron_parallel_compile call"),
                      (["neuron_parallel_compile", "--command", "compile"], "drop --command")):
        with pytest.raises(ValueError, match=said):
            split_phases(bad)
    # The view's compile must use the view: --cache_dir (which beats NEURON_COMPILE_CACHE_URL) goes, the rest stays.
    assert _without_cache_dir("--cache_dir=/fsx/c -O1 --cache_dir /x --target=trn1") == "-O1 --target=trn1"
