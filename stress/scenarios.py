"""The stress scenarios. Each returns a Figures record; invariants are checked by optimum_neuron_cache/testing/invariants.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.testing.invariants import bucket_violations, local_violations, reference_entries, reference_sizes

REPO = Path(__file__).resolve().parent.parent
VERSION = "2.21.33363.0+82129205"


@dataclass
class Figures:
    scenario: str
    trials: int = 0
    failures: int = 0
    bytes_transferred: int = 0
    bytes_needed: int = 0
    notes: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures += 1
        self.notes.append(message)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.update(extra or {})
    return env


def seed_bucket(workdir: Path, bucket: str, model: str, graphs: int, neff_size: int, seed: str) -> Path:
    """Compile a model's graphs in a source cache and publish them: the reference every copy must equal."""
    source = workdir / "source"
    for graph in make_graphs(graphs, seed=seed, neff_size=neff_size):
        compile_graph(source, VERSION, graph)
    subprocess.run([sys.executable, "-m", "optimum_neuron_cache", "-q", "sync", "--cache-dir", str(source),
                    "--bucket", bucket, "--to-model", model], env=_env(), check=True)
    return source


def ranks_on_one_host(workdir: Path, bucket: str, ranks: int, graphs: int = 4, neff_size: int = 2_000_000) -> Figures:
    """N ranks enter at once on a cold cache (each file downloaded once in total, every entry complete in every
    body), then compile new graphs on one rank and exit at once (each entry published once)."""
    figures = Figures(f"{ranks} ranks on one host", trials=1)
    source = seed_bucket(workdir, bucket, "org/ranks", graphs, neff_size, "ranks")
    reference = reference_entries(source, VERSION)
    figures.bytes_needed = sum(e.files.get(n, 0) for e in scan_entries(source, VERSION) for n in e.files if n != "model.log")
    cache = workdir / "shared-cache"
    procs = []
    for rank in range(ranks):
        spec = {"rank": rank, "ranks": ranks, "cache_dir": str(cache), "compiler_version": VERSION, "bucket": bucket,
                "model": "org/ranks", "graphs": graphs, "seed": "ranks-new", "neff_size": 100_000,
                "barriers": str(workdir / "barriers"), "compile_rank": 0}
        procs.append(subprocess.Popen([sys.executable, "-m", "stress.worker", json.dumps(spec)], env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            figures.fail(f"rank exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
            continue
        reports.append(json.loads(out.strip().splitlines()[-1]))
    fetched = [key for report in reports for key in report["fetched"]]
    synced = [key for report in reports for key in report["synced"]]
    figures.bytes_transferred = sum(report["bytes"] for report in reports)
    if len(fetched) != len(set(fetched)) or len(set(fetched)) != graphs:
        figures.fail(f"entries fetched {len(fetched)} times for {graphs} entries")
    if any(report["complete_at_start"] < graphs for report in reports):
        figures.fail("a rank's body started before every entry was complete")
    if len(synced) != len(set(synced)) or len(set(synced)) != graphs:
        figures.fail(f"{len(synced)} publications for {graphs} new entries")
    if any(report["warnings"] for report in reports):
        figures.fail(f"warnings: {[w for r in reports for w in r['warnings']][:3]}")
    problems = local_violations(cache, VERSION, {**reference, **reference_entries(cache, VERSION)})
    if problems:
        figures.fail(f"local: {problems[:3]}")
    journal = cache / ".optimum-neuron-cache" / "journal"
    left = sorted(path.name for path in journal.iterdir()) if journal.is_dir() else []
    if left:  # every rank's record is settled: the next run owes the bucket nothing
        figures.fail(f"journal records left after every rank exited normally: {left[:3]}")
    return figures


def hosts_syncing_the_same_entries(workdir: Path, bucket: str, hosts: int, graphs: int = 3) -> Figures:
    """Several hosts (own cache dir, own bucket server) compiled the same graphs and sync them at once."""
    figures = Figures(f"{hosts} hosts syncing the same entries", trials=1)
    caches = []
    for host in range(hosts):
        cache = workdir / f"host-{host}"
        for graph in make_graphs(graphs, seed="hosts", neff_size=500_000):
            compile_graph(cache, VERSION, graph)
        caches.append(cache)
    procs = [subprocess.Popen([sys.executable, "-m", "optimum_neuron_cache", "-q", "sync", "--cache-dir", str(cache),
                               "--bucket", bucket, "--to-model", "org/hosts"],
                              env=_env({"NEURON_CACHE_RUNTIME_DIR": str(workdir / f"rt-{index}")}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for index, cache in enumerate(caches)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            figures.fail(f"a host's sync failed: {err.strip()[-300:]}")
    for index in range(hosts):
        subprocess.run([sys.executable, "-m", "optimum_neuron_cache", "server", "stop"],
                       env=_env({"NEURON_CACHE_RUNTIME_DIR": str(workdir / f"rt-{index}")}), capture_output=True)
    listing = BucketClient(_ref(bucket)).list("", recursive=True)
    problems = bucket_violations(listing, VERSION, reference_sizes(caches[0], VERSION))
    done = [item for item in listing if item["path"].endswith("model.done")]
    if problems or len(done) != 2 * graphs:
        figures.fail(f"bucket: {problems[:3]}, {len(done)} commit files for {graphs} entries in 2 areas")
    return figures


def _ref(bucket: str) -> BucketRef:
    from optimum_neuron_cache.buckets import parse_bucket

    return parse_bucket(bucket)


def _listing(bucket: str) -> list[dict]:
    """The bucket's files, as the checker sees them. The checker's own connection may point at a server this
    scenario just killed; the client retries once, and the checker once more (it is not under test)."""
    from optimum_neuron_cache.errors import ServerError

    try:
        return BucketClient(_ref(bucket)).list("", recursive=True)
    except ServerError:
        return BucketClient(_ref(bucket)).list("", recursive=True)


def _server_pid() -> int | None:
    info = running_server()
    return info["pid"] if info else None


def _kill_at_random(command: list[str], rng: random.Random, window: float, kill_server: bool) -> None:
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0, window))
    victims = [proc.pid]
    if kill_server:
        pid = _server_pid()
        if pid:
            victims.append(pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in victims[1:]) and time.monotonic() < deadline:
        time.sleep(0.01)  # the server is not our child: wait until it is really gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return ") Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone (and reaped) between the two looks: ProcessLookupError or FileNotFoundError
        return False


def crash_fetch(workdir: Path, bucket: str, trials: int, seed: int = 0, graphs: int = 5, neff_size: int = 4_000_000,
                window: float = 1.0) -> Figures:
    """kill -9 a fetch (and at times its server) at a random instant; the cache never holds a hit that is not
    complete and byte-identical; the next run cleans leftovers and heals."""
    rng = random.Random(seed)
    figures = Figures("kill -9 during fetch", trials=trials)
    source = seed_bucket(workdir, bucket, "org/crash-fetch", graphs, neff_size, "crash-fetch")
    reference = reference_entries(source, VERSION)
    figures.bytes_needed = sum(sum(os.path.getsize(source / f"neuronxcc-{VERSION}" / m / n) for n in files) for m, files in reference.items())
    for trial in range(trials):
        cache = workdir / f"fetch-{trial}"
        command = [sys.executable, "-m", "optimum_neuron_cache", "-q", "fetch", "org/crash-fetch", "--bucket", bucket,
                   "--cache-dir", str(cache), "--compiler-version", VERSION]
        _kill_at_random(command, rng, window, kill_server=rng.random() < 0.3)
        problems = local_violations(cache, VERSION, reference)
        if problems:
            figures.fail(f"trial {trial} after the kill: {problems[:2]}")
        healed = subprocess.run(command, env=_env(), capture_output=True, text=True)
        if healed.returncode != 0:
            figures.fail(f"trial {trial}: the next fetch failed: {healed.stderr.strip()[-300:]}")
            continue
        states = {e.name: e.state for e in scan_entries(cache, VERSION)}
        if set(states) != set(reference) or set(states.values()) != {EntryState.SUCCESS} or local_violations(cache, VERSION, reference):
            figures.fail(f"trial {trial}: not healed: {states}")
        wait_until_the_server_is_idle()  # the killed client's download may still run: the server removes it
        tmp = cache / ".optimum-neuron-cache" / "tmp"
        leftovers = [path.name for path in tmp.iterdir() if _dead(path)] if tmp.is_dir() else []
        if leftovers:
            figures.fail(f"trial {trial}: leftover temp folders of dead processes {leftovers}")
    return figures


def wait_until_the_server_is_idle(deadline: float = 60.0) -> None:
    """Poll the bucket server until no request runs (its own count), or the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        info = running_server()
        if info is None or info.get("requests", 0) == 0:
            return
        time.sleep(0.02)


def _dead(path: Path) -> bool:
    from optimum_neuron_cache.host_state import HostState

    return HostState.is_stale_temp_dir(path)


def crash_sync(workdir: Path, trials: int, seed: int = 0, graphs: int = 5, neff_size: int = 4_000_000,
               window: float = 1.0, bucket_for=None) -> Figures:
    """kill -9 a sync (and at times its server) at a random instant; the bucket never holds a commit file whose
    files are missing or short; the next sync heals."""
    rng = random.Random(seed)
    figures = Figures("kill -9 during sync", trials=trials)
    source = workdir / "sync-source"
    for graph in make_graphs(graphs, seed="crash-sync", neff_size=neff_size):
        compile_graph(source, VERSION, graph)
    sizes = reference_sizes(source, VERSION)
    figures.bytes_needed = sum(sum(files.values()) for files in sizes.values())
    for trial in range(trials):
        bucket = bucket_for(trial) if bucket_for else str(workdir / f"sync-bucket-{trial}")
        client = BucketClient(_ref(bucket))
        client.create()
        command = [sys.executable, "-m", "optimum_neuron_cache", "-q", "sync", "--cache-dir", str(source),
                   "--bucket", bucket, "--to-model", "org/crash-sync"]
        _kill_at_random(command, rng, window, kill_server=rng.random() < 0.5)
        problems = bucket_violations(_listing(bucket), VERSION, sizes)
        if problems:
            figures.fail(f"trial {trial} after the kill: {problems[:2]}")
        healed = subprocess.run(command, env=_env(), capture_output=True, text=True)
        if healed.returncode != 0:
            figures.fail(f"trial {trial}: the next sync failed: {healed.stderr.strip()[-300:]}")
            continue
        listing = _listing(bucket)
        done = [item for item in listing if item["path"].endswith("model.done")]
        if bucket_violations(listing, VERSION, sizes) or len(done) != 2 * graphs:
            figures.fail(f"trial {trial}: not healed ({len(done)} commit files)")
    return figures
