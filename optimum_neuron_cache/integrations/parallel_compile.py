"""`neuron_parallel_compile` with the bucket cache: fetch before, hits during, publish after.

`neuron_parallel_compile <train command>` (its default mode, `--command collect-and-compile`) runs a short
trial of the training script with NEURON_EXTRACT_GRAPHS_ONLY=1, which only *collects* the graphs (leaving
*todo* entries: HLO and flags, no NEFF), then compiles them in parallel into the local cache. Its
`--command collect` and `--command compile` run the two phases apart (`compile` compiles every todo entry
of the cache). The cache joins in three places:

1. **Before collection**: the model's entries are fetched (`hub_neuronx_cache` enter). Graphs already in
   the bucket for this model are then complete locally, and are not collected as todo entries.
2. **Between collection and compilation**: todo entries are filled from the bucket's flat area, so graphs
   compiled for *other* models are not compiled again either. With one `collect-and-compile` call the two
   phases are not separable from outside, so the compiler shim (compiler_shim.py) does it instead: it is
   put first on PATH for the command, and looks each graph up in the flat area before compiling it. With
   the phases apart (`collect_command=` and `compile_command=`, e.g. `neuron_parallel_compile --command
   collect ...` and `neuron_parallel_compile --command compile`), `fill_todo_entries` runs between them.
3. **After the parallel compile**: the entries that became complete are published, to the flat area and the
   model's area, with an export record (`hub_neuronx_cache` exit).

With the phases apart, N hosts holding the same collected graphs also split the compile between them through
compile leases (`compile_with_leases`, compile_leases.py): round after round, each host takes the leases of a
few graphs nobody holds, compiles just those (the compile command runs on a *view*: a temporary cache holding
only them), installs and publishes them, and drops the leases; graphs other hosts hold are fetched once their
entries land. Every host ends with every entry; the compile's wall time divides by the number of hosts, up to
the number of graphs.

    python -m optimum_neuron_cache.integrations.parallel_compile run --model meta-llama/Llama-3.2-1B \\
        -- neuron_parallel_compile torchrun --nproc_per_node=32 train.py --max_steps 10

Run it once per host (neuron_parallel_compile starts the ranks itself). docs/integrations.md has the same
flow step by step with `neuron-cache` commands.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import remote_layout as layout
from ..buckets import BucketRef, embedded_default, resolve_bucket
from .. import settings
from ..client import BucketClient
from ..compile_leases import (Action, Decision, LeaseKeeper, LeaseSettings, LeaseTally, Watch, decide, observe, probe,
                              refresh_holder)
from ..context import CacheRun, hub_neuronx_cache
from ..errors import BucketNotFoundError, NeuronCacheError
from ..fetch import fetch_model
from ..host_state import HostState
from ..journal import JournalKey
from ..local_cache import (LOG, EntryState, LocalEntry, read_entry, resolve_cache_root, scan_entries, split_flags,
                           version_dir_name)
from ..neuron_sdk import resolve_compiler_version
from ..publish import publish_leftovers
from .compiler_shim import install_compiler_shim


@dataclass
class FillResult:
    """What `fill_todo_entries` did."""

    #: Todo entries found locally, and those completed from the flat area (`neuronxcc-<ver>/MODULE_...`).
    todo: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fill_todo_entries(*, bucket: str | BucketRef | None = None, cache_dir: str | os.PathLike[str] | None = None,
                      compiler_version: str | None = None) -> FillResult:
    """Complete the local todo entries (collected, not compiled) whose graphs the bucket's flat area holds.

    One paths-info and one download, whatever the number of entries; each entry gets its missing files
    hard-linked in, commit file last, only if it is still a todo entry. Best effort: a remote failure is
    one warning in the result, never an exception. Bad input (bucket name, version) raises.
    """
    ref = resolve_bucket(bucket)
    version = resolve_compiler_version(compiler_version)
    root = resolve_cache_root(cache_dir)
    result = FillResult()
    if root.path is None:
        result.warnings.append(f"bucket sync is off: {root.disabled_reason}")
        return result
    local = {entry.name: entry for entry in scan_entries(root.path, version)}
    prefix = layout.version_prefix(version)
    result.todo = [layout.flat_entry_prefix(version, name) for name, entry in sorted(local.items()) if entry.state is EntryState.TODO]
    if not result.todo:
        return result
    fetched = None
    try:
        fetched = fetch_model(BucketClient(ref), root.path, version, None, layout.DEFAULT_TASK, local)
    except BucketNotFoundError as exc:
        if ref != embedded_default():
            result.warnings.append(f"todo entries not filled, bucket {ref}: {exc}")
    except (NeuronCacheError, OSError) as exc:
        result.warnings.append(f"todo entries not filled, bucket {ref}: {exc} (they are compiled here)")
    if fetched is not None:
        result.filled = [layout.flat_entry_prefix(version, module) for module in fetched.result.fetched]
        result.warnings.extend(f"entry {prefix}/{module} not filled: {why}" for module, why in fetched.result.failed)
    _fill_from_upstreams(result, ref, root.path, version)
    return result


def _fill_from_upstreams(result: FillResult, ref: BucketRef, root: Path, version: str) -> None:
    """What the bucket lacked, from the read-only upstreams; what they gave is published to the bucket."""
    from ..upstreams import fill_and_publish

    fill = fill_and_publish(root, version, ref)
    result.filled += [layout.flat_entry_prefix(version, module) for module in fill.filled]
    result.warnings += fill.warnings


# ------------------------------------------------------------------------------- compile leases


@dataclass
class LeaseReport:
    """What the compile split across hosts did: the lease figures, the rounds, and every decision with its
    reason (what a user reads to know why a graph was compiled here or not)."""

    tally: LeaseTally = field(default_factory=LeaseTally)
    rounds: int = 0
    decisions: list[Decision] = field(default_factory=list)
    #: Entry keys (`neuronxcc-<ver>/MODULE_...`) fetched from the bucket instead of compiled here.
    fetched: list[str] = field(default_factory=list)
    #: One line each: why leases stopped (the bucket failed), entries that could not be installed.
    warnings: list[str] = field(default_factory=list)


def _without_cache_dir(flags: str) -> str:
    """NEURON_CC_FLAGS without `--cache_dir` (which beats NEURON_COMPILE_CACHE_URL): the view's compile must
    use the view."""
    tokens = split_flags(flags)
    kept: list[str] = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
        elif token == "--cache_dir":
            skip = True
        elif not token.startswith("--cache_dir="):
            kept.append(token)
    return shlex.join(kept)


def _link_or_copy(source: Path, target: Path) -> None:
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _install_from_view(view_entry: Path, target: Path, version: str) -> EntryState:
    """Bring what the view's compile produced into the real todo entry: a success's new files with the commit
    file last, or a failure's log; only while the entry is still todo (never over anything else)."""
    made = read_entry(view_entry, version)
    entry = read_entry(target, version)
    if entry.state is not EntryState.TODO:
        return entry.state
    if made.state.publishable:
        commit = layout.commit_file(made.files, version)
        new = sorted((name for name in made.files if name not in entry.files and not name.endswith(".lock")),
                     key=lambda name: name == commit)
        for name in new:
            _link_or_copy(view_entry / name, target / name)
    elif made.state is EntryState.FAILED:
        _link_or_copy(view_entry / LOG, target / LOG)
    return read_entry(target, version).state


def compile_in_view(command: Sequence[str], root: Path, version: str, entries: Sequence[LocalEntry],
                    env: Mapping[str, str]) -> dict[str, EntryState]:
    """Run `command` (e.g. `neuron_parallel_compile --command compile`) on a temporary cache holding only
    `entries` (their HLO and flags, hard-linked), then install what it made into the real cache. The
    compile cannot touch the other todo entries, so each host compiles just the graphs it holds leases
    on. The shim is off inside: the lookups are done. Returns module -> its state after."""
    states: dict[str, EntryState] = {}
    with HostState(root).temp_dir() as tmp:
        folder = tmp / "view" / version_dir_name(version)
        for entry in entries:
            (folder / entry.name).mkdir(parents=True)
            for name in entry.files:
                if not name.endswith(".lock"):
                    _link_or_copy(entry.path / name, folder / entry.name / name)
        child = {**env, "NEURON_COMPILE_CACHE_URL": str(tmp / "view"), settings.SHIM: "0",
                 "NEURON_CC_FLAGS": _without_cache_dir(env.get("NEURON_CC_FLAGS", ""))}
        subprocess.run(list(command), env=child, check=False)
        for entry in entries:
            states[entry.name] = _install_from_view(folder / entry.name, entry.path, version)
    return states


def compile_with_leases(compile_command: Sequence[str], *, root: Path, version: str, client: BucketClient,
                        env: Mapping[str, str], lease_settings: LeaseSettings, batch: int = 4,
                        say: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                        stop: threading.Event | None = None) -> LeaseReport:
    """Compile the local todo entries together with the other hosts that collected the same graphs: each
    round plans every todo graph (fetch / take / wait / take over / compile, with reasons), fetches what the
    bucket has, takes up to `batch` free leases, compiles those graphs in a view, installs and publishes
    them, then drops the leases; with nothing to take it waits `poll` seconds for the others' entries. A
    remote failure ends the leases with one warning: what is left stays todo, for the caller's compile.
    Graphs are taken in an order of this host's own, so that hosts starting together rarely race for one."""
    report = LeaseReport()
    stop = stop or threading.Event()
    keeper = LeaseKeeper(client, version, lease_settings)
    order = random.Random(keeper.holder.token)
    watches: dict[str, Watch] = {}
    since: dict[str, float] = {}  # when this host first saw each graph's lease: the max wait counts from then
    idle = 0.0  # seconds this run spent only waiting on other hosts: the max wait bounds them too, all graphs together
    waited: set[str] = set()
    key = JournalKey(str(client.bucket), version, None, layout.DEFAULT_TASK)
    with keeper:
        while True:
            todo = {entry.name: entry for entry in scan_entries(root, version) if entry.state is EntryState.TODO}
            if not todo:
                break
            report.rounds += 1
            try:
                found = probe(client, version, sorted(todo))
                now = clock()
                decisions = []
                for module in sorted(todo):
                    watch = observe(watches, found[module], now)
                    refresh_holder(keeper, module, watch)
                    if watch is not None:
                        since.setdefault(module, now)
                    first = min(since.get(module, now), now - idle)
                    decisions.append(decide(found[module], watch, now, lease_settings, since=first))
                report.decisions.extend(decisions)
                fetchable = [d.module for d in decisions if d.action is Action.FETCH]
                if fetchable:
                    fetched = fetch_model(client, root, version, None, layout.DEFAULT_TASK, todo).result
                    report.fetched += [layout.flat_entry_prefix(version, module) for module in fetched.fetched]
                    report.tally.fetched_after_wait += len(set(fetched.fetched) & waited)
                    report.warnings.extend(f"{module} not filled: {why}" for module, why in fetched.failed)
                    if fetched.failed or not fetched.fetched:
                        # The bucket's copy is bad, or could not be installed: the caller compiles what is left.
                        report.warnings.extend(f"{module} not installed: {why}" for module, why in fetched.skipped)
                        break
                    continue
                free = [d for d in decisions if d.action in (Action.TAKE, Action.TAKEOVER)]
                order.shuffle(free)
                mine: list[str] = []
                for decision in free:
                    if len(mine) >= batch:
                        break
                    taken = (keeper.take(decision.module) if decision.action is Action.TAKE
                             else keeper.take_over(decision.module, found[decision.module].lease))
                    if taken:
                        mine.append(decision.module)
                        report.tally.taken_over += decision.action is Action.TAKEOVER
                        if say and decision.action is Action.TAKEOVER:
                            say(f"{decision.module}: {decision.reason}; taken over")
                    else:
                        watches.pop(decision.module, None)
                unleased = [d.module for d in decisions if d.action is Action.COMPILE][: max(0, batch - len(mine))]
                for module in unleased:
                    if say:
                        say(next(f"{d.module}: {d.reason}" for d in decisions if d.module == module))
                waiting = [d.module for d in decisions if d.action is Action.WAIT]
                if not mine and not unleased:
                    if waiting and say and not waited.issuperset(waiting):
                        say(f"waiting for {len(waiting)} graph(s) other hosts are compiling")
                    waited.update(waiting)
                    before = clock()
                    stop.wait(lease_settings.poll)  # others hold the graphs, or won every take: look again later
                    idle += max(0.0, clock() - before)
                    continue
            except (NeuronCacheError, OSError) as exc:
                report.warnings.append(f"compile leases stopped, bucket {client.bucket}: {exc} (what is left is compiled here)")
                break
            states = compile_in_view(compile_command, root, version, [todo[m] for m in mine + unleased], env)
            complete = [read_entry(todo[m].path, version) for m in mine + unleased if states[m].publishable]
            present: set[str] = set()
            try:
                if complete:
                    publication = publish_leftovers(client, root, key, area=None, with_entries=complete)
                    if publication is not None:
                        present = set(publication.plan.present)
            except (NeuronCacheError, OSError) as exc:
                report.warnings.append(f"publication skipped, bucket {client.bucket}: {exc} (journaled for the next run)")
            for module in mine:
                report.tally.compiled_here += 1
                try:
                    released = keeper.release(module)
                except (NeuronCacheError, OSError):
                    released = True
                if not released or module in present:
                    report.tally.compiled_twice += 1
            for module in unleased:
                report.tally.compiled_without_lease += 1
                report.tally.compiled_twice += module in present
    return report


@dataclass
class ParallelCompileReport:
    """The exit code of the wrapped command (never changed by the cache) and what the cache did around it."""
    returncode: int
    #: The cache run around the command: fetched (step 1), compiled, synced and record (step 3).
    run: CacheRun
    #: Step 2 with explicit phases (None otherwise: the shim filled graphs as they came).
    fill: FillResult | None = None
    #: The compile split across hosts through leases (phases apart, leases on), else None.
    leases: LeaseReport | None = None
    #: Entry keys of `run.compiled` that the command did not compile: served by the bucket or an upstream while
    #: it ran (the compiler shim's hits, todo entries filled, graphs fetched after another host's lease).
    served: list[str] = field(default_factory=list)

    @property
    def compiled(self) -> list[str]:
        """Entry keys that became complete during the command and were compiled, not served."""
        served = set(self.served)
        return [key for key in self.run.compiled if key not in served]


def run_parallel_compile(command: Sequence[str] | None = None, *, model_id: str | os.PathLike[str] | None = None,
                         task: str | None = "training", export_config: Mapping[str, Any] | None = None,
                         bucket: str | BucketRef | None = None, cache_dir: str | os.PathLike[str] | None = None,
                         compiler_version: str | None = None, shim: bool = True,
                         collect_command: Sequence[str] | None = None, compile_command: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None, leases: bool | None = None,
                         lease_batch: int = 4) -> ParallelCompileReport:
    """Run `command` (e.g. `neuron_parallel_compile torchrun ... train.py`) inside the bucket cache.

    Either `command` (one call; with `shim=True` the compiler shim does step 2 graph by graph) or both
    `collect_command` and `compile_command` (step 2 runs between them; then, with `leases` (default:
    NEURON_CACHE_LEASES), the compile is split with the other hosts through compile leases, `lease_batch`
    graphs per round, and `compile_command` runs last on the real cache for whatever is left). The commands'
    exit code is returned in the report; the cache never changes it.
    """
    if (command is None) == (collect_command is None and compile_command is None):
        raise ValueError("give either command, or both collect_command and compile_command")
    if command is None and (collect_command is None or compile_command is None):
        raise ValueError("collect_command and compile_command go together")
    base_env = dict(os.environ if env is None else env)
    use_leases = settings.leases_enabled(base_env) if leases is None else leases
    lease_settings = LeaseSettings.from_env(base_env)
    fill = lease_report = None
    served: set[str] = set()
    with hub_neuronx_cache(model_id, task, export_config, compiler_version=compiler_version, bucket=bucket,
                           cache_dir=cache_dir) as run:
        # The command (libneuronxla, the shim) must use the cache dir, bucket and compiler this run uses.
        if cache_dir is not None and run.cache_dir is not None:
            base_env["NEURON_COMPILE_CACHE_URL"] = str(run.cache_dir)
        base_env.setdefault("NEURON_CC_VERSION", run.compiler_version)
        if command is not None:
            if shim and run.enabled:
                with tempfile.TemporaryDirectory(prefix="neuron-cache-shim-") as folder:
                    shim_path = install_compiler_shim(folder)
                    report_path = Path(folder) / "served"
                    child_env = {**base_env, "PATH": f"{shim_path.parent}{os.pathsep}{base_env.get('PATH', '')}",
                                 "NEURON_CACHE_BUCKET": run.bucket, settings.SHIM_REPORT: str(report_path)}
                    code = subprocess.run(list(command), env=child_env, check=False).returncode
                    served.update(_served_by_shim(report_path, run.compiler_version))
            else:
                code = subprocess.run(list(command), env=base_env, check=False).returncode
        else:
            assert collect_command is not None and compile_command is not None
            code = subprocess.run(list(collect_command), env=base_env, check=False).returncode
            if code == 0:
                fill = fill_todo_entries(bucket=bucket, cache_dir=cache_dir, compiler_version=run.compiler_version)
                served.update(fill.filled)
                if use_leases and run.enabled and run.cache_dir is not None:
                    lease_report = _compile_with_leases_here(compile_command, run, base_env, lease_settings, lease_batch)
                    served.update(lease_report.fetched if lease_report else ())
                code = subprocess.run(list(compile_command), env=base_env, check=False).returncode
    return ParallelCompileReport(returncode=code, run=run, fill=fill, leases=lease_report,
                                 served=[key for key in run.compiled if key in served])


def _served_by_shim(report: Path, version: str) -> set[str]:
    """The entry keys the compiler shim noted as served without a compile (settings.SHIM_REPORT); only those
    that became complete count (the caller keeps `run.compiled`'s), so whatever else the file holds is ignored."""
    try:
        with open(report, "rb") as lines:
            text = lines.read(1 << 24).decode("utf-8", "replace")
    except FileNotFoundError:
        return set()
    except OSError as exc:
        _say(f"what the compiler shim served is unknown ({exc}): counted as compiled")
        return set()
    return {layout.flat_entry_prefix(version, line.strip()) for line in text.splitlines() if line.strip()}


def split_phases(command: Sequence[str]) -> tuple[list[str], list[str]]:
    """`neuron_parallel_compile [--opt=value ...] <training command>` as its two modes run apart: `--command
    collect` with everything, and `--command compile` with the leading `--opt=value` options. Raises
    ValueError (one line) for a command that is not such a call."""
    command = list(command)
    if not command or os.path.basename(command[0]) != "neuron_parallel_compile":
        raise ValueError(f"--phases runs a neuron_parallel_compile call; got {shlex.join(command)!r}")
    if any(token == "--command" or token.startswith("--command=") for token in command[1:]):
        raise ValueError("--phases chooses the modes itself (collect, then compile): drop --command from COMMAND")
    options = []
    for token in command[1:]:
        if not (token.startswith("--") and "=" in token):
            break
        options.append(token)
    return [command[0], "--command", "collect", *command[1:]], [command[0], "--command", "compile", *options]


def _say(line: str) -> None:
    print(f"optimum-neuron-cache: {line}", file=sys.stderr, flush=True)


def _compile_with_leases_here(compile_command: Sequence[str], run: CacheRun, env: Mapping[str, str],
                              lease_settings: LeaseSettings, batch: int) -> LeaseReport | None:
    """`compile_with_leases` for a run, best effort: a failure is one line, and the caller's compile does the rest."""
    from ..buckets import parse_bucket
    from ..stats import Stats, record_run

    try:
        client = BucketClient(parse_bucket(run.bucket), env)
        report = compile_with_leases(compile_command, root=Path(str(run.cache_dir)), version=run.compiler_version,
                                     client=client, env=env, lease_settings=lease_settings, batch=batch, say=_say)
    except (NeuronCacheError, OSError) as exc:
        _say(f"compile leases skipped: {exc} (compiling here)")
        return None
    for warning in report.warnings:
        _say(warning)
    tally = report.tally
    record_run(Stats(lease_compiled=tally.compiled_here, lease_fetched_after_wait=tally.fetched_after_wait,
                     lease_compiled_twice=tally.compiled_twice))
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m optimum_neuron_cache.integrations.parallel_compile ...` is `neuron-cache parallel-compile ...`."""
    from ..cli import cli

    return cli.main(["parallel-compile", *(sys.argv[1:] if argv is None else argv)], prog_name="neuron-cache")


if __name__ == "__main__":
    sys.exit(main())
