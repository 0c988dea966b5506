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

    python -m optimum_neuron_cache.integrations.parallel_compile run --model meta-llama/Llama-3.2-1B \\
        -- neuron_parallel_compile torchrun --nproc_per_node=32 train.py --max_steps 10

Run it once per host (neuron_parallel_compile starts the ranks itself). docs/integrations.md has the same
flow step by step with `neuron-cache` commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import remote_layout as layout
from ..buckets import BucketRef, embedded_default, resolve_bucket
from ..client import BucketClient
from ..context import CacheRun, hub_neuronx_cache
from ..errors import BucketNotFoundError, NeuronCacheError
from ..fetch import fetch_model
from ..local_cache import EntryState, resolve_cache_root, scan_entries
from ..neuron_sdk import resolve_compiler_version
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
    try:
        fetched = fetch_model(BucketClient(ref), root.path, version, None, layout.DEFAULT_TASK, local)
    except BucketNotFoundError as exc:
        if ref != embedded_default():
            result.warnings.append(f"todo entries not filled, bucket {ref}: {exc}")
        return result
    except (NeuronCacheError, OSError) as exc:
        result.warnings.append(f"todo entries not filled, bucket {ref}: {exc} (they are compiled here)")
        return result
    result.filled = [layout.flat_entry_prefix(version, module) for module in fetched.result.fetched]
    result.warnings.extend(f"entry {prefix}/{module} not filled: {why}" for module, why in fetched.result.failed)
    return result


@dataclass
class ParallelCompileReport:
    """The exit code of the wrapped command (never changed by the cache) and what the cache did around it."""
    returncode: int
    #: The cache run around the command: fetched (step 1), compiled, synced and record (step 3).
    run: CacheRun
    #: Step 2 with explicit phases (None otherwise: the shim filled graphs as they came).
    fill: FillResult | None = None


def run_parallel_compile(command: Sequence[str] | None = None, *, model_id: str | os.PathLike[str] | None = None,
                         task: str | None = "training", export_config: Mapping[str, Any] | None = None,
                         bucket: str | BucketRef | None = None, cache_dir: str | os.PathLike[str] | None = None,
                         compiler_version: str | None = None, shim: bool = True,
                         collect_command: Sequence[str] | None = None, compile_command: Sequence[str] | None = None,
                         env: Mapping[str, str] | None = None) -> ParallelCompileReport:
    """Run `command` (e.g. `neuron_parallel_compile torchrun ... train.py`) inside the bucket cache.

    Either `command` (one call; with `shim=True` the compiler shim does step 2 graph by graph) or both
    `collect_command` and `compile_command` (step 2 runs between them). The commands' exit code is returned
    in the report; the cache never changes it.
    """
    if (command is None) == (collect_command is None and compile_command is None):
        raise ValueError("give either command, or both collect_command and compile_command")
    if command is None and (collect_command is None or compile_command is None):
        raise ValueError("collect_command and compile_command go together")
    base_env = dict(os.environ if env is None else env)
    fill = None
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
                    child_env = {**base_env, "PATH": f"{shim_path.parent}{os.pathsep}{base_env.get('PATH', '')}",
                                 "NEURON_CACHE_BUCKET": run.bucket}
                    code = subprocess.run(list(command), env=child_env, check=False).returncode
            else:
                code = subprocess.run(list(command), env=base_env, check=False).returncode
        else:
            assert collect_command is not None and compile_command is not None
            code = subprocess.run(list(collect_command), env=base_env, check=False).returncode
            if code == 0:
                fill = fill_todo_entries(bucket=bucket, cache_dir=cache_dir, compiler_version=run.compiler_version)
                code = subprocess.run(list(compile_command), env=base_env, check=False).returncode
    return ParallelCompileReport(returncode=code, run=run, fill=fill)


def main(argv: list[str] | None = None) -> int:
    """`python -m optimum_neuron_cache.integrations.parallel_compile ...` is `neuron-cache parallel-compile ...`."""
    from ..cli import cli

    return cli.main(["parallel-compile", *(sys.argv[1:] if argv is None else argv)], prog_name="neuron-cache")


if __name__ == "__main__":
    sys.exit(main())
