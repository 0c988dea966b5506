"""A silent remote: what a dead, silent or throttling Hub adds to a whole run of `hub_neuronx_cache`.

A whole run is enter + body + exit, starting with no bucket server (its start is part of the cost). After the
first failure the run stops talking to the bucket, so the cost is the server start plus one operation's retry
budget. Each failure is made here, on loopback or in the emulator (no network exists where this runs):

- a closed port: a TCP port bound but not listening (connections are refused at once);
- an accept-and-hang endpoint: a socket that accepts connections and never answers (a hung proxy);
- a name that does not resolve (`.invalid` is reserved for that);
- 429 for ever and 503 for ever, from the Hub emulator's fault injection.
- the Hub API answers and its Xet storage answers 503 for ever, or holds every request without answering:
  the listing succeeds, the download fails.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.client import stop_server
from optimum_neuron_cache.context import CacheRun
from optimum_neuron_cache.server_launcher import server_address
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from stress.scenarios import VERSION, Figures

#: The bound the guarantee states: what a silent remote adds to a whole run, server start included.
BOUND_SECONDS = 10.0
BUCKET = "stress/silent"
MODEL = "org/silent"
UNRESOLVABLE = "http://hub.invalid"
#: The Hub API paths every bucket operation starts with (the faults of the emulator scenarios match these).
API = r"^/api/"
#: Entries in the bucket when its Xet storage fails (each used to be tried again on its own).
STORAGE_ENTRIES = 3
#: How long the silent storage holds each request before answering (longer than any run may take).
SILENT_STORAGE_DELAY = 120.0


class SilentEndpoint:
    """A loopback TCP endpoint that accepts every connection and never answers: a hung proxy or load balancer.
    `connections` counts the connections accepted (one per attempt: a timed-out connection is not reused)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-endpoint", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """Its URL, for HF_ENDPOINT."""
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._held)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._held.append(conn)  # held open, never read from or written to

    def close(self) -> None:
        """Stop accepting, and close every connection held."""
        self._closed.set()
        self._sock.close()
        with self._lock:
            for conn in self._held:
                conn.close()

    def __enter__(self) -> "SilentEndpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def closed_port() -> Iterator[str]:
    """An endpoint whose port refuses connections: bound (so nobody else takes it meanwhile), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@dataclass
class WholeRun:
    """One whole run against a failing remote: its cost (wall time minus the body's own) and what it said."""

    seconds: float
    body_ran: bool
    run: CacheRun | None
    error: str | None = None
    #: Retries the server logged during the run (its log is read from where it ended before the run).
    server_retries: int = 0


def whole_run(cache_dir: Path, bucket: str = BUCKET, model: str = MODEL, graphs: int = 1,
              body: Callable[[], object] | None = None) -> WholeRun:
    """Enter, compile `graphs` simulated graphs (and call `body`), exit: with no server running beforehand, so
    its start counts. An exception out of the context (it must never happen) is reported, not raised."""
    stop_server()
    log_path = server_address().log_path
    log_start = log_path.stat().st_size if log_path.exists() else 0
    body_seconds = 0.0
    body_ran = False
    run = None
    started = time.monotonic()
    try:
        with hub_neuronx_cache(model, compiler_version=VERSION, bucket=bucket, cache_dir=cache_dir) as run:
            body_started = time.monotonic()
            for graph in make_graphs(graphs, seed=f"silent-{cache_dir.name}"):
                compile_graph(cache_dir, VERSION, graph)
            if body is not None:
                body()
            body_ran = True
            body_seconds = time.monotonic() - body_started
        error = None
    except Exception as exc:  # noqa: BLE001 - reported as a failure of the guarantee
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - started - body_seconds
    return WholeRun(seconds, body_ran, run, error, server_retries(log_path, log_start))


def server_retries(log_path: Path, start: int) -> int:
    """How many retries the server logged after offset `start` of its log ("<op>: retrying after <error>")."""
    return _log_since(log_path, start).count(": retrying after ")


def _log_since(log_path: Path, start: int) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def server_log_counter(text: str) -> Callable[[], int]:
    """A counter of the lines that contain `text` in the server's log (the server of the current HF_ENDPOINT),
    from now on."""
    log_path = server_address().log_path
    start = log_path.stat().st_size if log_path.exists() else 0
    return lambda: sum(text in line for line in _log_since(log_path, start).splitlines())


def download_requests() -> Callable[[], int]:
    """A counter of the download requests the server finished from now on, whatever their outcome (each
    ends with one line: "download ok in ..." or "download failed in ...")."""
    done, failed = server_log_counter(" download ok in "), server_log_counter(" download failed in ")
    return lambda: done() + failed()


@dataclass
class SilentFigures(Figures):
    """A failure's figures: the runs' cost (median and max seconds) and the attempts of each run."""

    median_seconds: float = 0.0
    max_seconds: float = 0.0
    #: Attempts per run: as the failing endpoint counted them, else as the server logged them.
    attempts: list[int] = field(default_factory=list)
    #: Whether BOUND_SECONDS is promised for this failure (False: a known limit, measured only).
    bounded: bool = True


def judge(figures: SilentFigures, outcome: WholeRun, bucket: str, attempts: int | None) -> None:
    """One run holds the guarantee when the body ran, one warning named the bucket, and it cost at most
    BOUND_SECONDS."""
    figures.attempts.append(attempts if attempts is not None else outcome.server_retries + 1)
    warnings = outcome.run.warnings if outcome.run is not None else []
    if outcome.error is not None:
        figures.fail(f"the context raised: {outcome.error}")
    elif not outcome.body_ran:
        figures.fail("the body did not run")
    elif len(warnings) != 1 or bucket not in warnings[0]:
        figures.fail(f"expected one warning naming {bucket}, got {warnings}")
    elif figures.bounded and outcome.seconds > BOUND_SECONDS:
        figures.fail(f"the run cost {outcome.seconds:.1f} s, over {BOUND_SECONDS:g} s")


def _failures(workdir: Path) -> list[tuple[str, Callable[[], object], bool]]:
    """(name, context manager factory yielding (endpoint, attempt counter), whether the bound is promised)."""

    @contextmanager
    def refused():
        with closed_port() as endpoint:
            yield endpoint, lambda: None

    @contextmanager
    def hung():
        with SilentEndpoint() as silent:
            yield silent.endpoint, lambda: silent.connections

    @contextmanager
    def unresolvable():
        yield UNRESOLVABLE, lambda: None

    def faulty(status: int):
        @contextmanager
        def make():
            from hub_emulator import HubEmulator

            emulator = HubEmulator(Path(tempfile.mkdtemp(prefix=f"hub-{status}-", dir=workdir))).start()
            try:
                emulator.add_fault(None, API, status, times=None)
                yield emulator.endpoint, lambda: emulator.requests.count(None, API)
            finally:
                stop_server()
                emulator.stop()
        return make

    def storage(status: int, delay: float = 0.0):
        @contextmanager
        def make():
            """The Hub API answers, its Xet storage (CAS) does not: the listing succeeds, the download fails."""
            from optimum_neuron_cache.buckets import BucketRef
            from optimum_neuron_cache.client import BucketClient
            from hub_emulator import HubEmulator

            fresh = Path(tempfile.mkdtemp(prefix="storage-", dir=workdir))
            emulator = HubEmulator(fresh / "hub", xet="http").start()
            os.environ["HF_ENDPOINT"] = emulator.endpoint
            try:
                BucketClient(BucketRef("hf", BUCKET)).create()
                source = fresh / "source"
                with hub_neuronx_cache(MODEL, compiler_version=VERSION, bucket=BUCKET, cache_dir=source):
                    for graph in make_graphs(STORAGE_ENTRIES, seed="silent-storage"):
                        compile_graph(source, VERSION, graph)
                emulator.add_fault(None, r"^/cas/", status, delay=delay, times=None)
                yield emulator.endpoint, download_requests()
            finally:
                stop_server()
                emulator.stop()
        return make

    return [("closed port", refused, True), ("accept-and-hang endpoint", hung, True),
            ("name that does not resolve", unresolvable, True), ("429 for ever", faulty(429), True),
            ("503 for ever", faulty(503), True),
            (f"Xet storage 503, API up, {STORAGE_ENTRIES} entries", storage(503), True),
            (f"Xet storage silent, API up, {STORAGE_ENTRIES} entries", storage(0, delay=SILENT_STORAGE_DELAY), True)]


def silent_remote(workdir: Path, runs: int) -> list[SilentFigures]:
    """`runs` whole runs against each failure; one SilentFigures per failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    previous = os.environ.get("HF_ENDPOINT")
    logging.getLogger("optimum_neuron_cache").setLevel(logging.ERROR)  # the one warning per run is expected
    try:
        for name, failure, bounded in _failures(workdir):
            figures = SilentFigures(f"whole run, {name}", trials=runs, bounded=bounded)
            seconds = []
            for trial in range(runs):
                with failure() as (endpoint, attempts):
                    os.environ["HF_ENDPOINT"] = endpoint
                    outcome = whole_run(workdir / f"{name.split()[0]}-{trial}")
                    stop_server()
                    judge(figures, outcome, BUCKET, attempts())
                seconds.append(outcome.seconds)
            figures.median_seconds = round(statistics.median(seconds), 2)
            figures.max_seconds = round(max(seconds), 2)
            results.append(figures)
    finally:
        logging.getLogger("optimum_neuron_cache").setLevel(logging.NOTSET)
        if previous is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = previous
    return results
