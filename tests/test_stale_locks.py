"""An entry that neuronx-cc left locked (its compile died) never strands what the bucket holds complete.

Healed when the lock can be told stale (no compiler runs, the lock is old, the cache is local); otherwise left
alone with one warning naming the entry and the command that fixes it. Both backends, real server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.compile_locks import MIN_AGE
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.testing.invariants import local_violations, reference_entries


@pytest.fixture
def stranded(tmp_path, bucket, version):
    """Cache A published a model's two entries; in cache B the compile of the first one died holding its lock."""
    graphs = make_graphs(2, seed="stale-locks")
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
        for graph in graphs:
            compile_graph(tmp_path / "A", version, graph)
    compile_graph(tmp_path / "B", version, graphs[0], outcome="crash")
    [entry] = scan_entries(tmp_path / "B", version)
    assert entry.state is EntryState.LOCKED
    return entry


def _age(entry, seconds: float) -> None:
    for name in entry.files:
        if name.endswith(".lock"):
            old = time.time() - seconds
            os.utime(entry.path / name, (old, old))


def test_a_stale_lock_is_replaced_whole_by_the_buckets_entry(tmp_path, bucket, version, stranded):
    _age(stranded, 10 * MIN_AGE)
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        states = {e.name: e.state for e in scan_entries(tmp_path / "B", version)}
    assert states == {name: EntryState.SUCCESS for name in states} and len(states) == 2
    assert f"neuronxcc-{version}/{stranded.name}" in run.fetched
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []
    [said] = [w for w in run.warnings if stranded.name in w]
    assert "locked by a compile that died" in said and "replaced" in said


def test_a_fresh_lock_is_left_alone_with_the_command_that_fixes_it(tmp_path, bucket, version, stranded):
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert f"neuronxcc-{version}/{stranded.name}" not in run.fetched
    assert {e.name: e.state for e in scan_entries(tmp_path / "B", version)}[stranded.name] is EntryState.LOCKED
    [said] = [w for w in run.warnings if stranded.name in w]
    assert "neuron-cache cleanup --locks" in said and "a compile may be starting" in said
    assert any(stranded.name in reason for reason in run.miss_reasons)


WAIT_FOR_STDIN = "import sys; print('compiling', flush=True); sys.stdin.read()\n"


def test_a_lock_is_never_touched_while_neuronx_cc_runs(tmp_path, bucket, version, stranded):
    _age(stranded, 10 * MIN_AGE)
    compiler = tmp_path / "bin" / "neuronx-cc"  # a process this host sees as a running compiler
    compiler.parent.mkdir()
    compiler.write_text(WAIT_FOR_STDIN)
    running = subprocess.Popen([sys.executable, str(compiler)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert running.stdout.readline().strip() == "compiling"
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
            pass
    finally:
        running.communicate("")
    assert {e.name: e.state for e in scan_entries(tmp_path / "B", version)}[stranded.name] is EntryState.LOCKED
    [said] = [w for w in run.warnings if stranded.name in w]
    assert f"pid {running.pid}" in said and "neuron-cache cleanup --locks" in said
