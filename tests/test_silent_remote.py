"""A silent remote costs seconds: a closed port, an endpoint that accepts and never answers, a name that does not
resolve, 429 and 503 for ever, a Xet storage that sends nothing behind a live Hub API. Each whole run (enter + body + exit, server start included) warns once, naming
the bucket, runs its body, stops talking to the bucket after the failure, and makes a bounded number of
attempts. The real client and server run against loopback sockets or the Hub emulator; durations are the stress
run's business (python -m stress), here a deadline only turns a hang into a failure.

The server's settings are its validated arguments; its inherited NEURON_CACHE_* variables are ignored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bucket_server.backends.base import BackendError
from bucket_server.backends.hf import RetryPolicy, request_timeout, with_retries
from bucket_server.protocol import ErrorCode
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.errors import RemoteUnavailableError
from optimum_neuron_cache.server_launcher import can_connect, server_address
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from stress.scenarios import VERSION
from tests.polling import wait_until
from stress.silent_remote import (API, BUCKET, MODEL, UNRESOLVABLE, SilentEndpoint, WholeRun, closed_port, download_requests,
                                  server_retries, whole_run)

REPO = Path(__file__).resolve().parent.parent
#: Far beyond what any of these runs may cost: only a hang reaches it.
HANG_DEADLINE = 120.0
DEFAULTS = RetryPolicy()


def run_with_deadline(cache_dir: Path, attempts: Callable[[], int]) -> tuple[WholeRun, int]:
    """A whole run on its own thread, failed if it is not over by HANG_DEADLINE; also the attempts counted when
    the body ran (everything after is what exit added)."""
    seen: list[int] = []
    result: list[WholeRun] = []
    worker = threading.Thread(target=lambda: result.append(whole_run(cache_dir, body=lambda: seen.append(attempts()))),
                              daemon=True)
    worker.start()
    worker.join(HANG_DEADLINE)
    assert not worker.is_alive(), f"the run was still going after {HANG_DEADLINE:g} s"
    return result[0], seen[0] if seen else -1


def logged_attempts() -> Callable[[], int]:
    """Attempts as the server's log tells them (for failures no endpoint of ours can count): 1 + its retries."""
    log_path = server_address().log_path
    start = log_path.stat().st_size if log_path.exists() else 0
    return lambda: 1 + server_retries(log_path, start)


def seed(cache: Path, graphs: int) -> None:
    """Publish `graphs` entries of MODEL to BUCKET (which it creates) through the real client and server."""
    BucketClient(BucketRef("hf", BUCKET)).create()
    with hub_neuronx_cache(MODEL, compiler_version=VERSION, bucket=BUCKET, cache_dir=cache) as run:
        for graph in make_graphs(graphs, seed="silent-seed"):
            compile_graph(cache, VERSION, graph)
    assert len(run.synced) == graphs


@contextmanager
def failing_endpoint(kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[], int]]:
    """Point HF_ENDPOINT at a failure of `kind`; yield a counter of the attempts made against it."""
    if kind == "hang":
        with SilentEndpoint() as silent:
            monkeypatch.setenv("HF_ENDPOINT", silent.endpoint)
            yield lambda: silent.connections
    elif kind == "refused":
        with closed_port() as endpoint:
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
            yield logged_attempts()
    elif kind == "unresolvable":
        monkeypatch.setenv("HF_ENDPOINT", UNRESOLVABLE)
        yield logged_attempts()
    else:
        from hub_emulator import HubEmulator

        emulator = HubEmulator(tmp_path / "hub").start()
        try:
            monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
            emulator.add_fault(None, API, int(kind), times=None)
            yield lambda: emulator.requests.count(None, API)
        finally:
            stop_server()
            emulator.stop()


@pytest.mark.parametrize("kind", ["refused", "hang", "unresolvable", "429", "503"])
def test_a_dead_or_silent_remote_warns_once_runs_the_body_and_makes_bounded_attempts(tmp_path, monkeypatch, kind):
    with failing_endpoint(kind, monkeypatch, tmp_path) as attempts:
        outcome, at_body = run_with_deadline(tmp_path / "cache", attempts)
        after_exit = attempts()
    assert outcome.error is None and outcome.body_ran
    run = outcome.run
    assert len(run.warnings) == 1 and f"buckets/{BUCKET}:" in run.warnings[0] and "fetch skipped" in run.warnings[0]
    assert run.fetched == [] and run.synced == [] and len(run.compiled) == 1  # compiled, kept for a later run
    # Retried, within the policy; the accept-and-hang endpoint gets a second attempt only because a metadata
    # request's timeout is a few seconds, not a transfer's (one 15 s attempt used to be all there was).
    assert 2 <= at_body <= DEFAULTS.attempts
    assert after_exit == at_body  # after the first failure, exit did not talk to the bucket


@pytest.mark.parametrize("storage", ["503", "silent"])
def test_a_dead_or_silent_xet_storage_behind_a_live_api_costs_one_download_request(tmp_path, monkeypatch, storage):
    """The listing succeeds, and not a byte comes from the storage (503 for ever, or answers that never come):
    the server gives up on the whole download at the first failure or when the budget passes without a byte
    (not once per file, after hf_xet's retries or read timeouts), and fetch does not try each entry again."""
    from hub_emulator import HubEmulator

    emulator = HubEmulator(tmp_path / "hub", xet="http").start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
        seed(tmp_path / "source", 3)
        if storage == "503":
            emulator.add_fault(None, r"^/cas/", 503, times=None)
        else:
            emulator.add_fault(None, r"^/cas/", 0, delay=HANG_DEADLINE, times=None)
        outcome, at_body = run_with_deadline(tmp_path / "cache", download_requests())
    finally:
        stop_server()
        emulator.stop()
    assert outcome.error is None and outcome.body_ran
    run = outcome.run
    assert len(run.warnings) == 1 and f"buckets/{BUCKET}:" in run.warnings[0] and "came through" in run.warnings[0]
    if storage == "silent":
        assert "not a byte came from the Xet storage" in run.warnings[0]
    assert run.fetched == [] and run.synced == []
    assert at_body == 1  # one download request for the 3 entries: neither retried whole nor entry by entry
    assert outcome.server_retries == 0


def test_a_file_that_does_not_transfer_costs_only_its_own_entry(tmp_path, hub):
    """A listing that lies about one file's size: hf_xet refuses that file; the others of the same request land
    and are installed, in one download request with no retry."""
    seed(tmp_path / "source", 2)
    with hub._lock:  # the emulator's stored metadata: make the listing claim a size the bytes do not have
        files = hub._buckets[BUCKET].files
        neff = next(path for path in files if "/models/" in path and path.endswith("model.neff"))
        files[neff] = {**files[neff], "size": files[neff]["size"] + 10}
    downloads = download_requests()
    log_path = server_address().log_path
    log_start = log_path.stat().st_size if log_path.exists() else 0
    with hub_neuronx_cache(MODEL, compiler_version=VERSION, bucket=BUCKET, cache_dir=tmp_path / "B") as run:
        pass
    module = neff.split("/")[-2]
    assert len(run.fetched) == 1 and module not in run.fetched[0]
    assert len(run.warnings) == 1 and module in run.warnings[0] and "did not transfer" in run.warnings[0]
    assert downloads() == 1 and server_retries(log_path, log_start) == 0


def test_the_accept_and_hang_endpoint_counts_what_it_accepts():
    """The stress run's silent endpoint: it accepts, holds and never answers (the tests above rely on it)."""
    import socket

    with SilentEndpoint() as silent:
        port = int(silent.endpoint.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(0.2)
            with pytest.raises(socket.timeout):
                conn.recv(1)
            wait_until(lambda: silent.connections >= 1, "the endpoint to count the connection")
            assert silent.connections == 1


# ------------------------------------------------------------------------------------------ the budget's rules
def test_metadata_requests_get_a_short_timeout_and_transfers_keep_theirs():
    policy = RetryPolicy(budget=100, timeout=15, metadata_timeout=3)
    assert request_timeout(policy, "GET", "/api/buckets/a/b/tree/x") == 3
    assert request_timeout(policy, "POST", "/api/buckets/a/b/paths-info") == 3
    assert request_timeout(policy, "HEAD", "/buckets/a/b/resolve/x") == 3
    assert request_timeout(policy, "POST", "/api/buckets/a/b/batch") == 15
    assert request_timeout(RetryPolicy(timeout=1, metadata_timeout=3), "GET", "/api/buckets/a/b/tree") == 1


def test_a_metadata_request_never_waits_past_the_budget_and_is_not_sent_once_it_is_spent():
    policy = RetryPolicy(budget=5, timeout=15, metadata_timeout=3)
    path = "/api/buckets/a/b/tree"

    def near_the_end() -> float:
        return request_timeout(policy, "GET", path, now=time.monotonic() + policy.budget - 1)

    assert 0 < with_retries(policy, "t", near_the_end) <= 1
    assert with_retries(policy, "t", lambda: request_timeout(policy, "POST", "/api/buckets/a/b/batch",
                                                             now=time.monotonic() + 60)) == 15
    calls = []

    def spent() -> float:
        calls.append(1)
        return request_timeout(policy, "GET", path, now=time.monotonic() + policy.budget + 1)

    with pytest.raises(BackendError) as caught:
        with_retries(policy, "t", spent)
    assert caught.value.code == ErrorCode.UNAVAILABLE and "budget" in caught.value.message
    # Outside an operation there is no budget to cut to.
    assert request_timeout(policy, "GET", path, now=time.monotonic() + 3600) == 3


def test_no_backoff_sleeps_past_the_budget():
    calls = []

    def silent() -> None:
        calls.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(BackendError) as caught:
        with_retries(RetryPolicy(budget=0.2, attempts=10), "list", silent)
    assert caught.value.code == ErrorCode.UNAVAILABLE and caught.value.retryable
    assert len(calls) == 1  # the first backoff (0.5 s or more) does not fit in 0.2 s
    calls.clear()
    with pytest.raises(BackendError):
        with_retries(RetryPolicy(budget=60, attempts=2), "list", silent)
    assert len(calls) == 2


def test_a_policy_refuses_values_that_would_never_end():
    for bad in ({"budget": 0}, {"budget": float("inf")}, {"timeout": float("nan")}, {"metadata_timeout": -1},
                {"attempts": 0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


# ------------------------------------------------------------------------------------------ server arguments
def server(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-s", str(REPO / "bucket_server" / "boot.py"), *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


@pytest.mark.parametrize(("option", "value"), [
    ("--retry-budget", "abc"), ("--retry-budget", "-1"), ("--retry-attempts", "0"), ("--retry-attempts", "2.5"),
    ("--http-timeout", "nan"), ("--metadata-timeout", "inf"), ("--xet-retry-duration", "10m"),
    ("--idle-timeout", "0"), ("--log-level", "loud"),
])
def test_a_bad_server_argument_is_one_line_and_exit_2(tmp_path, option, value):
    proc = server("--socket", str(tmp_path / "s.sock"), "--endpoint", "http://127.0.0.1:9", option, value)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and repr(value) in lines[0], err
    assert not (tmp_path / "s.sock").exists()


def test_the_server_takes_its_settings_from_arguments_and_ignores_its_environment(tmp_path, hub):
    """Values that broke every client of the server before (they were read from its inherited environment)
    are ignored; the arguments are used: with --retry-attempts 2, a 503 for ever costs exactly 2 requests."""
    BucketClient(BucketRef("hf", BUCKET)).create()
    stop_server()
    address = server_address()
    env = {**os.environ, "NEURON_CACHE_RETRY_ATTEMPTS": "abc", "NEURON_CACHE_RETRY_BUDGET": "abc",
           "NEURON_CACHE_HTTP_TIMEOUT": "abc", "NEURON_CACHE_XET_RETRY_DURATION": "abc",
           "NEURON_CACHE_SERVER_LOG_LEVEL": "loud"}
    proc = server("--socket", str(address.socket_path), "--endpoint", hub.endpoint, "--retry-attempts", "2",
                  "--retry-budget", "60", "--metadata-timeout", "2", env=env)
    try:
        wait_until(lambda: proc.poll() is not None or can_connect(address), "the server to start")
        assert proc.poll() is None, proc.communicate()[1]
        client = BucketClient(BucketRef("hf", BUCKET))
        assert client.server_status()["pid"] == proc.pid  # ours, not one the client started
        hub.reset_counts()
        hub.add_fault("GET", r"/tree", 503, times=None)
        with pytest.raises(RemoteUnavailableError):
            client.list("", recursive=True)
        assert hub.requests.count("GET", r"/tree") == 2
        hub.clear_faults()
        assert client.list("", recursive=True) == []
    finally:
        stop_server()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # ours, by its handle: a test that failed early may have left it unreachable
            proc.wait()


def test_progress_renews_the_budget():
    """A successful response starts the running operation's budget again; a failing one does not."""
    from bucket_server.backends.hf import renew_budget

    policy = RetryPolicy(budget=5, timeout=15, metadata_timeout=3)
    path = "/api/buckets/a/b/tree"

    def after_a_page_then_late() -> float:
        renew_budget(policy, 200, now=time.monotonic() + 100)  # a page arrived 100 s into the operation
        return request_timeout(policy, "GET", path, now=time.monotonic() + 102)

    assert 2.5 < with_retries(policy, "t", after_a_page_then_late) <= 3  # the budget now ends 3 s later, not 97 s ago

    def after_an_error_then_late() -> float:
        renew_budget(policy, 503, now=time.monotonic() + 100)
        return request_timeout(policy, "GET", path, now=time.monotonic() + 102)

    with pytest.raises(BackendError):
        with_retries(policy, "t", after_an_error_then_late)


def test_a_long_listing_that_keeps_returning_pages_is_not_cut_by_the_budget(tmp_path, hub, monkeypatch, version):
    """A big bucket's listing takes many pages: as long as pages keep coming, it outlasts the retry budget
    (which bounds only time without progress). One page per file here, each slowed by the emulator."""
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "2")  # each page gets the budget anew: 0.6 s of 2 s
    ref = BucketRef("hf", "test-org/long-listing")
    client = BucketClient(ref)
    client.create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=ref, cache_dir=tmp_path / "A"):
        for graph in make_graphs(2, seed="long-listing"):
            compile_graph(tmp_path / "A", version, graph)
    expected = {item["path"] for item in client.list("", recursive=True)}
    hub.page_size = 1
    hub.add_fault("GET", r"^/api/buckets/test-org/long-listing/tree", 0, times=None, delay=0.6)
    listed = {item["path"] for item in client.list("", recursive=True)}
    assert listed == expected and len(expected) * 0.6 > 2 * 2  # pages took well over the 2 s budget in all
