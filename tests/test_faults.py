"""Remote faults injected through the local Hub emulator: the body always runs, costs are bounded, one warning
line, nothing partial locally or remotely. (Timings are the benchmark's business; here we count requests.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.testing.invariants import bucket_violations, local_violations, reference_entries, reference_sizes

BUCKET = "test/faults"
TREE = r"^/api/buckets/test/faults/tree"


@pytest.fixture
def seeded(tmp_path, hub, version, monkeypatch):
    """A bucket holding a model's entries (compiled in cache A); faults are added by each test afterwards."""
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "4")
    monkeypatch.setenv("NEURON_CACHE_HTTP_TIMEOUT", "1")
    BucketClient(BucketRef("hf", BUCKET)).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "A") as run:
        for graph in make_graphs(2, seed="faults"):
            compile_graph(tmp_path / "A", version, graph)
    assert len(run.synced) == 2
    hub.reset_counts()
    return tmp_path / "A"


def enter(tmp_path: Path, version: str, caplog, cache: str = "B"):
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / cache) as run:
            body_ran = True
    assert body_ran
    return run


def test_a_transient_500_is_retried_silently(tmp_path, hub, version, seeded, caplog):
    hub.add_fault("GET", TREE, 500)
    run = enter(tmp_path, version, caplog)
    assert len(run.fetched) == 2 and run.warnings == [] and caplog.records == []
    assert hub.requests.count("GET", TREE) == 2


@pytest.mark.parametrize("status", [500, 503])
def test_a_server_error_for_ever_costs_bounded_attempts_and_one_warning(tmp_path, hub, version, seeded, caplog, status):
    hub.add_fault("GET", TREE, status, times=None)
    run = enter(tmp_path, version, caplog)
    assert run.fetched == [] and len(run.warnings) == 1 and len(caplog.records) == 1
    assert f"HTTP {status}" in run.warnings[0]
    assert 2 <= hub.requests.count("GET", TREE) <= 4
    assert scan_entries(tmp_path / "B", version) == []


def test_429_with_a_short_retry_after_is_honoured(tmp_path, hub, version, seeded, caplog):
    hub.add_fault("GET", TREE, 429, headers={"Retry-After": "1"})
    run = enter(tmp_path, version, caplog)
    assert len(run.fetched) == 2 and run.warnings == []


def test_429_with_a_retry_after_beyond_the_budget_fails_at_once(tmp_path, hub, version, seeded, caplog):
    hub.add_fault("GET", TREE, 429, headers={"Retry-After": "3600"}, times=None)
    run = enter(tmp_path, version, caplog)
    assert run.fetched == [] and len(run.warnings) == 1 and "429" in run.warnings[0]
    assert hub.requests.count("GET", TREE) == 1


def test_slow_responses_time_out_and_are_retried_within_the_budget(tmp_path, hub, version, seeded, caplog):
    hub.add_fault("GET", TREE, 0, delay=3.0, times=None)  # longer than NEURON_CACHE_HTTP_TIMEOUT=1
    run = enter(tmp_path, version, caplog)
    assert run.fetched == [] and len(run.warnings) == 1
    assert 2 <= hub.requests.count("GET", TREE) <= 4


@pytest.mark.parametrize(("status", "text"), [(401, "401 Unauthorized"), (403, "403 Forbidden"), (404, "not found")])
def test_auth_and_missing_errors_are_not_retried(tmp_path, hub, version, seeded, caplog, status, text):
    hub.add_fault("GET", TREE, status, times=None, headers={"X-Error-Code": "RepoNotFound"} if status == 404 else None)
    run = enter(tmp_path, version, caplog)
    assert run.fetched == [] and len(run.warnings) == 1 and text in run.warnings[0]
    assert hub.requests.count("GET", TREE) == 1


def test_a_listing_that_lies_about_sizes_installs_nothing(tmp_path, hub, version, seeded, caplog):
    with hub._lock:  # the emulator's stored metadata: make the listing claim a size the bytes do not have
        files = hub._buckets[BUCKET].files
        neff = next(path for path in files if "/models/" in path and path.endswith("model.neff"))
        files[neff] = {**files[neff], "size": files[neff]["size"] + 10}
    run = enter(tmp_path, version, caplog)
    module = neff.split("/")[-2]
    assert [key.rsplit("/", 1)[1] for key in run.fetched] != [] and module not in " ".join(run.fetched)
    assert len(run.warnings) == 1 and module in run.warnings[0]  # one entry skipped, by name; the other installed
    assert local_violations(tmp_path / "B", version, reference_entries(seeded, version)) == []
    assert module not in {e.name for e in scan_entries(tmp_path / "B", version)}


def test_failed_publishing_leaves_no_commit_file_without_content_and_heals(tmp_path, hub, version, seeded, caplog):
    graphs = make_graphs(2, seed="faults-sync")
    hub.add_fault("POST", r"/batch$", 500, times=None)
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "A") as run:
            for graph in graphs:
                compile_graph(tmp_path / "A", version, graph)
    assert run.synced == [] and len(run.warnings) == 1 and "sync failed" in run.warnings[0]
    listing = BucketClient(BucketRef("hf", BUCKET)).list("", recursive=True)
    assert bucket_violations(listing, version, reference_sizes(tmp_path / "A", version)) == []
    hub.clear_faults()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "A") as healed:
        pass
    assert len(healed.synced) == 2  # the pending entries of the failed run
    listing = BucketClient(BucketRef("hf", BUCKET)).list("", recursive=True)
    assert bucket_violations(listing, version, reference_sizes(tmp_path / "A", version)) == []
    assert len({item["path"].split("/")[-2] for item in listing if item["path"].endswith("model.done")}) == 4


def test_a_dead_server_mid_request_is_restarted_and_the_request_retried(tmp_path, hub, version, seeded):
    import os
    import signal
    import threading
    import time

    client = BucketClient(BucketRef("hf", BUCKET))
    pid = client.server_status()["pid"]
    hub.add_fault("GET", TREE, 0, delay=3.0)  # the request is in flight when the server dies

    def kill_when_in_flight() -> None:
        while hub.requests.count("GET", TREE) == 0:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_in_flight, daemon=True)
    killer.start()
    assert len(client.list("neuronxcc-" + version, recursive=True)) > 0
    killer.join(timeout=10)
    assert client.server_status()["pid"] != pid
    stop_server()
