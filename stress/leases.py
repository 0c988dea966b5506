"""Hosts compiling the same graphs at once, sharing the work through compile leases (compile_leases.py).

    uv run --extra test python -m stress.leases [--hosts 2,4,8,16] [--graphs 16] [--seconds 2] [--batch 2]
        [--modes shim,phases] [--dead 2] [--race-trials 20] [--race-kinds create,takeover] [--delay 1]
        [--killed 4] [--waiters 3] [--hf | --backends hf] [--json out.json]

Each simulated host is a process tree of its own: its own compile cache, its own bucket server (its own
runtime dir) and its own stats, against one bucket (a directory, or a Hub bucket on the local emulator with
Xet over HTTP). The simulated `neuronx-cc` sleeps `--seconds` per compile and logs each one to a shared file,
so the compile count is counted, not inferred. Modes:

- `shim`: each host runs a training script that JIT-compiles the G graphs one after the other, through the
  compiler shim (a lease per graph, waits on other hosts' leases);
- `phases`: each host runs `neuron-cache parallel-compile run --phases -- neuron_parallel_compile ...`:
  collect, then the hosts split the compile through leases, a few graphs per round.

Figures: total compiles (target G, naive H x G), wall time against one host alone, duplicates, and with
`--dead` graphs leased by a host that died, what the dead holder cost (target: about the stale timeout).
`--delay D` holds each server up to D s between its look at a lease and its write, and each host as long between
its probe and its take; `--killed N` kills a compiling holder N times while `--waiters` hosts wait on it.
`tests/test_leases.py` runs the same scenarios with small H, G and T.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import parse_bucket
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.compile_leases import Holder
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.stats import read_stats
from optimum_neuron_cache.testing.simulated_compiler import make_graphs, module_name
from optimum_neuron_cache.testing.simulated_neuronx_cc import install_simulated_compiler, install_simulated_parallel_compile
from optimum_neuron_cache.integrations.compiler_shim import install_compiler_shim

VERSION = "2.21.33363.0+82129205"
TRAIN = [sys.executable, "-m", "optimum_neuron_cache.testing.simulated_neuronx_cc"]


@dataclass
class LeaseFigures:
    """One run of H hosts over G graphs."""

    mode: str
    hosts: int
    graphs: int
    compile_seconds: float
    #: Real compiles over all hosts (the simulated compiler's log): G when every graph is compiled once.
    compiles: int = 0
    #: Compiles beyond one per graph.
    duplicates: int = 0
    #: Hosts that ended with every graph complete in their cache, and hosts whose command exited 0.
    complete_hosts: int = 0
    ok_hosts: int = 0
    wall_seconds: float = 0.0
    #: Graphs leased beforehand by a holder that never renews (a dead host).
    dead: int = 0
    #: Sums of the hosts' stats: compiled here under a lease, fetched after waiting, compiled twice.
    lease_compiled: int = 0
    lease_fetched_after_wait: int = 0
    lease_compiled_twice: int = 0
    notes: list[str] = field(default_factory=list)


def host_env(home: Path, bucket: str, *, seconds: float, log: Path, tools: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one simulated host: its own cache, server and stats; the shared bucket and log."""
    runtime = tempfile.mkdtemp(prefix="onc-h")  # Unix socket paths are short: not under a deep work dir
    env = {name: value for name, value in os.environ.items() if not name.startswith("NEURON_CACHE_")}
    env.update({
        "NEURON_COMPILE_CACHE_URL": str(home / "cache"), "NEURON_CACHE_RUNTIME_DIR": runtime,
        "XDG_CACHE_HOME": str(home / "xdg"), "HF_XET_CACHE": str(home / "xet"), "NEURON_CACHE_BUCKET": bucket,
        "NEURON_CC_VERSION": VERSION, "NEURON_CACHE_SERVER_MODE": "current", "NEURON_CACHE_SERVER_IDLE_TIMEOUT": "30",
        "PATH": os.pathsep.join([str(tools / "shim"), str(tools / "sdk"), os.environ.get("PATH", "")]),
        "SIMULATED_NEURONX_CC_SECONDS": str(seconds), "SIMULATED_NEURONX_CC_LOG": str(log),
        "NEURON_CACHE_LEASE_HEARTBEAT": "0.5", "NEURON_CACHE_LEASE_STALE": "3", "NEURON_CACHE_LEASE_POLL": "0.1",
    })
    env.update(extra or {})
    return env


def install_tools(tools: Path) -> None:
    """The simulated SDK (neuronx-cc, neuron_parallel_compile) and the shim in front of it."""
    install_simulated_compiler(tools / "sdk")
    install_simulated_parallel_compile(tools / "sdk")
    install_compiler_shim(tools / "shim")


def host_command(mode: str, graphs: int, seed: str, batch: int) -> list[str]:
    """What each host runs."""
    train = [*TRAIN, "--seed", f"{seed}:{graphs}"]
    if mode == "shim":
        return train
    return [sys.executable, "-m", "optimum_neuron_cache.integrations.parallel_compile", "run", "--phases",
            "--lease-batch", str(batch), "--", "neuron_parallel_compile", f"--num_parallel={batch}", *train]


def plant_dead_leases(bucket: str, modules: list[str]) -> None:
    """Leases held by a host that died: a foreign holder, never renewed."""
    client = BucketClient(parse_bucket(bucket))
    dead = Holder(host="dead-host", pid=4242, started=time.time(), token="dead", boot="dead-host-boot")
    for module in modules:
        client.lease(layout.lease_path(VERSION, module), "create", content=dead.text())


class Hosts:
    """`hosts` simulated hosts on the same `graphs` graphs, started at once (or, with `start=False`, each when
    `launch` says); `kill` SIGKILLs one's process group; `finish()` waits and counts."""

    def __init__(self, work: Path, bucket: str, *, mode: str, hosts: int, graphs: int, seconds: float, batch: int = 2,
                 dead: int = 0, seed: str = "lease", extra: dict[str, str] | None = None, start: bool = True) -> None:
        self.work, self.figures = work, LeaseFigures(mode, hosts, graphs, seconds, dead=dead)
        self.log = work / "compiles.log"
        install_tools(work / "tools")
        self.modules = [module_name(VERSION, graph) for graph in make_graphs(graphs, seed=seed)]
        if dead:
            plant_dead_leases(bucket, self.modules[:dead])
        self.envs = [host_env(work / f"host-{i}", bucket, seconds=seconds, log=self.log, tools=work / "tools", extra=extra)
                     for i in range(hosts)]
        self.command = host_command(mode, graphs, seed, batch)
        self.started = time.monotonic()
        self.processes: list[subprocess.Popen | None] = [None] * hosts
        self.killed: set[int] = set()
        if start:
            for index in range(hosts):
                self.launch(index)

    def launch(self, index: int, extra: dict[str, str] | None = None) -> None:
        """Start host `index` (its own process group), with `extra` on top of its environment."""
        with open(self.work / f"host-{index}.err", "w") as errors:
            self.processes[index] = subprocess.Popen(self.command, env={**self.envs[index], **(extra or {})},
                                                     stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)

    def kill(self, index: int) -> None:
        """SIGKILL host `index`'s whole process group (its training script, shim and compiler), as a host dies."""
        process = self.processes[index]
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.killed.add(index)

    def compiles(self) -> int:
        """Real compiles so far, over all hosts."""
        return len(self.log.read_text().split()) if self.log.exists() else 0

    def stderr(self, index: int) -> str:
        """What host `index` said so far."""
        path = self.work / f"host-{index}.err"
        return path.read_text() if path.exists() else ""

    def finish(self, timeout: float = 600.0) -> LeaseFigures:
        """Wait for every host (killing any left at `timeout`), stop their servers, and count (killed hosts
        are not counted among the hosts expected to end complete)."""
        figures = self.figures
        launched = [(index, process) for index, process in enumerate(self.processes) if process is not None]
        deadline = time.monotonic() + timeout
        try:
            codes = {index: process.wait(timeout=max(0.1, deadline - time.monotonic())) for index, process in launched}
        finally:
            for _, process in launched:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
        figures.wall_seconds = round(time.monotonic() - self.started, 2)
        for env in self.envs:
            stop_server(env)
            shutil.rmtree(env["NEURON_CACHE_RUNTIME_DIR"], ignore_errors=True)
        figures.compiles = self.compiles()
        figures.duplicates = max(0, figures.compiles - figures.graphs)
        for index, code in codes.items():
            if index in self.killed:
                continue
            figures.ok_hosts += code == 0
            home = self.work / f"host-{index}"
            states = {entry.name: entry.state for entry in scan_entries(home / "cache", VERSION)}
            figures.complete_hosts += all(states.get(module) is EntryState.SUCCESS for module in self.modules)
            _, total = read_stats(home / "xdg" / "optimum-neuron-cache" / "stats.json")
            figures.lease_compiled += total.lease_compiled
            figures.lease_fetched_after_wait += total.lease_fetched_after_wait
            figures.lease_compiled_twice += total.lease_compiled_twice
            if code != 0:
                figures.notes.append(f"host {index} exited {code}: {self.stderr(index)[-500:]}")
        return figures


def run_hosts(work: Path, bucket: str, *, timeout: float = 600.0, **options) -> LeaseFigures:
    """Start the hosts at once, wait for all, count (see Hosts)."""
    return Hosts(work, bucket, **options).finish(timeout)


def _wait_until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def run_killed_holder(work: Path, bucket: str, *, waiters: int = 3, seconds: float = 1.0,
                      extra: dict[str, str] | None = None, timeout: float = 300.0) -> LeaseFigures:
    """Host 0 takes the one graph's lease and compiles it (for ever); `waiters` hosts start and wait on that
    lease; then host 0's process group is killed. `duplicates` counts compiles beyond host 0's and one
    waiter's (target 0: one waiter takes the lease over, the others wait for its entry)."""
    hosts = Hosts(work, bucket, mode="shim", hosts=waiters + 1, graphs=1, seconds=seconds, extra=extra, start=False)
    hosts.launch(0, {"SIMULATED_NEURONX_CC_SECONDS": "600"})
    try:
        _wait_until(lambda: hosts.compiles() == 1, "host 0 to take the lease and compile")
        for index in range(1, waiters + 1):
            hosts.launch(index)
        _wait_until(lambda: all("is compiling it" in hosts.stderr(index) for index in range(1, waiters + 1)),
                    "every waiter to wait on host 0's lease")
        hosts.kill(0)
    finally:
        figures = hosts.finish(timeout)
    figures.duplicates = max(0, figures.compiles - 2)
    return figures


@dataclass
class RaceFigures:
    """Hosts taking the same lease in the same instant, `trials` times: how many believed they won."""

    takers: int
    trials: int
    #: "create" (nobody holds the lease) or "takeover" (of a dead holder's lease, all expecting its bytes).
    kind: str = "create"
    #: Each server waited a random time of up to this between its look at the lease and its write (seconds).
    delay: float = 0.0
    #: Trials where more than one taker thought the lease was its own (each would compile the graph).
    trials_with_duplicates: int = 0
    #: Trials nobody won (everyone would look again, then wait or take it).
    trials_without_winner: int = 0
    max_winners: int = 0
    mean_winners: float = 0.0


def race_takes(bucket: str, takers: int, trials: int, *, kind: str = "create", delay: float = 0.0) -> RaceFigures:
    """`takers` clients, each with its own bucket server (as separate hosts), released by a barrier onto the
    same lease, `trials` times (a new graph each time); with `delay`, each server waits a random time of up
    to `delay` seconds between its look at the lease and its write (NEURON_CACHE_TEST_DELAY)."""
    import threading

    figures = RaceFigures(takers, trials, kind, delay)
    extra = {"NEURON_CACHE_TEST_DELAY": f"lease-write:{delay}"} if delay else {}
    envs = [{**os.environ, "NEURON_CACHE_RUNTIME_DIR": tempfile.mkdtemp(prefix="onc-r"), **extra}
            for _ in range(takers)]
    clients = [BucketClient(parse_bucket(bucket), env) for env in envs]
    dead = Holder(host="dead-host", pid=4242, started=time.time(), token="dead", boot="dead-host-boot").text()
    try:
        for client in clients:
            client.info()  # every server started before the races
        total = 0
        for trial in range(trials):
            path = layout.lease_path(VERSION, f"MODULE_{trial}+race{takers}{kind}")
            if kind == "takeover":
                clients[0].lease(path, "create", content=dead)
            barrier = threading.Barrier(takers)
            winners: list[int] = []

            def take(index: int) -> None:
                holder = Holder(host=f"host-{index}", pid=index + 1, started=time.time(), token=f"t{index}-{trial}")
                barrier.wait()
                if kind == "takeover":
                    reply = clients[index].lease(path, "takeover", content=holder.text(), expect=dead)
                else:
                    reply = clients[index].lease(path, "create", content=holder.text())
                if reply.get("ok"):
                    winners.append(index)

            threads = [threading.Thread(target=take, args=(index,)) for index in range(takers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            total += len(winners)
            figures.trials_with_duplicates += len(winners) > 1
            figures.trials_without_winner += not winners
            figures.max_winners = max(figures.max_winners, len(winners))
        figures.mean_winners = round(total / max(1, trials), 2)
    finally:
        for env in envs:
            stop_server(env)
            shutil.rmtree(env["NEURON_CACHE_RUNTIME_DIR"], ignore_errors=True)
    return figures


# ----------------------------------------------------------------------------------------- main


def _buckets(backend: str, work: Path):
    """bucket_for(name) -> a new empty bucket of the backend (and the emulator to stop, on hf)."""
    if backend == "dir":
        def bucket_for(name: str) -> str:
            path = work / "buckets" / name
            path.mkdir(parents=True)
            return str(path)
        return bucket_for, None
    from hub_emulator import HubEmulator

    emulator = HubEmulator(work / "hub", xet="http").start()
    os.environ["HF_ENDPOINT"] = emulator.endpoint

    def bucket_for(name: str) -> str:
        from optimum_neuron_cache.buckets import BucketRef

        BucketClient(BucketRef("hf", f"leases/{name}")).create()
        return f"leases/{name}"
    return bucket_for, emulator


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.leases")
    parser.add_argument("--hosts", default="2,4,8,16", help="comma-separated host counts")
    parser.add_argument("--graphs", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="simulated compile time of one graph")
    parser.add_argument("--batch", type=int, default=2, help="graphs per host per round in the phases mode")
    parser.add_argument("--dead", type=int, default=2, help="graphs leased by a dead host in the dead-holder run")
    parser.add_argument("--modes", default="shim,phases", help="shim, phases, both, or '' (lease races only)")
    parser.add_argument("--hf", action="store_true", help="also on a Hub bucket (local emulator)")
    parser.add_argument("--backends", help="comma-separated, e.g. hf (default: dir, and hf with --hf)")
    parser.add_argument("--race-trials", type=int, default=20, help="lease races per number of takers (0: none)")
    parser.add_argument("--race-kinds", default="create", help="create, takeover (of a dead holder's lease), or both")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="each server waits up to this between its look at a lease and its write, and each host "
                             "between its probe and its take (seconds; NEURON_CACHE_TEST_DELAY)")
    parser.add_argument("--killed", type=int, default=0,
                        help="runs where a holder is killed while --waiters wait on it")
    parser.add_argument("--waiters", type=int, default=3)
    parser.add_argument("--bare", action="store_true",
                        help="shim mode: also one host without the shim on PATH (the cost of the cache per graph)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neuron-cache-leases-"))
    os.environ.update({"HF_HOME": str(work / "hf_home"), "XDG_CACHE_HOME": str(work / "xdg"),
                       "NEURON_CACHE_RUNTIME_DIR": tempfile.mkdtemp(prefix="onc-m"), "NEURON_CACHE_SERVER_MODE": "current"})
    rows = []
    try:
        for backend in (args.backends.split(",") if args.backends else ["dir", *(["hf"] if args.hf else [])]):
            bucket_for, emulator = _buckets(backend, work / backend)
            try:
                for kind in [kind for kind in args.race_kinds.split(",") if kind]:
                    for takers in ([int(h) for h in args.hosts.split(",")] if args.race_trials else []):
                        race = race_takes(bucket_for(f"race-{kind}-{takers}"), takers, args.race_trials, kind=kind,
                                          delay=args.delay)
                        rows.append({"backend": backend, "mode": "race", **asdict(race)})
                        print(f"{backend:4} race {kind:8} takers={takers:<2} trials={race.trials} "
                              f"delay={args.delay:g}s: "
                              f"more than one winner in {race.trials_with_duplicates}, none in "
                              f"{race.trials_without_winner}, winners mean {race.mean_winners} max {race.max_winners}",
                              flush=True)
                delays = ({"NEURON_CACHE_TEST_DELAY": f"lease-look:{args.delay},lease-write:{args.delay}"}
                          if args.delay else {})
                for run in range(args.killed):
                    name = f"killed-{run}"
                    figures = run_killed_holder(work / backend / name, bucket_for(name), waiters=args.waiters,
                                                seconds=args.seconds, extra=delays)
                    rows.append({"backend": backend, **asdict(figures), "mode": "killed"})
                    print(f"{backend:4} killed holder, {args.waiters} waiters, T={args.seconds:g}s: compiles after "
                          f"the kill "
                          f"{figures.compiles - 1}, duplicates {figures.duplicates}, complete waiters "
                          f"{figures.complete_hosts}/{args.waiters}", flush=True)
                    for note in figures.notes[:3]:
                        print(f"     {note}")
                for mode in [mode for mode in args.modes.split(",") if mode]:
                    runs = [(1, 0), *((int(h), 0) for h in args.hosts.split(","))]
                    runs += [(max(2, int(args.hosts.split(",")[0])), args.dead)] if args.dead else []
                    runs += [(1, -1)] if args.bare and mode == "shim" else []
                    for hosts, dead in runs:
                        name = f"{mode}-{hosts}-{dead}"
                        # dead -1: the same host without the shim on PATH (the bare compiler: no cache at all).
                        sdk = work / backend / name / "tools" / "sdk"
                        bare = {"PATH": os.pathsep.join([str(sdk), os.environ["PATH"]])}
                        figures = run_hosts(work / backend / name, bucket_for(name), mode=mode, hosts=hosts,
                                            graphs=args.graphs, seconds=args.seconds, batch=args.batch,
                                            dead=max(0, dead),
                                            extra={**delays, **(bare if dead < 0 else {})})
                        row = {"backend": backend, **asdict(figures), **({"mode": "bare"} if dead < 0 else {})}
                        rows.append(row)
                        if dead < 0:
                            alone = next((r for r in rows if r["backend"] == backend and r["mode"] == mode
                                          and r["hosts"] == 1), None)
                            added = ((alone["wall_seconds"] - figures.wall_seconds) / args.graphs if alone
                                     else float("nan"))
                            print(f"{backend:4} bare   H=1  G={args.graphs} T={args.seconds:g}s (no shim): wall "
                                  f"{figures.wall_seconds}s; the cache adds {added:.2f}s per graph", flush=True)
                            continue
                        print(f"{backend:4} {mode:6} H={hosts:<2} G={args.graphs} T={args.seconds:g}s dead={dead}: compiles "
                              f"{figures.compiles} (naive {hosts * args.graphs}), duplicates {figures.duplicates}, wall "
                              f"{figures.wall_seconds}s, complete hosts {figures.complete_hosts}/{hosts}, "
                              f"fetched after waiting {figures.lease_fetched_after_wait}", flush=True)
                        for note in figures.notes[:3]:
                            print(f"     {note}")
            finally:
                stop_server()
                if emulator is not None:
                    emulator.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    incomplete = any(row["complete_hosts"] != row["hosts"] - (row["mode"] == "killed")
                     for row in rows if row["mode"] not in ("race", "bare"))
    return 1 if incomplete or any(row.get("duplicates") or row.get("trials_with_duplicates") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
