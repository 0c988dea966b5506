"""Stand-ins for the Neuron SDK's executables, for tests, examples and demos (no SDK, no hardware).

- `compiler_main`: a `neuronx-cc` command line. `neuronx-cc compile --framework=XLA <in>.hlo_module.pb
  --output <out>.neff [flags] [--verbose=35]` writes a NEFF that depends only on the HLO and the flags
  (the same bytes `simulated_compiler` writes for the same graph); `neuronx-cc --version` prints the
  version. `install_simulated_compiler(dir)` puts it on disk as an executable named `neuronx-cc`.
- `jit_compile`: what libneuronxla's `neuron_cc_wrapper` does for one graph: a hit when the entry has
  `model.done`; else take the lock, write HLO and flags into the entry, call `neuronx-cc` through PATH on
  `model.MODULE_<key>+<hash>.hlo_module.pb` in a work dir, copy the NEFF in, write `model.done`, drop the
  lock (a failure leaves `model.log`). With NEURON_EXTRACT_GRAPHS_ONLY=1 it only writes HLO and flags.
- `parallel_compile_main`: a `neuron_parallel_compile` command line with the real tool's modes (`--command
  collect|compile|collect-and-compile|clean|clear-locks|clear-neffs|scan|scan-with-failed`; `analyze` is not
  simulated), and `--num_parallel`.
- `train_main`: a "training script" that JIT-compiles the graphs of a model through `jit_compile`.

Knobs for tests (environment): SIMULATED_NEURONX_CC_LOG (a file: one line per real compile),
SIMULATED_NEURONX_CC_FAIL (1: every compile fails; else fail inputs whose name contains it),
SIMULATED_NEURONX_CC_SECONDS (compile time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write
from ..local_cache import DONE, LOG, NEFF, EntryState, read_entry, resolve_cache_root, scan_entries, version_dir_name
from ..neuron_sdk import ENV_COMPILER_VERSION, resolve_compiler_version, writes_done_marker
from .simulated_compiler import Graph, _neff_bytes, flags_file, hlo_file_name, make_graphs, module_name

DEFAULT_VERSION = "2.21.33363.0+82129205"
ENV_LOG = "SIMULATED_NEURONX_CC_LOG"
ENV_FAIL = "SIMULATED_NEURONX_CC_FAIL"
ENV_SECONDS = "SIMULATED_NEURONX_CC_SECONDS"
ENV_EXTRACT_ONLY = "NEURON_EXTRACT_GRAPHS_ONLY"


# ------------------------------------------------------------------------------------- neuronx-cc


def _compile_flags(argv: list[str]) -> tuple[str | None, str | None, str | None, list[str]]:
    """(framework, input, output, compile flags) of a `neuronx-cc compile` command line."""
    framework = source = output = None
    flags: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "compile":
            continue
        if token == "--output":
            output = next(tokens, None)
        elif token.startswith("--output="):
            output = token.split("=", 1)[1]
        elif token == "--framework":
            framework = next(tokens, None)
        elif token.startswith("--framework="):
            framework = token.split("=", 1)[1]
        elif token.startswith("--verbose"):
            continue
        elif token.startswith("-"):
            flags.append(token)
        elif source is None:
            source = token
    return framework, source, output, flags


def compiler_main(argv: list[str] | None = None) -> int:
    """The simulated `neuronx-cc` command: `compile --framework=XLA <hlo> --output <neff>` and `--version`."""
    argv = sys.argv[1:] if argv is None else argv
    if "--version" in argv:
        print(f"NeuronX Compiler version {os.environ.get(ENV_COMPILER_VERSION) or DEFAULT_VERSION}\n\nPython version {sys.version.split()[0]}")
        return 0
    if "compile" not in argv:
        print("usage: neuronx-cc compile --framework XLA <model> --output <neff> [options]", file=sys.stderr)
        return 2
    framework, source, output, flags = _compile_flags(argv)
    if framework != "XLA" or not source or not output:
        print(f"neuronx-cc: error: expected --framework XLA, an input and --output (got {argv})", file=sys.stderr)
        return 2
    try:
        hlo = Path(source).read_bytes()
    except OSError as exc:
        print(f"neuronx-cc: error: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    if os.environ.get(ENV_LOG):
        with open(os.environ[ENV_LOG], "a", encoding="utf-8") as handle:
            handle.write(f"{Path(source).name}\n")
    if os.environ.get(ENV_SECONDS):
        time.sleep(float(os.environ[ENV_SECONDS]))
    fail = os.environ.get(ENV_FAIL, "")
    if fail and (fail == "1" or fail in Path(source).name):
        print(f"ERROR 70: simulated compiler failure on {Path(source).name}", file=sys.stderr)
        print("Compiler status ERROR")
        return 70
    Path(output).write_bytes(_neff_bytes(Graph(hlo=hlo, flags=tuple(flags))))
    print("Compiler status PASS")
    return 0


def write_launcher(path: Path, module: str, function: str, python: str | None = None) -> Path:
    """An executable script at `path` running `module.function()` with this interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, f"#!{python or sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n",
                 mode=0o755)
    return path


def install_simulated_compiler(directory: str | os.PathLike[str], name: str = "neuronx-cc") -> Path:
    """Put the simulated compiler in `directory` as an executable named `neuronx-cc`."""
    return write_launcher(Path(directory) / name, __name__, "compiler_main")


def install_simulated_parallel_compile(directory: str | os.PathLike[str], name: str = "neuron_parallel_compile") -> Path:
    """Write a simulated `neuron_parallel_compile` into `directory`; returns its path."""
    return write_launcher(Path(directory) / name, __name__, "parallel_compile_main")


# ----------------------------------------------------------------------------- libneuronxla's wrapper


class SimulatedCompileError(RuntimeError):
    """The compiler failed (the entry now holds model.log), or a cached failure was replayed."""


@dataclass(frozen=True)
class JitResult:
    """What one simulated JIT compile through libneuronxla's protocol did."""
    module: str
    path: Path
    #: True when the entry was complete already (libneuronxla's "Using a cached neff").
    hit: bool
    #: False with NEURON_EXTRACT_GRAPHS_ONLY=1: HLO and flags only.
    compiled: bool


def jit_compile(root: str | os.PathLike[str], version: str, graph: Graph, *, compiler: str = "neuronx-cc",
                env: dict[str, str] | None = None) -> JitResult:
    """Compile one graph into the cache at `root` as libneuronxla does, calling `compiler` through PATH."""
    env = dict(os.environ if env is None else env)
    module = module_name(version, graph)
    path = Path(root) / version_dir_name(version) / module
    hlo_name = hlo_file_name(version)
    entry = read_entry(path, version)
    if entry.state.publishable:
        return JitResult(module, path, hit=True, compiled=False)
    if entry.state is EntryState.FAILED:
        raise SimulatedCompileError(f"cached failed compilation at {path}")
    path.mkdir(parents=True, exist_ok=True)
    lock = path / f"{hlo_name}.lock"
    lock.write_bytes(b"")
    try:
        flags_name, flags_bytes = flags_file(version, graph.flags)
        if not (path / hlo_name).exists():
            (path / hlo_name).write_bytes(graph.hlo)
            (path / flags_name).write_bytes(flags_bytes)
        if env.get(ENV_EXTRACT_ONLY) == "1":
            return JitResult(module, path, hit=False, compiled=False)
        with tempfile.TemporaryDirectory(prefix="neuroncc_compile_workdir-") as workdir:
            suffix = "hlo.pb" if hlo_name == "model.hlo.pb" else "hlo_module.pb"
            source = Path(workdir) / f"model.{module}.{suffix}"
            output = Path(workdir) / f"model.{module}.neff"
            source.write_bytes(graph.hlo)
            command = [compiler, "compile", "--framework=XLA", str(source), "--output", str(output), *graph.flags, "--verbose=35"]
            returncode, stderr = _run_compiler(command, env)
            if returncode != 0 or not output.is_file():
                (path / LOG).write_text(f"compiler exited {returncode}\n{stderr}", encoding="utf-8")
                raise SimulatedCompileError(f"compilation failed for {module} (exit {returncode}): {stderr.strip()}")
            shutil.copyfile(output, path / NEFF)
        if writes_done_marker(version):
            (path / DONE).write_bytes(b"")
        return JitResult(module, path, hit=False, compiled=True)
    finally:
        lock.unlink(missing_ok=True)


def _run_compiler(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the compiler; its stderr is passed on line by line as it comes (what the shim says while it waits
    on another host is seen at once) and kept for model.log. Its stdout is kept quiet."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    assert process.stderr is not None
    for line in process.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        lines.append(line)
    return process.wait(), "".join(lines)


def _env_root_and_version() -> tuple[Path, str]:
    root = resolve_cache_root()
    if root.path is None:
        raise SystemExit(f"simulated libneuronxla: {root.disabled_reason}")
    return root.path, resolve_compiler_version(None)


def train_main(argv: list[str] | None = None) -> int:
    """A training script's compiles: `--seed S --graphs N` (the graphs of `make_graphs(N, seed=S)`)."""
    parser = argparse.ArgumentParser(description="simulated training run: JIT-compiles a model's graphs")
    parser.add_argument("--seed", action="append", required=True, help="graph seed (repeatable: seed:count)")
    args = parser.parse_args(argv)
    root, version = _env_root_and_version()
    failed = 0
    for spec in args.seed:
        seed, _, count = spec.partition(":")
        for graph in make_graphs(int(count or 2), seed=seed):
            try:
                result = jit_compile(root, version, graph)
            except SimulatedCompileError as exc:
                print(f"FAILED {exc}", file=sys.stderr)
                failed += 1
                continue
            if not result.hit and not result.compiled:  # libneuronxla's line, which neuron_parallel_compile reads
                print(EXTRACTED_LINE.format(path=result.path / hlo_file_name(version)))
            else:
                print(("HIT " if result.hit else "COMPILED ") + result.module)
    return 1 if failed else 0


#: `neuron_parallel_compile --command` choices, as torch-neuronx's argparse lists them (docs/integrations.md).
PARALLEL_COMPILE_COMMANDS = ("collect-and-compile", "collect", "clear-locks", "clear-neffs", "compile", "clean",
                             "scan", "scan-with-failed", "analyze")
#: What libneuronxla's wrapper logs for each graph it extracts; `collect-and-compile` compiles the graphs these
#: lines name (the real tool reads them from its trial run's log).
EXTRACTED_LINE = "Extracting graphs ({path}) for ahead-of-time parallel compilation. No compilation was done."
_EXTRACTED_RE = re.compile(r"Extracting graphs \((.+?)\) for ahead-of-time")


@dataclass
class _ParallelArgs:
    command: str = "collect-and-compile"
    num_parallel: int = 2
    rest: list[str] = field(default_factory=list)


def _parallel_args(argv: list[str]) -> _ParallelArgs | str:
    """The stand-in's options (`--command X`, `--num_parallel N`) before the training command; or why not."""
    args = _ParallelArgs()
    tokens = list(argv)
    while tokens and tokens[0].startswith("--"):
        name, _, value = tokens.pop(0).partition("=")
        if name not in ("--command", "--num_parallel"):
            tokens.insert(0, f"{name}={value}" if value else name)
            break
        if not value:
            if not tokens:
                return f"{name} needs a value"
            value = tokens.pop(0)
        if name == "--command":
            if value not in PARALLEL_COMPILE_COMMANDS:
                return f"argument --command: invalid choice: {value!r} (choose from {', '.join(PARALLEL_COMPILE_COMMANDS)})"
            args.command = value
        else:
            if not value.isdecimal() or int(value) < 1:
                return f"argument --num_parallel: {value!r} is not a whole number >= 1"
            args.num_parallel = int(value)
    args.rest = tokens
    return args


def _collect(command: list[str]) -> tuple[int, list[Path]]:
    """Run the training command with NEURON_EXTRACT_GRAPHS_ONLY=1 (HLO and flags only, no compile), echoing
    its output; (exit code, the HLO paths its extraction lines name)."""
    if not command:
        print("neuron_parallel_compile: give the training command", file=sys.stderr)
        return 2, []
    process = subprocess.Popen(command, env={**os.environ, ENV_EXTRACT_ONLY: "1"}, stdout=subprocess.PIPE, text=True)
    extracted: list[Path] = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        match = _EXTRACTED_RE.search(line)
        if match:
            extracted.append(Path(match.group(1)))
    sys.stdout.flush()
    return process.wait(), extracted


def _graph_of(entry_path: Path, files: dict[str, int]) -> Graph:
    hlo = next((entry_path / name).read_bytes() for name in ("model.hlo_module.pb", "model.hlo.pb") if name in files)
    flags_path = entry_path / ("compile_flags.json" if "compile_flags.json" in files else "compile_flags.txt")
    raw = flags_path.read_text(encoding="utf-8")
    return Graph(hlo=hlo, flags=tuple(json.loads(raw)) if flags_path.suffix == ".json" else tuple(raw.split()))


def _compile_todo(root: Path, version: str, only: set[Path] | None, workers: int) -> int:
    """Compile the todo entries (all of them, or those of `only`), `workers` at a time, each through
    `jit_compile` (lock, neuronx-cc on PATH, NEFF, done). The number that failed."""
    env = {k: v for k, v in os.environ.items() if k != ENV_EXTRACT_ONLY}
    todo = [entry for entry in scan_entries(root, version)
            if entry.state is EntryState.TODO and (only is None or entry.path.resolve() in only)]

    def one(entry) -> bool:
        try:
            jit_compile(root, version, _graph_of(entry.path, entry.files), env=env)
        except SimulatedCompileError as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return False
        return True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, sorted(todo, key=lambda entry: entry.name)))
    print(f"Total graphs: {len(results)}\nTotal successful compilations: {sum(results)}\n"
          f"Total failed compilations: {len(results) - sum(results)}")
    return len(results) - sum(results)


def _scan(root: Path, version: str, with_failed: bool) -> None:
    """todo, locked, done (and failed apart, with `scan-with-failed`) HLOs of the cache, one list each."""
    groups: dict[str, list[str]] = {"todo": [], "locked": [], "done": [], "failed": []}
    for entry in scan_entries(root, version):
        state = {EntryState.TODO: "todo", EntryState.LOCKED: "locked", EntryState.FAILED: "failed"}.get(entry.state, "done")
        groups["done" if state == "failed" and not with_failed else state].append(entry.name)
    for name, items in groups.items():
        if name != "failed" or with_failed:
            print(f"{name}[{len(items)}]: {sorted(items)}")


def parallel_compile_main(argv: list[str] | None = None) -> int:
    """`neuron_parallel_compile [--command MODE] [--num_parallel N] <training command...>`, simulated.

    Modes as torch-neuronx's: `collect` runs the command with NEURON_EXTRACT_GRAPHS_ONLY=1 (todo entries: HLO
    and flags, no NEFF); `compile` compiles every todo entry of the cache, N at a time; `collect-and-compile`
    (the default) collects, then compiles the graphs this collection extracted; `clean` removes the cache
    dir; `clear-locks` removes lock files; `clear-neffs` removes NEFFs (and done markers), leaving todo
    entries; `scan` and `scan-with-failed` list todo/locked/done(/failed) entries. `analyze` checks operator
    support on hardware: not simulated (exit 2).
    """
    parsed = _parallel_args(sys.argv[1:] if argv is None else list(argv))
    if isinstance(parsed, str):
        print(f"neuron_parallel_compile: error: {parsed}", file=sys.stderr)
        return 2
    if parsed.command == "analyze":
        print("neuron_parallel_compile: --command analyze is not simulated", file=sys.stderr)
        return 2
    extracted: list[Path] | None = None
    if parsed.command in ("collect", "collect-and-compile"):
        code, extracted = _collect(parsed.rest)
        if code != 0 or parsed.command == "collect":
            return code
    root, version = _env_root_and_version()
    if parsed.command in ("compile", "collect-and-compile"):
        only = None if extracted is None else {path.parent.resolve() for path in extracted}
        return 1 if _compile_todo(root, version, only, parsed.num_parallel) else 0
    if parsed.command == "clean":
        shutil.rmtree(root, ignore_errors=True)
    elif parsed.command in ("clear-locks", "clear-neffs"):
        names = (lambda name: name.endswith(".lock")) if parsed.command == "clear-locks" else (lambda name: name in (NEFF, DONE))
        for entry in scan_entries(root, version):
            for name in entry.files:
                if names(name):
                    (entry.path / name).unlink(missing_ok=True)
    else:
        _scan(root, version, parsed.command == "scan-with-failed")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
