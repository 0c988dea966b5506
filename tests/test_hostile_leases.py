"""A lease path holding what no host can read or replace (a dangling symlink, a FIFO, a folder on a directory
bucket; a file over the lease size limit on either kind) counts as a lease held by an unknown host: it is
waited on, taken over once stale, every wait ends within the max wait, `leases` lists it and `--sweep`
removes it. Requests are counted (a counting pass-through in front of the real client), never timed: the
planner's clock is a counter. See docs/reliability.md, "A lease that cannot be read or created never stalls
a host".
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.compile_leases import (
    Action,
    Holder,
    LeaseKeeper,
    LeaseSettings,
    Probe,
    Watch,
    decide,
    list_leases,
    wait_for_graph,
)

from .lifecycle_helpers import run, uri

MODULE = "MODULE_123+abcdef01"
#: (bucket kind, what sits at the lease path)
ODD = [("dir", "symlink"), ("dir", "fifo"), ("dir", "folder"), ("dir", "oversized"), ("hf", "oversized")]


class Counted:
    """The real client, with its lease requests counted; a host that loops without waiting fails the test
    at `limit` requests instead of hanging it."""

    def __init__(self, client: BucketClient, limit: int = 400) -> None:
        self.client, self.limit, self.requests = client, limit, 0

    def _count(self) -> None:
        self.requests += 1
        assert self.requests <= self.limit, f"{self.requests} lease requests: the host loops without waiting"

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        self._count()
        return self.client.paths_info(paths)

    def lease(self, path: str, mode: str, **kwargs: Any) -> dict[str, Any]:
        self._count()
        return self.client.lease(path, mode, **kwargs)


def plant(ref: BucketRef, kind: str, path: str, outside: Path) -> None:
    """Put `kind` at the bucket path `path`: what a hostile or careless teammate leaves there."""
    if ref.kind == "hf":
        assert kind == "oversized"
        BucketClient(ref).batch(add=[{"dest": path, "content": "x" * 5000}])
        return
    target = Path(ref.location) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        os.symlink(outside / "gone", target)  # dangling
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
        (target / "inside").write_text("goes with the folder")
        (target / "out").symlink_to(outside)  # removing the folder removes this link, never what it points to
    else:
        target.write_text("x" * 5000)


@pytest.fixture(params=ODD, ids=["-".join(pair) for pair in ODD])
def odd(request, tmp_path: Path, version: str):
    """A bucket whose lease on MODULE is an odd thing: (bucket, kind)."""
    backend, kind = request.param
    if backend == "hf":
        request.getfixturevalue("hub")
        ref = BucketRef("hf", "test-org/odd-leases")
    else:
        ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "kept").write_text("a teammate's file")
    plant(ref, kind, layout.lease_path(version, MODULE), tmp_path / "outside")
    return ref, kind


def ticking() -> Any:
    """A clock that moves one second per look."""
    return itertools.count(0.0, 1.0).__next__


def test_an_odd_lease_is_waited_on_and_the_wait_ends_at_the_max_wait(odd, version):
    ref, _ = odd
    client = Counted(BucketClient(ref))
    keeper = LeaseKeeper(client, version, LeaseSettings(heartbeat=1.0, stale=10_000.0, max_wait=20.0, poll=0.001))
    waited = wait_for_graph(keeper, MODULE, clock=ticking())
    assert waited.decision.action is Action.COMPILE and waited.waited
    assert {d.action for d in waited.decisions} == {Action.WAIT, Action.COMPILE}
    assert client.requests <= 2 * 21  # a look and a read per (fake) second for 20 s: not a loop without waiting


def test_an_odd_lease_is_taken_over_once_stale(odd, version, tmp_path):
    ref, kind = odd
    client = Counted(BucketClient(ref))
    keeper = LeaseKeeper(client, version, LeaseSettings(heartbeat=1.0, stale=5.0, max_wait=10_000.0, poll=0.001))
    waited = wait_for_graph(keeper, MODULE, clock=ticking())
    assert waited.decision.action is Action.TAKEOVER and MODULE in keeper.held
    assert client.requests <= 2 * 7 + 4  # a look and a read a second until stale; read, look, take over, look
    path = layout.lease_path(version, MODULE)
    assert Holder.parse(BucketClient(ref).lease(path, "read")["content"]) == keeper.holder
    outside = tmp_path / "outside"  # nothing was written, nor removed, through a symlink
    assert [path.name for path in outside.iterdir()] == ["kept"]
    assert (outside / "kept").read_text() == "a teammate's file"
    assert keeper.release(MODULE)
    assert BucketClient(ref).list(layout.leases_prefix()) == []


def test_the_leases_command_lists_an_odd_lease_and_sweep_removes_it(odd, version, tmp_path):
    ref, kind = odd
    listed = run("leases", "--bucket", uri(ref))
    assert MODULE in listed and "(unreadable)" in listed
    found = list_leases(BucketClient(ref), version)
    assert [(lease.module, lease.holder) for lease in found] == [(MODULE, None)]
    data = json.loads(run("leases", "--bucket", uri(ref), "--sweep", "--older-than", "0", "--yes", "--json"))
    assert data["leases"] == [] and data["swept"] == [f"{version}/{MODULE}"]
    assert BucketClient(ref).list(layout.leases_prefix()) == []
    if ref.kind == "dir":
        assert not os.path.lexists(Path(ref.location) / layout.lease_path(version, MODULE))
        assert (tmp_path / "outside" / "kept").read_text() == "a teammate's file"
    # The path is free again: a host takes it at once.
    keeper = LeaseKeeper(BucketClient(ref), version, LeaseSettings())
    assert keeper.take(MODULE) and keeper.release(MODULE)


def test_the_max_wait_counts_from_the_first_look_across_lost_takeovers():
    """A host that lost takeovers (a new lease each time) has waited since its first look, not since the
    last lease it saw."""
    settings = LeaseSettings(heartbeat=1.0, stale=60.0, max_wait=100.0, poll=1.0)
    found = Probe(MODULE, False, ("a new holder's lease",))
    fresh = Watch(found.lease, changed_at=150.0, first_seen=150.0)
    assert decide(found, fresh, 160.0, settings).action is Action.WAIT
    late = decide(found, fresh, 160.0, settings, since=0.0)
    assert late.action is Action.COMPILE and "waited 160s" in late.reason


def test_a_lease_path_symlinked_to_a_folder_is_listed_never_followed(tmp_path, version):
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    client = BucketClient(ref)
    client.create()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not the bucket's")
    path = layout.lease_path(version, MODULE)
    (Path(ref.location) / path).parent.mkdir(parents=True)
    (Path(ref.location) / path).symlink_to(outside)
    for listed in (client.list(layout.leases_prefix()), client.paths_info([path])):
        assert [(item["path"], item["size"], item["digest"]) for item in listed] == [(path, 0, "stale")]
    assert client.lease(path, "read")["content"] == ""
    assert not client.lease(path, "delete", expect="someone's lease")["ok"]
    assert client.lease(path, "delete", expect="")["ok"]
    assert not os.path.lexists(Path(ref.location) / path) and (outside / "secret").read_text() == "not the bucket's"


def test_an_empty_lease_file_is_one_that_cannot_be_read(bucket, version):
    client = BucketClient(bucket)
    path = layout.lease_path(version, MODULE)
    client.batch(add=[{"dest": path, "content": ""}])
    assert client.lease(path, "read")["content"] == ""
    assert not client.lease(path, "replace", content="mine", expect="someone's lease")["ok"]
    assert client.lease(path, "replace", content="mine", expect="")["ok"]
    assert client.lease(path, "read")["content"] == "mine"


# ------------------------------------------------------------------------- hosts through the shim


def _dir_bucket(tmp_path: Path) -> str:
    path = tmp_path / "bucket"
    path.mkdir()
    return str(path)


@pytest.mark.parametrize("kind,mode", [("symlink", "shim"), ("fifo", "shim"), ("folder", "shim"),
                                       ("symlink", "phases")])
def test_a_host_given_an_odd_lease_compiles_within_the_max_wait(tmp_path, kind, mode):
    """The lease's holder is unknown and never goes stale here (an hour): the host waits at most the max wait
    (1 s), then compiles, publishes, and ends with the entry. Before, it looped on the create for ever."""
    from stress.leases import VERSION, Hosts
    from optimum_neuron_cache.testing.simulated_compiler import make_graphs, module_name

    bucket = _dir_bucket(tmp_path)
    (tmp_path / "outside").mkdir()
    module = module_name(VERSION, make_graphs(1, seed="lease")[0])
    plant(BucketRef("dir", bucket), kind, layout.lease_path(VERSION, module), tmp_path / "outside")
    hosts = Hosts(tmp_path / "w", bucket, mode=mode, hosts=1, graphs=1, seconds=0.1,
                  extra={"NEURON_CACHE_LEASE_STALE": "3600", "NEURON_CACHE_LEASE_MAX_WAIT": "1"})
    figures = hosts.finish(timeout=60)
    assert figures.notes == [] and figures.complete_hosts == 1 and figures.compiles == 1
    assert "(the most allowed)" in hosts.stderr(0)


def test_an_oversized_lease_never_turns_the_bucket_off(tmp_path):
    """A directory bucket holds graph 1, and a lease over the size limit sits on graph 0: the host takes that
    lease over once stale and compiles graph 0, and still fetches graph 1 (before, the takeover was refused
    as a bad request and the shim skipped the whole bucket for 300 s, compiling graph 1 too)."""
    from stress.leases import VERSION, Hosts
    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs, module_name

    bucket = _dir_bucket(tmp_path)
    graphs = make_graphs(2, seed="lease")
    with hub_neuronx_cache(compiler_version=VERSION, bucket=bucket, cache_dir=tmp_path / "publisher"):
        compile_graph(tmp_path / "publisher", VERSION, graphs[1])
    plant(BucketRef("dir", bucket), "oversized", layout.lease_path(VERSION, module_name(VERSION, graphs[0])), tmp_path)
    hosts = Hosts(tmp_path / "w", bucket, mode="shim", hosts=1, graphs=2, seconds=0.1,
                  extra={"NEURON_CACHE_LEASE_STALE": "1", "NEURON_CACHE_LEASE_MAX_WAIT": "3600"})
    figures = hosts.finish(timeout=60)
    assert figures.notes == [] and figures.complete_hosts == 1
    assert figures.compiles == 1 and figures.lease_compiled == 1
    assert "skipped" not in hosts.stderr(0)
    assert BucketClient(BucketRef("dir", bucket)).list(layout.leases_prefix()) == []
    shutil.rmtree(tmp_path / "publisher")


# ---------------------------------------------------------------------------------- the sweep's clock


@pytest.mark.parametrize("skew_days", [-2, 2])
def test_the_sweep_judges_a_lease_by_the_buckets_clock_not_its_writers(hub, tmp_path, version, skew_days):
    """A host whose clock runs two days behind (or ahead) writes its lease: on the Hub the file's `mtime` is
    that clock's. The sweep goes by the bucket's upload time: the fresh lease of the host behind is kept by the
    default sweep (a day), and the lease of the host ahead is old to a sweep of `--older-than 0`."""
    import time

    ref = BucketRef("hf", "test-org/skewed")
    client = BucketClient(ref)
    client.create()
    holder = Holder(host="skewed-host", pid=77, started=1.0, token="skewed", boot="skewed-boot")
    written = tmp_path / "lease"
    written.write_text(holder.text())
    skewed = time.time() + skew_days * 86400
    os.utime(written, (skewed, skewed))  # the file time that host's Hub client sends as `mtime`
    path = layout.lease_path(version, MODULE)
    client.batch(add=[{"dest": path, "local_path": str(written)}])
    assert abs(client.paths_info([path])[0]["mtime"] - skewed) < 5  # the writer's clock, as the Hub keeps it
    if skew_days < 0:
        data = json.loads(run("leases", "--bucket", uri(ref), "--sweep", "--yes", "--json"))
        assert data["swept"] == [] and [lease["holder"]["host"] for lease in data["leases"]] == ["skewed-host"]
    else:
        data = json.loads(run("leases", "--bucket", uri(ref), "--sweep", "--older-than", "0", "--yes", "--json"))
        assert data["leases"] == [] and data["swept"] == [f"{version}/{MODULE}"]


# ------------------------------------------------------------------- a holder whose compiler hangs


def test_the_max_wait_bounds_a_runs_waits_on_a_hung_holder_not_each_graphs(tmp_path):
    """Another host holds the leases of both graphs of a run and renews them for ever (its heartbeat lives,
    its compiler hangs). The run waits on the first graph until the max wait, then compiles it; the second
    graph it does not wait for at all: the max wait bounds the run's waits together. Before, each graph
    waited the whole max wait (2 h each by default)."""
    import threading

    from stress.leases import VERSION, Hosts
    from optimum_neuron_cache.testing.simulated_compiler import make_graphs, module_name

    bucket = _dir_bucket(tmp_path)
    client = BucketClient(BucketRef("dir", bucket))
    paths = [layout.lease_path(VERSION, module_name(VERSION, graph)) for graph in make_graphs(2, seed="lease")]
    holders = {path: Holder(host="hung-host", pid=77, started=1.0, token=f"hung-{i}", boot="hung-boot")
               for i, path in enumerate(paths)}
    for path, holder in holders.items():
        assert client.lease(path, "create", content=holder.text())["ok"]
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.2):
            for path, holder in list(holders.items()):
                renewed = holder.renewed()
                if client.lease(path, "replace", content=renewed.text(), expect=holder.text())["ok"]:
                    holders[path] = renewed

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        hosts = Hosts(tmp_path / "w", bucket, mode="shim", hosts=1, graphs=2, seconds=0.1,
                      extra={"NEURON_CACHE_LEASE_STALE": "3600", "NEURON_CACHE_LEASE_MAX_WAIT": "2"})
        figures = hosts.finish(timeout=60)
    finally:
        stop.set()
        renewer.join()
    assert figures.notes == [] and figures.complete_hosts == 1 and figures.compiles == 2
    said = hosts.stderr(0)
    assert said.count("hung-host pid 77 is compiling it") == 1, said  # one wait, for the first graph only
    assert said.count("(the most allowed)") == 2, said


def test_a_host_takes_over_an_oversized_lease_on_a_hub_bucket(tmp_path, monkeypatch):
    """Before, its takeover read nothing, failed, and restarted the host's wait: it waited for ever."""
    from hub_emulator import HubEmulator

    from stress.leases import VERSION, Hosts
    from optimum_neuron_cache.client import stop_server
    from optimum_neuron_cache.testing.simulated_compiler import make_graphs, module_name

    emulator = HubEmulator(tmp_path / "hub", xet="http").start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
    ref = BucketRef("hf", "team/oversized")
    try:
        BucketClient(ref).create()
        plant(ref, "oversized", layout.lease_path(VERSION, module_name(VERSION, make_graphs(1, seed="lease")[0])),
              tmp_path)
        hosts = Hosts(tmp_path / "w", ref.location, mode="shim", hosts=1, graphs=1, seconds=0.1,
                      extra={"NEURON_CACHE_LEASE_STALE": "1", "NEURON_CACHE_LEASE_MAX_WAIT": "3600"})
        figures = hosts.finish(timeout=60)
        assert figures.notes == [] and figures.complete_hosts == 1
        assert figures.compiles == 1 and figures.lease_compiled == 1
        assert "no heartbeat" in hosts.stderr(0)  # taken over once stale, not compiled after the max wait
        assert BucketClient(ref).list(layout.leases_prefix()) == []
    finally:
        stop_server()
        emulator.stop()
