"""Many ranks, many hosts, kill -9: the stress scenarios (stress/) with CI-sized counts.

Counts come from NEURON_CACHE_TEST_RANKS, _HOSTS, _CRASH_TRIALS; `python -m stress` runs them bigger.
"""

from __future__ import annotations

import os

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from stress import scenarios

RANKS = int(os.environ.get("NEURON_CACHE_TEST_RANKS", "8"))
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
    from tests.emulator import HubEmulator

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
