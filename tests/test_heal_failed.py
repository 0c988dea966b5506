"""A cached failure on one host (a compile killed by OOM or Ctrl-C leaves `model.log`, which libneuronxla replays)
is swapped for the bucket's complete entry at fetch: context enter, `neuron-cache fetch`, the compiler shim's
lookup. Whole and at once (no instant with a partial entry, no mix of the two), never over a compile in progress,
and the failure never published. Both bucket kinds, the real server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.fetch import Action, execute_fetch, plan_fetch
from optimum_neuron_cache.host_state import HostState
from optimum_neuron_cache.integrations.compiler_shim import install_compiler_shim
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, compile_graph, make_graphs
from optimum_neuron_cache.testing.simulated_neuronx_cc import install_simulated_compiler, jit_compile

REPO = Path(__file__).resolve().parent.parent


def files_of(entry: Path) -> dict[str, bytes]:
    """Every regular file of an entry folder, name -> bytes: what libneuronxla reads."""
    return {item.name: item.read_bytes() for item in entry.iterdir() if item.is_file()}


def listing(bucket: BucketRef) -> dict[str, int]:
    return {item["path"]: item["size"] for item in BucketClient(bucket).list("", recursive=True)}


@pytest.fixture
def failed_here(tmp_path, bucket, version):
    """Cache A published a model's two entries; in cache B the compile of the first one failed (model.log).
    Returns (the failed entry's folder in B, the same entry's folder in A)."""
    graphs = make_graphs(2, seed="heal-failed")
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        for graph in graphs:
            compile_graph(tmp_path / "A", version, graph)
    assert len(run.synced) == 2
    with pytest.raises(CompileFailed):
        compile_graph(tmp_path / "B", version, graphs[0], outcome="failed")
    [entry] = scan_entries(tmp_path / "B", version)
    assert entry.state is EntryState.FAILED
    return entry.path, tmp_path / "A" / entry.key


def test_enter_swaps_a_cached_failure_for_the_buckets_entry_and_publishes_nothing(tmp_path, bucket, version,
                                                                                  failed_here):
    failed, good = failed_here
    before = listing(bucket)
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        assert files_of(failed) == files_of(good)  # the bucket's entry, byte for byte: no model.log left in it
        states = {e.name: e.state for e in scan_entries(tmp_path / "B", version)}
    assert states == {name: EntryState.SUCCESS for name in states} and len(states) == 2
    assert f"neuronxcc-{version}/{failed.name}" in run.fetched
    [said] = [w for w in run.warnings if "failed local entry" in w]
    assert said.startswith("replaced 1 failed local entry with the bucket's complete copy") and failed.name in said
    assert run.synced == [] and run.compiled == [] and listing(bucket) == before  # nothing of the failure went up
    assert not any(path.endswith("/model.log") for path in before)
    assert compile_graph(tmp_path / "B", version, make_graphs(2, seed="heal-failed")[0]).hit


def test_cli_fetch_swaps_a_cached_failure_and_says_so(tmp_path, bucket, version, failed_here):
    failed, good = failed_here
    before = listing(bucket)
    result = CliRunner().invoke(cli, ["fetch", "org/m", "--cache-dir", str(tmp_path / "B"), "--bucket", str(bucket),
                                      "--compiler-version", version], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert files_of(failed) == files_of(good)
    assert f"replaced 1 failed local entry with the bucket's complete copy (neuronxcc-{version}/{failed.name})" \
        in result.output
    assert listing(bucket) == before


def test_the_plan_says_why_a_failure_is_swapped(tmp_path, bucket, version, failed_here):
    failed, _ = failed_here
    local = {e.name: e for e in scan_entries(tmp_path / "B", version)}
    plan = plan_fetch(BucketClient(bucket), version, "org--m", "default", local)
    [op] = [op for op in plan.ops if op.module == failed.name]
    assert op.action is Action.HEAL and "cached failure" in op.reason and op in plan.items


def test_a_failure_a_compile_is_retrying_is_left_alone(tmp_path, bucket, version, failed_here):
    """A compile that takes the entry (its lock) between the plan and the swap keeps it: nothing is swapped."""
    failed, _ = failed_here
    client = BucketClient(bucket)
    local = {e.name: e for e in scan_entries(tmp_path / "B", version)}
    plan = plan_fetch(client, version, "org--m", "default", local)
    assert failed.name in {op.module for op in plan.items}
    (failed / "model.hlo_module.pb.lock").write_bytes(b"")  # --retry_failed_compilation: compiling it now
    mine = files_of(failed)
    result = execute_fetch(client, tmp_path / "B", plan)
    assert files_of(failed) == mine and result.healed == [] and failed.name not in result.fetched
    # And a locked entry is planned as such: never swapped, said with the command that fixes a stale lock.
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert files_of(failed) == mine
    assert not any("failed local entry" in w for w in run.warnings)
    assert any(failed.name in w and "neuron-cache cleanup --locks" in w for w in run.warnings)


def test_a_kill_during_the_swap_leaves_the_buckets_entry_and_the_next_run_sweeps_the_failure(tmp_path, bucket,
                                                                                             version, failed_here):
    failed, good = failed_here
    before = listing(bucket)
    env = {**os.environ, "NEURON_CACHE_CRASH_AT": "heal"}
    child = subprocess.run([sys.executable, "-m", "optimum_neuron_cache", "fetch", "org/m", "--cache-dir",
                            str(tmp_path / "B"), "--bucket", str(bucket), "--compiler-version", version],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    assert files_of(failed) == files_of(good)  # swapped whole: the bucket's entry, nothing of the failure
    tmp = tmp_path / "B" / ".optimum-neuron-cache" / "tmp"
    assert [path for path in tmp.iterdir() if HostState.is_stale_temp_dir(path)]  # the failure, set aside there
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert not [path for path in tmp.iterdir() if HostState.is_stale_temp_dir(path)]
    assert files_of(failed) == files_of(good) and run.synced == [] and listing(bucket) == before


@pytest.fixture
def toolchain(tmp_path, monkeypatch, version):
    """The simulated neuronx-cc on PATH with the shim in front of it; returns the compile log."""
    install_simulated_compiler(tmp_path / "sdk-bin")
    install_compiler_shim(tmp_path / "shim-bin")
    path = [str(tmp_path / "shim-bin"), str(tmp_path / "sdk-bin"), os.environ["PATH"]]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    monkeypatch.setenv("SIMULATED_NEURONX_CC_LOG", str(tmp_path / "compiles.log"))
    return tmp_path / "compiles.log"


def test_the_shims_lookup_swaps_the_hosts_cached_failures(tmp_path, bucket, version, toolchain, monkeypatch,
                                                          capsys):
    """Host A compiles two graphs through the shim (published to the flat area). On host B the first one's
    compile failed; libneuronxla replays that failure and never calls the compiler for it, but the shim's
    lookup of any other graph swaps it for the bucket's entry."""
    graphs = make_graphs(2, seed="shim-heal")
    monkeypatch.setenv("NEURON_CACHE_BUCKET", str(bucket))
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "A"))
    results = [jit_compile(tmp_path / "A", version, graph) for graph in graphs]
    assert all(result.compiled for result in results)
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "B"))
    with pytest.raises(CompileFailed):
        compile_graph(tmp_path / "B", version, graphs[0], outcome="failed")
    failed = tmp_path / "B" / f"neuronxcc-{version}" / results[0].module
    before, compiled = listing(bucket), toolchain.read_text().split()
    capsys.readouterr()
    assert jit_compile(tmp_path / "B", version, graphs[1]).compiled  # a miss here: the shim's lookup
    said = capsys.readouterr().err
    assert files_of(failed) == files_of(results[0].path)
    assert f"replaced 1 failed local entry with the bucket's complete copy (neuronxcc-{version}/{failed.name})" in said
    assert jit_compile(tmp_path / "B", version, graphs[0]).hit
    assert toolchain.read_text().split() == compiled and listing(bucket) == before  # no compile, nothing published


def test_without_rename_exchange_the_failure_is_moved_aside_then_the_buckets_entry_renamed_in(
        tmp_path, bucket, version, failed_here, monkeypatch):
    """A filesystem without renameat2's RENAME_EXCHANGE (overlayfs, some network filesystems): the fallback."""
    from optimum_neuron_cache import atomic

    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    failed, good = failed_here
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert files_of(failed) == files_of(good)
    assert any(w.startswith("replaced 1 failed local entry") for w in run.warnings) and run.synced == []
