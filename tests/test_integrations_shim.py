"""The neuronx-cc shim, driven the way libneuronxla drives the compiler: through PATH, one MODULE per call.

The real compiler is the simulated one installed as an executable named `neuronx-cc`; libneuronxla's side is
`jit_compile` (lock, HLO and flags into the entry, compile in a work dir, NEFF in, model.done). The bucket is
reached through the real bucket server, on a directory bucket and on the Hub emulator.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server
from optimum_neuron_cache.integrations.compiler_shim import (
    SHIM_MARKER,
    compiler_shim_on_path,
    find_real_compiler,
    install_compiler_shim,
    parse_compile_request,
)
from optimum_neuron_cache.testing.simulated_neuronx_cc import (
    SimulatedCompileError,
    install_simulated_compiler,
    jit_compile,
)
from optimum_neuron_cache.local_cache import EntryState, read_entry, scan_entries
from optimum_neuron_cache.remote_layout import PUBLISHABLE_FILES
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs


@pytest.fixture
def toolchain(tmp_path, monkeypatch, version):
    """A real (simulated) neuronx-cc on PATH, and the shim in front of it; returns the compile log."""
    real_bin = tmp_path / "sdk-bin"
    install_simulated_compiler(real_bin)
    shim_bin = tmp_path / "shim-bin"
    install_compiler_shim(shim_bin)
    monkeypatch.setenv("PATH", os.pathsep.join([str(shim_bin), str(real_bin), os.environ["PATH"]]))
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    log = tmp_path / "compiles.log"
    monkeypatch.setenv("SIMULATED_NEURONX_CC_LOG", str(log))
    return log


def compiles(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def remote_files(bucket: BucketRef, prefix: str = "") -> dict[str, int]:
    return {item["path"]: item["size"] for item in BucketClient(bucket).list(prefix, recursive=True)}


def use(bucket: BucketRef, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEURON_CACHE_BUCKET", str(bucket))
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(cache))


def test_a_graph_compiled_for_one_model_is_a_hit_for_another(tmp_path, bucket, version, toolchain, monkeypatch):
    shared = make_graphs(2, seed="shared-decoder-layer")
    own = make_graphs(1, seed="model-b-head")[0]
    use(bucket, tmp_path / "A", monkeypatch)
    for graph in shared:
        result = jit_compile(tmp_path / "A", version, graph)
        assert result.compiled
    assert len(compiles(toolchain)) == 2
    flat = remote_files(bucket, f"neuronxcc-{version}")
    for result_graph in shared:
        entry = read_entry(tmp_path / "A" / f"neuronxcc-{version}" / jit_compile(tmp_path / "A", version, result_graph).module, version)
        published = {p.rsplit("/", 1)[1]: s for p, s in flat.items() if f"/{entry.name}/" in p}
        assert published == {name: size for name, size in entry.files.items() if name in PUBLISHABLE_FILES}
        assert "model.done" in published and "model.neff" in published

    # Another model, another machine: a fresh cache. The shared graphs come from the flat area, no compile.
    use(bucket, tmp_path / "B", monkeypatch)
    results = [jit_compile(tmp_path / "B", version, graph) for graph in [*shared, own]]
    assert all(r.compiled and not r.hit for r in results)  # libneuronxla saw a successful "compile" each time
    assert len(compiles(toolchain)) == 3  # only the new graph reached the real compiler
    for result in results:
        b = read_entry(result.path, version)
        assert b.state is EntryState.SUCCESS
        reference = tmp_path / "A" / f"neuronxcc-{version}" / result.module
        if reference.exists():
            assert (result.path / "model.neff").read_bytes() == (reference / "model.neff").read_bytes()
    # The new graph was published too, by the compile that made it.
    assert any(f"/{results[2].module}/model.done" in p for p in remote_files(bucket, f"neuronxcc-{version}"))


def test_entries_published_by_a_context_serve_the_shim(tmp_path, version, toolchain, monkeypatch):
    """Entries written by `simulated_compiler` inside hub_neuronx_cache (the context path) are the same
    entries the shim finds: one flat area for every integration."""
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    graphs = make_graphs(2, seed="context-made")
    with hub_neuronx_cache("org/a", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        for graph in graphs:
            compile_graph(tmp_path / "A", version, graph)
    assert len(run.synced) == 2
    use(bucket, tmp_path / "B", monkeypatch)
    for graph in graphs:
        assert jit_compile(tmp_path / "B", version, graph).compiled
    assert compiles(toolchain) == []
    for entry in scan_entries(tmp_path / "B", version):
        assert (entry.path / "model.neff").read_bytes() == (tmp_path / "A" / entry.key / "model.neff").read_bytes()


def run_shim(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["neuronx-cc", *argv], capture_output=True, text=True, check=False, timeout=120, **kwargs)


def test_a_failed_compile_keeps_its_exit_code_and_output_and_publishes_nothing(tmp_path, version, toolchain, monkeypatch):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    use(bucket, tmp_path / "A", monkeypatch)
    monkeypatch.setenv("SIMULATED_NEURONX_CC_FAIL", "1")
    graph = make_graphs(1, seed="broken")[0]
    with pytest.raises(SimulatedCompileError, match="exit 70"):
        jit_compile(tmp_path / "A", version, graph)
    entry = scan_entries(tmp_path / "A", version)[0]
    assert entry.state is EntryState.FAILED
    assert "simulated compiler failure" in (entry.path / "model.log").read_text()
    assert remote_files(bucket) == {}
    # Direct call: stdout, stderr and the exit code are the real compiler's.
    source = tmp_path / f"model.{entry.name}.hlo_module.pb"
    source.write_bytes(graph.hlo)
    done = run_shim(["compile", "--framework=XLA", str(source), "--output", str(tmp_path / f"model.{entry.name}.neff")])
    assert done.returncode == 70
    assert "Compiler status ERROR" in done.stdout and "simulated compiler failure" in done.stderr
    assert not (tmp_path / f"model.{entry.name}.neff").exists()


class HangUp:
    """An endpoint that hangs up on every connection at once (a bucket that cannot be reached), counting them."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


def test_an_unreachable_bucket_costs_one_line_and_the_real_compile(tmp_path, version, toolchain, monkeypatch):
    from optimum_neuron_cache.client import stop_server

    endpoint = HangUp()
    monkeypatch.setenv("HF_ENDPOINT", endpoint.endpoint)
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "1")
    monkeypatch.setenv("NEURON_CACHE_BUCKET", "org/unreachable")
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "A"))
    graphs = make_graphs(3, seed="offline")
    results = [jit_compile(tmp_path / "A", version, graphs[0])]
    tried = endpoint.connections
    assert tried >= 1  # the first compile asked the bucket
    results += [jit_compile(tmp_path / "A", version, graph) for graph in graphs[1:]]
    assert all(r.compiled for r in results) and len(compiles(toolchain)) == 3
    assert {e.state for e in scan_entries(tmp_path / "A", version)} == {EntryState.SUCCESS}
    # After the first failure the host skips the bucket: the next calls do not contact it, nor even the server.
    assert endpoint.connections == tried
    stop_server()
    source = tmp_path / "work" / f"model.{results[0].module}.hlo_module.pb"
    source.parent.mkdir()
    source.write_bytes(graphs[0].hlo)
    done = run_shim(["compile", "--framework=XLA", str(source), "--output", str(source.with_name(f"model.{results[0].module}.neff"))])
    assert done.returncode == 0 and done.stderr == ""
    assert endpoint.connections == tried and running_server() is None
    endpoint.close()
    # What could not be published is journaled for the next flat-area run of this bucket.
    from optimum_neuron_cache.journal import Journal, JournalKey

    left = Journal(tmp_path / "A").leftovers(JournalKey("hf://buckets/org/unreachable", version, None, "default"))
    assert {name for record in left for name in record.entries} == {r.module for r in results}


def test_offline_mode_means_no_bucket_and_an_unchanged_compile(tmp_path, version, toolchain, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NEURON_CACHE_BUCKET", "org/bucket")
    monkeypatch.setenv("NEURON_COMPILE_CACHE_URL", str(tmp_path / "A"))
    result = jit_compile(tmp_path / "A", version, make_graphs(1, seed="offline-mode")[0])
    assert result.compiled and len(compiles(toolchain)) == 1
    assert running_server() is None


def test_anything_else_goes_to_the_real_compiler_untouched(tmp_path, version, toolchain, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_BUCKET", str(tmp_path / "bucket"))
    done = run_shim(["--version"])
    assert done.returncode == 0 and f"NeuronX Compiler version {version}" in done.stdout and done.stderr == ""
    done = run_shim(["compile", "--framework", "XLA"])
    assert done.returncode == 2 and "expected --framework XLA" in done.stderr
    # A plain trace compile (no MODULE in the names), as torch_neuronx.trace does it: compiled, never looked up.
    source = tmp_path / "graph.hlo"
    source.write_bytes(b"HloModule trace")
    done = run_shim(["compile", "--framework", "XLA", str(source), "--output", str(tmp_path / "graph.neff")])
    assert done.returncode == 0 and (tmp_path / "graph.neff").exists()
    assert running_server() is None  # nothing was asked of the bucket


def test_remote_entries_that_cannot_be_installed_whole_are_compiled(tmp_path, version, toolchain, monkeypatch):
    """A remote entry without its commit file, with an extra artifact the command line has no place for, or
    with another HLO under the same key, is never installed: the graph is compiled."""
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    graphs = make_graphs(3, seed="odd-remote")
    use(bucket, tmp_path / "A", monkeypatch)
    modules = [jit_compile(tmp_path / "A", version, graph).module for graph in graphs]
    flat = Path(bucket.location) / f"neuronxcc-{version}"
    (flat / modules[0] / "model.done").unlink()  # a partial upload
    (flat / modules[1] / "wrapped_neff.hlo").write_bytes(b"wlo")  # NxD weight-layout output
    (flat / modules[2] / "model.hlo_module.pb").write_bytes(b"another graph")  # a key collision
    use(bucket, tmp_path / "B", monkeypatch)
    before = len(compiles(toolchain))
    for graph in graphs:
        assert jit_compile(tmp_path / "B", version, graph).compiled
    assert len(compiles(toolchain)) == before + 3


def test_the_real_compiler_is_found_after_any_number_of_shims(tmp_path, monkeypatch):
    real_bin = tmp_path / "sdk"
    real = install_simulated_compiler(real_bin)
    first, second = install_compiler_shim(tmp_path / "s1"), install_compiler_shim(tmp_path / "s2")
    assert SHIM_MARKER in first.read_text()
    path = os.pathsep.join([str(first.parent), str(second.parent), str(real_bin)])
    found, shims = find_real_compiler({"PATH": path}, str(first))
    assert found == str(real) and shims == [str(first.parent), str(second.parent)]
    # With only shims on PATH there is no compiler, and no recursion: one clear error, said once, by the first shim.
    done = subprocess.run([str(first), "--version"], env={**os.environ, "PATH": f"{first.parent}{os.pathsep}{second.parent}"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 127 and done.stderr.count("no real neuronx-cc") == 1


def test_the_shim_keeps_its_bytecode_where_pythondontwritebytecode_is_set(tmp_path):
    """The shim is one process per graph: where PYTHONDONTWRITEBYTECODE is set (as in Neuron container images),
    it keeps the bytecode of what it imports under the user's cache folder, so that the next graph's shim does
    not compile the package from source again; the real compiler's environment keeps the setting."""
    real_bin = tmp_path / "sdk"
    install_simulated_compiler(real_bin)
    shim = install_compiler_shim(tmp_path / "shim")
    cache = tmp_path / "xdg"
    env = {**os.environ, "PATH": os.pathsep.join([str(shim.parent), str(real_bin), os.environ["PATH"]]),
           "PYTHONDONTWRITEBYTECODE": "1", "XDG_CACHE_HOME": str(cache)}
    probe = ("import os, sys; print(os.environ.get('PYTHONDONTWRITEBYTECODE'), sys.dont_write_bytecode)")
    env["NEURON_CACHE_REAL_COMPILER"] = str(_python_compiler(tmp_path, probe))
    done = subprocess.run([str(shim), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True"]  # the real compiler runs as the user set it
    kept = {path.name.split(".")[0] for path in (cache / "optimum-neuron-cache" / "bytecode").rglob("*.pyc")}
    assert {"compiler_shim", "settings", "atomic"} <= kept


def _python_compiler(tmp_path: Path, code: str) -> Path:
    """An executable `neuronx-cc` that runs `code` (a Python one-liner) with this interpreter."""
    path = tmp_path / "probe-bin" / "neuronx-cc"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\n{code}\n")
    path.chmod(0o755)
    return path


def test_compile_requests_are_recognized_only_exactly(tmp_path):
    source = tmp_path / "model.MODULE_123+abcdef12.hlo_module.pb"
    source.write_bytes(b"x")
    out = str(tmp_path / "model.MODULE_123+abcdef12.neff")
    request = parse_compile_request(["--target=trn1", "compile", "--framework", "XLA", str(source), "--output", out, "--verbose=35"])
    assert request and request.module == "MODULE_123+abcdef12" and request.hlo_name == "model.hlo_module.pb"
    assert parse_compile_request(["compile", "--framework=XLA", str(source), f"--output={out}"]).output == Path(out)
    assert parse_compile_request(["compile", "--framework=TENSORFLOW", str(source), "--output", out]) is None
    assert parse_compile_request(["compile", "--framework=XLA", str(source), "--output", str(tmp_path / "other.neff")]) is None
    assert parse_compile_request(["compile", "--framework=XLA", str(tmp_path / "missing.MODULE_1+2.hlo.pb"), "--output", out]) is None
    assert parse_compile_request(["--version"]) is None


def test_the_shim_on_path_in_process(tmp_path, monkeypatch, version):
    install_simulated_compiler(tmp_path / "sdk")
    monkeypatch.setenv("PATH", f"{tmp_path / 'sdk'}{os.pathsep}{os.environ['PATH']}")
    before = os.environ["PATH"]
    with compiler_shim_on_path(tmp_path / "shim") as shim:
        assert os.environ["PATH"].split(os.pathsep)[0] == str(shim.parent)
        done = subprocess.run(["neuronx-cc", "--version"], capture_output=True, text=True, env={**os.environ, "NEURON_CC_VERSION": version})
        assert done.returncode == 0 and version in done.stdout
    assert os.environ["PATH"] == before


def test_the_install_command_prints_the_path_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "optimum_neuron_cache.integrations.compiler_shim", str(tmp_path / "bin")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f'export PATH="{tmp_path / "bin"}:$PATH"'
    assert (tmp_path / "bin" / "neuronx-cc").stat().st_mode & 0o111
