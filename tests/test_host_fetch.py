"""One fetch per host: ranks entering a block together on one cold cache make one listing, one plan and one
download between them; the others wait on the host's fetch gate, then take what the fetch found, without a
request. A fetch that fails is not retried by every waiting rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.fetch import FetchNote, HostFetchGate
from optimum_neuron_cache.host_state import HostState
from optimum_neuron_cache.journal import JournalKey
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.testing.invariants import local_violations, reference_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from tests.polling import wait_until

REPO = Path(__file__).resolve().parent.parent
RANKS = int(os.environ.get("NEURON_CACHE_TEST_RANKS", "8"))

RANK = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from optimum_neuron_cache import hub_neuronx_cache
    out, cache, bucket, version, go = sys.argv[1:6]
    while not Path(go).exists():  # every rank imported and ready: they enter together
        time.sleep(0.001)
    with hub_neuronx_cache("org/ranks", compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        pass
    json.dump({"requests": run.requests, "fetched": len(run.fetched), "compiled": len(run.compiled),
               "waited": run.waited_for_host_fetch, "warnings": run.warnings}, open(out, "w"))
    """
)


def _ranks(tmp_path: Path, bucket: str, version: str, cache: Path, module: str, others: int) -> list[dict]:
    """Start the ranks together. The test holds one entry's fetch lock until every rank has entered (its
    journal record is written just before the gate) and the fetcher has installed the `others` entries: the
    fetch cannot end before the last rank reaches the gate, so every other rank finds it held, and the fetcher
    found the held entry held, however the machine schedules them."""
    go = tmp_path / "go"
    lock = HostState(cache).entry_lock(version, module, "fetch")
    lock.acquire()
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / f"rank{i}.json"), str(cache), bucket, version, str(go)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for i in range(RANKS)]
    go.touch()
    journal = HostState(cache).base / "journal"
    wait_until(lambda: journal.is_dir() and len(list(journal.iterdir())) >= RANKS, "every rank to enter")
    wait_until(lambda: sum(entry.state is EntryState.SUCCESS for entry in scan_entries(cache, version)) >= others,
               "the fetcher to install the entries nobody held")
    lock.release()
    assert [proc.wait(timeout=300) for proc in procs] == [0] * RANKS
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(RANKS)]


def test_ranks_entering_together_fetch_once_and_the_others_ask_nothing(tmp_path, bucket, version):
    BucketClient(bucket).create()
    with hub_neuronx_cache("org/ranks", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        for graph in make_graphs(6, seed="ranks", neff_size=400_000):
            compile_graph(tmp_path / "A", version, graph)
    ranks = _ranks(tmp_path, str(bucket), version, tmp_path / "B", layout.module_of(run.synced[0]), others=5)
    fetchers = [rank for rank in ranks if rank["fetched"]]
    # The fetcher: the listing, one download, and one more for the entry the test held meanwhile.
    assert len(fetchers) == 1 and fetchers[0]["fetched"] == 6 and fetchers[0]["requests"] == 3
    assert all(rank["compiled"] == 0 and rank["warnings"] == [] for rank in ranks)  # nobody takes them for its own
    waiting = [rank for rank in ranks if rank["waited"]]
    assert len(waiting) == RANKS - 1 and all(rank["requests"] == 0 for rank in waiting)
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []


def held_gate(tmp_path: Path, version: str, monkeypatch) -> tuple[BucketRef, Path, HostFetchGate, threading.Event]:
    """A directory bucket, a cache, the gate of `org/ranks`'s area held as a fetcher holds it, and an event set
    when a rank starts waiting on it (flock locks are per open file: a rank on a thread waits like another
    process)."""
    bucket, cache = BucketRef("dir", str(tmp_path / "bucket")), tmp_path / "cache"
    BucketClient(bucket).create()
    key = JournalKey(str(bucket), version, "org--ranks", "default").text
    gate = HostFetchGate(HostState(cache).fetch_gate_path(key), key)
    assert gate.lead()
    waiting = threading.Event()
    wait = HostFetchGate.wait
    monkeypatch.setattr(HostFetchGate, "wait", lambda self, timeout: (waiting.set(), wait(self, timeout))[1])
    return bucket, cache, gate, waiting


def test_a_failed_host_fetch_is_not_retried_by_the_ranks_that_waited_for_it(tmp_path, version, monkeypatch):
    """The fetcher's failure is in its note: a waiting rank warns once with it and goes on without the bucket
    (no request of its own, no retry budget spent again). The test holds the gate as a fetcher would, and
    the rank runs on a thread (flock locks are per open file: it waits like another process)."""
    bucket, cache, gate, waiting = held_gate(tmp_path, version, monkeypatch)
    runs = []

    def rank() -> None:
        with hub_neuronx_cache("org/ranks", compiler_version=version, bucket=bucket, cache_dir=cache) as run:
            pass
        runs.append(run)

    thread = threading.Thread(target=rank)
    thread.start()
    assert waiting.wait(60)
    gate.release(FetchNote(gate.key, time.time(), False, "bucket unreachable (as the fetcher met it)"))
    thread.join(60)
    (run,) = runs
    assert run.waited_for_host_fetch and run.requests == 0
    assert len(run.warnings) == 1 and "bucket unreachable (as the fetcher met it)" in run.warnings[0]


def test_a_torn_or_foreign_note_is_never_taken(tmp_path):
    key = "b\0v\0org--m\0default"
    gate = HostFetchGate(HostState(tmp_path).fetch_gate_path(key), key)
    for raw in (b"", b'{"key": "b', json.dumps({"key": "other", "finished_at": 1e10, "ok": True}).encode(),
                json.dumps({"key": key, "finished_at": 1e10, "ok": True, "remote_modules": [1],
                            "record_names": []}).encode()):
        gate.path.write_bytes(raw)
        assert gate.wait(1.0) is None
    note = FetchNote(key, 1e10, True, "", "area", ("MODULE_1+a",), (), None)
    gate.path.write_bytes(note.to_json())
    assert gate.wait(1.0) == note
    old = FetchNote(key, 1.0, True)  # another fetch's, long ago
    gate.path.write_bytes(old.to_json())
    assert gate.wait(1.0) is None


@pytest.fixture(params=["hf", "dir"])
def bucket(request, tmp_path: Path):
    if request.param == "hf":
        request.getfixturevalue("hub")
        return BucketRef("hf", "test/ranks")
    return BucketRef("dir", str(tmp_path / "bucket"))


def test_a_rank_that_took_the_note_and_compiled_publishes_what_it_compiled(tmp_path, version, monkeypatch):
    """A waiting rank makes no request to enter; if its body compiles, exit connects and publishes as usual."""
    bucket, cache, gate, waiting = held_gate(tmp_path, version, monkeypatch)
    runs = []

    def rank() -> None:
        with hub_neuronx_cache("org/ranks", compiler_version=version, bucket=bucket, cache_dir=cache) as run:
            runs.append(run.requests)
            compile_graph(cache, version, make_graphs(1, seed="after-the-note", neff_size=20_000)[0])
        runs.append(run)

    thread = threading.Thread(target=rank)
    thread.start()
    assert waiting.wait(60)
    area = f"neuronxcc-{version}/models/org--ranks/default"
    gate.release(FetchNote(gate.key, time.time(), True, "", area, (), (), None))
    thread.join(60)
    requests_on_enter, run = runs
    assert run.waited_for_host_fetch and requests_on_enter == 0
    assert len(run.synced) == 1 and run.warnings == [] and run.requests >= 1
    assert any(item["path"].startswith(area) for item in BucketClient(bucket).list(area, recursive=True))
