"""The figures: each measures this project and its baselines in the same run, on the same data.

A figure is a dict: {"id", "backend", "title", "ours": stats, "baselines": {name: stats}, "ratios": {name: x},
"targets": [{"text", "met", "value"}], "checks": [problems], "notes"}. Stats hold the median time over the
repetitions ("median_s", "samples_s") and counters: "requests" (to the bucket server, counted by
BucketClient), "hub_requests" (HTTP requests the Hub emulator saw), byte counts.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.local_cache import scan_entries, version_dir_name
from optimum_neuron_cache.records import make_record
from stress.leases import Hosts

from . import lookup as lookups
from .config import Config
from .harness import (
    REPO_ROOT,
    BenchEnv,
    DownloadCounter,
    Sample,
    cas_bytes,
    drop_connections,
    hub_requests,
    io_delta,
    proc_cpu,
    proc_io,
    ratio_interval,
    release,
    server_pid,
    summarize,
    timed,
)
from .machine import page_reporting, reported_mb
from .workload import (
    PLAIN_MODEL,
    PUBLISHED_FILES,
    TARGET_MODEL,
    TASK,
    OtherEntry,
    compile_into,
    compiler_versions,
    export_config,
    link_tree,
    other_entries,
    other_entry_paths,
    other_record_paths,
    populate_dir_bucket,
    publishable_bytes,
)

BUCKET_ID = "bench-org/neuron-cache"


def figure(fid: str, backend: str, title: str, ours: dict[str, Any], baselines: dict[str, dict[str, Any]] | None = None,
           ratios: dict[str, float | None] | None = None, targets: list[dict[str, Any]] | None = None,
           checks: list[str] | None = None, notes: str = "") -> dict[str, Any]:
    return {"id": fid, "backend": backend, "title": title, "ours": ours, "baselines": baselines or {},
            "ratios": {key: (round(value, 4) if value is not None else None) for key, value in (ratios or {}).items()},
            "targets": targets or [], "checks": checks or [], "notes": notes}


def target(text: str, met: bool, value: Any, interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """A target and whether the run met it; `interval`: how far its ratio could move by chance (ratio_interval)."""
    out = {"text": text, "met": bool(met), "value": value}
    if interval is not None:
        out["interval"] = [round(bound, 4) for bound in interval]
    return out


def _chance(mine: list[Sample], base: list[Sample]) -> tuple[float, float] | None:
    return ratio_interval([s.seconds for s in mine], [s.seconds for s in base]) if mine and base else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------------------------ the world


@dataclass
class World:
    """The data every figure uses: the benchmarked model's published cache, and buckets of several sizes."""

    env: BenchEnv
    cfg: Config
    versions: list[str]
    pool_root: Path
    pool_modules: list[str]
    record_source: Path
    target_modules: list[str] = field(default_factory=list)
    target_bytes: int = 0
    #: The same workload (other bytes) published without an export record: PLAIN_MODEL.
    plain_modules: list[str] = field(default_factory=list)
    plain_bytes: int = 0
    hf_base: Path | None = None
    dir_base: Path | None = None
    others: dict[int, list[OtherEntry]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.versions[0]

    @property
    def flat_dir(self) -> str:
        return version_dir_name(self.version)


def build_world(env: BenchEnv, cfg: Config, log) -> World:
    sizes = cfg.sizes
    versions = compiler_versions(sizes.versions)
    pool_root = env.path("pool")
    pool_sizes = replace(sizes, neff_median=max(sizes.neff_min, int(sizes.neff_median * sizes.other_neff_scale)))
    compile_into(pool_root, versions[0], pool_sizes, sizes_seed="pool", content_seed="pool", count=sizes.pool, noise=False)
    pool_modules = [entry.name for entry in scan_entries(pool_root, versions[0])]
    record_source = env.root / "pool-record.json"
    record_source.write_text(make_record("bench-org/other", TASK, versions[0], export_config(0), pool_modules[:4]).to_json())
    world = World(env, cfg, versions, pool_root, pool_modules, record_source)
    for models in sorted({cfg.models, *cfg.lookup_models}):
        world.others[models] = other_entries(models, sizes, pool_modules)
    if "hf" in cfg.backends:
        log("building the Hub buckets (emulator)")
        _build_hf(world)
    if "dir" in cfg.backends:
        log("building the directory buckets")
        _build_dir(world)
    return world


def _publish_target(world: World, ref: BucketRef, cache: Path) -> None:
    """Publish the benchmarked model with this project: entries, flat + model areas, one record per config."""
    sizes = world.cfg.sizes
    for index in range(sizes.records):
        with hub_neuronx_cache(TARGET_MODEL, TASK, export_config(index), compiler_version=world.version, bucket=ref,
                               cache_dir=cache) as run:
            if index == 0:
                compile_into(cache, world.version, sizes, sizes_seed="target", content_seed="target")
        if run.warnings:
            raise RuntimeError(f"publishing the benchmarked model failed: {run.warnings}")
    modules = sorted(entry.name for entry in scan_entries(cache, world.version) if entry.state.publishable)
    world.target_modules, world.target_bytes = modules, publishable_bytes(cache, world.version)
    plain = cache.with_name(cache.name + "-plain")
    with hub_neuronx_cache(PLAIN_MODEL, TASK, None, compiler_version=world.version, bucket=ref, cache_dir=plain) as run:
        compile_into(plain, world.version, sizes, sizes_seed="target", content_seed="plain")
    if run.warnings or run.record:
        raise RuntimeError(f"publishing the model without a record failed: {run.warnings} {run.record}")
    world.plain_modules = sorted(entry.name for entry in scan_entries(plain, world.version) if entry.state.publishable)
    world.plain_bytes = publishable_bytes(plain, world.version)
    for version in world.versions[1:]:  # the model was compiled with older SDKs too: a few entries, one record
        with hub_neuronx_cache(TARGET_MODEL, TASK, export_config(0), compiler_version=version, bucket=ref, cache_dir=cache) as run:
            compile_into(cache, version, replace(sizes, neff_median=sizes.neff_min), sizes_seed=f"old-{version}",
                         content_seed=f"old-{version}", count=2, noise=False)
        if run.warnings:
            raise RuntimeError(f"publishing the benchmarked model failed: {run.warnings}")


def _build_hf(world: World) -> None:
    from huggingface_hub import HfApi

    env = world.env
    data = env.root / "hub-base"
    emulator = start_emulator(env, data, world.cfg)
    env.use(emulator)
    ref = BucketRef("hf", BUCKET_ID)
    BucketClient(ref).create()
    api = HfApi(endpoint=emulator.endpoint)
    adds = [(str(world.pool_root / world.flat_dir / module / name), f"pool/{module}/{name}")
            for module in world.pool_modules for name in PUBLISHED_FILES]
    api.batch_bucket_files(BUCKET_ID, add=adds + [(str(world.record_source), "pool/record.json")])
    _publish_target(world, ref, env.path("published-hf"))
    env.stop_emulator(emulator)
    world.hf_base = data


def _link_or_copy(source: str, dest: str) -> None:
    """Xorbs are immutable: hard-link them. Everything else (hf_xet's redb database, shards) is copied."""
    if Path(source).parent.name == "xorbs" and not source.endswith(".redb"):
        os.link(source, dest)
    else:
        shutil.copy2(source, dest)


def hf_data_dir(world: World, models: int) -> Path:
    """An emulator data dir whose bucket holds the benchmarked model among `models - 1` others (made once).

    The other models' entries are added to the emulator's state file as server-side copies by hash of the
    pool's files (exactly what `batch(copy=...)` records: size and Xet hash), which is representative and
    fast; copies through the API cost O(files) each in the emulator (see docs/performance.md)."""
    assert world.hf_base is not None
    data = world.env.root / f"hub-{models}"
    if data.exists():
        return data
    data.mkdir()
    shutil.copytree(world.hf_base / "cas", data / "cas", copy_function=_link_or_copy)
    for extra in world.hf_base.glob("*.key"):  # the HTTP CAS's signing key
        shutil.copy2(extra, data / extra.name)
    state = json.loads((world.hf_base / "hub_state.json").read_text())
    bucket = next(b for b in state["buckets"] if b["id"] == BUCKET_ID)
    files: dict[str, dict[str, Any]] = bucket["files"]
    pool = {path: files.pop(path) for path in [p for p in files if p.startswith("pool/")]}
    now = time.time()

    def copy_of(path: str) -> dict[str, Any]:
        source = pool[path]
        return {"size": source["size"], "xetHash": source["xetHash"], "mtime": source["mtime"], "uploadedAt": now}

    entries = world.others[models]
    for entry in entries:
        module = world.pool_modules[entry.pool_index]
        for path, name in other_entry_paths(entry):
            files[path] = copy_of(f"pool/{module}/{name}")
    for path in other_record_paths(entries):
        files[path] = copy_of("pool/record.json")
    (data / "hub_state.json").write_text(json.dumps(state))
    return data


def _build_dir(world: World) -> None:
    env = world.env
    base = env.root / "dir-base"
    env.use(None)
    ref = BucketRef("dir", str(base))
    BucketClient(ref).create()
    _publish_target(world, ref, env.path("published-dir"))
    world.dir_base = base


def dir_bucket(world: World, models: int) -> Path:
    assert world.dir_base is not None
    path = world.env.root / f"dir-{models}"
    if not path.exists():
        link_tree(world.dir_base, path)
        populate_dir_bucket(path, world.pool_root, world.version, world.others[models], world.pool_modules, world.record_source)
    return path


def start_emulator(env: BenchEnv, data: Path, cfg: Config) -> Any:
    return env.start_emulator(data, cfg.xet)


# ------------------------------------------------------------------------------------ sites


class Site:
    """One backend with a bucket of `models` models, its bucket server started and warm."""

    def __init__(self, world: World, backend: str, models: int) -> None:
        self.world, self.backend, self.models = world, backend, models
        self.emulator = None
        self.api = None
        if backend == "hf":
            self.emulator = start_emulator(world.env, hf_data_dir(world, models), world.cfg)
            world.env.use(self.emulator)
            self.ref = BucketRef("hf", BUCKET_ID)
            from huggingface_hub import HfApi

            self.api = HfApi(endpoint=self.emulator.endpoint)
        else:
            world.env.use(None)
            self.root = dir_bucket(world, models)
            self.ref = BucketRef("dir", str(self.root))
        self.warm()

    def warm(self) -> None:
        """Start the server and let it load what a first request loads (huggingface_hub for the hf backend)."""
        BucketClient(self.ref).list(layout.model_area_prefix(self.world.version, "warm-up", TASK))
        self.pid = server_pid()

    def close(self) -> None:
        if self.emulator is not None:
            self.world.env.stop_emulator(self.emulator)
        else:
            stop_server()

    def hub(self):
        return hub_requests(self.emulator)

    def server_io(self) -> dict[str, int]:
        return proc_io(self.pid) if self.pid else {}

    def area(self, model: str = TARGET_MODEL) -> str:
        return layout.model_area_prefix(self.world.version, layout.model_ref(model).folder, TASK)

    def target_files(self, model: str = TARGET_MODEL) -> list[dict[str, Any]]:
        """The files a cold cache needs: the model's entries in its model area (path, size, xet_hash)."""
        area = self.area(model)
        return [item for item in BucketClient(self.ref).list(area, recursive=True) if layout.parse_area_path(item["path"], area)]

    def context(self, cache: Path, model: str = TARGET_MODEL, config: dict[str, Any] | None = None) -> hub_neuronx_cache:
        return hub_neuronx_cache(model, TASK, config, compiler_version=self.world.version, bucket=self.ref, cache_dir=cache)


def fresh(env: BenchEnv, name: str) -> Path:
    """The empty scratch folder `name`, its earlier contents released (`release`): call it right before the
    sample that writes there."""
    path = scratch_root(env) / name
    release([path])
    path.mkdir(parents=True)
    return path


def scratch_root(env: BenchEnv) -> Path:
    """Where every sample's files live (one folder per kind of sample, under it)."""
    return env.root / "scratch"


def local_target(cache: Path, flat_dir: str, remote_path: str, area: str) -> Path:
    parsed = layout.parse_area_path(remote_path, area)
    assert parsed is not None
    return cache / flat_dir / parsed.module / parsed.filename


# ------------------------------------------------------------------------------------ fetch


def fetch_cold(site: Site) -> dict[str, Any]:
    """Fetch the model's entries into a cold cache; against one direct download of exactly those files
    (hf), `hf buckets sync` of the version prefix (hf), a plain copy of the same bytes (dir)."""
    world, cfg = site.world, site.world.cfg
    needed = world.target_bytes
    files = site.target_files()
    area = site.area()
    checks: list[str] = []
    baselines: dict[str, dict[str, Any]] = {}
    ours_samples = []
    direct_samples: list[Sample] = []
    sync_samples: list[Sample] = []
    copy_samples: list[Sample] = []
    plain_files = site.target_files(PLAIN_MODEL) if site.backend == "hf" else []
    plain_samples: list[Sample] = []
    plain_direct: list[Sample] = []
    first_samples: list[Sample] = []
    first_direct: list[Sample] = []
    baseline = (lambda: _direct_download(site, files, area)) if site.backend == "hf" else (lambda: _plain_copy_down(site, files, area))

    def first_fetch() -> Sample:  # a job's one fetch: the first download of a server just started (untimed)
        stop_server()
        site.warm()
        return _cold_fetch(site, "fetch-first", "ours_first_fetch", checks)

    for rep in range(cfg.fetch_reps):
        mine, theirs = _alternated(rep, lambda: _cold_fetch(site, "fetch-ours", "ours", checks), baseline)
        ours_samples.append(mine)
        (direct_samples if site.backend == "hf" else copy_samples).append(theirs)
        if site.backend == "hf":  # the model published without a record: checked by its digest manifests
            mine, theirs = _alternated(rep, lambda: _cold_fetch(site, "fetch-plain", "ours_no_record", checks, PLAIN_MODEL),
                                       lambda: _direct_download(site, plain_files, site.area(PLAIN_MODEL)))
            plain_samples.append(mine)
            plain_direct.append(theirs)
            if rep < cfg.slow_reps:
                sync_samples.append(_hf_sync_down(site))
    for rep in range(cfg.fetch_reps if site.backend == "hf" else 0):
        # Against the first download of a fresh process; both have huggingface_hub imported and nothing of
        # hf_xet yet.
        theirs, mine = _alternated(rep, lambda: _direct_download_first(site, files, area), first_fetch)
        first_samples.append(mine)
        first_direct.append(theirs)
    ours_stats = summarize(ours_samples, bytes_needed=needed)
    # Each pair of methods, by its ratio's name: the notes give all of them, the targets three.
    compared = (("ours", "direct_download", direct_samples, ours_samples),
                ("ours_first_fetch", "direct_download_first", first_direct, first_samples),
                ("ours", "plain_copy", copy_samples, ours_samples),
                ("ours_no_record", "direct_download_no_record", plain_direct, plain_samples))
    chance = {f"{label}/{name}": _chance(mine, base) for label, name, base, mine in compared}
    ratios: dict[str, float | None] = {}
    targets = []
    if site.backend == "hf":
        baselines["direct_download"] = summarize(direct_samples, bytes_needed=needed)
        baselines["hf_buckets_sync"] = summarize(sync_samples)
        ratios["ours/direct_download"] = ratio(ours_stats["median_s"], baselines["direct_download"]["median_s"])
        ratios["hf_buckets_sync/ours"] = ratio(baselines["hf_buckets_sync"]["median_s"], ours_stats["median_s"])
        value = ratios["ours/direct_download"]
        targets.append(target("within 10% of the direct download (ours/direct <= 1.10)", value is not None and value <= 1.10, value,
                              chance["ours/direct_download"]))
        baselines["ours_first_fetch"] = summarize(first_samples, bytes_needed=needed)
        baselines["direct_download_first"] = summarize(first_direct, bytes_needed=needed)
        ratios["ours_first_fetch/direct_download_first"] = ratio(baselines["ours_first_fetch"]["median_s"],
                                                                 baselines["direct_download_first"]["median_s"])
        baselines["ours_no_record"] = summarize(plain_samples, bytes_needed=world.plain_bytes)
        baselines["direct_download_no_record"] = summarize(plain_direct, bytes_needed=world.plain_bytes)
        value = ratios["ours_no_record/direct_download_no_record"] = ratio(
            baselines["ours_no_record"]["median_s"], baselines["direct_download_no_record"]["median_s"])
        targets.append(target("without an export record, within 10% of the direct download (<= 1.10)",
                              value is not None and value <= 1.10, value, chance["ours_no_record/direct_download_no_record"]))
        value = ratios["hf_buckets_sync/ours"]
        targets.append(target(f"at least 3x faster than `hf buckets sync` ({site.models} models in the bucket)",
                              value is not None and value >= 3.0, value))
    else:
        baselines["plain_copy"] = summarize(copy_samples, bytes_needed=needed)
        ratios["ours/plain_copy"] = ratio(ours_stats["median_s"], baselines["plain_copy"]["median_s"])
        value = ratios["ours/plain_copy"]
        targets.append(target("within 20% of a plain copy, verified (ours/copy <= 1.20)", value is not None and value <= 1.20, value,
                              chance["ours/plain_copy"]))
    paired: list[str] = []
    # Robust to a busy machine: the median of the pairs' ratios, and what each method costs in CPU (on 2 cores
    # a CPU-bound fetch's wall time follows its CPU).
    for label, name, base, mine in compared:
        if base and mine:
            for key, value in ((f"{label}/{name} (median of pairs)", _paired(mine, base)),
                               (f"{label}/{name} (CPU, median of pairs)", _paired(mine, base, "cpu_s"))):
                if value is not None:  # a tiny smoke sample may use no measurable CPU (10 ms ticks)
                    ratios[key] = value
                    paired.append(f"{key} {value:.2f}x")
            interval = chance[f"{label}/{name}"]
            if interval is not None:
                ratios[f"{label}/{name} (90% interval, low)"], ratios[f"{label}/{name} (90% interval, high)"] = interval
                paired.append(f"{label}/{name} could be {interval[0]:.2f}x to {interval[1]:.2f}x by chance "
                              f"(90% of {len(mine)}-pair resamplings)")
    moved = ours_stats.get("bytes_transferred")
    if moved is not None and moved < needed:
        checks.append(f"ours transferred {moved} bytes, fewer than the {needed} needed")
    cpu = [(name, stats.get("server_cpu_s")) for name, stats in (("ours", ours_stats), *baselines.items())]
    notes = "server CPU per fetch (median): " + ", ".join(f"{name} {value * 1e3:.0f} ms" for name, value in cpu
                                                            if isinstance(value, (int, float)))
    every = [(name, stats.get("cpu_s")) for name, stats in (("ours", ours_stats), *baselines.items())]
    notes += "; CPU per fetch, client, emulator and server (median): " + ", ".join(
        f"{name} {value * 1e3:.0f} ms" for name, value in every if isinstance(value, (int, float)))
    if paired:
        notes += "; " + ", ".join(paired)
    return figure(f"{site.backend}.fetch_cold", site.backend,
                  f"fetch {len(world.target_modules)} entries ({needed / 1e6:.1f} MB) into a cold cache, {site.models} models in the bucket",
                  ours_stats, baselines, ratios, targets, checks, notes)


def _alternated(rep: int, first: Callable[[], Sample], second: Callable[[], Sample]) -> tuple[Sample, Sample]:
    """One sample of each side, `first` going first in odd repetitions and second in even ones, so that a drift
    of the machine hits both sides alike: (first's sample, second's sample)."""
    if rep % 2:
        a = first()
        return a, second()
    b = second()
    return first(), b


def _cold_fetch(site: Site, scratch: str, label: str, checks: list[str], model: str = TARGET_MODEL) -> Sample:
    """One timed `with hub_neuronx_cache(...): pass` into an empty cache, with the bytes it asked for; a
    fetch that missed any of the model's entries, or warned, is added to `checks`."""
    world = site.world
    expected = world.target_modules if model == TARGET_MODEL else world.plain_modules
    cache = fresh(world.env, scratch)
    DownloadCounter.install()
    asked = DownloadCounter.total

    def run_it() -> dict[str, Any]:
        cpu = _cpu_seconds(site)
        with site.hub() as box, site.context(cache, model) as run:
            pass
        return {"requests": run.requests, **box, "_run": run, "cpu_s": _cpu_seconds(site) - cpu}

    cpu0 = proc_cpu(site.pid) if site.pid else None
    sample = timed(run_it)
    cpu1 = proc_cpu(site.pid) if site.pid else None
    sample.extra["server_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    run = sample.extra.pop("_run")
    sample.extra["bytes_transferred"] = DownloadCounter.total - asked
    if sorted(Path(key).name for key in run.fetched) != expected or run.warnings:
        checks.append(f"{label} fetched {len(run.fetched)}/{len(expected)} entries, warnings {run.warnings}")
    return sample


def verify_cost(site: Site, link_rate: float | None = None) -> dict[str, Any]:
    """What verified bytes cost: a cold fetch against the same fetch with NEURON_CACHE_VERIFY=0 (no digest
    checked), in pairs run back to back, alternating which goes first. The ratio is the median of the
    pairs' ratios: a machine whose speed drifts during the run moves both halves of a pair alike. On the
    Hub, optionally through a link of `link_rate` bytes/s shared by every transfer (loopback has no
    bandwidth of its own). The server's CPU seconds per fetch are reported too: what the checks cost where
    nothing hides them."""
    world, cfg = site.world, site.world.cfg
    checks: list[str] = []

    def one(verify: bool, model: str = TARGET_MODEL) -> Sample:
        previous = os.environ.get("NEURON_CACHE_VERIFY")
        os.environ["NEURON_CACHE_VERIFY"] = "1" if verify else "0"
        cpu0 = proc_cpu(site.pid) if site.pid else None
        try:
            sample = _cold_fetch(site, "verify-cost", "verified" if verify else "unverified", checks, model)
            cpu1 = proc_cpu(site.pid) if site.pid else None
            sample.extra["server_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
            return sample
        finally:
            if previous is None:
                os.environ.pop("NEURON_CACHE_VERIFY", None)
            else:
                os.environ["NEURON_CACHE_VERIFY"] = previous

    if link_rate is not None:
        from hub_emulator import Link

        site.emulator.link = Link(link_rate)
    samples: dict[bool, list[Sample]] = {True: [], False: []}
    plain: list[Sample] = []  # the model published without a record: checked by its digest manifests
    try:
        for rep in range(cfg.verify_reps):
            for verify in ((True, False) if rep % 2 == 0 else (False, True)):
                samples[verify].append(one(verify))
            if site.backend == "hf" and not link_rate:
                plain.append(one(True, PLAIN_MODEL))
    finally:
        if site.emulator is not None:
            site.emulator.link = None
    needed = world.target_bytes
    ours = summarize(samples[True], bytes_needed=needed)
    base = summarize(samples[False], bytes_needed=needed)
    value = statistics.median(v.seconds / u.seconds for v, u in zip(samples[True], samples[False]))
    cpu = (ours.get("server_cpu_s"), base.get("server_cpu_s"))
    notes = (f"server CPU per fetch: {cpu[0] * 1e3:.0f} ms verified, {cpu[1] * 1e3:.0f} ms unverified"
             if None not in cpu else "")
    baselines = {"unverified": base}
    if plain:
        baselines["verified_no_record"] = summarize(plain, bytes_needed=world.plain_bytes)
        no_record = baselines["verified_no_record"].get("server_cpu_s")
        if no_record is not None and notes:
            notes += f", {no_record * 1e3:.0f} ms verified without a record (digest manifests only)"
    where = f"through a {link_rate / 1e6:.0f} MB/s link" if link_rate else ("over loopback" if site.backend == "hf" else "local disk")
    fid = f"{site.backend}.verify_cost" + ("_link" if link_rate else "")
    return figure(fid, site.backend, f"cold fetch of {len(world.target_modules)} entries ({needed / 1e6:.1f} MB), "
                  f"verified against unverified, {where}",
                  ours, baselines, {"ours/unverified": value},
                  [target(f"verification adds at most 5% to fetch time, {where} (verified/unverified, median of "
                          "pairs, <= 1.05)", value <= 1.05, value)], checks, notes)


def _cpu_seconds(site: Site | None = None) -> float:
    """CPU seconds used so far by this process (the client, the Hub emulator's threads, an in-process
    baseline) and, given a site, its bucket server: what a sample costs the machine, whatever its load."""
    server = proc_cpu(site.pid) if site is not None and site.pid else 0.0
    return (proc_cpu() or 0.0) + (server or 0.0)


def _paired(ours: list[Sample], base: list[Sample], key: str | None = None) -> float | None:
    """The median of the ratios of samples taken in the same repetition (by time, or by `key`): a drift of
    the machine moves both halves of a pair alike."""
    pairs = [(a.seconds, b.seconds) if key is None else (a.extra.get(key), b.extra.get(key)) for a, b in zip(ours, base)]
    ratios = [a / b for a, b in pairs if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0]
    return statistics.median(ratios) if ratios else None


def _direct_download(site: Site, files: list[dict[str, Any]], area: str) -> Sample:
    from huggingface_hub import BucketFile

    dest = fresh(site.world.env, "fetch-direct")
    pairs = [(BucketFile(type="file", path=item["path"], size=item["size"], xetHash=item["xet_hash"]),
              local_target(dest, site.world.flat_dir, item["path"], area)) for item in files]
    io0 = proc_io()

    def run_it() -> dict[str, Any]:
        cpu = _cpu_seconds()
        with site.hub() as box:
            for folder in {str(local.parent) for _, local in pairs}:  # as the user's download would
                os.makedirs(folder, exist_ok=True)
            site.api.download_bucket_files(BUCKET_ID, [(remote, str(local)) for remote, local in pairs])
        return {**box, "cpu_s": _cpu_seconds() - cpu}

    sample = timed(run_it)
    sample.extra["bytes_transferred"] = io_delta(io0, proc_io())
    return sample


#: One `download_bucket_files` in a fresh process (huggingface_hub imported, hf_xet not yet): a job's first.
FIRST_DOWNLOAD = """
import json, os, sys, time
from huggingface_hub import BucketFile, HfApi
spec = json.loads(sys.argv[1])
api = HfApi(endpoint=spec["endpoint"])
pairs = [(BucketFile(type="file", path=f["path"], size=f["size"], xetHash=f["xet_hash"]), f["local"]) for f in spec["files"]]
print("ready", flush=True)
sys.stdin.readline()
def written():
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["wchar"])
io, started, cpu = written(), time.monotonic(), time.process_time()
for folder in {os.path.dirname(local) for _, local in pairs}:
    os.makedirs(folder, exist_ok=True)
api.download_bucket_files(spec["bucket"], [(remote, local) for remote, local in pairs])
print(json.dumps({"seconds": time.monotonic() - started, "cpu_s": time.process_time() - cpu, "written": written() - io}),
      flush=True)
"""


def _direct_download_first(site: Site, files: list[dict[str, Any]], area: str) -> Sample:
    """The same download as `_direct_download`, as the first one of a fresh process (started untimed); its
    time is the call's, its CPU the process's during the call plus the emulator's."""
    dest = scratch_root(site.world.env) / "fetch-direct-first"
    spec = {"endpoint": site.emulator.endpoint, "bucket": BUCKET_ID,
            "files": [{**item, "local": str(local_target(dest, site.world.flat_dir, item["path"], area))} for item in files]}
    child = subprocess.Popen([sys.executable, "-c", FIRST_DOWNLOAD, json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the first-download process did not start")
        fresh(site.world.env, dest.name)  # after the process's start, as `first_fetch` does after the server's
        gc.collect()
        os.sync()
        cpu = _cpu_seconds()
        with site.hub() as box:
            child.stdin.write("go\n")
            child.stdin.flush()
            report = json.loads(child.stdout.readline())
        emulator_cpu = _cpu_seconds() - cpu
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    return Sample(report["seconds"], {**box, "cpu_s": report["cpu_s"] + emulator_cpu, "bytes_transferred": report["written"]})


def _hf_sync_down(site: Site) -> Sample:
    """`hf buckets sync hf://buckets/<id>/neuronxcc-<ver> <cache>/neuronxcc-<ver> --exclude 'models/*' --exclude 'digests/*'
    --ignore-times`: the flat area (the local cache tree, as is), with the flags a careful user would pass."""
    dest = fresh(site.world.env, "fetch-hfsync")
    io0 = proc_io()

    def run_it() -> dict[str, Any]:
        with site.hub() as box:
            plan = site.api.sync_bucket(f"hf://buckets/{BUCKET_ID}/{site.world.flat_dir}", str(dest / site.world.flat_dir),
                                        exclude=["models/*", "digests/*"], ignore_times=True, quiet=True)
        return {**box, "files": plan.summary().get("downloads")}

    sample = timed(run_it)
    sample.extra["bytes_transferred"] = io_delta(io0, proc_io())
    return sample


def _plain_copy_down(site: Site, files: list[dict[str, Any]], area: str) -> Sample:
    """`cp -r` of the entries (folders, then bytes through sendfile). What checking digests adds on top is
    the verify_cost figure."""
    dest = fresh(site.world.env, "fetch-copy")
    pairs = [(site.root / item["path"], local_target(dest, site.world.flat_dir, item["path"], area)) for item in files]
    io0 = proc_io()

    def run_it() -> dict[str, Any]:
        cpu = _cpu_seconds()
        for folder in {str(local.parent) for _, local in pairs}:
            os.makedirs(folder, exist_ok=True)
        for source, local in pairs:
            shutil.copyfile(source, local)
        return {"cpu_s": _cpu_seconds() - cpu}

    sample = timed(run_it)
    sample.extra["bytes_transferred"] = io_delta(io0, proc_io())
    return sample


# ------------------------------------------------------------------------------------- sync


def sync_figures(site: Site) -> list[dict[str, Any]]:
    """Sync a finished compile (a new model's entries, with failed and killed compiles mixed in), then sync
    again with nothing new. Every repetition publishes fresh bytes (a new model), for every method."""
    world, env, cfg = site.world, site.world.env, site.world.cfg
    sizes = cfg.sizes
    checks: list[str] = []
    first: dict[str, list[Sample]] = {"ours": [], "hf_buckets_sync": [], "direct_upload": [], "plain_copy": []}
    again: dict[str, list[Sample]] = {"ours": [], "hf_buckets_sync": [], "copy_if_size_differs": []}
    needed_bytes = []
    for rep in range(cfg.reps):
        # --- ours: enter (untimed), compile inside the block, time the exit; then a second run
        cache = fresh(env, f"sync-ours-{rep}")
        model = f"bench-org/job-{os.getpid()}-{rep:03d}"
        context = site.context(cache, model, export_config(0))
        run = context.__enter__()
        compile_into(cache, world.version, sizes, sizes_seed="job", content_seed=f"ours-{rep}")
        needed = publishable_bytes(cache, world.version)
        needed_bytes.append(needed)
        before = run.requests
        stored0, io0 = _stored(site), site.server_io()

        def exit_it(context=context, run=run, before=before) -> dict[str, Any]:
            with site.hub() as box:
                context.__exit__(None, None, None)
            return {"requests": run.requests - before, **box, "bytes_uploaded": run.bytes_uploaded}

        sample = timed(exit_it)
        sample.extra["bytes_stored"] = _stored(site) - stored0 if site.backend == "hf" else io_delta(io0, site.server_io())
        first["ours"].append(sample)
        if len(run.synced) != sizes.entries or run.warnings or not run.record:
            checks.append(f"ours synced {len(run.synced)}/{sizes.entries} entries, record {run.record}, warnings {run.warnings}")
        # second run over the same cache: nothing new
        context = site.context(cache, model, export_config(0))
        drop_connections()
        run2 = context.__enter__()
        enter_requests = run2.requests
        stored0, io0 = _stored(site), site.server_io()

        def again_it(context=context, run2=run2, enter_requests=enter_requests) -> dict[str, Any]:
            with site.hub() as box:
                context.__exit__(None, None, None)
            return {"requests": run2.requests, "exit_requests": run2.requests - enter_requests, **box,
                    "bytes_uploaded": run2.bytes_uploaded}

        sample = timed(again_it)
        sample.extra["bytes_stored"] = _stored(site) - stored0 if site.backend == "hf" else io_delta(io0, site.server_io())
        again["ours"].append(sample)
        if run2.fetched or run2.synced or run2.warnings:
            checks.append(f"second run fetched {len(run2.fetched)}, synced {len(run2.synced)}, warnings {run2.warnings}")
        # --- baselines, on a cache of the same sizes and fresh bytes
        if site.backend == "hf":
            cache = fresh(env, f"sync-hfsync-{rep}")
            compile_into(cache, world.version, sizes, sizes_seed="job", content_seed=f"hfsync-{rep}")
            first["hf_buckets_sync"].append(_hf_sync_up(site, cache))
            again["hf_buckets_sync"].append(_hf_sync_up(site, cache))
            cache = fresh(env, f"sync-direct-{rep}")
            compile_into(cache, world.version, sizes, sizes_seed="job", content_seed=f"direct-{rep}")
            first["direct_upload"].append(_direct_upload(site, cache))
        else:
            cache = fresh(env, f"sync-copy-{rep}")
            compile_into(cache, world.version, sizes, sizes_seed="job", content_seed=f"copy-{rep}")
            first["plain_copy"].append(_plain_copy_up(site, cache, only_missing=False))
            again["copy_if_size_differs"].append(_plain_copy_up(site, cache, only_missing=True))
    needed = needed_bytes[0] if needed_bytes else 0
    ours = summarize(first["ours"], bytes_needed=needed)
    baselines = {name: summarize(samples, bytes_needed=needed) for name, samples in first.items() if samples and name != "ours"}
    ratios = {f"{name}/ours" if name == "hf_buckets_sync" else f"ours/{name}":
              (ratio(stats["median_s"], ours["median_s"]) if name == "hf_buckets_sync" else ratio(ours["median_s"], stats["median_s"]))
              for name, stats in baselines.items()}
    title = (f"sync a finished compile: {sizes.entries} new entries ({needed / 1e6:.1f} MB) + {sizes.failed} failed + "
             f"{sizes.locked} locked, {site.models} models in the bucket")
    notes = ("ours publishes the flat area, the model's area (the Hub: by the staged bytes' Xet hash, in one upload "
             "session and two batch requests; a directory: hard links) and an export record; "
             "`hf buckets sync` uploads the flat tree as is, failed entries, logs and lock files included")
    sync_fig = figure(f"{site.backend}.sync_new", site.backend, title, ours, baselines, ratios, [], checks, notes)

    ours2 = summarize(again["ours"])
    baselines2 = {name: summarize(samples) for name, samples in again.items() if samples and name != "ours"}
    ratios2 = {f"{name}/ours": ratio(stats["median_s"], ours2["median_s"]) for name, stats in baselines2.items()}
    stored = ours2.get("bytes_stored") or 0
    targets = [
        target("a second sync transfers 0 bytes", ours2.get("bytes_uploaded", 0) == 0 and stored == 0, stored),
        target("with at most 2 requests (enter + exit)", ours2.get("requests", 99) <= 2, ours2.get("requests")),
    ]
    again_fig = figure(f"{site.backend}.sync_again", site.backend, "sync again with nothing new (exit timed; requests of the whole run)",
                       ours2, baselines2, ratios2, targets, [])
    return [sync_fig, again_fig]


def _stored(site: Site) -> int:
    return cas_bytes(site.emulator) if site.emulator is not None else 0


def _hf_sync_up(site: Site, cache: Path) -> Sample:
    """`hf buckets sync <cache>/neuronxcc-<ver> hf://buckets/<id>/neuronxcc-<ver> --ignore-times`."""
    stored0 = _stored(site)

    def run_it() -> dict[str, Any]:
        with site.hub() as box:
            plan = site.api.sync_bucket(str(cache / site.world.flat_dir), f"hf://buckets/{BUCKET_ID}/{site.world.flat_dir}",
                                        exclude=["models/*", "digests/*"], ignore_times=True, quiet=True)
        return {**box, "files": plan.summary().get("uploads")}

    sample = timed(run_it)
    sample.extra["bytes_stored"] = _stored(site) - stored0
    return sample


def _publishable(cache: Path, version: str) -> list[tuple[Path, str]]:
    return [(entry.path / name, f"{version_dir_name(version)}/{entry.name}/{name}")
            for entry in scan_entries(cache, version) if entry.state.publishable
            for name in sorted(entry.files) if layout.is_publishable(name)]


def _direct_upload(site: Site, cache: Path) -> Sample:
    """The transfer limit of an upload: one batch of exactly the files to publish, to the flat area."""
    adds = [(str(local), remote) for local, remote in _publishable(cache, site.world.version)]
    stored0 = _stored(site)

    def run_it() -> dict[str, Any]:
        with site.hub() as box:
            site.api.batch_bucket_files(BUCKET_ID, add=adds)
        return dict(box)

    sample = timed(run_it)
    sample.extra["bytes_stored"] = _stored(site) - stored0
    return sample


def _plain_copy_up(site: Site, cache: Path, *, only_missing: bool) -> Sample:
    pairs = [(local, site.root / remote) for local, remote in _publishable(cache, site.world.version)]
    io0 = proc_io()

    def run_it() -> None:
        for folder in {str(dest.parent) for _, dest in pairs}:
            os.makedirs(folder, exist_ok=True)
        for source, dest in pairs:
            if only_missing:
                try:
                    if os.stat(dest).st_size == os.stat(source).st_size:
                        continue
                except FileNotFoundError:
                    pass
            shutil.copyfile(source, dest)

    sample = timed(run_it)
    sample.extra["bytes_stored"] = io_delta(io0, proc_io())
    return sample


# --------------------------------------------------------------------------------- no-op runs


def _warm_cache(site: Site) -> Path:
    cache = fresh(site.world.env, f"warm-{site.backend}")
    with site.context(cache) as run:
        pass
    assert len(run.fetched) == len(site.world.target_modules), run.warnings
    return cache


def noop_warm(site: Site) -> dict[str, Any]:
    """Enter + exit with nothing to fetch or sync, the server already running (each repetition connects anew,
    as a new process would)."""
    world, cfg = site.world, site.world.cfg
    cache = _warm_cache(site)
    checks: list[str] = []

    def ours() -> dict[str, Any]:
        with site.hub() as box:
            with site.context(cache, config=export_config(0)) as run:
                pass
        if run.fetched or run.synced or run.warnings:
            checks.append(f"no-op run fetched {len(run.fetched)}, synced {len(run.synced)}, warnings {run.warnings}")
        return {"requests": run.requests, **box}

    samples, bare, pairs = [], [], []
    for _ in range(cfg.fast_reps):
        drop_connections()
        samples.append(timed(ours))
        if site.backend == "hf":  # the floor: one metadata request to the Hub, in-process, connection warm
            bare.append(timed(lambda: {"files": len(list(site.api.get_bucket_paths_info(BUCKET_ID, [f"{site.area()}/x"])))}))
            pairs.append(samples[-1].seconds / bare[-1].seconds)
    stats = summarize(samples)
    baselines: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float | None] = {}
    parts = _noop_parts(site, cache)
    if bare:
        baselines["bare_paths_info"] = summarize(bare)
        ratios["ours/bare_paths_info"] = statistics.median(pairs)
    if site.backend == "hf":
        mirror = site.world.env.root / "mirror"
        if not mirror.exists():
            site.api.sync_bucket(f"hf://buckets/{BUCKET_ID}/{world.flat_dir}", str(mirror / world.flat_dir),
                                 exclude=["models/*", "digests/*"], ignore_times=True, quiet=True)

        def both_ways() -> dict[str, Any]:
            with site.hub() as box:
                down = site.api.sync_bucket(f"hf://buckets/{BUCKET_ID}/{world.flat_dir}", str(mirror / world.flat_dir),
                                            exclude=["models/*", "digests/*"], ignore_times=True, quiet=True)
                up = site.api.sync_bucket(str(mirror / world.flat_dir), f"hf://buckets/{BUCKET_ID}/{world.flat_dir}",
                                          exclude=["models/*", "digests/*"], ignore_times=True, quiet=True)
            return {**box, "files": down.summary().get("downloads", 0) + up.summary().get("uploads", 0)}

        baselines["hf_buckets_sync"] = summarize([timed(both_ways) for _ in range(cfg.slow_reps)])
        ratios["hf_buckets_sync/ours"] = ratio(baselines["hf_buckets_sync"]["median_s"], stats["median_s"])
    targets = [
        target("warm no-op enter + exit under 20 ms (median)", stats["median_s"] < 0.020, round(stats["median_s"] * 1000, 2)),
        target("at most 2 requests to the server", stats.get("requests", 99) <= 2, stats.get("requests")),
    ]
    if bare:
        value = ratios["ours/bare_paths_info"]
        targets.append(target("at most 3x one bare get_bucket_paths_info (median of pairs)", value <= 3.0, value))
    stats["parts_ms"] = parts
    notes = "; ".join(f"{name} {value} ms" for name, value in parts.items())
    return figure(f"{site.backend}.noop_warm", site.backend,
                  f"enter + exit, nothing to fetch or sync, server running ({len(world.target_modules)} entries local, {site.models} models in the bucket)",
                  stats, baselines, ratios, targets, checks,
                  ("baseline: `hf buckets sync` down then up, nothing new, --ignore-times; " if site.backend == "hf" else "")
                  + f"parts of a no-op, each timed alone (median): {notes}")


def _noop_parts(site: Site, cache: Path) -> dict[str, float]:
    """Each part of a warm no-op, timed alone (median of `fast_reps`, ms): what the whole is made of."""
    from optimum_neuron_cache.client import _connection
    from optimum_neuron_cache.journal import Journal, JournalKey, RunRecord
    from optimum_neuron_cache.stats import Stats, record_run

    version, reps = site.world.version, max(5, site.world.cfg.fast_reps)
    client = BucketClient(site.ref)
    journal = Journal(cache)
    key = JournalKey(str(site.ref), version, "parts", TASK)
    scratch = fresh(site.world.env, "noop-parts") / "stats.json"

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1000, 3)

    def connect() -> None:
        drop_connections()
        _connection(os.environ)._connect()

    emulator: dict[str, float] = {}
    if site.emulator is not None and hasattr(site.emulator, "op_tree"):  # its handlers, called in-process
        emulator = {
            "emulator's own time for that listing": median_ms(lambda: site.emulator.op_tree(None, BUCKET_ID, site.area(), True)),
            "emulator's own time for the stamp's paths-info": median_ms(
                lambda: site.emulator.op_paths_info(None, BUCKET_ID, [layout.area_stamp_path(site.area())])),
            "emulator's own time for the bare paths-info": median_ms(
                lambda: site.emulator.op_paths_info(None, BUCKET_ID, [f"{site.area()}/x"])),
        }
    return {
        "connect + handshake": median_ms(connect),
        "paths-info of the area's stamp (connected; what a warm run asks)": median_ms(
            lambda: client.paths_info([layout.area_stamp_path(site.area())])),
        "listing of the model's area (connected; what a warm run asked before area stamps)": median_ms(
            lambda: client.list(site.area(), recursive=True)),
        **emulator,
        "local scan (x2: enter and exit)": median_ms(lambda: scan_entries(cache, version)),
        "journal window (write + remove)": median_ms(lambda: journal.drop(journal.begin(
            RunRecord(key=key, started=time.time(), window=True, open=True)))),
        "stats (one appended line)": median_ms(lambda: record_run(Stats(fetches=1), scratch)),
        "fetch gate (take + note)": median_ms(lambda: _gate_once(cache, version)),
    }


def _gate_once(cache: Path, version: str) -> None:
    from optimum_neuron_cache.fetch import FetchNote, HostFetchGate
    from optimum_neuron_cache.host_state import HostState

    gate = HostFetchGate(HostState(cache).fetch_gate_path("bench-parts"), "bench-parts")
    if gate.lead():
        gate.release(FetchNote("bench-parts", time.time(), True))


def noop_cold_server(site: Site) -> dict[str, Any]:
    """Enter + exit with nothing to fetch or sync and no server running: the first request starts it.
    Mode "uv": an isolated environment made by uv (its cache warm), what users get; "current": this
    interpreter. Baseline: the `hf buckets sync` CLI down then up (a fresh process, like a new job)."""
    world, cfg = site.world, site.world.cfg
    cache = _warm_cache(site)
    checks: list[str] = []
    modes: dict[str, dict[str, Any]] = {}
    saved_mode = os.environ.get("NEURON_CACHE_SERVER_MODE")
    try:
        for mode in cfg.cold_modes:
            os.environ["NEURON_CACHE_SERVER_MODE"] = mode
            stop_server()
            with site.context(cache, config=export_config(0)):  # warms uv's cache for this mode (untimed)
                pass
            samples = []
            for _ in range(cfg.reps):
                stop_server()

                def ours(mode: str = mode) -> dict[str, Any]:
                    with site.hub() as box, site.context(cache, config=export_config(0)) as run:
                        pass
                    if run.fetched or run.synced or run.warnings:
                        checks.append(f"cold run ({mode}) fetched {len(run.fetched)}, synced {len(run.synced)}, warnings {run.warnings}")
                    return {"requests": run.requests, **box}

                samples.append(timed(ours))
            modes[mode] = summarize(samples, server_mode=mode)
    finally:
        if saved_mode is None:
            os.environ.pop("NEURON_CACHE_SERVER_MODE", None)
        else:
            os.environ["NEURON_CACHE_SERVER_MODE"] = saved_mode
        stop_server()
        site.warm()
    main_mode = cfg.cold_modes[0]
    ours_stats = modes[main_mode]
    notes = ""
    baselines = {f"ours_{mode}": stats for mode, stats in modes.items() if mode != main_mode}
    ratios: dict[str, float | None] = {}
    if site.backend == "hf":
        mirror = world.env.root / "mirror-cli"
        if not mirror.exists():
            site.api.sync_bucket(f"hf://buckets/{BUCKET_ID}/{world.flat_dir}", str(mirror / world.flat_dir),
                                 exclude=["models/*", "digests/*"], ignore_times=True, quiet=True)
        hf = Path(sys.executable).with_name("hf")
        remote = f"hf://buckets/{BUCKET_ID}/{world.flat_dir}"
        commands = [[str(hf), "buckets", "sync", remote, str(mirror / world.flat_dir), "--exclude", "models/*", "--exclude", "digests/*", "--ignore-times"],
                    [str(hf), "buckets", "sync", str(mirror / world.flat_dir), remote, "--exclude", "models/*", "--exclude", "digests/*", "--ignore-times"]]

        def cli() -> dict[str, Any]:
            with site.hub() as box:
                for command in commands:
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
            return dict(box)

        if hf.exists():
            baselines["hf_buckets_sync_cli"] = summarize([timed(cli) for _ in range(cfg.slow_reps)])
            ratios["hf_buckets_sync_cli/ours"] = ratio(baselines["hf_buckets_sync_cli"]["median_s"], ours_stats["median_s"])
        else:
            notes = f"no `hf` CLI next to {sys.executable}: the CLI baseline was skipped"
    targets = [target(f"cold server start: enter + exit under 1 s ({main_mode} mode)", ours_stats["median_s"] < 1.0,
                      round(ours_stats["median_s"], 3))]
    return figure(f"{site.backend}.noop_cold_server", site.backend,
                  f"enter + exit, nothing to fetch or sync, server not running ({main_mode} mode, uv cache warm)",
                  ours_stats, baselines, ratios, targets, checks, notes)


# --------------------------------------------------------------------------------- concurrency


def concurrent(site: Site) -> dict[str, Any]:
    """N processes enter at once with a cold cache (one cache dir, as ranks of one host): bytes transferred
    against bytes needed, and wall time (start signal to the last exit of the block) against one process.

    The ranks import first, then wait for one signal that wakes them all at once, and stay alive after their
    block until every rank has reported (as ranks of a real run go on into their body). Baseline
    `beside_idle_ranks`: one rank fetching beside N-1 processes with the same imports that wake on the same
    signal, report and stay, without entering the block: what merely having that many processes on the host
    costs the fetch. Each sample says where the time went, from the ranks' traced phases (bench/worker.py):
    when the fetching rank began its fetch, how long the fetch took, and the tail from its release of the
    host's fetch gate to the last rank's exit."""
    world, cfg = site.world, site.world.cfg
    checks: list[str] = []
    results: dict[str, list[Sample]] = {"one": [], "many": [], "idle": []}
    for _ in range(cfg.reps):
        results["one"].append(_ranks(site, 1, checks))
        results["many"].append(_ranks(site, cfg.procs, checks))
        results["idle"].append(_ranks(site, cfg.procs, checks, others={"trivial": True}))
    one = summarize(results["one"], bytes_needed=world.target_bytes)
    many = summarize(results["many"], bytes_needed=world.target_bytes)
    idle = summarize(results["idle"], bytes_needed=world.target_bytes)
    wall = ratio(many["median_s"], one["median_s"])
    moved = many.get("bytes_transferred")
    bytes_ratio = ratio(moved, world.target_bytes)
    waiting_requests = max((sample.extra.get("waiting_rank_requests_max") or 0 for sample in results["many"]), default=0)
    waiting_cpu = max((sample.extra.get("waiting_rank_cpu_ms_max") or 0.0 for sample in results["many"]), default=0.0)
    targets = [
        target("bytes transferred equal bytes needed", moved == world.target_bytes, bytes_ratio),
        target("each waiting rank sends at most 1 request to the server", waiting_requests <= 1, waiting_requests),
        target("each waiting rank uses at most 10 ms of CPU after imports (max over ranks and repetitions)",
               waiting_cpu <= 10.0, waiting_cpu),
        target("wall time within 2x of one process (hf)" if site.backend == "hf" else "wall time within 2x of one process",
               wall is not None and wall <= 2.0, wall),
    ]
    emulator = site.backend == "hf"
    notes = (f"Medians. One rank fetching beside {cfg.procs - 1} idle ones: {idle['median_s'] * 1000:.0f} ms, fetch "
             f"{_ms(idle.get('fetch_ms'))}, server CPU {_ms(idle.get('server_cpu_ms'))} (alone: {one['median_s'] * 1000:.0f} ms, "
             f"fetch {_ms(one.get('fetch_ms'))}, server CPU {_ms(one.get('server_cpu_ms'))}). {cfg.procs} ranks "
             f"({many['median_s'] * 1000:.0f} ms): the fetching rank began its fetch {_ms(many.get('fetch_start_ms'))} "
             f"after the signal, the fetch took {_ms(many.get('fetch_ms'))} (server CPU {_ms(many.get('server_cpu_ms'))}"
             + (f", Hub emulator CPU {_ms(many.get('bench_cpu_ms'))}, alone {_ms(one.get('bench_cpu_ms'))}" if emulator else "")
             + f"), and the last rank left {_ms(many.get('tail_ms'))} after the fetcher released the gate. Ranks' CPU "
             f"{_ms(many.get('ranks_cpu_ms'))}; a waiting rank's {_ms(many.get('waiting_rank_cpu_ms_median'))}, of which "
             f"{_ms(many.get('waiting_rank_cpu_before_gate_ms_median'))} before it waits on the gate.")
    return figure(f"{site.backend}.concurrent", site.backend,
                  f"{cfg.procs} processes enter at once, cold cache ({len(world.target_modules)} entries, {world.target_bytes / 1e6:.1f} MB)",
                  many, {"one_process": one, "beside_idle_ranks": idle},
                  {"ours/one_process": wall, "bytes_transferred/bytes_needed": bytes_ratio,
                   "beside_idle_ranks/one_process": ratio(idle["median_s"], one["median_s"]),
                   "ours/beside_idle_ranks": ratio(many["median_s"], idle["median_s"])},
                  targets, checks, notes)


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "n/a"


def _launch(site: Site, procs: int, cache: Path, *, broadcast: bool = True, hold: bool = True,
            others: dict[str, Any] | None = None, free_first: Sequence[Path] = (),
            **spec_extra: Any) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """Start `procs` ranks (each imports, then says ready), signal them all at once, and collect their reports:
    (the signal's monotonic time, the reports, the server's I/O and CPU, this process's CPU (the Hub emulator runs
    in it) and the Hub's requests meanwhile).

    `free_first`: the folders of the samples before, released (`release`) once every rank is ready, just before
    the signal, whatever the number of ranks and however long their imports took: freed before the ranks
    start, one rank (0.2 s of imports) would write into memory freed a moment ago and 32 ranks (3 s) into
    memory handed back to the VM's host.

    `broadcast`: the signal is the close of one pipe all ranks read (one wake-up of all of them), rather than a
    line written to each rank's stdin in turn (each write may hand the CPU to the rank it wakes, so the last
    rank hears the signal tens of ms late). `hold`: ranks stay alive until all have reported (bench/worker.py)."""
    world = site.world
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    read_end, write_end = os.pipe() if broadcast else (None, None)
    spec = {"model": TARGET_MODEL, "task": TASK, "version": world.version, "bucket": str(site.ref),
            "cache_dir": str(cache), "signal_fd": read_end, "hold": hold, **spec_extra}
    specs = [json.dumps(spec if rank == 0 or others is None else {**spec, **others}) for rank in range(procs)]
    workers: list[subprocess.Popen] = []
    try:
        workers = [subprocess.Popen([sys.executable, "-m", "bench.worker", specs[rank]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, cwd=str(REPO_ROOT), env=env, pass_fds=(read_end,) if broadcast else ())
                   for rank in range(procs)]
        if read_end is not None:
            os.close(read_end)
            read_end = None
        for worker in workers:
            line = worker.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"worker failed to start: {line!r}")
        release(free_first)
        io0 = site.server_io()
        cpu0 = proc_cpu(site.pid) if site.pid else None
        reporting = page_reporting()
        with site.hub() as box:
            started, bench_cpu0 = time.monotonic(), time.process_time()
            if write_end is not None:
                os.close(write_end)
                write_end = None
            else:
                for worker in workers:
                    worker.stdin.write("\n")
                    worker.stdin.flush()
            reports = [json.loads(worker.stdout.readline()) for worker in workers]
            bench_cpu = time.process_time() - bench_cpu0
        io1 = site.server_io()
        cpu1 = proc_cpu(site.pid) if site.pid else None
        for worker in workers:
            worker.stdin.close()
        for worker in workers:
            worker.wait(timeout=300)
    finally:
        for end in (read_end, write_end):
            if end is not None:
                os.close(end)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return started, reports, {**box, "server_bytes_written": io_delta(io0, io1), "bench_cpu_s": bench_cpu,
                              "vm_reported_mb": reported_mb(reporting, page_reporting()),
                              "server_cpu_s": round(cpu1 - cpu0, 4) if cpu0 is not None and cpu1 is not None else None}


def _ranks(site: Site, procs: int, checks: list[str], others: dict[str, Any] | None = None) -> Sample:
    """`procs` ranks on one cold cache (`others`: what every rank but the first does instead, for a baseline)."""
    world = site.world
    scratch = scratch_root(world.env)
    scratch.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="ranks-", dir=scratch))
    earlier = [path for path in scratch.glob("ranks-*") if path != cache]
    started, reports, server = _launch(site, procs, cache, others=others, free_first=earlier)
    ended = max(report["end"] for report in reports)
    installed = sum(report.get("fetched", 0) for report in reports)
    entries = [entry for entry in scan_entries(cache, world.version) if entry.state.publishable]
    if installed != len(world.target_modules) or len(entries) != len(world.target_modules):
        checks.append(f"{procs} ranks installed {installed} entries, the cache holds {len(entries)}, expected {len(world.target_modules)}")
    for report in reports:
        if report.get("warnings"):
            checks.append(f"a rank warned: {report['warnings']}")
    waiting = [report for report in reports if report.get("waited")]
    server_cpu, bench_cpu = server.pop("server_cpu_s", None), server.pop("bench_cpu_s")
    return Sample(ended - started, {
        # the ranks that waited on the host's fetch gate, then took the fetch's note: what each one costs
        "waiting_ranks": len(waiting),
        "waiting_rank_requests_max": max((report["requests"] for report in waiting), default=None),
        "waiting_rank_cpu_ms_median": round(statistics.median(r["cpu"] for r in waiting) * 1000, 2) if waiting else None,
        "waiting_rank_cpu_ms_max": round(max(r["cpu"] for r in waiting) * 1000, 2) if waiting else None,
        "waiting_rank_cpu_before_gate_ms_median": _median_ms(_cpu_before_gate(r) for r in waiting),
        "waiting_rank_gc_ms_max": max((r.get("gc", {}).get("cpu_ms", 0.0) for r in waiting), default=None),
        "requests": sum(report.get("requests", 0) for report in reports),
        "bytes_transferred": sum(report.get("bytes_requested", 0) for report in reports),
        # where the time goes on a small machine: CPU of the ranks (after the start signal), of the server and of
        # this process (the Hub emulator runs in it), and the fetching rank's timeline
        "ranks_cpu_ms": round(sum(report.get("cpu", 0.0) for report in reports) * 1000, 1),
        "server_cpu_ms": round(server_cpu * 1000, 1) if server_cpu is not None else None,
        "bench_cpu_ms": round(bench_cpu * 1000, 1),
        **_fetcher_timeline(reports, started),
        **server,
    })


def _median_ms(values) -> float | None:
    found = [value for value in values if value is not None]
    return round(statistics.median(found) * 1000, 2) if found else None


def _cpu_before_gate(report: dict[str, Any]) -> float | None:
    """A waiting rank's CPU from the signal until it began to wait on the gate (its traced phases)."""
    phases = report.get("phases", {})
    if "_wait" not in phases:
        return None
    after = sum(phases[name][2] for name in ("_wait", "_take_note", "__exit__") if name in phases)
    return max(0.0, report["cpu"] - after)  # what follows the wait is the note, the exit and a few microseconds


def _fetcher_timeline(reports: list[dict[str, Any]], started: float) -> dict[str, float | None]:
    """The fetching rank's phases relative to the signal (ms): when its fetch began, how long it took, and the
    tail from its release of the host's fetch gate to the last rank's exit."""
    fetcher = next((report for report in reports if not report.get("waited") and "fetch_model" in report.get("phases", {})), None)
    if fetcher is None:
        return {"fetch_start_ms": None, "fetch_ms": None, "tail_ms": None}
    phases = fetcher["phases"]
    begin, end, _ = phases["fetch_model"]
    released = phases.get("release", [end, end])[1]
    return {"fetch_start_ms": round((begin - started) * 1000, 1), "fetch_ms": round((end - begin) * 1000, 1),
            "tail_ms": round((max(report["end"] for report in reports) - released) * 1000, 1)}


# ------------------------------------------------------------------------------------- lookup


def lookup_figure(world: World, backend: str, log) -> dict[str, Any]:
    """Lookup latency and requests as the bucket grows: the model's export records, for its compiler version
    (what an exporter asks) and across all versions; against listing the whole tree."""
    cfg = world.cfg
    checks: list[str] = []
    per_size: dict[str, dict[str, Any]] = {}
    use_library = lookups.LOOKUP_CACHE is not None
    for models in cfg.lookup_models:
        log(f"  lookup, {backend}, {models} models")
        site = Site(world, backend, models)
        try:
            row: dict[str, Any] = {}
            every = cfg.sizes.records + len(world.versions) - 1  # records of the model in every version
            naive_reps = 1 if models >= 200 else cfg.reps  # listing a 500-model bucket whole takes tens of seconds
            for name, fn, reps, expected in (
                    ("ours_one_version", lambda c, s=site: _ours_lookup(world, s, c, all_versions=False), cfg.fast_reps, cfg.sizes.records),
                    ("ours_all_versions", lambda c, s=site: _ours_lookup(world, s, c, all_versions=True), cfg.fast_reps, every),
                    ("naive_list_all", lambda c: lookups.naive_lookup(c, TARGET_MODEL, TASK), naive_reps, every)):
                samples = []
                for _ in range(reps):
                    drop_connections()
                    client = BucketClient(site.ref)

                    def run_it(client=client, fn=fn, site=site) -> dict[str, Any]:
                        with site.hub() as box:
                            found = fn(client)
                        return {"requests": client.requests, **box, "records": len(found)}

                    samples.append(timed(run_it))
                row[name] = summarize(samples)
                if row[name].get("records") != expected:
                    checks.append(f"{name} at {models} models found {row[name].get('records')} records, expected {expected}")
            if site.emulator is not None:
                row["emulator_list"] = _emulator_list_time(world, site, cfg.fast_reps)
            per_size[str(models)] = row
        finally:
            site.close()
    sizes = [str(m) for m in cfg.lookup_models]
    small, large = per_size[sizes[0]], per_size[sizes[-1]]
    ratios: dict[str, float | None] = {}
    targets = []
    for name in ("ours_one_version", "ours_all_versions"):
        times = [per_size[s][name]["median_s"] for s in sizes]
        ratios[f"{name}: time {sizes[-1]}/{sizes[0]} models"] = ratio(large[name]["median_s"], small[name]["median_s"])
        flat_requests = len({per_size[s][name].get("requests") for s in sizes}) == 1
        growth = max(times) / min(times) if min(times) else 99.0
        # flat: the slowest bucket size within 1.25x of the fastest, or within 5 ms of it (millisecond noise)
        flat_time = growth <= 1.25 or max(times) - min(times) <= 0.005
        targets.append(target(f"{name}: requests flat from {sizes[0]} to {sizes[-1]} models",
                              flat_requests, [per_size[s][name].get("requests") for s in sizes]))
        targets.append(target(f"{name}: time flat from {sizes[0]} to {sizes[-1]} models (max/min <= 1.25x or +5 ms)",
                              flat_time, round(growth, 3)))
    for size in sizes:
        ratios[f"naive/ours_one_version at {size} models"] = ratio(per_size[size]["naive_list_all"]["median_s"],
                                                                    per_size[size]["ours_one_version"]["median_s"])
    notes = ("lookup_cache from optimum_neuron_cache.lookup (memo cleared each repetition)" if use_library
             else "interim lookup over the remote layout (bench/lookup.py): lookup_cache not available yet")
    return {"id": f"{backend}.lookup", "backend": backend,
            "title": f"lookup of one model's export records as the bucket grows ({', '.join(sizes)} models, {len(world.versions)} compiler versions)",
            "ours": per_size[sizes[-1]]["ours_one_version"], "by_models": per_size, "baselines": {},
            "ratios": {key: (round(value, 4) if value is not None else None) for key, value in ratios.items()},
            "targets": targets, "checks": checks, "notes": notes}


def _emulator_list_time(world: World, site: Site, reps: int) -> dict[str, Any]:
    """Diagnostic: the emulator's own time to answer the listings a lookup makes (its handler, called
    in-process): one exports listing for one version; the root plus every version's exports for all versions.
    The emulator scans every path of the bucket for each listing, a cost an indexed store does not have."""
    op_tree = getattr(site.emulator, "op_tree", None)
    if op_tree is None:
        return {}
    folder = layout.model_ref(TARGET_MODEL).folder
    one = [layout.exports_prefix(world.version, folder, TASK)]
    every = [""] + [layout.exports_prefix(version, folder, TASK) for version in world.versions]

    def listings(prefixes: list[str]) -> float:
        started = time.perf_counter()
        for prefix in prefixes:
            op_tree(None, BUCKET_ID, prefix, False)
        return time.perf_counter() - started

    runs = max(3, reps)
    return {"one_version_s": statistics.median(listings(one) for _ in range(runs)),
            "all_versions_s": statistics.median(listings(every) for _ in range(runs))}


def _ours_lookup(world: World, site: Site, client: BucketClient, *, all_versions: bool) -> list[Any]:
    if lookups.LOOKUP_CACHE is not None:
        from optimum_neuron_cache.lookup import clear_lookup_cache

        clear_lookup_cache()
        return lookups.LOOKUP_CACHE(TARGET_MODEL, TASK, compiler_version=None if all_versions else world.version,
                                    all_versions=all_versions, bucket=site.ref, client=client)
    # TODO(lookup): interim, until lookup_cache lands (see bench/lookup.py)
    records = lookups.interim_lookup(client, TARGET_MODEL, TASK)
    return records if all_versions else [r for r in records if r.get("compiler_version") == world.version]


# ------------------------------------------------------------------------------------ compile leases


#: What stress.leases tunes for its own speed: the figure runs the defaults a user gets.
_STRESS_LEASE_SETTINGS = ("NEURON_CACHE_LEASE_HEARTBEAT", "NEURON_CACHE_LEASE_STALE", "NEURON_CACHE_LEASE_POLL")


def lease_cost(env: BenchEnv, cfg: Config, log) -> list[dict[str, Any]]:
    """Hosts compiling the same `lease_graphs` graphs of `lease_seconds` each through the compiler shim against
    one Hub bucket (each host its own cache, bucket server and stats: stress.leases), against the same hosts
    compiling without the cache (the real compiler first on PATH). One host, then `lease_hosts`; the sides
    alternate, a fresh bucket per run. The figure: seconds the cache adds per graph (difference of medians)."""
    emulator = env.start_emulator(env.path("hub-leases"), cfg.xet)
    env.use(emulator)
    try:
        return [_lease_figure(env, cfg, hosts, name, log)
                for hosts, name in ((1, "lease_one"), (cfg.lease_hosts, "lease_many"))]
    finally:
        env.stop_emulator(emulator)


def _lease_figure(env: BenchEnv, cfg: Config, hosts: int, name: str, log) -> dict[str, Any]:
    graphs, seconds = cfg.lease_graphs, cfg.lease_seconds
    checks: list[str] = []
    ours: list[Sample] = []
    bare: list[Sample] = []
    for rep in range(cfg.lease_reps):
        log(f"hf: {name}, repetition {rep + 1} of {cfg.lease_reps}")
        a, b = _alternated(rep, lambda: _lease_run(env, hosts, graphs, seconds, checks, bare=False, rep=rep),
                           lambda: _lease_run(env, hosts, graphs, seconds, checks, bare=True, rep=rep))
        ours.append(a)
        bare.append(b)
    ours_stats, bare_stats = summarize(ours), summarize(bare)
    added = (ours_stats["median_s"] - bare_stats["median_s"]) / graphs
    by_pairs = statistics.median((a.seconds - b.seconds) / graphs for a, b in zip(ours, bare))
    limit = 0.3 if hosts == 1 else 0.6
    who = "one host" if hosts == 1 else f"{hosts} hosts at once"
    notes = (f"{who}, {graphs} graphs of {seconds:g} s each through the shim on a Hub bucket (emulator), lease "
             f"settings at their defaults: the cache adds {added:.2f} s per graph (difference of medians), "
             f"{by_pairs:.2f} s by pairs; ours {[round(s.seconds, 2) for s in ours]} s, "
             f"bare {[round(s.seconds, 2) for s in bare]} s")
    return figure(f"hf.{name}", "hf", f"{who} compile {graphs} graphs of {seconds:g} s through the compiler shim",
                  ours_stats, {"bare compiler": bare_stats},
                  {"ours/bare compiler": ratio(ours_stats["median_s"], bare_stats["median_s"])},
                  [target(f"the cache adds at most {limit:g} s per graph, {who} ((ours - bare) / graphs, medians)",
                          added <= limit, round(added, 3))],
                  checks, notes)


def _lease_run(env: BenchEnv, hosts: int, graphs: int, seconds: float, checks: list[str], *, bare: bool,
               rep: int) -> Sample:
    """One run of `hosts` hosts (stress.leases.Hosts), timed from their start to the last one's exit; what
    went wrong (a compile more or less than expected, a host that failed) goes to `checks`."""
    side = "bare" if bare else "ours"
    bucket = f"bench-org/leases-{hosts}-{rep}"
    if not bare:
        BucketClient(BucketRef("hf", bucket)).create()
    work = fresh(env, f"lease-{side}-{hosts}")
    extra = ({"PATH": os.pathsep.join([str(work / "tools" / "sdk"), os.environ.get("PATH", "")])} if bare else None)
    run = Hosts(work, bucket, mode="shim", hosts=hosts, graphs=graphs, seconds=seconds, seed="bench", extra=extra,
                start=False)
    for host_env in run.envs:
        for setting in _STRESS_LEASE_SETTINGS:
            host_env.pop(setting, None)
    gc.collect()
    os.sync()
    run.started = time.monotonic()
    for index in range(hosts):
        run.launch(index)
    figures = run.finish(timeout=300.0)
    expected = hosts * graphs if bare else graphs
    if figures.compiles != expected or figures.ok_hosts != hosts or figures.complete_hosts != hosts:
        checks.append(f"{side}, {hosts} hosts: {figures.compiles} compiles (expected {expected}), "
                      f"{figures.ok_hosts} hosts exited 0 and {figures.complete_hosts} ended complete of {hosts}"
                      + (f": {figures.notes[0]}" if figures.notes else ""))
    return Sample(figures.wall_seconds, {"compiles": figures.compiles,
                                         "fetched_after_wait": figures.lease_fetched_after_wait})
