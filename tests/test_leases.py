"""Compile leases: the bucket server's lease operation on both backends, the planner, and hosts sharing compiles.

"Hosts" here are processes with their own compile cache and their own bucket server (their own runtime dir),
against one bucket, as separate machines would be. Waits are polls of the bucket (or events), never sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.compile_leases import (
    Action,
    Holder,
    LeaseSettings,
    Probe,
    Watch,
    decide,
    observe,
    probe,
)
from optimum_neuron_cache.testing.simulated_compiler import make_graphs, module_name

from .polling import wait_until

MODULE = "MODULE_123+abcdef01"


def test_the_lease_operation_is_conditional_and_idempotent(bucket, version):
    client = BucketClient(bucket)
    path = layout.lease_path(version, MODULE)
    assert client.lease(path, "read") == {"ok": True, "content": None}
    assert client.lease(path, "create", content="a")["ok"]
    assert client.lease(path, "create", content="a")["ok"]  # a resent create of ours: still ours
    assert not client.lease(path, "create", content="b")["ok"]  # someone else's: refused
    assert client.lease(path, "read")["content"] == "a"
    assert not client.lease(path, "replace", content="b", expect="x")["ok"]  # not what it holds
    assert client.lease(path, "read")["content"] == "a"
    assert client.lease(path, "replace", content="b", expect="a")["ok"]
    assert client.lease(path, "replace", content="b", expect="a")["ok"]  # resent: it holds our bytes
    assert not client.lease(path, "takeover", content="c", expect="x")["ok"]  # a takeover is conditional too
    assert client.lease(path, "takeover", content="c", expect="b")["ok"]
    assert client.lease(path, "takeover", content="c", expect="b")["ok"]  # resent
    assert client.lease(path, "replace", content="b", expect="c")["ok"]
    assert not client.lease(path, "delete", expect="a")["ok"]
    assert client.lease(path, "delete", expect="b")["ok"]
    assert client.lease(path, "delete", expect="b")["ok"]  # already gone
    assert not client.lease(path, "replace", content="c", expect="b")["ok"]  # nothing to replace
    # Leases never show in the flat area nor in any compiler version's folder.
    client.lease(path, "create", content="a")
    assert client.list(layout.version_prefix(version)) == []
    assert [item["path"] for item in client.list(layout.leases_prefix())] == [path]


def test_bad_lease_requests_are_refused(bucket, version):
    from optimum_neuron_cache.errors import RemoteInvalidDataError

    client = BucketClient(bucket)
    path = layout.lease_path(version, MODULE)
    for kwargs in ({"mode": "steal"}, {"mode": "create"}, {"mode": "replace", "content": "a"},
                   {"mode": "create", "content": "x" * 5000}):
        with pytest.raises(RemoteInvalidDataError):
            client.lease(path, **kwargs)
    with pytest.raises(RemoteInvalidDataError):
        client.lease("../escape", "create", content="a")


def test_a_directory_bucket_gives_a_lease_to_exactly_one_of_many_racing_takers(tmp_path, version):
    from bucket_server.backends.dir import DirBackend

    backend = DirBackend(str(tmp_path / "b"))
    backend.create(private=None)
    path = layout.lease_path(version, MODULE)
    start = threading.Barrier(16)
    won: list[str] = []

    def take(name: str) -> None:
        start.wait()
        if backend.lease(path, "create", content=name)["ok"]:
            won.append(name)

    threads = [threading.Thread(target=take, args=(f"taker-{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and backend.lease(path, "read")["content"] == won[0]
    # Takeovers race the same way: one wins.
    won.clear()
    start.reset()

    def take_over(name: str) -> None:
        start.wait()
        if backend.lease(path, "replace", content=name, expect=current)["ok"]:
            won.append(name)

    current = backend.lease(path, "read")["content"]
    threads = [threading.Thread(target=take_over, args=(f"new-{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and backend.lease(path, "read")["content"] == won[0]


# ------------------------------------------------------------------------------------ the planner

SETTINGS = LeaseSettings(heartbeat=1.0, stale=5.0, max_wait=100.0, poll=0.05)


def test_the_planner_decides_with_reasons():
    other = Holder(host="elsewhere", pid=1234, started=1.0, token="t", boot="another-boot")
    assert decide(Probe(MODULE, True, ("sig",)), None, 0.0, SETTINGS).action is Action.FETCH
    assert decide(Probe(MODULE, False, None), None, 0.0, SETTINGS).action is Action.TAKE
    watches: dict[str, Watch] = {}
    watch = observe(watches, Probe(MODULE, False, (1,)), now=10.0)
    watch.holder = other
    waiting = decide(Probe(MODULE, False, (1,)), watch, 12.0, SETTINGS)
    assert waiting.action is Action.WAIT and "elsewhere pid 1234" in waiting.reason
    observe(watches, Probe(MODULE, False, (2,)), now=14.0)  # a heartbeat: the file changed
    assert decide(Probe(MODULE, False, (2,)), watch, 18.0, SETTINGS).action is Action.WAIT
    stale = decide(Probe(MODULE, False, (2,)), watch, 19.5, SETTINGS)
    assert stale.action is Action.TAKEOVER and "no heartbeat for 6s" in stale.reason
    watch.changed_at = 108.0  # heartbeats go on, but the wait has lasted more than max_wait
    assert decide(Probe(MODULE, False, (3,)), watch, 110.5, SETTINGS).action is Action.COMPILE
    dead = Holder.of_this_process()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    watch = Watch((1,), 0.0, 0.0, holder=Holder(dead.host, child.pid, 1.0, "t", dead.boot))
    assert decide(Probe(MODULE, False, (1,)), watch, 0.1, SETTINGS).action is Action.TAKEOVER
    # Another waiter took it over: the lease's bytes changed. The dead holder no longer decides anything.
    observe({MODULE: watch}, Probe(MODULE, False, (2,)), now=0.2)
    assert decide(Probe(MODULE, False, (2,)), watch, 0.3, SETTINGS).action is Action.WAIT


@pytest.mark.parametrize("text", ["", "nan", "[]", '{"host": "h"}', '{"host": "h", "pid": -1, "started": 1, "token": "t", "boot": "", "beat": 0}',
                                  '{"host": "h", "pid": 5, "started": NaN, "token": "t", "boot": "", "beat": 0}',
                                  '{"host": "h", "pid": true, "started": 1, "token": "t", "boot": "", "beat": 0}'])
def test_a_lease_file_is_hostile_input(text):
    assert Holder.parse(text) is None


def test_holders_round_trip():
    holder = Holder.of_this_process()
    assert Holder.parse(holder.text()) == holder
    assert Holder.parse(holder.renewed().text()).beat == 1


# ------------------------------------------------------------------------------- hosts sharing compiles

HOSTS = int(os.environ.get("NEURON_CACHE_TEST_LEASE_HOSTS", "3"))
GRAPHS = int(os.environ.get("NEURON_CACHE_TEST_LEASE_GRAPHS", "3"))
SECONDS = float(os.environ.get("NEURON_CACHE_TEST_LEASE_SECONDS", "0.3"))


@pytest.fixture
def dir_bucket(tmp_path) -> str:
    path = tmp_path / "bucket"
    path.mkdir()
    return str(path)


@pytest.fixture
def hub_http(tmp_path, monkeypatch):
    """A Hub emulator serving Xet over HTTP (several hosts' servers transfer at once), and a bucket on it."""
    from hub_emulator import HubEmulator

    from optimum_neuron_cache.buckets import BucketRef
    from optimum_neuron_cache.client import stop_server

    emulator = HubEmulator(tmp_path / "hub", xet="http").start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
    BucketClient(BucketRef("hf", "team/leases")).create()
    try:
        yield emulator, "team/leases"
    finally:
        stop_server()
        emulator.stop()


@pytest.mark.parametrize("mode", ["shim", "phases"])
def test_hosts_on_a_directory_bucket_compile_each_graph_once_and_all_end_with_every_entry(tmp_path, dir_bucket, mode):
    from stress.leases import run_hosts

    figures = run_hosts(tmp_path / "w", dir_bucket, mode=mode, hosts=HOSTS, graphs=GRAPHS, seconds=SECONDS, timeout=300)
    assert figures.notes == [] and figures.ok_hosts == HOSTS
    assert figures.complete_hosts == HOSTS
    assert figures.compiles == GRAPHS  # not HOSTS x GRAPHS
    assert figures.lease_compiled == GRAPHS and figures.lease_compiled_twice == 0
    assert BucketClient(layout_ref(dir_bucket)).list(layout.leases_prefix()) == []  # every holder dropped its leases


def layout_ref(bucket: str):
    from optimum_neuron_cache.buckets import parse_bucket

    return parse_bucket(bucket)


def test_hosts_on_a_hub_bucket_share_compiles_and_all_end_with_every_entry(tmp_path, hub_http):
    from stress.leases import run_hosts

    _, bucket = hub_http
    # Compiles of 1 s: the hosts overlap, and one waits on the other's lease, even if one starts a second late.
    figures = run_hosts(tmp_path / "w", bucket, mode="shim", hosts=2, graphs=GRAPHS, seconds=max(SECONDS, 1.0), timeout=300)
    assert figures.notes == [] and figures.complete_hosts == 2
    assert figures.compiles == GRAPHS  # a Hub lease is won by claim: one winner per graph
    assert figures.lease_fetched_after_wait >= 1


@pytest.mark.parametrize("mode", ["shim", "phases"])
def test_a_dead_holders_leases_are_taken_over_once_stale(tmp_path, dir_bucket, mode):
    from stress.leases import run_hosts

    # Stale after 4 s, renewed every 0.2 s: the dead holder's leases are taken over, a live holder's never is,
    # even when a loaded machine delays a heartbeat by seconds.
    figures = run_hosts(tmp_path / "w", dir_bucket, mode=mode, hosts=2, graphs=2, seconds=SECONDS, dead=2,
                        extra={"NEURON_CACHE_LEASE_STALE": "4", "NEURON_CACHE_LEASE_HEARTBEAT": "0.2"}, timeout=300)
    assert figures.notes == [] and figures.complete_hosts == 2
    assert figures.compiles == 2


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path, dir_bucket, version):
    """No stale timeout to wait: the holder's pid is gone on this very machine (a staleness wait would run
    into the test's deadline, with the timeout set to an hour)."""
    from stress.leases import VERSION, run_hosts

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    mine = Holder.of_this_process()
    dead = Holder(host=mine.host, pid=child.pid, started=mine.started, token="gone", boot=mine.boot)
    module = module_name(VERSION, make_graphs(1, seed="lease")[0])
    BucketClient(layout_ref(dir_bucket)).lease(layout.lease_path(VERSION, module), "create", content=dead.text())
    figures = run_hosts(tmp_path / "w", dir_bucket, mode="shim", hosts=1, graphs=1, seconds=SECONDS,
                        extra={"NEURON_CACHE_LEASE_STALE": "3600"}, timeout=120)
    assert figures.notes == [] and figures.complete_hosts == 1 and figures.compiles == 1


@pytest.mark.parametrize("backend", ["dir", "hf"])
def test_a_bucket_failing_mid_wait_leaves_the_waiter_compiling_itself(tmp_path, backend, request):
    """Another host holds a live lease (renewed by this test); the waiting host's bucket then fails: it
    compiles the graph itself, with one line, and ends with the entry."""
    from stress.leases import VERSION, Hosts

    if backend == "dir":
        bucket = request.getfixturevalue("dir_bucket")
        extra: dict[str, str] = {}
    else:
        emulator, bucket = request.getfixturevalue("hub_http")
        extra = {"NEURON_CACHE_RETRY_BUDGET": "1", "NEURON_CACHE_XET_RETRY_DURATION": "1"}
    client = BucketClient(layout_ref(bucket))
    module = module_name(VERSION, make_graphs(1, seed="lease")[0])
    path = layout.lease_path(VERSION, module)
    holder = Holder(host="busy-host", pid=77, started=1.0, token="busy", boot="busy-boot")
    client.lease(path, "create", content=holder.text())
    stop = threading.Event()

    def renew() -> None:
        current = holder
        while not stop.wait(0.2):
            renewed = current.renewed()
            try:
                if client.lease(path, "replace", content=renewed.text(), expect=current.text())["ok"]:
                    current = renewed
            except Exception:
                return  # the bucket failed: as for any holder

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    hosts = Hosts(tmp_path / "w", bucket, mode="shim", hosts=1, graphs=1, seconds=SECONDS,
                  extra={"NEURON_CACHE_LEASE_STALE": "3600", **extra})
    try:
        wait_until(lambda: "busy-host pid 77 is compiling it" in hosts.stderr(0), "the host to wait on the lease")
        if backend == "dir":
            os.rename(bucket, f"{bucket}.gone")
        else:
            emulator.add_fault(None, ".*", 503, times=None)
        figures = hosts.finish(timeout=120)
    finally:
        stop.set()
        renewer.join()
    assert figures.notes == [] and figures.complete_hosts == 1 and figures.compiles == 1
    said = hosts.stderr(0)
    assert "compile lease of" in said and "(compiling)" in said


def test_a_lease_whose_heartbeat_goes_on_is_never_taken_over(bucket, version):
    """The holder renews far more often than the waiter's stale timeout, for longer than that timeout; the
    waiter only waits, and takes the lease (not takes it over) once the holder drops it."""
    from optimum_neuron_cache.compile_leases import LeaseKeeper, wait_for_graph

    client = BucketClient(bucket)
    holder = LeaseKeeper(client, version, LeaseSettings(heartbeat=0.05, stale=60.0, max_wait=600.0, poll=0.05))
    # Stale after 1.5 s, the time of 30 heartbeats: only a heartbeat delayed 1.5 s by a loaded machine looks stale.
    waiter = LeaseKeeper(client, version, LeaseSettings(heartbeat=1.0, stale=1.5, max_wait=600.0, poll=0.02))
    with holder:
        assert holder.take(MODULE)
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(wait_for_graph(waiter, MODULE)))
        thread.start()
        # Beats for at least three stale timeouts' worth (0.05 s each): the waiter saw the lease change all along.
        wait_until(lambda: holder.held[MODULE].holder.beat >= 90, "ninety heartbeats")
        assert thread.is_alive() and not holder.lost(MODULE)
        assert holder.release(MODULE)
        thread.join()
    waited = outcome[0]
    assert waited.waited and waited.decision.action is Action.TAKE
    assert Action.TAKEOVER not in {d.action for d in waited.decisions}
    assert waiter.release(MODULE)


class _PacedStop(threading.Event):
    """A waiter's stop event that notes each wait it is asked for, and lets the waiter look again at once."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.asked.append(timeout)
        return super().wait(0.005)


def test_a_waiter_looks_again_soon_at_first_then_every_poll(bucket, version):
    """A short graph's waiter must not lose a whole poll: its first looks again come soon (a quarter second),
    each next one twice as late, up to NEURON_CACHE_LEASE_POLL; and it still takes the lease once dropped."""
    from optimum_neuron_cache.compile_leases import LeaseKeeper, wait_for_graph

    client = BucketClient(bucket)
    holder = LeaseKeeper(client, version, LeaseSettings(heartbeat=0.05, stale=60.0, max_wait=600.0, poll=0.05))
    waiter = LeaseKeeper(client, version, LeaseSettings(heartbeat=1.0, stale=60.0, max_wait=600.0, poll=2.0))
    stop = _PacedStop()
    with holder:
        assert holder.take(MODULE)
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(wait_for_graph(waiter, MODULE, stop=stop)))
        thread.start()
        wait_until(lambda: len(stop.asked) >= 7, "seven looks of the waiter")
        assert holder.release(MODULE)
        thread.join()
    assert stop.asked[:6] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert set(stop.asked[6:]) <= {2.0}
    assert outcome[0].waited and outcome[0].decision.action is Action.TAKE
    assert waiter.release(MODULE)


def test_the_leases_command_lists_holders_and_sweeps_what_is_left(tmp_path, bucket, version):
    from optimum_neuron_cache.compile_leases import LeaseKeeper
    from optimum_neuron_cache.testing.simulated_compiler import compile_graph
    from optimum_neuron_cache import hub_neuronx_cache

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "optimum_neuron_cache", *args, "--bucket", str(bucket)],
                              capture_output=True, text=True, timeout=120)

    assert cli("leases").stdout.strip() == f"{bucket} holds no compile leases"
    committed, live = (module_name(version, graph) for graph in make_graphs(2, seed="listed"))
    keeper = LeaseKeeper(BucketClient(bucket), version, LeaseSettings())
    assert keeper.take(committed) and keeper.take(live)
    # The holder of `committed` published it and died before dropping its lease.
    with hub_neuronx_cache(compiler_version=version, bucket=bucket, cache_dir=tmp_path / "c"):
        compile_graph(tmp_path / "c", version, make_graphs(2, seed="listed")[0])
    listed = cli("leases")
    assert listed.returncode == 0, listed.stderr
    assert f"{keeper.holder.host} pid {os.getpid()}" in listed.stdout and committed in listed.stdout and live in listed.stdout
    import json

    preview = json.loads(cli("leases", "--sweep", "--json").stdout)  # no terminal, no --yes: only shown
    assert preview["swept"] == [] and preview["sweep"] == [{"lease": f"{version}/{committed}",
                                                            "reason": "the bucket holds its graph"}]
    assert len(BucketClient(bucket).list(layout.leases_prefix())) == 2
    swept = cli("leases", "--sweep", "--yes", "--json")
    assert swept.returncode == 0, swept.stderr
    data = json.loads(swept.stdout)
    assert data["swept"] == [f"{version}/{committed}"]
    assert [lease["module"] for lease in data["leases"]] == [live] and data["leases"][0]["holder"]["pid"] == os.getpid()
    assert [item["path"] for item in BucketClient(bucket).list(layout.leases_prefix())] == [layout.lease_path(version, live)]
    assert keeper.release(live)
    assert BucketClient(bucket).list(layout.leases_prefix()) == []


def test_scrub_takes_leases_for_what_they_are(tmp_path, bucket, version):
    """A live lease, and the folder a directory bucket keeps once it is dropped, are not strays."""
    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.compile_leases import LeaseKeeper
    from optimum_neuron_cache.testing.simulated_compiler import compile_graph

    with hub_neuronx_cache(compiler_version=version, bucket=bucket, cache_dir=tmp_path / "c"):
        compile_graph(tmp_path / "c", version, make_graphs(1, seed="scrubbed")[0])
    keeper = LeaseKeeper(BucketClient(bucket), version, LeaseSettings())
    assert keeper.take(MODULE)

    def scrub() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "optimum_neuron_cache", "scrub", "--bucket", str(bucket)],
                              capture_output=True, text=True, timeout=120)

    for _ in ("held", "dropped"):
        done = scrub()
        assert done.returncode == 0 and "no problem" in done.stdout, done.stdout + done.stderr
        keeper.release(MODULE)


def test_a_lease_taken_over_by_one_waiter_is_not_taken_over_again_by_another(bucket, version):
    """Two waiters judged the same lease stale; the first takes it over; the second, acting on what it saw,
    must leave the first's fresh lease alone (and a lease that is gone is not taken blindly either)."""
    from optimum_neuron_cache.compile_leases import LeaseKeeper

    client = BucketClient(bucket)
    dead = Holder(host="dead-host", pid=4242, started=1.0, token="dead", boot="dead-boot")
    assert client.lease(layout.lease_path(version, MODULE), "create", content=dead.text())["ok"]
    stale = probe(client, version, [MODULE])[MODULE].lease
    first, second = (LeaseKeeper(client, version, LeaseSettings()) for _ in range(2))
    assert first.take_over(MODULE, stale)
    assert not second.take_over(MODULE, stale)
    assert Holder.parse(client.lease(layout.lease_path(version, MODULE), "read")["content"]) == first.holder
    assert first.release(MODULE)
    assert not second.take_over(MODULE, stale)  # gone: the next look decides (the entry may be committed)


# ------------------------------------------------------------------ issue 26: one compile per graph, always


@pytest.mark.parametrize("backend", ["dir", "hf"])
def test_a_killed_holder_watched_by_several_waiters_is_taken_over_by_one(tmp_path, backend, request):
    """Host 0 holds the lease and compiles; three hosts wait on it; host 0 is killed (its process group). One
    waiter takes the lease over and compiles; the two others wait for its entry, even though they first saw
    the dead holder (a waiter must never take the new holder's lease over as if it were the dead one's)."""
    from stress.leases import run_killed_holder

    bucket = request.getfixturevalue("dir_bucket") if backend == "dir" else request.getfixturevalue("hub_http")[1]
    figures = run_killed_holder(tmp_path / "w", bucket, waiters=3, seconds=1.0, timeout=300)
    assert figures.notes == [] and figures.complete_hosts == 3
    assert figures.compiles == 2  # host 0's, killed, and one waiter's: not one per waiter


def _delayed_contender(tmp_path, bucket: str, phase: str, *, until_holder_exits: bool):
    """Host 1 looks first (nobody holds the lease, the bucket lacks the entry) and is held at `phase`; host 0
    then takes the lease and compiles (and, with `until_holder_exits`, publishes and drops the lease); host 1
    goes on. Returns the figures."""
    from stress.leases import Hosts

    gates = tmp_path / "gates"
    gates.mkdir()
    hosts = Hosts(tmp_path / "w", bucket, mode="shim", hosts=2, graphs=1, seconds=1.0, start=False)
    try:
        hosts.launch(1, {"NEURON_CACHE_TEST_PAUSE": f"{phase}:{gates}"})
        wait_until(lambda: any(gates.glob(f"{phase}.*.reached")), f"host 1 to reach {phase}", timeout=120)
        hosts.launch(0)
        if until_holder_exits:
            wait_until(lambda: hosts.processes[0].poll() is not None, "host 0 to compile and publish", timeout=120)
        else:
            wait_until(lambda: hosts.compiles() == 1, "host 0 to take the lease and compile", timeout=120)
    finally:
        (gates / f"{phase}.go").touch()
        figures = hosts.finish(timeout=300)
    return figures


def test_a_contender_delayed_between_its_servers_look_and_write_never_compiles_a_second_time(tmp_path, hub_http):
    """On a Hub bucket (no conditional write) a contender's server looks (no lease), is delayed, and writes
    only once another host holds the lease and compiles: it must not take the lease from under that host."""
    figures = _delayed_contender(tmp_path, hub_http[1], "lease-write", until_holder_exits=False)
    assert figures.notes == [] and figures.complete_hosts == 2
    assert figures.compiles == 1


@pytest.mark.parametrize("backend", ["dir", "hf"])
def test_a_contender_delayed_between_its_probe_and_its_take_never_compiles_a_second_time(tmp_path, backend, request):
    """A host probes (no entry, no lease) and is delayed; meanwhile another host takes the lease, compiles,
    publishes and drops the lease. The delayed host's take then succeeds: it finds the entry committed and
    fetches it instead of compiling."""
    bucket = request.getfixturevalue("dir_bucket") if backend == "dir" else request.getfixturevalue("hub_http")[1]
    figures = _delayed_contender(tmp_path, bucket, "lease-look", until_holder_exits=True)
    assert figures.notes == [] and figures.complete_hosts == 2
    assert figures.compiles == 1


@pytest.mark.parametrize("kind", ["create", "takeover"])
def test_hosts_racing_for_a_hub_lease_with_delays_between_look_and_write_never_both_win(tmp_path, hub_http, kind):
    """Four hosts (their own servers) race for one lease, each server waiting a random time between its look
    and its write: at most one wins each race, for a new lease and for the takeover of a dead holder's."""
    from stress.leases import race_takes

    figures = race_takes(hub_http[1], 4, 4, kind=kind, delay=1.5)
    assert figures.trials_with_duplicates == 0 and figures.max_winners <= 1


def test_a_hub_claim_left_by_a_dead_claimant_holds_a_lease_back_for_a_bounded_time(hub_http, version):
    """A claimant killed between its claim and its lease write leaves a claim that beats later ones: takes
    fail while it is younger than LEASE_CLAIM_TTL (by the Hub's clock), then succeed and remove it."""
    from bucket_server.backends.hf import LEASE_CLAIM_TTL, LEASE_CLAIMS
    from bucket_server.messages import AddFile

    from optimum_neuron_cache.compile_leases import LeaseKeeper

    emulator, bucket = hub_http
    client = BucketClient(layout_ref(bucket))
    path = layout.lease_path(version, MODULE)
    leftover = f"{path}{LEASE_CLAIMS}/new/dead-claimant"
    client.batch(add=[AddFile(leftover, content="dead")])
    keeper = LeaseKeeper(client, version, LeaseSettings())
    assert not keeper.take(MODULE)
    assert client.lease(path, "read")["content"] is None
    with emulator._lock:  # the Hub's clock moves on: the claim is now older than the TTL
        emulator._buckets[bucket].files[leftover]["uploadedAt"] -= LEASE_CLAIM_TTL + 5
    assert keeper.take(MODULE)
    assert [item["path"] for item in client.list(layout.leases_prefix())] == [path]
    assert keeper.release(MODULE)
