"""Plumbing: an isolated environment, Hub emulators, bucket servers, timers and counters.

Everything lives under one temporary directory and on loopback. The environment is isolated as in
tests/conftest.py: HF_HOME, XDG_CACHE_HOME and the Xet cache under the temp dir, a short runtime dir for the
server's Unix socket, no token, and uv's own cache left where the user has it (so "uv cache warm" is true).
Every emulator and bucket server started here is stopped on exit.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimum_neuron_cache import client as client_module
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server, stop_server

from .machine import page_reporting, reported_mb

_CLEARED = (
    "NEURON_CC_FLAGS", "NEURON_COMPILE_CACHE_URL", "NEURON_CACHE_BUCKET", "NEURON_CC_VERSION",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN_PATH",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchEnv:
    """os.environ and temp dirs for one benchmark run; restores everything on exit."""

    def __init__(self, keep: bool = False, nodelay: bool = True) -> None:
        self.keep = keep
        self.nodelay = nodelay
        self.root = Path(tempfile.mkdtemp(prefix="onc-bench-"))
        self.runtime = Path(tempfile.mkdtemp(prefix="onb-"))  # short: Unix socket paths hold 108 bytes
        self._saved: dict[str, str] | None = None
        self._emulators: list[Any] = []
        self._endpoints: set[str] = set()

    def __enter__(self) -> BenchEnv:
        self._saved = dict(os.environ)
        for name in _CLEARED:
            os.environ.pop(name, None)
        uv_cache = os.environ.get("UV_CACHE_DIR") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv")
        os.environ.update({
            "UV_CACHE_DIR": uv_cache,
            "HF_HOME": str(self.root / "hf_home"),
            "XDG_CACHE_HOME": str(self.root / "xdg_cache"),
            "HF_XET_CACHE": str(self.root / "xet_cache"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "NEURON_CACHE_RUNTIME_DIR": str(self.runtime),
            "NEURON_CACHE_SERVER_MODE": "current",
            "NEURON_CACHE_SERVER_IDLE_TIMEOUT": "120",
            "NEURON_CACHE_LOCK_TIMEOUT": "120",
        })
        return self

    def __exit__(self, *exc: object) -> None:
        for endpoint in sorted(self._endpoints):
            stop_server({**os.environ, "HF_ENDPOINT": endpoint})
        if "HF_ENDPOINT" not in os.environ:
            stop_server()
        for emulator in self._emulators:
            emulator.stop()
        if self._saved is not None:
            os.environ.clear()
            os.environ.update(self._saved)
        if self.keep:  # the server logs live in the runtime dir: keep them with the rest
            for log in self.runtime.glob("server-*.log"):
                shutil.copy2(log, self.root / log.name)
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)

    def path(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ----------------------------------------------------------------------------- emulators
    def start_emulator(self, data_dir: Path, xet: str = "http") -> Any:
        from hub_emulator import HubEmulator

        from hub_emulator import hub

        hub._Handler.disable_nagle_algorithm = self.nodelay  # --emulator-nagle measures the 40 ms per request
        try:
            emulator = HubEmulator(data_dir, xet=xet)
        except TypeError:  # an emulator without Xet modes: local:// only
            if xet != "local":
                raise
            emulator = HubEmulator(data_dir)
        emulator.start()
        self._emulators.append(emulator)
        return emulator

    def use(self, emulator: Any | None) -> None:
        """Point HF_ENDPOINT (hence the bucket server) at `emulator`, or at no Hub for dir buckets."""
        if emulator is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = emulator.endpoint
            self._endpoints.add(emulator.endpoint)

    def stop_emulator(self, emulator: Any) -> None:
        """Stop its bucket server first: no transfer may be left running against its local:// store."""
        stop_server({**os.environ, "HF_ENDPOINT": emulator.endpoint})
        self._endpoints.discard(emulator.endpoint)
        emulator.stop()
        self._emulators.remove(emulator)


def entry_bytes(files: list[Any]) -> int:
    """Bytes of cache-entry files among a download's files (DownloadFile, or their wire form). Export records
    and digest manifests (small JSON read along with the entries, for compile durations and cheaper checks) are
    metadata, not bytes the compile needs: not counted."""
    wire = [item.to_wire() if hasattr(item, "to_wire") else item for item in files]
    return sum(int(item.get("size") or 0) for item in wire if not item.get("manifest")
               and "/exports/" not in str(item.get("path", "")) and "/digests/" not in str(item.get("path", "")))


class DownloadCounter:
    """Bytes of entries this process asks bucket servers to download (see entry_bytes)."""

    total = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        original = BucketClient.download

        def counting(self, files, **kwargs):
            cls.total += entry_bytes(files)
            return original(self, files, **kwargs)

        BucketClient.download = counting
        cls._installed = True


def drop_connections() -> None:
    """Close this process's cached connections to bucket servers: the next request connects and shakes hands
    again, as a new process would (the server keeps running)."""
    with client_module._connections_lock:
        for conn in client_module._connections.values():
            conn.close()
        client_module._connections.clear()


def server_pid() -> int | None:
    status = running_server()
    return int(status["pid"]) if status else None


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/<pid>/io: rchar/wchar count every byte read or written through syscalls (files and sockets)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {key: int(value) for key, value in (line.split(": ") for line in text.splitlines() if ": " in line)}


def proc_cpu(pid: int | str = "self") -> float | None:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def io_delta(before: dict[str, int], after: dict[str, int], key: str = "wchar") -> int | None:
    if key not in before or key not in after:
        return None
    return after[key] - before[key]


def cas_bytes(emulator: Any) -> int:
    """Bytes of the xorbs (the data) the emulator's Xet store holds: what uploads added."""
    from optimum_neuron_cache.maintenance import tree_size

    for xorbs in (emulator.cas_dir / "xorbs", emulator.cas_dir / "xet" / "xorbs" / "xorbs"):  # HTTP CAS, local://
        if xorbs.is_dir():
            return tree_size(xorbs)
    return tree_size(emulator.cas_dir, skip=("shard-cache", "shard-session"))


# ------------------------------------------------------------------------------------ measures


@dataclass
class Sample:
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def release(paths: Iterable[Path]) -> None:
    """Flush every dirty page, then remove `paths`: the folders of earlier samples, right before the sample
    that writes in their place. This VM hands memory that stayed free for about 2 s back to its host, and
    writing a file into such memory costs about 9x writing it into memory freed a moment ago (docs/performance.md,
    "The VM's page reporting"): every sample, ours and the baselines alike, frees its predecessor's files just
    before it starts, so that none of them writes into memory that sat free while something else ran."""
    os.sync()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable[[], dict[str, Any] | None]) -> Sample:
    """Time one sample. Dirty pages left by the samples before (`hf buckets sync` writes 2 GB) are flushed
    first, so that no sample pays for the writeback of another. `vm_reported_mb`: the free memory the guest
    handed to its host during the sample, where the kernel counts it (`release`)."""
    gc.collect()
    os.sync()
    reporting = page_reporting()
    started = time.perf_counter()
    extra = fn() or {}
    seconds = time.perf_counter() - started
    reported = reported_mb(reporting, page_reporting())
    if reported is not None:
        extra.setdefault("vm_reported_mb", reported)
    return Sample(seconds, extra)


def summarize(samples: list[Sample], **fixed: Any) -> dict[str, Any]:
    """Median time over the samples, and for each counter the median too (they are usually constant). The MB
    the VM handed to its host during each sample are kept per sample (`samples_vm_reported_mb`), beside
    `samples_s`: they tell which samples wrote into memory the host had to give back."""
    out: dict[str, Any] = {"median_s": statistics.median(s.seconds for s in samples), "samples_s": [round(s.seconds, 6) for s in samples]}
    if any(s.extra.get("vm_reported_mb") is not None for s in samples):
        out["samples_vm_reported_mb"] = [s.extra.get("vm_reported_mb") for s in samples]
    keys = sorted({key for s in samples for key in s.extra})
    for key in keys:
        values = [s.extra[key] for s in samples if s.extra.get(key) is not None]
        if values and all(isinstance(v, (int, float)) for v in values):
            median = statistics.median(values)
            out[key] = int(median) if all(isinstance(v, int) for v in values) and float(median).is_integer() else median
        elif values:
            out[key] = values[-1]
    out.update(fixed)
    return out


def ratio_interval(ours: list[float], base: list[float], level: float = 0.9, draws: int = 2000) -> tuple[float, float] | None:
    """How far a ratio of medians (ours / base) could move by chance: the central `level` share of that ratio
    over `draws` resamplings of the repetitions (a repetition keeps its pair together). On a noisy VM the
    median of 7 samples moves by 10% or more from run to run; a target judged on one run must be read with
    it. Deterministic (fixed seed); None below 3 pairs."""
    import random

    pairs = [(a, b) for a, b in zip(ours, base) if a > 0 and b > 0]
    if len(pairs) < 3:
        return None
    rng = random.Random(0)
    ratios = []
    for _ in range(draws):
        drawn = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        ratios.append(statistics.median(a for a, _ in drawn) / statistics.median(b for _, b in drawn))
    ratios.sort()
    cut = int(draws * (1 - level) / 2)
    return ratios[cut], ratios[draws - 1 - cut]


@contextmanager
def hub_requests(emulator: Any | None) -> Iterator[dict[str, int]]:
    """Counts the HTTP requests the emulator saw inside the block (into the yielded dict, key 'hub_requests')."""
    box: dict[str, int] = {}
    log = emulator.requests if emulator is not None else None
    before = len(log) if log is not None else 0
    try:
        yield box
    finally:
        if log is not None:
            # Only the block's own records are read: summing the whole log (tens of thousands of requests by the
            # end of a run) inside a timed block once cost the warm no-op more than the no-op itself.
            new = log.since(before)
            box["hub_requests"] = len(new)
            if getattr(emulator, "xet", "local") != "local":  # the emulator's HTTP CAS mode counts the bytes it serves
                box["hub_bytes_out"] = sum(record.bytes_out for record in new)


def ensure_bucket(ref: BucketRef) -> None:
    BucketClient(ref).create()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
