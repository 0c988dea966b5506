"""The core package imports and works where huggingface_hub is absent or at 0.x: the bucket server then runs
in an environment uv builds for it, with a bucket-capable huggingface_hub, whatever the caller pinned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import importlib.metadata as md, json, sys
import optimum_neuron_cache
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.client import running_server, stop_server
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

try:
    client_hub = md.version("huggingface_hub")
except md.PackageNotFoundError:
    client_hub = None
version, root_a, root_b = sys.argv[1:4]
graphs = make_graphs(2, seed="isolated")
with hub_neuronx_cache("org/isolated", compiler_version=version, bucket="test/isolated", cache_dir=root_a) as run_a:
    for graph in graphs:
        compile_graph(root_a, version, graph)
with hub_neuronx_cache("org/isolated", compiler_version=version, bucket="test/isolated", cache_dir=root_b) as run_b:
    hits = [compile_graph(root_b, version, graph).hit for graph in graphs]
server = running_server()
stop_server()
print(json.dumps({"client_hub": client_hub, "synced": run_a.synced, "fetched": run_b.fetched, "hits": hits,
                  "warnings": run_a.warnings + run_b.warnings, "server_hub": server["huggingface_hub"],
                  "server_python": server["python"]}))
"""


def _venv(tmp_path: Path, packages: list[str]) -> Path:
    from uv import find_uv_bin

    uv = find_uv_bin()
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "filelock", "uv", *packages], check=True)
    # The project itself, by path (what `pip install optimum-neuron-cache` puts in site-packages).
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "optimum_neuron_cache_dev.pth").write_text(str(REPO) + "\n")
    return python


@pytest.mark.parametrize("client_packages", [[], ["huggingface_hub==0.36.2"]], ids=["hub-absent", "hub-0.x"])
def test_works_whatever_huggingface_hub_the_caller_has(tmp_path, hub, version, client_packages):
    from optimum_neuron_cache.buckets import BucketRef
    from optimum_neuron_cache.client import BucketClient

    BucketClient(BucketRef("hf", "test/isolated")).create()
    python = _venv(tmp_path, client_packages)
    env = {**os.environ, "NEURON_CACHE_SERVER_MODE": "auto", "NEURON_CACHE_RUNTIME_DIR": os.path.join(os.environ["NEURON_CACHE_RUNTIME_DIR"], "iso")}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(python), "-c", SCRIPT, version, str(tmp_path / "A"), str(tmp_path / "B")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["client_hub"] == (client_packages[0].split("==")[1] if client_packages else None)
    assert report["warnings"] == []
    assert len(report["synced"]) == 2 and sorted(report["fetched"]) == sorted(report["synced"])
    assert report["hits"] == [True, True]
    major, minor = (int(x) for x in report["server_hub"].split(".")[:2])
    assert (major, minor) >= (1, 5)
    assert not report["server_python"].startswith(str(tmp_path / "venv"))  # uv's environment, not the caller's


def _wheel(folder: Path, name: str) -> Path:
    """A pure-Python wheel of one module, written by hand: uv installs it with no index and no build step."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": b"VALUE = 1\n",
             f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
             f"{name}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
                     for path, data in files.items()) + f"{name}-0.1.dist-info/RECORD,,\n"
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in {**files, f"{name}-0.1.dist-info/RECORD": record.encode()}.items():
            archive.writestr(path, data)
    return wheel


def test_the_server_environment_is_compiled_when_uv_installs_it(tmp_path, monkeypatch):
    """Where PYTHONDONTWRITEBYTECODE is set (AWS's Neuron container examples set it), nothing ever writes the
    bytecode of the server's environment: unless uv compiles it at install, every server start compiles
    huggingface_hub from source again (about 300 ms). The launcher's own uv command, on a wheel of ours."""
    from optimum_neuron_cache import server_launcher, settings

    wheel = _wheel(tmp_path, "onc_probe_pkg")
    monkeypatch.setattr(server_launcher, "SERVER_REQUIREMENTS", (f"onc_probe_pkg @ {wheel.as_uri()}",))
    env = {**os.environ, settings.SERVER_MODE: "uv", "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    command = server_launcher.server_commands(server_launcher.server_address(env), env)[0]
    assert "--offline" in command  # the first try: no index needed
    probe = ("import importlib.util, os, onc_probe_pkg; "
             "print(os.path.exists(importlib.util.cache_from_source(onc_probe_pkg.__file__)))")
    out = subprocess.run([*command[: command.index("python") + 1], "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
