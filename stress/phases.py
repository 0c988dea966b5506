"""Kill a run at each named phase, check that nothing is wrong, then check that one plain run heals everything.

Each trial: the bucket holds `seed_graphs` entries of a model (published with an export record); a child run
(stress/phase_child.py) enters `hub_neuronx_cache` on a fresh cache (fetching them), compiles `new_graphs`
new graphs in its body and exits (publishing them with its export record), and dies at the phase named in
NEURON_CACHE_CRASH_AT (crashpoints.py) or in its body. Then:

1. it died there (SIGKILL, or SIGTERM for `body:term`): a trial whose child did not reach its phase fails;
2. no hit in its cache is incomplete or differs from the reference, and no commit file in the bucket lacks
   its content;
3. one plain run of the same model, task and export config (compiling the same graphs: hits where the child
   left them) leaves the cache with every entry, the bucket with every entry in the flat and the model's
   area, an export record of the configuration listing every new graph, and nothing left in the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.host_state import HostState
from optimum_neuron_cache.journal import Journal
from optimum_neuron_cache.local_cache import FLAGS_FILES, HLO_FILES, EntryState, scan_entries
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.sync import sync_cache
from stress.scenarios import VERSION, Figures, _env, _listing, _ref, wait_until_the_server_is_idle
from optimum_neuron_cache.testing.invariants import bucket_violations, local_violations, reference_entries, reference_sizes

#: (phase, how the child dies) in the order a run meets them. `NAME@n`: the n-th time the phase is reached.
PHASES: tuple[str, ...] = (
    "journal-write@1",  # the run's record, before the body
    "download-sent@1",  # fetching the seed entries: the server is transferring
    "install@1",  # downloaded and checked, none installed
    "install@2",  # one of the seed entries installed
    "heal@1",  # a cached failure of a seed entry here, swapped for the bucket's, not yet removed
    "body:kill",  # compiled, killed in the body (SIGKILL)
    "body:term",  # compiled, stopped in the body (SIGTERM, as schedulers do)
    "journal-write@2",  # exit: the names being journaled before the first byte goes up
    "stage-sent@1",  # every byte being uploaded, nothing added to the bucket yet
    "stage-done@1",  # staged, the commit not yet sent
    "commit-sent@1",  # the server adding the content, then the commit files, manifests, record and stamp
    "commit-done@1",  # everything committed, the journal not yet settled
)
EXPORT_CONFIG = {"batch_size": 1, "sequence_length": 128}
TASK = "text-generation"


def _died_as_told(phase: str, returncode: int) -> bool:
    return returncode == -(signal.SIGTERM if phase == "body:term" else signal.SIGKILL)


def crash_at_phases(workdir: Path, bucket_for: Callable[[str], str], trials: int, phases: tuple[str, ...] = PHASES, *,
                    seed_graphs: int = 3, new_graphs: int = 3, neff_size: int = 1_500_000) -> dict[str, Figures]:
    """`trials` kills at each phase, each trial in a fresh bucket from `bucket_for(name)` (so that what a trial
    lists and checks stays the size of one trial); phase -> figures."""
    seeds = make_graphs(seed_graphs, seed="phase-seed", neff_size=neff_size)
    source = workdir / "seed-source"
    for graph in seeds:
        compile_graph(source, VERSION, graph)
    results = {}
    for index, phase in enumerate(phases):
        figures = results[phase] = Figures(f"kill at {phase}", trials=trials)
        for trial in range(trials):
            bucket = bucket_for(f"phase-{index}-{trial}")
            problem = _trial(workdir / f"{phase.replace(':', '-').replace('@', '-')}-{trial}", bucket,
                             BucketClient(_ref(bucket)), phase, trial, source, new_graphs, neff_size)
            if problem:
                figures.fail(f"trial {trial}: {problem}")
    return results


def _trial(work: Path, bucket: str, client: BucketClient, phase: str, trial: int, source: Path, new_graphs: int,
           neff_size: int) -> str | None:
    model = f"org/phase-{hashlib.sha256(f'{phase}:{trial}:{work}'.encode()).hexdigest()[:10]}"
    sync_cache(client, source, compiler_version=VERSION, model_folder=layout.model_ref(model).folder, task=TASK)
    cache = work / "cache"
    if phase.startswith("heal"):
        _cached_failure(source, cache)
    new_seed = f"new-{model}"
    spec = {"model": model, "task": TASK, "export_config": EXPORT_CONFIG, "compiler_version": VERSION,
            "bucket": bucket, "cache_dir": str(cache), "graphs": new_graphs, "seed": new_seed, "neff_size": neff_size}
    env = _env()
    if phase.startswith("body:"):
        spec["body"] = phase.split(":", 1)[1]
    else:
        env["NEURON_CACHE_CRASH_AT"] = phase
    child = subprocess.run([sys.executable, "-m", "stress.phase_child", json.dumps(spec)], env=env,
                           capture_output=True, text=True, timeout=300)
    if not _died_as_told(phase, child.returncode):
        return f"the child did not die at {phase} (exit {child.returncode}): {child.stderr.strip()[-300:]}"

    reference_cache = work / "reference"
    graphs = make_graphs(new_graphs, seed=new_seed, neff_size=neff_size)
    for graph in graphs:
        compile_graph(reference_cache, VERSION, graph)
    new_modules = {entry.name for entry in scan_entries(reference_cache, VERSION)}
    reference = {**reference_entries(source, VERSION), **reference_entries(reference_cache, VERSION)}
    sizes = {**reference_sizes(source, VERSION), **reference_sizes(reference_cache, VERSION)}
    problems = local_violations(cache, VERSION, reference) + bucket_violations(_listing(bucket), VERSION, sizes)
    if problems:
        return f"after the kill: {problems[:3]}"

    with hub_neuronx_cache(model, task=TASK, export_config=EXPORT_CONFIG, compiler_version=VERSION, bucket=bucket,
                           cache_dir=cache) as run:
        for graph in graphs:
            compile_graph(cache, VERSION, graph)
    return _healed(bucket, cache, model, new_modules, reference, sizes, run.warnings)


def _cached_failure(source: Path, cache: Path) -> None:
    """A compile of the first seed entry that failed in `cache` (its HLO and flags, and `model.log`): what the
    `heal` phase swaps for the bucket's entry."""
    first = scan_entries(source, VERSION)[0]
    failed = cache / first.key
    failed.mkdir(parents=True)
    for name in first.files:
        if name in HLO_FILES or name in FLAGS_FILES:
            shutil.copyfile(first.path / name, failed / name)
    (failed / "model.log").write_text("ERROR: neuronx-cc was killed (out of memory)\n", encoding="utf-8")


def _healed(bucket: str, cache: Path, model: str, new_modules: set[str], reference: dict, sizes: dict,
            warnings: list[str]) -> str | None:
    if warnings:
        return f"the plain run warned: {warnings}"
    states = {entry.name: entry.state for entry in scan_entries(cache, VERSION)}
    if set(states) != set(reference) or set(states.values()) != {EntryState.SUCCESS}:
        return f"the cache is not whole after the plain run: {states}"
    problems = local_violations(cache, VERSION, reference)
    listing = _listing(bucket)
    problems += bucket_violations(listing, VERSION, sizes)
    committed = {item["path"] for item in listing if item["path"].endswith("/model.done")}
    area = layout.model_area_prefix(VERSION, layout.model_ref(model).folder, TASK)
    for module in new_modules:
        for path in (layout.flat_file_path(VERSION, module, "model.done"), layout.area_file_path(area, module, "model.done")):
            if path not in committed:
                problems.append(f"{path} is not in the bucket")
    clear_lookup_cache()
    records = [r for r in lookup_cache(model, TASK, compiler_version=VERSION, bucket=bucket) if r.export_config == EXPORT_CONFIG]
    if len(records) != 1 or not new_modules <= set(records[0].modules):
        problems.append(f"the export record lists {[sorted(r.modules) for r in records]}, not the {len(new_modules)} new graphs")
    journal = Journal(cache)
    left = sorted(os.listdir(journal.folder)) if journal.folder.is_dir() else []
    if left:
        problems.append(f"journal files left: {left}")
    wait_until_the_server_is_idle()  # a dead client's download may still be running: the server removes it
    tmp = cache / ".optimum-neuron-cache" / "tmp"
    stale = [path.name for path in tmp.iterdir() if HostState.is_stale_temp_dir(path)] if tmp.is_dir() else []
    if stale:
        problems.append(f"temp folders of dead processes left: {stale}")
    return "; ".join(problems[:4]) or None
