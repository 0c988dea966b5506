"""One settings module: every NEURON_CACHE_* variable is validated where it is read, with one line naming the
variable, the value and what is accepted; the server gets only validated values, as arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache, settings
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server, stop_server
from optimum_neuron_cache.errors import ConfigurationError
from optimum_neuron_cache.server_launcher import server_address, server_command
from tests.test_integrations_shim import compiles, toolchain, use  # noqa: F401  (toolchain: the shim's fixture)

REPO = Path(__file__).resolve().parent.parent

DURATIONS = [
    (settings.lock_timeout, settings.LOCK_TIMEOUT, 600.0),
    (settings.request_timeout, settings.REQUEST_TIMEOUT, 60.0),
    (settings.server_start_timeout, settings.SERVER_START_TIMEOUT, 120.0),
    (settings.server_idle_timeout, settings.SERVER_IDLE_TIMEOUT, 300.0),
]
OPTIONAL_DURATIONS = [
    (settings.retry_budget, settings.RETRY_BUDGET),
    (settings.http_timeout, settings.HTTP_TIMEOUT),
    (settings.metadata_timeout, settings.METADATA_TIMEOUT),
    (settings.xet_retry_duration, settings.XET_RETRY_DURATION),
]
NOT_SECONDS = ["abc", "-1", "0", "inf", "nan", "1e309", "1e9", "31d", "10x", "0x10"]


def _refused(read, name: str, value: str) -> str:
    with pytest.raises(ConfigurationError) as caught:
        read({name: value})
    message = str(caught.value)
    assert "\n" not in message and name in message and repr(value) in message, message
    return message


@pytest.mark.parametrize("read,name,default", DURATIONS, ids=[d[1] for d in DURATIONS])
def test_durations_are_positive_finite_seconds(read, name, default):
    assert read({}) == default and read({name: "  "}) == default  # unset or blank: the default
    assert read({name: "2.5"}) == 2.5 and read({name: " 7 "}) == 7.0
    for bad in NOT_SECONDS:
        message = _refused(read, name, bad)
        assert message.endswith(f"set it to e.g. {default:g}")


@pytest.mark.parametrize("read,name", OPTIONAL_DURATIONS, ids=[d[1] for d in OPTIONAL_DURATIONS])
def test_server_durations_are_absent_or_positive_finite_seconds(read, name):
    assert read({}) is None and read({name: ""}) is None
    assert read({name: "3"}) == 3.0
    for bad in NOT_SECONDS:
        _refused(read, name, bad)


def test_the_issue_s_example_message():
    assert _refused(settings.lock_timeout, "NEURON_CACHE_LOCK_TIMEOUT", "abc") == (
        "NEURON_CACHE_LOCK_TIMEOUT='abc' is not a duration (more than 0, at most 30d: seconds, or a number followed by "
        "s, m, h, d or w); set it to e.g. 600")


def test_counts_choices_and_flags():
    assert settings.retry_attempts({settings.RETRY_ATTEMPTS: "2"}) == 2
    for bad in ("abc", "0", "-3", "2.5", "101"):
        _refused(settings.retry_attempts, settings.RETRY_ATTEMPTS, bad)
    assert settings.server_mode({}) == "auto" and settings.server_mode({settings.SERVER_MODE: "Current"}) == "current"
    assert "auto, uv, current" in _refused(settings.server_mode, settings.SERVER_MODE, "fast")
    assert settings.server_log_level({}) is None and settings.server_log_level({settings.SERVER_LOG_LEVEL: "debug"}) == "DEBUG"
    _refused(settings.server_log_level, settings.SERVER_LOG_LEVEL, "verbose")
    assert settings.verify({}) is True and settings.verify({settings.VERIFY: "off"}) is False
    _refused(settings.verify, settings.VERIFY, "maybe")
    assert settings.shim_backoff({settings.SHIM_BACKOFF: "0"}) == 0.0  # 0: never skip the bucket
    _refused(settings.shim_backoff, settings.SHIM_BACKOFF, "-1")
    assert settings.xet_retry_duration({settings.XET_RETRY_DURATION: "1s"}) == 1.0  # hf_xet's own spelling


def test_the_server_gets_only_the_settings_the_user_set_as_validated_arguments():
    env = {**os.environ}
    for name in settings.SERVER_VARIABLES:
        env.pop(name, None)
    address = server_address(env)
    plain = server_command(address, {**env, settings.SERVER_MODE: "current"})
    assert not any(flag in plain for _, flag, _ in settings.SERVER_FLAGS)
    chosen = {settings.RETRY_BUDGET: "4", settings.RETRY_ATTEMPTS: "2", settings.HTTP_TIMEOUT: "1.5",
              settings.METADATA_TIMEOUT: "3", settings.XET_RETRY_DURATION: "2s", settings.SERVER_LOG_LEVEL: "debug"}
    command = server_command(address, {**env, settings.SERVER_MODE: "current", **chosen})
    pairs = dict(zip(command, command[1:]))
    assert (pairs["--retry-budget"], pairs["--retry-attempts"], pairs["--http-timeout"], pairs["--metadata-timeout"],
            pairs["--xet-retry-duration"], pairs["--log-level"]) == ("4.0", "2", "1.5", "3.0", "2.0", "DEBUG")
    with pytest.raises(ConfigurationError, match="NEURON_CACHE_RETRY_ATTEMPTS='abc'"):
        server_command(address, {**env, settings.RETRY_ATTEMPTS: "abc"})
    with pytest.raises(ConfigurationError, match="NEURON_CACHE_SERVER_IDLE_TIMEOUT='soon'"):
        server_command(address, {**env, settings.SERVER_IDLE_TIMEOUT: "soon"})


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optimum_neuron_cache", *args], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=120)


def test_a_bad_server_setting_never_sticks_in_the_shared_server(tmp_path, version, monkeypatch):
    bucket = str(tmp_path / "bucket")
    BucketClient(BucketRef("dir", bucket)).create()
    stop_server()
    base = {k: v for k, v in os.environ.items() if k not in settings.SERVER_VARIABLES}

    # A client with a bad value: one line, exit 2, and no server started with it.
    bad = _cli("ls", "--bucket", bucket, env={**base, settings.RETRY_ATTEMPTS: "abc"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["error: NEURON_CACHE_RETRY_ATTEMPTS='abc' is not a whole number from 1 to 100; "
                                       "set it to e.g. 4"]
    assert running_server() is None

    # The context manager refuses it before the body, as any other bad input.
    monkeypatch.setenv(settings.RETRY_ATTEMPTS, "abc")
    body_ran = False
    with pytest.raises(ConfigurationError, match="NEURON_CACHE_RETRY_ATTEMPTS"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
            body_ran = True
    assert not body_ran and running_server() is None

    # A client with good values starts the server: they travel as arguments, never in its environment.
    started = _cli("ls", "--bucket", bucket, env={**base, settings.RETRY_ATTEMPTS: "2", settings.SERVER_LOG_LEVEL: "debug"})
    assert started.returncode == 0, started.stderr
    info = running_server()
    assert info is not None
    proc = Path("/proc") / str(info["pid"])
    argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--retry-attempts") + 1] == b"2" and argv[argv.index(b"--log-level") + 1] == b"DEBUG"
    environ = proc.joinpath("environ").read_bytes()
    assert not any(name.encode() + b"=" in environ for name in settings.SERVER_VARIABLES)

    # A later client that never set anything works against that server, and so does one run in-process.
    monkeypatch.delenv(settings.RETRY_ATTEMPTS)
    later = _cli("ls", "--bucket", bucket, env=base)
    assert later.returncode == 0 and "holds no entries" in later.stdout, later.stderr
    assert running_server()["pid"] == info["pid"]
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        pass
    assert run.warnings == []


def test_the_shim_never_fails_a_compile_over_a_setting(tmp_path, version, toolchain, monkeypatch):
    from optimum_neuron_cache.testing.simulated_neuronx_cc import jit_compile
    from optimum_neuron_cache.testing.simulated_compiler import make_graphs

    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    graph = make_graphs(1, seed="shim-settings")[0]
    use(bucket, tmp_path / "A", monkeypatch)
    jit_compile(tmp_path / "A", version, graph)  # compiled and published by the shim
    assert len(compiles(toolchain)) == 1
    # A malformed shim setting falls back to its default: the bucket is still used, so this is a hit.
    monkeypatch.setenv(settings.SHIM_BACKOFF, "soon")
    monkeypatch.setenv(settings.SHIM_PUBLISH, "maybe")
    use(bucket, tmp_path / "B", monkeypatch)
    jit_compile(tmp_path / "B", version, graph)
    assert len(compiles(toolchain)) == 1
    # A malformed client setting turns the bucket off for this call, never the compile.
    monkeypatch.setenv(settings.RETRY_ATTEMPTS, "abc")
    use(bucket, tmp_path / "C", monkeypatch)
    jit_compile(tmp_path / "C", version, graph)
    assert len(compiles(toolchain)) == 2 and running_server() is not None


def test_one_duration_format_for_variables_and_options():
    """`90` and `90s` are seconds, then `15m`, `12h`, `30d`, `2w`, in every variable and every age option."""
    assert [settings.duration(text) for text in ("90", "90s", "1.5m", "12h", "30d", "2w", " 3H ")] == [
        90.0, 90.0, 90.0, 43200.0, 2592000.0, 1209600.0, 10800.0]
    assert [settings.duration(text) for text in ("", "d", "-1s", "nan", "inf", "1e999h", "1x", "ten")] == [None] * 8
    assert settings.lease_max_wait({settings.LEASE_MAX_WAIT: "2h"}) == 7200.0
