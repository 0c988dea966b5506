"""A stand-in for neuronx-cc behind libneuronxla: writes cache entries exactly as real ones look on disk.

The Neuron SDK is not installable here (PyPI only has placeholders), so tests, the quick start and the
benchmarks compile with this. It follows libneuronxla's protocol (2.15 and newer): a hit when `model.done`
exists, a replayed failure when `model.log` exists, else take `<hlo>.lock`, write HLO and flags, "compile",
write `model.neff`, then `model.done`, then drop the lock. Older compilers: `compile_flags.txt`, no marker,
and up to 2.12 `model.hlo.pb`. Names: `MODULE_<hlo key>+<first 8 hex of md5(flags)>`, the flags hashed as a
JSON list or as space-joined text (`flags_hash_style`): real releases do either, and not by a version boundary
(2.15.128 hashes the JSON list, optimum-neuron#698; 2.15.141 is reported hashing the text, aws-neuron-sdk#1023;
2.12 hashes the text, aws-neuron-sdk#825), so the project must never derive one from the other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..local_cache import DONE, LOG, NEFF, version_dir_name
from ..neuron_sdk import version_tuple, writes_done_marker


class CompileFailed(RuntimeError):
    """The (simulated) compiler failed, or replayed a cached failure."""


@dataclass(frozen=True)
class Graph:
    """A graph to compile: its serialized HLO and the compiler flags in force."""

    hlo: bytes
    flags: tuple[str, ...] = ()
    #: Size of the NEFF the compile produces (bytes); default: a few times the HLO.
    neff_size: int | None = None
    #: Extra NxD artifact, written when > 0.
    wrapped_neff_size: int = 0

    @property
    def hlo_key(self) -> str:
        """A decimal unsigned 64-bit key, like the torch-xla / PJRT path's."""
        return str(int.from_bytes(hashlib.sha256(self.hlo).digest()[:8], "big"))


@dataclass(frozen=True)
class CompileResult:
    """Where the entry is, whether it was a hit, how long the compile took, and its files' sizes."""
    path: Path
    hit: bool
    seconds: float = 0.0
    files: dict[str, int] = field(default_factory=dict)


def hlo_file_name(version: str) -> str:
    """The HLO file of an entry: `model.hlo.pb` up to compiler 2.12, `model.hlo_module.pb` after."""
    return "model.hlo.pb" if version_tuple(version)[:2] <= (2, 12) else "model.hlo_module.pb"


#: How the flags half of a MODULE name is hashed: "json" (the JSON list), "text" (space-joined), or None
#: (the bytes of the flags file the version writes: JSON from 2.15, text before).
FLAGS_HASH_STYLES = ("json", "text")


def flags_file(version: str, flags: tuple[str, ...]) -> tuple[str, bytes]:
    """The flags file of an entry and its bytes: `compile_flags.json` (a JSON list) from 2.15, `compile_flags.txt`
    (space-joined) before."""
    if writes_done_marker(version):
        return "compile_flags.json", json.dumps(list(flags)).encode()
    return "compile_flags.txt", " ".join(flags).encode()


def flags_hash(version: str, flags: tuple[str, ...], style: str | None = None) -> str:
    """The flags half of a MODULE name: first 8 hex of md5 of the flags as `style` serializes them."""
    if style is None:
        data = flags_file(version, flags)[1]
    elif style == "json":
        data = json.dumps(list(flags)).encode()
    elif style == "text":
        data = " ".join(flags).encode()
    else:
        raise ValueError(f"flags_hash_style {style!r} is not one of {FLAGS_HASH_STYLES} (or None)")
    return hashlib.md5(data).hexdigest()[:8]


def module_name(version: str, graph: Graph, flags_hash_style: str | None = None) -> str:
    """`MODULE_<hlo key>+<flags hash>`, as the entry's folder is named."""
    return f"MODULE_{graph.hlo_key}+{flags_hash(version, graph.flags, flags_hash_style)}"


def _neff_bytes(graph: Graph) -> bytes:
    """Deterministic for a graph and its flags: two hosts compiling the same graph get the same NEFF."""
    size = graph.neff_size if graph.neff_size is not None else max(1024, 3 * len(graph.hlo))
    seed = hashlib.sha256(graph.hlo + b"\0" + "\0".join(graph.flags).encode()).digest()
    return b"NEFF" + random.Random(seed).randbytes(max(0, size - 4))


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def entry_path(root: Path, version: str, graph: Graph, flags_hash_style: str | None = None) -> Path:
    """The entry folder a compile of `graph` writes under `root`."""
    return Path(root) / version_dir_name(version) / module_name(version, graph, flags_hash_style)


def compile_graph(root: str | os.PathLike[str], version: str, graph: Graph, *, outcome: str = "success",
                  seconds: float = 0.0, flags_hash_style: str | None = None) -> CompileResult:
    """Compile `graph` into the cache at `root`, as libneuronxla + neuronx-cc would.

    outcome: "success"; "failed" (leaves a cached failure); "failed_neff" (a failure old compilers cached as a
    NEFF alone, no log); "crash" (killed mid-compile: a stale lock, no
    NEFF); "todo" (collection only, as `neuron_parallel_compile --command collect`). `seconds` simulates
    the compile's duration (the lock is held meanwhile). `flags_hash_style`: "json" or "text" names the
    entry by that hash of the flags, whatever the version (None: the bytes of the version's flags file).
    """
    started = time.monotonic()
    path = entry_path(Path(root), version, graph, flags_hash_style)
    hlo_name = hlo_file_name(version)
    lock = path / f"{hlo_name}.lock"
    files_now = set(os.listdir(path)) if path.is_dir() else set()
    if DONE in files_now or (not writes_done_marker(version) and NEFF in files_now and LOG not in files_now and not lock.exists()):
        return CompileResult(path, hit=True, files=_sizes(path))
    if LOG in files_now:
        raise CompileFailed(f"cached failed compilation at {path} (use --retry_failed_compilation)")
    path.mkdir(parents=True, exist_ok=True)
    _write(lock, b"")
    flags_name, flags_bytes = flags_file(version, graph.flags)
    _write(path / hlo_name, graph.hlo)
    _write(path / flags_name, flags_bytes)
    if outcome == "todo":
        lock.unlink()
        return CompileResult(path, hit=False, files=_sizes(path))
    if seconds:
        time.sleep(seconds)
    if outcome == "crash":
        return CompileResult(path, hit=False, files=_sizes(path))  # the lock stays: the process "died"
    if outcome == "failed":
        _write(path / LOG, b"ERROR: neuronx-cc failed: simulated compiler error\n")
        if version_tuple(version)[:2] <= (2, 12):
            _write(path / NEFF, b"ERROR")
        lock.unlink()
        raise CompileFailed(f"compilation failed for {path.name}")
    if outcome == "failed_neff":  # compilers up to 2.14: a failure cached as a NEFF alone ("cached failed neff")
        _write(path / NEFF, b"ERROR")
        lock.unlink()
        raise CompileFailed(f"compilation failed for {path.name} (cached as a NEFF)")
    if outcome != "success":
        raise ValueError(f"unknown outcome {outcome!r}")
    _write(path / NEFF, _neff_bytes(graph))
    if graph.wrapped_neff_size:
        _write(path / "wrapped_neff.hlo", random.Random(graph.hlo_key).randbytes(graph.wrapped_neff_size))
    if writes_done_marker(version):
        _write(path / DONE, b"")
    lock.unlink()
    return CompileResult(path, hit=False, seconds=time.monotonic() - started, files=_sizes(path))


def _sizes(path: Path) -> dict[str, int]:
    return {item.name: item.stat().st_size for item in path.iterdir() if item.is_file()}


def make_graphs(count: int, *, seed: str = "model", hlo_size: int = 4096, neff_size: int | None = None,
                flags: tuple[str, ...] = ("--target=trn1",)) -> list[Graph]:
    """`count` distinct graphs of a model (deterministic for a seed): what one export or training run compiles."""
    graphs = []
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")
        graphs.append(Graph(hlo=f"HloModule {seed}.{index}\n".encode() + rng.randbytes(hlo_size), flags=flags, neff_size=neff_size))
    return graphs


def main(argv: list[str] | None = None) -> int:
    """The simulated compiler at the terminal: compile N graphs of a model into a cache dir."""
    parser = argparse.ArgumentParser(description="Simulated neuronx-cc: compile N graphs of a model into a cache dir")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--compiler-version", required=True)
    parser.add_argument("--model", default="model", help="seed naming the model's graphs")
    parser.add_argument("--graphs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.0, help="simulated compile time per graph")
    parser.add_argument("--outcome", default="success", choices=["success", "failed", "crash", "todo"])
    parser.add_argument("--flags-hash-style", choices=FLAGS_HASH_STYLES, default=None,
                        help="hash the flags as a JSON list or as text (default: as the version's flags file)")
    args = parser.parse_args(argv)
    for graph in make_graphs(args.graphs, seed=args.model):
        try:
            result = compile_graph(args.cache_dir, args.compiler_version, graph, outcome=args.outcome, seconds=args.seconds,
                                   flags_hash_style=args.flags_hash_style)
        except CompileFailed as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return 1
        print(("HIT " if result.hit else "COMPILED ") + str(result.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
