"""Many ranks, many hosts, kill -9: the stress scenarios (stress/) with CI-sized counts.

Counts come from NEURON_CACHE_TEST_RANKS, _HOSTS, _CRASH_TRIALS; `python -m stress` runs them bigger.
"""

from __future__ import annotations

import os

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from stress import phases, scenarios

RANKS = int(os.environ.get("NEURON_CACHE_TEST_RANKS", "8"))
PHASE_TRIALS = int(os.environ.get("NEURON_CACHE_TEST_PHASE_TRIALS", "1"))
HOSTS = int(os.environ.get("NEURON_CACHE_TEST_HOSTS", "3"))
TRIALS = int(os.environ.get("NEURON_CACHE_TEST_CRASH_TRIALS", "4"))


@pytest.fixture(params=["dir", "hf"])
def bucket_for(request, tmp_path, monkeypatch):
    """Returns name -> a fresh bucket of the backend. hf: an emulator serving Xet over HTTP, since several
    bucket servers (hosts) transfer against it at the same instant."""
    if request.param == "dir":
        def make(name: str) -> str:
            path = tmp_path / "buckets" / name
            path.mkdir(parents=True, exist_ok=True)
            return str(path)
        yield make
        return
    from optimum_neuron_cache.client import stop_server
    from hub_emulator import HubEmulator

    emulator = HubEmulator(tmp_path / "hub", xet="http").start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)

    def make(name: str) -> str:
        BucketClient(BucketRef("hf", f"stress/{name}")).create()
        return f"stress/{name}"
    try:
        yield make
    finally:
        stop_server()
        emulator.stop()


def _ok(figures: scenarios.Figures) -> None:
    assert figures.failures == 0, figures.notes


def test_ranks_on_one_host_fetch_once_and_publish_once(tmp_path, bucket_for):
    figures = scenarios.ranks_on_one_host(tmp_path, bucket_for("ranks"), RANKS)
    _ok(figures)
    assert figures.bytes_transferred == figures.bytes_needed


def test_hosts_syncing_the_same_entries_end_with_one_correct_copy(tmp_path, bucket_for):
    _ok(scenarios.hosts_syncing_the_same_entries(tmp_path, bucket_for("hosts"), HOSTS))


def test_kill_9_during_fetch_never_leaves_a_bad_hit_and_heals(tmp_path, bucket_for):
    _ok(scenarios.crash_fetch(tmp_path, bucket_for("fetch"), TRIALS, graphs=4, neff_size=3_000_000, window=0.6))


def test_kill_9_during_sync_never_commits_missing_content_and_heals(tmp_path, bucket_for):
    _ok(scenarios.crash_sync(tmp_path, TRIALS, graphs=4, neff_size=3_000_000, window=0.6,
                             bucket_for=lambda trial: bucket_for(f"sync-{trial}")))


@pytest.mark.parametrize("phase", phases.PHASES)
def test_a_run_killed_at_each_named_phase_leaves_nothing_wrong_and_the_next_plain_run_loses_nothing(
        tmp_path, bucket_for, phase):
    """Killed (or SIGTERMed) where the phase says: no bad hit, no commit file without content; then one plain
    run of the same model and task publishes everything the killed run compiled, with its export record."""
    figures = phases.crash_at_phases(tmp_path, bucket_for, PHASE_TRIALS, (phase,))[phase]
    _ok(figures)


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_lock_held_too_long_is_a_clear_warning_and_a_killed_holder_blocks_nobody(tmp_path, version, monkeypatch):
    import subprocess
    import sys

    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.host_state import HostState
    from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        compile_graph(tmp_path / "A", version, make_graphs(1)[0])
    module = run.synced[0].rsplit("/", 1)[1]
    lock = HostState(tmp_path / "B").entry_lock(version, module, "fetch").lock_file
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # another rank is "downloading" this entry
    monkeypatch.setenv("NEURON_CACHE_LOCK_TIMEOUT", "1")
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as waited:
        pass
    assert waited.fetched == [] and len(waited.warnings) == 1
    assert "held its lock for over 1s" in waited.warnings[0] and "NEURON_CACHE_LOCK_TIMEOUT" in waited.warnings[0]
    holder.kill()  # kill -9: the kernel drops its flock, so nobody waits for a dead process
    holder.wait()
    monkeypatch.setenv("NEURON_CACHE_LOCK_TIMEOUT", "600")
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as after:
        pass
    assert [key.rsplit("/", 1)[1] for key in after.fetched] == [module]
