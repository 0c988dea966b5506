"""One rank of the concurrent-enter figure: `python -m bench.worker '<json spec>'`.

It imports everything first, prints `ready`, waits for a line on stdin (the start signal, sent to every rank
at once), enters and exits `hub_neuronx_cache`, and prints one JSON line: monotonic start and end times
(CLOCK_MONOTONIC is system-wide, so the parent compares them across processes), requests to the bucket
server, the bytes this rank asked the server to download, what it installed, its CPU time after the signal, and
whether it waited for another rank's fetch (the host's fetch gate).

`phases` says where each rank's time went: for each traced step of the context (`TRACED`), when it began and
ended (monotonic seconds) and the CPU it used. Wrapping a step costs about a microsecond.

With `"trivial": true` the rank imports the same modules and does the same signal and report dance, but never
enters the context (the baseline of one fetching rank beside idle ones).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
from typing import Any

#: (module, attribute path) of the steps whose time each rank reports. A name the code no longer has is skipped.
TRACED = (
    ("optimum_neuron_cache.context", "hub_neuronx_cache.__enter__"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache._open_journal"),
    ("optimum_neuron_cache.context", "Journal.leftovers"),
    ("optimum_neuron_cache.context", "Journal.begin"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache._lead"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache._wait"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache._take_note"),
    ("optimum_neuron_cache.context", "fetch_model"),
    ("optimum_neuron_cache.fetch", "HostFetchGate.release"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache.__exit__"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache._sync"),
    ("optimum_neuron_cache.context", "hub_neuronx_cache._close_journal"),
    ("optimum_neuron_cache.context", "record_run"),
)


def _trace(phases: dict[str, list[float]]) -> None:
    """Wrap each step of TRACED to note [start, end, cpu] of its first call in `phases`."""
    import importlib

    for module_name, path in TRACED:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or not hasattr(owner, name):
            continue
        raw = inspect.getattr_static(owner, name)
        static = isinstance(raw, staticmethod)
        original = raw.__func__ if static else getattr(owner, name)

        def wrapper(*args, _original=original, _key=name, **kwargs):
            started, cpu = time.monotonic(), time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                phases.setdefault(_key, [round(started, 6), round(time.monotonic(), 6),
                                         round(time.process_time() - cpu, 6)])

        functools.update_wrapper(wrapper, original)
        setattr(owner, name, staticmethod(wrapper) if static else wrapper)


class _Collections:
    """The garbage collections that ran, and the CPU they took: a full collection can cost a rank several ms,
    wherever in its code the allocation that triggers it happens to fall."""

    def __init__(self) -> None:
        self.done: list[tuple[float, int, float]] = []  # (cpu at start, generation, cpu seconds)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.done.append((self._started, info["generation"], time.process_time() - self._started))

    def since(self, cpu0: float) -> dict[str, Any]:
        """Collections since `cpu0` (process CPU time): how many of each generation, and their CPU in ms."""
        mine = [(generation, cpu) for started, generation, cpu in self.done if started >= cpu0]
        return {"count": [sum(1 for g, _ in mine if g == gen) for gen in range(3)],
                "cpu_ms": round(sum(cpu for _, cpu in mine) * 1000, 3)}


def _count_collections() -> _Collections:
    import gc

    counter = _Collections()
    gc.callbacks.append(counter)
    return counter


def _wait_for_signal(fd: int | None) -> None:
    """Block until the start signal: EOF on the pipe every rank shares (the parent closes its end, and the kernel
    wakes all ranks at once), or else a line on stdin."""
    if fd is None:
        sys.stdin.readline()
        return
    while os.read(fd, 4096):
        pass


def _report(data: dict[str, Any], hold: bool) -> None:
    """Print the rank's report; with `hold`, stay alive until the parent closes stdin (after every rank has
    reported), as a rank of a real run goes on into its body: no rank's interpreter teardown (tens of ms of
    CPU each) runs inside the measured window."""
    print(json.dumps(data), flush=True)
    if hold:
        sys.stdin.read()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    from bench.harness import entry_bytes
    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.client import BucketClient

    signal_fd, hold = spec.get("signal_fd"), bool(spec.get("hold"))
    if spec.get("trivial"):
        print("ready", flush=True)
        _wait_for_signal(signal_fd)
        signalled = time.monotonic()
        cpu0 = time.process_time()
        _report({"start": signalled, "signalled": signalled, "end": time.monotonic(), "cpu": time.process_time() - cpu0},
                hold)
        return 0

    requested = [0]
    original = BucketClient.download

    def counting_download(self, files, **kwargs):  # the bytes this rank asks the server for
        requested[0] += entry_bytes(files)
        return original(self, files, **kwargs)

    BucketClient.download = counting_download
    phases: dict[str, list[float]] = {}
    _trace(phases)
    collections = _count_collections()
    context = hub_neuronx_cache(spec["model"], spec["task"], compiler_version=spec["version"], bucket=spec["bucket"],
                                cache_dir=spec["cache_dir"])
    print("ready", flush=True)
    _wait_for_signal(signal_fd)
    signalled = time.monotonic()
    cpu0 = time.process_time()
    started = time.monotonic()
    with context as run:
        pass
    ended = time.monotonic()
    cpu = time.process_time() - cpu0
    _report({"start": started, "signalled": signalled, "end": ended, "cpu": cpu, "requests": run.requests,
             "bytes_requested": requested[0], "fetched": len(run.fetched), "bytes_installed": run.bytes_downloaded,
             "warnings": run.warnings, "waited": run.waited_for_host_fetch, "phases": phases,
             "gc": collections.since(cpu0)}, hold)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
