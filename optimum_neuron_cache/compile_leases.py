"""Compile leases: hosts that are about to compile the same graph share the work through the bucket.

A multi-node job runs the same program on every node, so every node misses the same graphs at the same
moment. Before compiling `MODULE_<key>`, a host looks for the entry in the bucket's flat area, then for a
lease on it (`leases/neuronxcc-<ver>/MODULE_<key>.lease`, see remote_layout.py):

- the entry is there: fetch it;
- no lease: take one (the bucket server creates it only if none exists), compile, publish, drop it;
- a live lease of another host: wait for the entry, polling (soon at first, then every `poll`), then fetch it;
- a lease whose heartbeat stopped for `stale` seconds, or whose holder is a dead process of this host:
  take it over and compile;
- a run that waited `max_wait` in all (its graphs together), or the bucket failing: compile here (one line).

Leases are advisory: correctness never depends on them. Entries are still published content before commit
file, so two hosts that both compile a graph publish one correct entry. A holder renews its lease every
`heartbeat` seconds (the file's bytes change, so a waiter sees the change in a paths-info: staleness is
judged on the waiter's own clock, never by comparing clocks across hosts). On a directory bucket a lease is
taken atomically (exclusive create); a Hub bucket has no conditional write, so there a take or takeover is won
by claim, ordered by the bucket's own upload times (HfBackend._claim; docs/integrations.md says why it holds).
A take won after another host committed the graph and dropped its lease is dropped at once: fetch instead.

Plan, then execute: `decide` is pure (what the bucket said, what this host saw, the clock -> a `Decision`
with its reason); `LeaseKeeper` carries out takes, takeovers, heartbeats and releases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

from bucket_server import pauses

from . import remote_layout as layout
from . import settings
from .processes import alive

log = logging.getLogger("optimum_neuron_cache")

#: A holder field longer than this is not one of ours.
_MAX_FIELD = 256


class LeaseBucket(Protocol):
    """What leases need of a bucket client (BucketClient has it)."""

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]: ...

    def lease(self, path: str, mode: str, *, content: str | None = None, expect: str | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LeaseSettings:
    """How often a holder renews, when a silent lease counts as abandoned, how long a waiter waits at most,
    and how often it looks (seconds)."""

    heartbeat: float = 10.0
    stale: float = 60.0
    max_wait: float = 7200.0
    poll: float = 2.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "LeaseSettings":
        """The settings of the environment (settings.py validates each; a bad value raises ConfigurationError)."""
        return cls(heartbeat=settings.lease_heartbeat(environ), stale=settings.lease_stale(environ),
                   max_wait=settings.lease_max_wait(environ), poll=settings.lease_poll(environ))


def _boot_id() -> str:
    """This machine's boot id (two hosts may share a name; a process is judged dead only on its own machine)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read(64).strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the content of the lease file. `token` is unique per process and lease keeper;
    `beat` counts heartbeats, so each renewal changes the file's bytes."""

    host: str
    pid: int
    started: float
    token: str
    boot: str = ""
    beat: int = 0

    @classmethod
    def of_this_process(cls) -> "Holder":
        """A new holder identity for this process."""
        return cls(host=socket.gethostname() or "host", pid=os.getpid(), started=round(time.time(), 3),
                   token=uuid.uuid4().hex, boot=_boot_id())

    def text(self) -> str:
        """The lease file's content."""
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started, "token": self.token,
                           "boot": self.boot, "beat": self.beat}, sort_keys=True, allow_nan=False)

    def renewed(self) -> "Holder":
        """The same holder, one heartbeat later."""
        return replace(self, beat=self.beat + 1)

    @classmethod
    def parse(cls, text: str | None) -> "Holder | None":
        """The holder a lease file names, or None when it is not one (a lease file is bucket data: hostile)."""
        if not text:
            return None
        try:
            data = json.loads(text, parse_constant=lambda name: None)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        host, pid, started, token, boot, beat = (data.get(key) for key in ("host", "pid", "started", "token", "boot", "beat"))
        if not (isinstance(host, str) and isinstance(token, str) and isinstance(boot, str)
                and 0 < len(host) <= _MAX_FIELD and 0 < len(token) <= _MAX_FIELD and len(boot) <= _MAX_FIELD):
            return None
        if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31):
            return None
        if not (isinstance(beat, int) and not isinstance(beat, bool) and 0 <= beat < 2**53):
            return None
        if isinstance(started, bool) or not isinstance(started, (int, float)) or not math.isfinite(started):
            return None
        return cls(host=host.replace("\n", " "), pid=pid, started=float(started), token=token, boot=boot, beat=beat)

    def describe(self) -> str:
        """`<host> pid <pid>`, for messages."""
        return f"{self.host} pid {self.pid}"

    def dead_here(self) -> bool:
        """Whether this holder was a process of this machine that is gone (then nobody needs to wait for its
        heartbeat to go stale)."""
        return bool(self.boot) and self.boot == _boot_id() and self.host == (socket.gethostname() or "host") \
            and not alive(self.pid)


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Probe:
    """What one paths-info said of one graph: whether the flat area holds it complete, and the lease
    file's signature (its size, mtime and hash: they change at every heartbeat), None without a lease."""

    module: str
    committed: bool
    lease: tuple[Any, ...] | None


def probe_paths(compiler_version: str, modules: Iterable[str]) -> list[str]:
    """The paths one paths-info asks about: each graph's flat-area files and its lease."""
    from .fetch import flat_probe_paths

    modules = list(modules)
    # Leases first: a directory bucket answers path by path, and a holder commits its entry before it drops its
    # lease, so a lease seen gone means the entry, if any, is seen too.
    return [*(layout.lease_path(compiler_version, m) for m in modules), *flat_probe_paths(compiler_version, modules)]


def read_probes(compiler_version: str, modules: Iterable[str], info: Iterable[Mapping[str, Any]]) -> dict[str, Probe]:
    """Probes from a paths-info answer (pure)."""
    from .fetch import complete_flat_entries

    modules = list(modules)
    info = list(info)
    complete = complete_flat_entries(compiler_version, info)
    leases: dict[str, tuple[Any, ...]] = {}
    for item in info:
        path = item.get("path")
        found = layout.parse_lease_path(path) if isinstance(path, str) else None
        if found is not None and found.compiler_version == compiler_version:
            leases[found.module] = (layout.listed_size(item), _number(item.get("mtime")), str(item.get("xet_hash")),
                                    str(item.get("digest")))
    return {m: Probe(m, m in complete, leases.get(m)) for m in modules}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def probe(client: LeaseBucket, compiler_version: str, modules: Iterable[str]) -> dict[str, Probe]:
    """One paths-info: which of `modules` the flat area holds, and the leases on them."""
    modules = list(modules)
    return read_probes(compiler_version, modules, client.paths_info(probe_paths(compiler_version, modules)))


@dataclass
class Watch:
    """What this host has seen of one graph's lease while waiting for it (monotonic times)."""

    signature: tuple[Any, ...] | None
    changed_at: float
    first_seen: float
    holder: Holder | None = None
    #: Whether `holder` was read since the signature last changed (a takeover changes both).
    holder_current: bool = True


class Action(Enum):
    FETCH = "fetch"  # the bucket has the entry
    TAKE = "take"  # nobody holds a lease: take one and compile
    WAIT = "wait"  # another host holds a live lease: wait for its entry
    TAKEOVER = "takeover"  # the lease is abandoned: replace it, then compile
    COMPILE = "compile"  # compile without a lease (waited too long, or the bucket failed)


@dataclass(frozen=True)
class Decision:
    """What to do about one graph, and why (the reason is what a user reads)."""

    module: str
    action: Action
    reason: str


def observe(watches: dict[str, Watch], found: Probe, now: float) -> Watch | None:
    """Note what a probe showed of a graph's lease: the time its signature last changed (heartbeats). None
    when there is no lease. A changed signature makes the holder read before no longer current: the bytes may
    name a new holder (a takeover), never to be judged dead as the old one was (see `refresh_holder`)."""
    if found.lease is None:
        watches.pop(found.module, None)
        return None
    watch = watches.get(found.module)
    if watch is None:
        watch = watches[found.module] = Watch(found.lease, now, now)
    elif watch.signature != found.lease:
        watch.signature, watch.changed_at, watch.holder_current = found.lease, now, False
    return watch


def refresh_holder(keeper: "LeaseKeeper", module: str, watch: Watch | None) -> None:
    """Read the lease's holder when this host has none for it, or when the one it has is a dead process of
    this machine and the lease changed since (a takeover): only then does the holder decide anything. A live
    holder's heartbeats cost no read."""
    if watch is not None and (watch.holder is None or (not watch.holder_current and watch.holder.dead_here())):
        watch.holder, watch.holder_current = keeper.read(module), True


def decide(found: Probe, watch: Watch | None, now: float, lease_settings: LeaseSettings,
           since: float | None = None) -> Decision:
    """What to do about one graph (pure): fetch, take, wait, take over or compile, with the reason. `since`:
    when this host began waiting for the graph, across lost races and takeovers (default: when it first saw
    this lease); the max wait counts from then."""
    module = found.module
    if found.committed:
        return Decision(module, Action.FETCH, "the bucket has it")
    if found.lease is None or watch is None:
        return Decision(module, Action.TAKE, "nobody holds a lease on it")
    who = watch.holder.describe() if watch.holder else "another host"
    if watch.holder is not None and watch.holder_current and watch.holder.dead_here():
        return Decision(module, Action.TAKEOVER, f"its lease holder ({who}) is a dead process of this host")
    silent = now - watch.changed_at
    if silent > lease_settings.stale:
        return Decision(module, Action.TAKEOVER, f"the lease of {who} has had no heartbeat for {silent:.0f}s")
    waited = now - (watch.first_seen if since is None else min(since, watch.first_seen))
    if waited > lease_settings.max_wait:
        return Decision(module, Action.COMPILE, f"waited {waited:.0f}s for {who} (the most allowed); compiling here")
    return Decision(module, Action.WAIT, f"{who} is compiling it (heartbeat {silent:.0f}s ago)")


# --------------------------------------------------------------------------------------- execute


@dataclass
class LeaseTally:
    """What leases did for a run: the figures `neuron-cache stats` and the run's report show."""

    #: Graphs compiled here under a lease (taken or taken over).
    compiled_here: int = 0
    #: Graphs fetched after waiting on another host's lease.
    fetched_after_wait: int = 0
    #: Graphs compiled here that another host compiled too (its lease or entry turned up meanwhile).
    compiled_twice: int = 0
    #: Graphs compiled here without a lease (waited too long, or the bucket failed).
    compiled_without_lease: int = 0
    #: Abandoned leases taken over.
    taken_over: int = 0


@dataclass
class _Held:
    holder: Holder
    lost: bool = False


class LeaseKeeper:
    """Takes, renews and drops this process's leases on one bucket and compiler version. Use as a context
    manager: a heartbeat thread renews every held lease every `heartbeat` seconds while it is open."""

    def __init__(self, client: LeaseBucket, compiler_version: str, lease_settings: LeaseSettings,
                 holder: Holder | None = None) -> None:
        self.client = client
        self.version = compiler_version
        self.settings = lease_settings
        self.holder = holder or Holder.of_this_process()
        self.held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        #: One lease operation at a time: a renewal in flight and a release must not cross (the release would
        #: expect the bytes from before the renewal, fail, and leave the lease behind).
        self._ops = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, module: str) -> str:
        return layout.lease_path(self.version, module)

    def take(self, module: str) -> bool:
        """Create the lease if nobody holds one; True when it is ours and the graph still to compile."""
        reply = self.client.lease(self.path(module), "create", content=self.holder.text())
        return bool(reply.get("ok")) and self._hold(module)

    def _hold(self, module: str) -> bool:
        """Note a lease won, unless the bucket now holds the graph: a holder that committed it and dropped its
        lease between our look and our take (it commits before it drops). Then drop ours: False."""
        with self._lock:
            self.held[module] = _Held(self.holder)
        if probe(self.client, self.version, [module])[module].committed:
            self.release(module)
            return False
        return True

    def read(self, module: str) -> Holder | None:
        """The holder a lease names (None: no lease, or not one of ours)."""
        return Holder.parse(self.client.lease(self.path(module), "read").get("content"))

    def take_over(self, module: str, stale: tuple[Any, ...] | None) -> bool:
        """Replace an abandoned lease with ours; True when it is ours. `stale` is the signature judged stale: the
        content read is checked to be that one's (a probe after the read still shows it), and the replace
        happens only if the file still holds that content. So a lease another waiter took over meanwhile, or
        that its holder renewed, is left alone; one that is gone is left to the next look (the entry may be
        committed)."""
        current = self.client.lease(self.path(module), "read").get("content")
        if current is None:
            return False
        if stale is not None and probe(self.client, self.version, [module])[module].lease != stale:
            return False
        reply = self.client.lease(self.path(module), "takeover", content=self.holder.text(), expect=current)
        return bool(reply.get("ok")) and self._hold(module)

    def release(self, module: str) -> bool:
        """Drop our lease; False when it was no longer ours (taken over, or overwritten on a Hub bucket): then
        another host compiled the graph too."""
        with self._ops:
            with self._lock:
                held = self.held.pop(module, None)
            if held is None or held.lost:
                return False
            reply = self.client.lease(self.path(module), "delete", expect=held.holder.text())
        return bool(reply.get("ok"))

    def lost(self, module: str) -> bool:
        """Whether a renewal found our lease replaced by someone else's."""
        with self._lock:
            held = self.held.get(module)
        return bool(held and held.lost)

    def beat(self) -> None:
        """Renew every held lease once (the heartbeat thread calls this; a failure is retried next beat)."""
        with self._lock:
            items = [(module, held) for module, held in self.held.items() if not held.lost]
        for module, held in items:
            with self._ops:
                if self.held.get(module) is not held:
                    continue  # released meanwhile
                renewed = held.holder.renewed()
                try:
                    reply = self.client.lease(self.path(module), "replace", content=renewed.text(), expect=held.holder.text())
                except Exception as exc:  # the bucket is slow or down: the compile goes on; a waiter may take over
                    log.debug("lease heartbeat of %s failed: %s", module, exc)
                    continue
                with self._lock:
                    if reply.get("ok"):
                        held.holder = renewed
                    else:
                        held.lost = True

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat):
            self.beat()

    def __enter__(self) -> "LeaseKeeper":
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for module in list(self.held):  # a compile that raised: drop its leases so others need not wait
            with contextlib.suppress(Exception):
                self.release(module)


#: A waiter's first look again comes this soon (seconds); each next one twice as late, up to the poll setting:
#: a short graph's entry is seen about when it lands, a long one's costs one look every `poll` seconds.
FIRST_POLL = 0.25


def poll_intervals(poll: float) -> Iterator[float]:
    """The waits between a waiter's looks at a lease: FIRST_POLL, doubling, then `poll` for ever."""
    interval = min(FIRST_POLL, poll)
    while True:
        yield interval
        interval = min(poll, interval * 2)


@dataclass
class Waited:
    """How one graph's wait ended: the final decision, and whether this host waited on another's lease."""

    decision: Decision
    waited: bool = False
    decisions: list[Decision] = field(default_factory=list)


def wait_for_graph(keeper: LeaseKeeper, module: str, *, clock: Any = time.monotonic,
                   stop: threading.Event | None = None, say: Any = None, waited_before: float = 0.0) -> Waited:
    """Probe, decide and act for one graph until it is ours to compile (TAKE, TAKEOVER, COMPILE) or the
    bucket has it (FETCH). `say(line)` hears the first wait and any takeover or give-up. `waited_before`:
    seconds the run already waited on other graphs' leases (the max wait bounds a run's waits together).
    Remote failures raise (the caller compiles, with one line)."""
    stop = stop or threading.Event()
    watches: dict[str, Watch] = {}
    waited = False
    history: list[Decision] = []
    began = clock() - max(0.0, waited_before)
    lost = 0  # takes and takeovers lost in a row: from the second on, look again only after a poll
    pace = poll_intervals(keeper.settings.poll)
    while True:
        if lost > 1:
            stop.wait(keeper.settings.poll)
        found = probe(keeper.client, keeper.version, [module])[module]
        now = clock()
        watch = observe(watches, found, now)
        refresh_holder(keeper, module, watch)
        decision = decide(found, watch, now, keeper.settings, since=began)
        history.append(decision)
        if decision.action in (Action.TAKE, Action.TAKEOVER):
            pauses.reached("lease-look")
        if decision.action is Action.TAKE and not keeper.take(module):
            # Someone took it between the probe and the create, or committed it; or, on a Hub bucket, claims in the
            # same instant all withdrew: look again soon, at a random moment, so that those do not meet again
            # (from the second loss in a row, after a poll).
            lost += 1
            pace = poll_intervals(keeper.settings.poll)  # a new holder: its compile starts now
            stop.wait(random.uniform(0.0, min(keeper.settings.poll, 1.0) / 2))
            continue
        if decision.action is Action.TAKEOVER and not keeper.take_over(module, found.lease):
            lost += 1
            pace = poll_intervals(keeper.settings.poll)
            watches.pop(module, None)  # another waiter took it over first: a new holder to wait for
            continue
        lost = 0
        if say is not None and (decision.action in (Action.TAKEOVER, Action.COMPILE)
                                or (decision.action is Action.WAIT and not waited)):
            say(_line(decision, keeper.settings.max_wait, waited_before))
        if decision.action is not Action.WAIT:
            return Waited(decision, waited, history)
        waited = True
        stop.wait(next(pace))


def _line(decision: Decision, max_wait: float, waited_before: float) -> str:
    """What `wait_for_graph` says of a decision."""
    if decision.action is Action.WAIT:
        spent = f" for the run, {waited_before:.0f}s spent" if waited_before > 0 else ""
        return f"{decision.module}: {decision.reason}; waiting for its entry (at most {max_wait:g}s{spent})"
    ending = "" if decision.reason.endswith("compiling here") else "; compiling here"
    return f"{decision.module}: {decision.reason}{ending}"


# ---------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class LiveLease:
    """A lease found in a bucket, for `neuron-cache leases`."""

    compiler_version: str
    module: str
    #: None: the lease cannot be read (not a holder of ours, too large, not a regular file): an unknown host's.
    holder: Holder | None
    #: When the bucket got the file's last write, by the bucket's own clock (the Hub's upload time, never the
    #: writer's `mtime`: remote_layout.listed_time), seconds since the epoch; None when the listing does not say.
    uploaded: float | None


def list_leases(client: Any, compiler_version: str | None = None, *, holders: bool = True) -> list[LiveLease]:
    """The leases of a bucket (one listing; with `holders`, one read per lease)."""
    found = []
    for item in client.list(layout.leases_prefix(compiler_version)):
        path = item.get("path")
        where = layout.parse_lease_path(path) if isinstance(path, str) else None
        if where is None:
            continue
        holder = Holder.parse(client.lease(path, "read").get("content")) if holders else None
        found.append(LiveLease(where.compiler_version, where.module, holder, layout.listed_time(item)))
    return sorted(found, key=lambda lease: (lease.compiler_version, lease.module))


@dataclass(frozen=True)
class Sweep:
    """A lease `neuron-cache leases --sweep` would remove, and why."""

    lease: LiveLease
    reason: str


def plan_sweep(client: Any, leases: Iterable[LiveLease], *, now: float, older_than: float) -> list[Sweep]:
    """The leases to remove: those whose graph the flat area now holds (their holder published and died before
    dropping them), and those not written for `older_than` seconds by the bucket's own clock against ours
    (generous: clocks differ), never by the writer's. One paths-info per compiler version."""
    leases = list(leases)
    committed: set[tuple[str, str]] = set()
    by_version: dict[str, list[str]] = {}
    for lease in leases:
        by_version.setdefault(lease.compiler_version, []).append(lease.module)
    for version, modules in by_version.items():
        committed |= {(version, m) for m, p in probe(client, version, modules).items() if p.committed}
    planned = []
    for lease in leases:
        if (lease.compiler_version, lease.module) in committed:
            planned.append(Sweep(lease, "the bucket holds its graph"))
        elif lease.uploaded is not None and now - lease.uploaded > older_than:
            planned.append(Sweep(lease, f"not written for {now - lease.uploaded:.0f}s by the bucket's clock"))
    return planned


def sweep_leases(client: Any, planned: Iterable[Sweep]) -> list[LiveLease]:
    """Remove the planned leases, each only if it still holds what was read (a lease that cannot be read
    reads as "", and is removed as such). Returns those removed."""
    removed = []
    for item in planned:
        lease = item.lease
        expect = lease.holder.text() if lease.holder else None
        path = layout.lease_path(lease.compiler_version, lease.module)
        if expect is None:
            expect = client.lease(path, "read").get("content")
        if client.lease(path, "delete", expect=expect).get("ok"):
            removed.append(lease)
    return removed

