"""What-if measurements of fixes proposed to core code (docs/performance.md), applied here as patches.

`python -m bench --experiment lock-convoy,uv-offline,installed-by-others` measures the figures as they would be with each fix.
These patches exist only to measure; the fixes belong in optimum_neuron_cache/. Delete each experiment
when its fix lands. The bench's worker processes apply the same experiments (BENCH_EXPERIMENTS).
"""

from __future__ import annotations

import os
import time
from typing import Any

ENV = "BENCH_EXPERIMENTS"
#: Poll interval proposed for waiting on an entry lock (filelock's default is 50 ms).
LOCK_POLL_INTERVAL = 0.02


def _lock_convoy() -> None:
    """fetch.Fetcher.execute: a process that waited on an entry another process was fetching releases that
    entry's lock as soon as it sees the entry installed (it no longer holds every waited-on lock until it has
    looked at all of them), and skips waiting altogether when the entry is installed already; entry locks
    poll every 20 ms instead of 50 ms. Otherwise the 31 waiting ranks queue behind each other on the first
    entry, one 50 ms poll at a time."""
    from filelock import FileLock, Timeout

    from optimum_neuron_cache import fetch, host_state

    original_lock = host_state.HostState.entry_lock

    def entry_lock(self, compiler_version: str, module: str, purpose: str) -> FileLock:
        lock = original_lock(self, compiler_version, module, purpose)
        return FileLock(lock.lock_file, poll_interval=LOCK_POLL_INTERVAL)

    def execute(self, plan, progress=None):
        result = fetch.FetchResult()
        if not plan.items:
            return result
        locks = {item.module: self.state.entry_lock(self.version, item.module, "fetch") for item in plan.items}
        held: list[Any] = []
        waiting: list[Any] = []
        try:
            for item in plan.items:
                try:
                    locks[item.module].acquire(timeout=0)
                    held.append(item)
                except Timeout:
                    waiting.append(item)
            self._download_and_install(held, result, progress)
            for item in held:
                locks[item.module].release()
            held = []
            deadline = time.monotonic() + host_state.lock_timeout()
            for item in waiting:
                if not fetch._still_needed(item, self.target(item.module), self.version):
                    result.installed_by_others.append(item.module)  # installed already: no need to wait
                    continue
                try:
                    locks[item.module].acquire(timeout=max(0.0, deadline - time.monotonic()))
                except Timeout:
                    result.failed.append((item.module, f"another process held its lock for over {host_state.lock_timeout():.0f}s"))
                    continue
                if fetch._still_needed(item, self.target(item.module), self.version):
                    held.append(item)  # its holder failed: fetch it here, keeping the lock
                else:
                    locks[item.module].release()  # release at once: other waiters must not queue behind us
                    result.installed_by_others.append(item.module)
            if held:
                self._download_and_install(held, result, progress)
        finally:
            for item in held:
                locks[item.module].release()
        return result

    host_state.HostState.entry_lock = entry_lock
    fetch.Fetcher.execute = execute


def _uv_offline() -> None:
    """server_launcher.server_command: start the server with `uv run --offline ...` first (uv resolves from
    its cache, no index round trip: 0.03 s instead of 0.35 s here), falling back to the online command only
    when that fails (a cold uv cache)."""
    from optimum_neuron_cache import server_launcher

    original = server_launcher.server_command

    def server_command(address, environ=None):
        command = original(address, environ)
        if len(command) > 2 and command[1] == "run" and "--offline" not in command:
            command = [command[0], "run", "--offline", *command[2:]]
        return command

    server_launcher.server_command = server_command


def _installed_by_others() -> None:
    """context.hub_neuronx_cache.__enter__: entries that another process of the host installed while this one
    waited on their locks (`FetchResult.installed_by_others`) count as present before the block, like the
    ones it fetched itself. Today the exit takes them for entries compiled in the block: each waiting rank
    downloads the export records to explain "misses" it never had and asks the bucket about them (a
    paths-info), two needless requests per rank, and reports them in `run.compiled`."""
    from optimum_neuron_cache import context
    from optimum_neuron_cache.local_cache import EntryState

    original_fetch = context.fetch_model
    original_enter = context.hub_neuronx_cache.__enter__
    last: dict[str, Any] = {}

    def fetch_model(*args, **kwargs):
        result = original_fetch(*args, **kwargs)
        last["others"] = list(result.result.installed_by_others)
        return result

    def enter(self):
        last.clear()
        run = original_enter(self)
        for module in last.get("others", []):
            self._before[module] = EntryState.SUCCESS
        return run

    context.fetch_model = fetch_model
    context.hub_neuronx_cache.__enter__ = enter


EXPERIMENTS = {"lock-convoy": _lock_convoy, "uv-offline": _uv_offline, "installed-by-others": _installed_by_others}


def apply(names: tuple[str, ...] | list[str]) -> None:
    unknown = set(names) - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"unknown experiments {sorted(unknown)}; choose from {sorted(EXPERIMENTS)}")
    for name in names:
        EXPERIMENTS[name]()
    if names:
        os.environ[ENV] = ",".join(names)  # for the worker processes


def apply_from_env() -> None:
    names = [name for name in os.environ.get(ENV, "").split(",") if name]
    for name in names:
        EXPERIMENTS[name]()
