"""Shared fixtures: an isolated environment per test, the local Hub emulator, the real bucket server.

Nothing here touches the network, the user's home or a token: HF_HOME, XDG dirs, the server's runtime dir
and the compile cache all live under the test's tmp dirs, and every server a test starts is stopped after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from optimum_neuron_cache.client import stop_server

COMPILER_VERSION = "2.21.33363.0+82129205"

_CLEARED = (
    "NEURON_CC_FLAGS", "NEURON_COMPILE_CACHE_URL", "NEURON_CACHE_BUCKET", "NEURON_CC_VERSION",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN_PATH",
)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    # Unix socket paths must stay short (108 bytes): the runtime dir gets its own short temp dir.
    runtime = Path(tempfile.mkdtemp(prefix="onc-"))
    # uv keeps its own cache where the user has it (moving XDG_CACHE_HOME must not make every test cold).
    uv_cache = os.environ.get("UV_CACHE_DIR") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv")
    settings = {
        "UV_CACHE_DIR": uv_cache,
        "HF_HOME": str(tmp_path / "hf_home"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg_cache"),
        "HF_XET_CACHE": str(tmp_path / "xet_cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NEURON_CACHE_RUNTIME_DIR": str(runtime),
        "NEURON_CACHE_SERVER_MODE": os.environ.get("NEURON_CACHE_TEST_SERVER_MODE", "current"),
        "NEURON_CACHE_SERVER_IDLE_TIMEOUT": "60",
        "NEURON_CACHE_LOCK_TIMEOUT": "60",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    yield settings
    stop_server()
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A local Hub emulator; HF_ENDPOINT points at it (so the bucket server for this test is its own)."""
    from hub_emulator import HubEmulator

    emulator = HubEmulator(tmp_path / "hub")
    emulator.start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
    try:
        yield emulator
    finally:
        stop_server()  # before the emulator goes: no transfer may be left running against its local:// store
        emulator.stop()


@pytest.fixture
def http_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Hub emulator whose Xet storage answers over HTTP, as the Hub's does (faults can reach a download)."""
    from hub_emulator import HubEmulator

    emulator = HubEmulator(tmp_path / "hub", xet="http")
    emulator.start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
    try:
        yield emulator
    finally:
        stop_server()
        emulator.stop()


@pytest.fixture(params=["hf", "dir"])
def bucket(request, tmp_path: Path):
    """A created bucket of each backend: a Hub bucket on the emulator, and a directory. Modules that need
    another kind of bucket define their own `bucket` fixture, which takes precedence."""
    from optimum_neuron_cache.buckets import BucketRef
    from optimum_neuron_cache.client import BucketClient

    if request.param == "hf":
        request.getfixturevalue("hub")
        ref = BucketRef("hf", "test-org/neuron-cache")
    else:
        ref = BucketRef("dir", str(tmp_path / "dir-bucket"))
    BucketClient(ref).create()
    return ref


@pytest.fixture
def dir_bucket(tmp_path: Path):
    """A created directory bucket, the process's lookup cache cleared: modules whose tests take this one kind
    of bucket define their `bucket` fixture from it."""
    from optimum_neuron_cache.buckets import BucketRef
    from optimum_neuron_cache.client import BucketClient
    from optimum_neuron_cache.lookup import clear_lookup_cache

    clear_lookup_cache()
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    return ref


@pytest.fixture
def version() -> str:
    return COMPILER_VERSION
