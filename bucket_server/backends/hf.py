"""A Hub bucket through `huggingface_hub.HfApi` (>=1.5): the only code of the project that touches the network.

The token comes with each request (the calling client's HF_TOKEN or stored token): one server serves every
process of the user, whatever token each holds. It is passed to HfApi per call, never logged or stored.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import queue
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import pauses
from ..digests import Verifier, file_digest, publish_algorithm, xet_hash_of_one_chunk
from ..messages import (
    LEASE_MAX_BYTES, AddFile, BatchRequest, BatchResult, CommitResult, CopyFile, CreateResult, Described, DownloadFile,
    DownloadResult, FileItem, FolderItem, InfoResult, ListItem, StageResult,
)
from ..protocol import ErrorCode
from .base import Backend, BackendError, FileSizeWatcher, Progress, Staged, reject_mismatched

log = logging.getLogger("bucket_server")

_configure_lock = threading.Lock()
_configured = False


@dataclass(frozen=True)
class RetryPolicy:
    """Our retries replace huggingface_hub's (five tries, about 23 s, and an unbounded wait on Retry-After):
    exponential backoff with jitter, Retry-After honoured only within the budget, all within `budget` seconds,
    time spent waiting on timeouts included. The cache is best effort: a dead, silent or throttling endpoint
    must cost the user's run seconds, not minutes.

    Metadata requests (info, listings, paths-info, file metadata) answer in well under a second on a healthy
    Hub: they get `metadata_timeout`, never more than `timeout`, and never more than what is left of the
    budget. `timeout` is for requests that carry a transfer's weight (the commit of a batch)."""

    budget: float = 6.0
    attempts: int = 4
    timeout: float = 15.0
    metadata_timeout: float = 3.0

    def __post_init__(self) -> None:
        for name in ("budget", "timeout", "metadata_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")
        if not (isinstance(self.attempts, int) and self.attempts >= 1):
            raise ValueError(f"attempts must be an integer >= 1, not {self.attempts!r}")

    def request_timeout(self, *, transfer: bool) -> float:
        """A request's timeout before the budget cuts it: a transfer's, or metadata's (never the longer)."""
        return self.timeout if transfer else min(self.metadata_timeout, self.timeout)


#: When the retry budget of the operation running on this thread ends (monotonic seconds); None outside one.
_budget_ends: ContextVar[float | None] = ContextVar("bucket_server_budget_ends", default=None)
#: The longest a connection may take to open, whatever the request (a blackholed SYN waits this long).
CONNECT_TIMEOUT = 3.0


def is_transfer_request(method: str, path: str) -> bool:
    """The requests that may legitimately take long: a batch's commit (its body lists every operation) and a
    file's bytes over HTTP. Everything else huggingface_hub sends here is metadata. (Xet transfers do not go
    through huggingface_hub's HTTP client; hf_xet bounds them itself.)"""
    return (method == "POST" and path.rstrip("/").endswith("/batch")) or (method == "GET" and "/resolve/" in path)


def request_timeout(policy: RetryPolicy, method: str, path: str, now: float | None = None) -> float:
    """The timeout of one HTTP request: its class's, cut to what is left of the running operation's budget
    for metadata. Raises TimeoutError when that budget is spent (the request is not sent)."""
    transfer = is_transfer_request(method, path)
    seconds = policy.request_timeout(transfer=transfer)
    ends = _budget_ends.get()
    if ends is not None and not transfer:
        left = ends - (time.monotonic() if now is None else now)
        if left <= 0:
            raise TimeoutError(f"the retry budget of {policy.budget:g} s is spent")
        seconds = min(seconds, left)
    return seconds


def renew_budget(policy: RetryPolicy, status: int, now: float | None = None) -> None:
    """A successful response is progress: the running operation's budget starts again from now. The budget
    bounds what a dead, silent or failing remote costs, not a long listing that keeps returning pages (a big
    bucket's listing legitimately takes many pages). Failures never renew it; attempts stay capped."""
    if status < 400 and _budget_ends.get() is not None:
        _budget_ends.set((time.monotonic() if now is None else now) + policy.budget)


def configure_http(policy: RetryPolicy) -> None:
    """Turn off huggingface_hub's own retries and give each of its requests our timeout (it has none by
    default, so a blackholed endpoint would hang for ever, and one it passes itself would not know our
    budget). This process belongs to the bucket server alone, so changing the library's process-wide
    defaults here is deliberate."""
    global _configured
    with _configure_lock:
        if _configured:
            return
        from huggingface_hub.utils import _http

        defaults = dict(_http.http_backoff.__kwdefaults__ or {})
        if "max_retries" in defaults:
            _http.http_backoff.__kwdefaults__ = {**defaults, "max_retries": 0}
        default_factory = getattr(_http, "default_client_factory", None)
        set_factory = getattr(_http, "set_client_factory", None)
        if default_factory is not None and set_factory is not None:

            def bound_timeout(request: Any) -> None:
                # Runs just before each request is sent, on the thread of the operation that sends it.
                seconds = request_timeout(policy, request.method, request.url.path)
                request.extensions["timeout"] = {"connect": min(CONNECT_TIMEOUT, seconds), "read": seconds,
                                                 "write": seconds, "pool": seconds}

            def progress(response: Any) -> None:
                # Runs when each response arrives, on the thread of the operation that sent the request.
                renew_budget(policy, response.status_code)

            def client_factory():
                client = default_factory()
                hooks = dict(client.event_hooks)
                hooks["request"] = [*hooks.get("request", []), bound_timeout]
                hooks["response"] = [*hooks.get("response", []), progress]
                client.event_hooks = hooks
                return client

            set_factory(client_factory)
        else:
            log.warning("this huggingface_hub has no set_client_factory: Hub requests keep its default timeouts")
        _configured = True


class PartialBatchError(Exception):
    """The Hub applied a batch in part and listed what failed (a retry redoes it whole: every operation is
    idempotent)."""

    def __init__(self, failed: int) -> None:
        super().__init__(f"{failed} bucket operation(s) failed")
        self.failed = failed


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def with_retries(policy: RetryPolicy, what: str, fn: Callable[[], Any]) -> Any:
    """Run `fn`, retrying retryable failures (network, timeout, 408/429/5xx) within the policy's budget;
    any failure left is raised as a coded BackendError.

    The budget covers the whole operation: metadata requests never wait past its end (`request_timeout`), no
    attempt starts after it, and no backoff sleeps into it. Progress renews it: each successful response
    starts it again (`renew_budget`), so only time without progress counts."""
    import tenacity

    started = time.monotonic()

    def left() -> float:  # until the budget's end, which each successful response pushes back (renew_budget)
        return (_budget_ends.get() or started + policy.budget) - time.monotonic()

    def should_retry(state: tenacity.RetryCallState) -> bool:
        if not state.outcome or not state.outcome.failed:
            return False
        exc = state.outcome.exception()
        if isinstance(exc, BackendError) or not map_exception(exc, what).retryable:
            return False
        wait = _retry_after(exc)
        return wait is None or wait < left()

    # 0.5 s doubling to 4 s, plus up to 0.5 s of jitter (wait_exponential_jitter's `initial` is deprecated in 9.x).
    backoff = tenacity.wait_exponential(multiplier=0.5, max=4.0) + tenacity.wait_random(0, 0.5)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = _retry_after(exc) if exc is not None else None
        return after if after is not None else backoff(state)

    def stop(state: tenacity.RetryCallState) -> bool:
        # tenacity >= 8.3 knows the coming sleep when it asks: stop rather than sleep past the budget.
        return state.attempt_number >= policy.attempts or (getattr(state, "upcoming_sleep", 0.0) or 0.0) >= left()

    token = _budget_ends.set(started + policy.budget)
    try:
        for attempt in tenacity.Retrying(
            retry=should_retry, wait=wait, reraise=True, stop=stop,
            before_sleep=lambda state: log.info("%s: retrying after %s", what, type(state.outcome.exception()).__name__),
        ):
            with attempt:
                return fn()
    except BackendError:
        raise
    except Exception as exc:
        raise map_exception(exc, what) from exc
    finally:
        _budget_ends.reset(token)


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def map_exception(exc: BaseException, what: str) -> BackendError:
    """huggingface_hub / hf_xet / network exceptions -> an error code. Checked by type and status, not text."""
    import huggingface_hub.errors as hf_errors

    bucket_not_found = getattr(hf_errors, "BucketNotFoundError", None)
    if bucket_not_found is not None and isinstance(exc, bucket_not_found):
        return BackendError(ErrorCode.BUCKET_NOT_FOUND, f"{what}: bucket not found (or private and the token cannot see it)")
    if isinstance(exc, getattr(hf_errors, "OfflineModeIsEnabled", ())):
        return BackendError(ErrorCode.UNAVAILABLE, f"{what}: HF_HUB_OFFLINE is set", retryable=False)
    status = _status_of(exc)
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())) and status in (None, 404):
        return BackendError(ErrorCode.BUCKET_NOT_FOUND, f"{what}: bucket not found (or private and the token cannot see it)")
    if isinstance(exc, getattr(hf_errors, "EntryNotFoundError", ())):
        return BackendError(ErrorCode.NOT_FOUND, f"{what}: file not found in the bucket")
    if status == 401:
        return BackendError(ErrorCode.UNAUTHORIZED, f"{what}: 401 Unauthorized (no token or an invalid one; set HF_TOKEN)")
    if status == 403:
        return BackendError(ErrorCode.FORBIDDEN, f"{what}: 403 Forbidden (the token lacks permission for this bucket)")
    if status == 404:
        return BackendError(ErrorCode.BUCKET_NOT_FOUND, f"{what}: 404 Not Found")
    if status is not None and (status == 408 or status == 429 or status >= 500):
        return BackendError(ErrorCode.UNAVAILABLE, f"{what}: HTTP {status} from the Hub", retryable=True)
    if isinstance(exc, PartialBatchError):
        return BackendError(ErrorCode.UNAVAILABLE, f"{what}: {exc}", retryable=True)
    if isinstance(exc, getattr(hf_errors, "BucketBatchError", ())):
        failures = getattr(exc, "failures", None) or []
        return BackendError(ErrorCode.UNAVAILABLE, f"{what}: {len(failures)} bucket operation(s) failed", retryable=True)
    if status is not None:
        return BackendError(ErrorCode.BAD_REQUEST, f"{what}: HTTP {status} from the Hub")
    if isinstance(exc, FileNotFoundError):
        return BackendError(ErrorCode.NOT_FOUND, f"{what}: local file missing: {exc.filename}")
    if isinstance(exc, (ConnectionError, TimeoutError, RuntimeError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH)
    ):
        return BackendError(ErrorCode.UNAVAILABLE, f"{what}: {type(exc).__name__}: {exc}", retryable=True)
    module = type(exc).__module__.split(".", 1)[0]
    if module in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):  # transport errors of the HTTP stack
        return BackendError(ErrorCode.UNAVAILABLE, f"{what}: {type(exc).__name__}: {exc}", retryable=True)
    return BackendError(ErrorCode.INTERNAL, f"{what}: {type(exc).__name__}: {exc}")


def _require_regular_file(path: str) -> None:
    """Uploads read regular files only: a symlink could point anywhere (outside the cache) and is refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise BackendError(ErrorCode.NOT_FOUND, f"local file {path} to upload is missing") from None
    if not stat.S_ISREG(mode):
        raise BackendError(ErrorCode.BAD_REQUEST, f"local file {path} is not a regular file (symlinks are never uploaded)")


#: Threads that wait on a download's files (each blocks in hf_xet, without the GIL, until its file lands).
JOINERS = 16

_session_lock = threading.Lock()
_session: Any = None


def _xet_session() -> Any:
    """One hf_xet session (runtime and connection pool) for the server's life: a deliberate cache."""
    global _session
    with _session_lock:
        if _session is None:
            import hf_xet

            _session = hf_xet.XetSession()
        return _session


@dataclass(frozen=True)
class XetConnection:
    """Where a bucket's Xet storage is and a read token for it: what each download group needs first."""

    refresh_route: str  # the bucket's xet-read-token URL, the same for every file of the bucket
    endpoint: str
    token: str
    expires: float  # Unix seconds


#: A connection is reused for at most this long (and never within a minute of its token's expiry): a
#: server serves the burst of processes of one job, and a user whose access was taken away keeps it no
#: longer than this.
XET_CONNECTION_REUSE = 300.0
XET_CONNECTION_MARGIN = 60.0
_connections_lock = threading.Lock()
#: (Hub endpoint, bucket, sha256 of the HF token) -> (connection, when it was fetched, monotonic).
_connections: dict[tuple[str, str, str], tuple[XetConnection, float]] = {}


#: hf_xet allocates its transfer buffers with the C allocator, some of them the size of a Xorb range (two
#: of about 58 MB per fetch of the benchmark's 179 MB). glibc's malloc serves every buffer above its mapping
#: threshold (128 kB, growing with what is freed, at most 32 MB) with a fresh mapping and unmaps it when
#: freed, and gives a heap's free top back to the system above its trim threshold: each fetch then faults in
#: and zeroes fresh pages for most of what it moves (29,000 to 36,000 page faults per 179 MB, 74 to 110 ms of
#: CPU, in the server as in a direct `download_bucket_files`). The server keeps freed buffers for the next
#: download of the burst instead (docs/performance.md, the cold fetch), and gives them back once idle.
MALLOC_MMAP_THRESHOLD = 128 << 20  # above the largest Xorb (64 MiB): such buffers come from the heap
MALLOC_TRIM_THRESHOLD = 512 << 20  # a heap keeps up to this much free memory at its top
#: Seconds without a download after which the server returns the kept buffers to the system (malloc_trim).
MALLOC_KEEP_IDLE = 30.0
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_lock = threading.Lock()
_libc: Any = None  # glibc, once tuned; False: another C library (musl, macOS), left as it is
_malloc_round = 0  # downloads started so far: a trim is for the round it was scheduled in only
_malloc_running = 0  # downloads running
_trim_timer: threading.Timer | None = None  # the one trim pending: each download's end replaces it


def _glibc() -> Any:
    """The process's glibc, its malloc tuned to keep freed transfer buffers (once); None elsewhere."""
    global _libc
    if _libc is None:
        _libc = False
        try:
            import ctypes

            if (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
                libc = ctypes.CDLL(None)
                if libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and \
                        libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD):
                    _libc = libc
        except (OSError, AttributeError, ValueError) as exc:
            log.debug("malloc left as it is: %s", exc)
    return _libc or None


def _download_started() -> int:
    """Tune malloc (first download) and open a round; the round's number, for `_download_ended`."""
    global _malloc_round, _malloc_running
    with _malloc_lock:
        _glibc()
        _malloc_round += 1
        _malloc_running += 1
        return _malloc_round


def _download_ended(round_: int) -> None:
    """In MALLOC_KEEP_IDLE seconds, if no download ran since this one, give the kept buffers back. One trim
    is pending at a time: a burst of downloads keeps one timer thread, not one per download."""
    global _malloc_running, _trim_timer

    def trim() -> None:
        with _malloc_lock:
            if _malloc_round == round_ and not _malloc_running and _libc:
                _libc.malloc_trim(0)

    with _malloc_lock:
        _malloc_running -= 1
        if _libc:
            if _trim_timer is not None:
                _trim_timer.cancel()  # a later round's trim supersedes it
            _trim_timer = threading.Timer(MALLOC_KEEP_IDLE, trim)
            _trim_timer.daemon = True
            _trim_timer.start()


def _any_bytes(items: Sequence[DownloadFile]) -> bool:
    """Whether any of these downloads has written a byte yet (hf_xet writes each file as its data arrives)."""
    for item in items:
        try:
            if os.lstat(item.local_path).st_size > 0:
                return True
        except OSError:
            continue
    return False


#: How often a download looks for its first byte (only until one has arrived).
FIRST_BYTE_POLL = 0.2


def _join_each(group_cm: Any, transfers: list[DownloadFile], verifier: Verifier,
               failed: dict[str, BaseException], first_byte_within: float) -> None:
    """Start every transfer in one Xet download group, hand each file to the verifier as it lands, and put
    each one that fails in `failed` (local path -> error) while the others go on.

    Until a first byte arrives the storage is on probation: if a file fails before then, or nothing has
    arrived after `first_byte_within` seconds, the storage is failing or silent (not a file): every file
    goes in `failed` and the group is stopped, rather than each file failing in turn after hf_xet's retries
    or read timeouts. A healthy storage sends its first bytes well within a second."""
    import hf_xet

    with group_cm as group:
        # Manifests first (the other files' checks wait for them), then largest first: the big files land
        # early, and what is left to hash when the transfer ends is small.
        todo: queue.SimpleQueue[tuple[Any, DownloadFile]] = queue.SimpleQueue()
        for item in sorted(transfers, key=lambda item: (not item.manifest, -int(item.size))):
            todo.put((group.start_download_file(hf_xet.XetFileInfo(item.xet_hash, int(item.size)), item.local_path), item))
        started = todo.qsize()
        landed: queue.SimpleQueue[tuple[DownloadFile, BaseException | None]] = queue.SimpleQueue()

        def join() -> None:
            # A task reads as running until it is joined, failed or not: each joiner blocks in one join at a
            # time (which releases the GIL), and the files come out of `landed` in the order they finish.
            while True:
                try:
                    handle, item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    handle.result()  # the file is whole and closed (raises if its transfer failed)
                except BaseException as exc:
                    landed.put((item, exc))
                else:
                    landed.put((item, None))

        def give_up(exc: BaseException) -> None:
            failed.update({item.local_path: exc for item in transfers if item.local_path not in failed})
            group.abort()  # the other transfers stop, and their joins return

        joiners = [threading.Thread(target=join, name="xet-join", daemon=True) for _ in range(min(JOINERS, started))]
        for joiner in joiners:
            joiner.start()
        deadline = time.monotonic() + first_byte_within
        arrived = False
        try:
            for _ in range(started):
                while True:
                    try:
                        item, exc = landed.get(timeout=None if arrived else FIRST_BYTE_POLL)
                        break
                    except queue.Empty:
                        arrived = _any_bytes(transfers)
                        if not arrived and time.monotonic() > deadline:
                            give_up(TimeoutError(f"not a byte came from the Xet storage in {first_byte_within:g} s"))
                            return
                arrived = arrived or _any_bytes(transfers)
                if exc is not None:
                    failed[item.local_path] = exc
                    if not arrived:
                        give_up(exc)
                        return
                    continue
                arrived = True
                verifier.submit(item.local_path, item.digest)
        except BaseException:
            group.abort()
            raise
        finally:
            for joiner in joiners:  # after an abort, the joins left return at once
                joiner.join()


def _digests_of(items: Sequence[AddFile]) -> dict[str, tuple[str, str]]:
    """dest -> (source key, digest) of the local file to upload there; a file that cannot be read is left out
    (its upload reports the error)."""
    algorithm = publish_algorithm()
    digests = {}
    for item in items:
        try:
            digests[item.dest] = (_source_key(item), file_digest(str(item.local_path), algorithm, every_core=False))
        except OSError:  # beside the upload, on one core
            continue
    return digests


def _source_key(item: AddFile) -> str:
    """What an add uploads, as a key: its local file, or its content. Two adds of the same file upload once."""
    if item.local_path is not None:
        return f"file:{item.local_path}"
    return "content:" + hashlib.sha256(item.content.encode("utf-8")).hexdigest()


def _sources(items: Sequence[AddFile]) -> dict[str, str | bytes]:
    """What `items` upload, by source key: a local path, or the content's bytes."""
    return {_source_key(item): item.local_path if item.local_path is not None else item.content.encode("utf-8")
            for item in items}


def _described_while(items: Sequence[AddFile], upload: Callable[[], Any],
                     hashes: Callable[[Any], dict[str, tuple[str, int]]]) -> tuple[Any, dict[str, Described]]:
    """Run `upload` while the local files of `items` marked `describe` are hashed beside it (they are read
    twice either way), then describe them by the Xet hash the upload gave their source: (what `upload`
    returned, dest -> Described). `hashes` picks source key -> (Xet hash, size) out of what it returned."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="describe") as hasher:
        digests = hasher.submit(_digests_of, [item for item in items if item.describe and item.local_path is not None])
        got = upload()
        uploaded = hashes(got)
        return got, {dest: Described(uploaded[key][0], digest) for dest, (key, digest) in digests.result().items()}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _add_line(item: AddFile, xet_hash: str) -> dict[str, Any]:
    """A batch's addFile line; `mtime` is the local file's (milliseconds), as huggingface_hub sends it."""
    mtime = _now_ms()
    if item.local_path is not None:
        try:
            mtime = int(os.stat(item.local_path).st_mtime * 1000)
        except OSError:
            pass
    return {"type": "addFile", "path": item.dest, "xetHash": xet_hash, "mtime": mtime}


def _abort(session: Any) -> None:
    try:
        session.abort()
    except Exception as exc:  # already failed or finished: nothing more to let go
        log.debug("aborting an upload session: %s", exc)


class _ProgressRelay:
    """hf_xet's progress callback for an upload session, passed on as (done, total) bytes to whichever
    request's progress the session now serves: the stage's, then none, then the commit's (a frame under a
    request id whose reply was sent would break the client's stream)."""

    def __init__(self, target: Progress | None) -> None:
        self.target = target

    def __call__(self, group: Any, _items: Any = None) -> None:
        target = self.target
        if target is not None:
            target(int(group.total_bytes_completed), int(group.total_bytes))


class HfStaged(Staged):
    """A stage on a Hub bucket: its open upload session, what it took in, and where from."""

    def __init__(self, owner: tuple[str, str, str], session: Any, uploaded: dict[str, tuple[str, int]],
                 sources: dict[str, str | bytes], relay: _ProgressRelay) -> None:
        self.owner = owner  # the bucket and token it was made for (HfBackend._connection_key)
        self.session = session
        self.uploaded = uploaded
        self.sources = sources
        self.relay = relay

    def abort(self) -> None:
        self.relay.target = None
        _abort(self.session)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None and hasattr(value, "isoformat") else None


def _timestamp(value: Any) -> float | None:
    """A listed ISO time as seconds (None when absent or not one: the client's edge decides what it trusts)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _raw_file_item(item: dict[str, Any]) -> FileItem:
    """A file of a tree listing as the Hub sent it, as `_file_item` gives a BucketFile. Its fields are the
    bucket's word, passed on as they are: the client's edge (messages.FileItem.from_wire) decides."""
    xet_hash = item.get("xetHash")
    return FileItem(item["path"], item.get("size"), xet_hash, _timestamp(item.get("mtime")),
                    f"xet:{xet_hash}" if isinstance(xet_hash, str) and xet_hash else None,
                    uploaded=_timestamp(item.get("uploadedAt")))


def _file_item(bucket_file: Any) -> FileItem:
    """A file as the Hub lists it. Its fields are the bucket's word, passed on as they are: the client's edge
    (messages.FileItem.from_wire) decides what it trusts."""
    mtime = getattr(bucket_file, "mtime", None)
    uploaded = getattr(bucket_file, "uploaded_at", None)  # when the bucket got it; `mtime` is the uploader's file time
    return FileItem(bucket_file.path, bucket_file.size, bucket_file.xet_hash,
                    mtime.timestamp() if mtime is not None else None,
                    f"xet:{bucket_file.xet_hash}" if bucket_file.xet_hash else None,
                    uploaded=uploaded.timestamp() if uploaded is not None else None)


#: The folder of a lease's claims, next to it (`<lease path>.claims/<round>/<claim id>`; see HfBackend._claim).
LEASE_CLAIMS = ".claims"
#: Seconds after which a claim is taken for its claimant's, dead before it finished (by the bucket's clock,
#: against the later claim's upload time): far longer than a claimant's three requests between its claim and
#: its lease write.
LEASE_CLAIM_TTL = 60.0


class HfBackend(Backend):
    """A Hub bucket through HfApi, with the calling client's token: every operation within the retry policy,
    every failure a coded BackendError."""

    def __init__(self, api: Any, bucket_id: str, token: str | None, policy: RetryPolicy | None = None) -> None:
        self.api = api
        self.bucket_id = bucket_id
        self.token: str | bool = token or False  # False: send no token (not even a stored one)
        self.policy = policy or RetryPolicy()

    def _call(self, what: str, fn, *args, **kwargs):
        """Every operation is idempotent (adds overwrite with the same bytes, copies and deletes repeat):
        all are retried within the policy, and every failure left becomes a coded error."""
        return with_retries(self.policy, f"{what} {self.bucket_id}", lambda: fn(*args, token=self.token, **kwargs))

    def info(self) -> InfoResult:
        """The bucket's id, visibility, size and file count."""
        info = self._call("bucket info", self.api.bucket_info, self.bucket_id)
        return InfoResult(info.id, info.private, info.size, info.total_files)

    def create(self, *, private: bool | None) -> CreateResult:
        """Create the bucket unless it exists (asked first: a token that may read but not create still
        gets `created: False` for an existing bucket)."""
        try:
            info = self._call("create", self.api.bucket_info, self.bucket_id)
            return CreateResult(False, f"{self.api.endpoint}/buckets/{info.id}", str(info.id))
        except BackendError as exc:
            if exc.code != ErrorCode.BUCKET_NOT_FOUND:
                raise
        url = self._call("create", self.api.create_bucket, self.bucket_id, private=private, exist_ok=True)
        return CreateResult(True, str(getattr(url, "url", url)), str(getattr(url, "bucket_id", "") or self.bucket_id))

    def list(self, prefix: str, *, recursive: bool) -> list[ListItem]:
        """Files (and, when not recursive, folders) strictly under the folder `prefix` (validated at the
        server's edge, without a trailing '/'); a folder nobody wrote to is empty, not an error."""
        folder = f"{prefix}/" if prefix else ""

        def run() -> list[ListItem]:
            items: list[ListItem] = []
            # The server matches prefixes lexically ("logs" also matches "logs.json"): keep what is inside.
            for item in self._tree(prefix, recursive):
                path = item.get("path")
                if not isinstance(path, str) or not path.startswith(folder):
                    continue
                if not recursive and "/" in path[len(folder) :]:
                    continue
                if item.get("type") == "file":
                    items.append(_raw_file_item(item))
                elif item.get("type") == "directory":
                    items.append(FolderItem(path))
            return items

        try:
            return with_retries(self.policy, f"list {self.bucket_id}/{prefix}", run)
        except BackendError as exc:
            if exc.code == ErrorCode.NOT_FOUND:  # a folder nobody wrote to yet: empty, not an error
                return []
            raise

    def _tree(self, prefix: str, recursive: bool) -> Any:
        """The tree listing's items as the Hub sends them (dicts), page after page: what
        `HfApi.list_bucket_tree` reads, without making a BucketFile of each file, whose datetime parses were
        most of a warm run's listing CPU here (about 20 us a file). Through list_bucket_tree on a
        huggingface_hub without the pieces used."""
        try:
            from urllib.parse import quote

            from huggingface_hub.utils import paginate

            headers = self.api._build_hf_headers(token=self.token)
        except (ImportError, AttributeError):
            return ({"type": item.type, "path": item.path, "size": getattr(item, "size", None),
                     "xetHash": getattr(item, "xet_hash", None), "mtime": _iso(getattr(item, "mtime", None)),
                     "uploadedAt": _iso(getattr(item, "uploaded_at", None))}
                    for item in self.api.list_bucket_tree(self.bucket_id, prefix or None, recursive=recursive, token=self.token))
        encoded = "/" + quote(prefix, safe="") if prefix else ""
        return paginate(f"{self.api.endpoint}/api/buckets/{self.bucket_id}/tree{encoded}", {"recursive": recursive}, headers)

    def paths_info(self, paths: Sequence[str]) -> list[FileItem]:
        """The files among `paths` that exist, in one request; missing ones are left out."""
        if not paths:
            return []
        return with_retries(self.policy, f"paths-info {self.bucket_id}", lambda: [
            _file_item(item) for item in self.api.get_bucket_paths_info(self.bucket_id, list(paths), token=self.token)])

    def download(self, files: Sequence[DownloadFile], *, progress: Progress | None = None) -> DownloadResult:
        """Download the files; each one is checked against its digest as soon as it lands, while the others
        still transfer (by the BLAKE3 digest a manifest of the request binds to its Xet hash, else by
        recomputing the Xet hash). A file that does not match is removed and reported."""
        items = self._with_xet_info(list(files))
        total = sum(int(item.size or 0) for item in items)
        # hf_xet writes the destination files as it goes: their sizes are the progress.
        with FileSizeWatcher([item.local_path for item in items], total, progress):
            problems, unread = with_retries(self.policy, f"download from {self.bucket_id}",
                                            lambda: self._download_verified(items))
        return DownloadResult(len(items), total, tuple(reject_mismatched(items, problems, unread)))

    def _with_xet_info(self, items: list[DownloadFile]) -> list[DownloadFile]:
        """Every file with its Xet hash and size (clients send them from their listing; ask for the rest)."""
        unknown = [item.path for item in items if not (item.xet_hash and item.size is not None)]
        if not unknown:
            return items
        known = {info.path: info for info in self.paths_info(unknown)}
        missing = [path for path in unknown if path not in known]
        if missing:
            raise BackendError(ErrorCode.NOT_FOUND, f"download from {self.bucket_id}: {len(missing)} file(s) not in the "
                                                    f"bucket: {', '.join(missing[:3])}")
        return [item if item.path not in known else
                replace(item, xet_hash=known[item.path].xet_hash, size=known[item.path].size,
                        digest=item.digest or known[item.path].digest) for item in items]

    def _download_verified(self, items: list[DownloadFile]) -> tuple[dict[str, str], dict[str, str]]:
        """One attempt: (local path -> why it does not match its digest, local path -> why it did not
        transfer)."""
        verifier = Verifier(manifests=[item.local_path for item in items if item.manifest])
        started = time.perf_counter()
        try:  # hf_xet >= 1.6 (SERVER_REQUIREMENTS) has the download groups _download_each uses
            not_transferred = self._download_each(items, verifier)
        except BaseException:
            verifier.finish()
            raise
        landed = time.perf_counter()
        problems = {path: why for path, why in verifier.finish().items() if path not in not_transferred}
        log.info("downloaded %d files in %.3f s, %s", len(items) - len(not_transferred), landed - started,
                 verifier.summary())
        return problems, not_transferred

    def _download_each(self, items: list[DownloadFile], verifier: Verifier) -> dict[str, str]:
        """The transfer as huggingface_hub's download_bucket_files makes it (one Xet download group), but
        each file is handed to the verifier the moment it is complete.

        A file that does not come through (after hf_xet's own retries) costs only itself: the others go on,
        and it is returned (local path -> why) to be reported as failed. When none comes through, the storage
        itself is failing: that raises, and is not retried on top of hf_xet's retries (a dead storage must
        not cost a run more than one transfer's retries; nor must fetch try it again entry by entry)."""
        from huggingface_hub.utils import build_hf_headers

        for item in items:
            if int(item.size) == 0:  # nothing to transfer
                Path(item.local_path).write_bytes(b"")
                verifier.submit(item.local_path, item.digest)
        transfers = [item for item in items if int(item.size) > 0]
        if not transfers:
            return {}
        headers = build_hf_headers(token=self.token)
        connection = self._xet_connection(transfers[0].path, headers)
        group = _xet_session().new_file_download_group(
            endpoint=connection.endpoint, token=connection.token, token_expiry_unix_secs=int(connection.expires),
            token_refresh_url=connection.refresh_route, token_refresh_headers=headers,
            custom_headers={key: value for key, value in headers.items() if key.lower() != "authorization"},
        )
        failed: dict[str, BaseException] = {}
        round_ = _download_started()
        try:
            _join_each(group, transfers, verifier, failed, first_byte_within=self.policy.budget)
        except Exception as exc:
            if not failed:
                self._forget_xet_connection()
                raise
            log.debug("download group of %s closed with: %s", self.bucket_id, exc)  # a failure already counted
        finally:
            _download_ended(round_)
        if failed:  # whatever failed, the next attempt asks the Hub for a fresh connection
            self._forget_xet_connection()
        if failed and len(failed) == len(transfers):
            first = next(iter(failed.values()))
            cause = map_exception(first, f"download from {self.bucket_id}")
            raise BackendError(cause.code, f"{cause.message} (none of {len(transfers)} files came through)") from first
        for path, exc in failed.items():
            log.info("download from %s: %s did not come through: %s", self.bucket_id, path, exc)
        return {path: f"did not transfer: {type(exc).__name__}: {exc}" for path, exc in failed.items()}

    def _connection_key(self) -> tuple[str, str, str]:
        # The HF token only as a digest: a connection is never shared between tokens, and none is kept.
        return (str(getattr(self.api, "endpoint", "")), self.bucket_id,
                hashlib.sha256((self.token or "").encode("utf-8")).hexdigest())

    def _forget_xet_connection(self) -> None:
        with _connections_lock:
            _connections.pop(self._connection_key(), None)

    def _xet_connection(self, some_path: str, headers: dict[str, str]) -> XetConnection:
        """The bucket's Xet connection, reused from an earlier download of this server while its token is
        good: a download then makes no metadata request and no token request before its transfers (two
        round trips of the Hub's; huggingface_hub's `download_bucket_files` makes both at every call). Else
        the refresh route from one file's metadata ("same for all files in this bucket", as
        huggingface_hub's `download_bucket_files` says), then a token from it."""
        key = self._connection_key()
        now = time.time()
        with _connections_lock:
            cached = _connections.get(key)
        if cached is not None:
            connection, fetched = cached
            if time.monotonic() - fetched < XET_CONNECTION_REUSE and connection.expires - now > XET_CONNECTION_MARGIN:
                return connection
        route = cached[0].refresh_route if cached is not None else \
            self.api.get_bucket_file_metadata(self.bucket_id, some_path, token=self.token).xet_file_data.refresh_route
        connection = self._fetch_xet_connection(route, headers)
        with _connections_lock:
            _connections[key] = (connection, time.monotonic())
        return connection

    def _fetch_xet_connection(self, route: str, headers: dict[str, str]) -> XetConnection:
        """A read token from the refresh route: the JSON `{"accessToken", "exp", "casUrl"}` hf_xet itself
        expects of that route (its `new_file_download_group` docs)."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        response = get_session().get(route, headers=headers)
        hf_raise_for_status(response)
        body = response.json()
        token, expires, endpoint = (body.get("accessToken"), body.get("exp"), body.get("casUrl")) \
            if isinstance(body, dict) else (None, None, None)
        if not (isinstance(token, str) and token and isinstance(endpoint, str) and endpoint
                and isinstance(expires, (int, float)) and not isinstance(expires, bool) and math.isfinite(expires)):
            raise BackendError(ErrorCode.INVALID_DATA, f"download from {self.bucket_id}: the Xet token route "
                                                       "answered without a token, expiry and storage URL")
        return XetConnection(route, endpoint, token, float(expires))

    def batch(self, *, add: Sequence[AddFile], copy: Sequence[CopyFile], delete: Sequence[str],
              progress: Progress | None = None) -> BatchResult:
        """Adds (regular local files or inline content), server-side copies by Xet hash, and deletes, in one
        commit of one phase; files marked `describe` get their Xet hash and digest."""
        return self.commit(None, [BatchRequest(tuple(add), tuple(copy), tuple(delete))], progress=progress).phases[0]

    def stage(self, add: Sequence[AddFile], *, progress: Progress | None = None) -> tuple[Staged | None, StageResult]:
        """Upload the bytes of `add` in a Xet upload session left open for the commit, and describe those
        marked `describe` (the Xet hash hf_xet computed as it took them in, and their digest). Nothing is
        added to the bucket: the session's data is pushed to the Xet storage by the commit, and a stage whose
        connection closes is aborted."""
        sources = _sources(add)
        relay = _ProgressRelay(progress)

        def attempt() -> tuple[Any, dict[str, tuple[str, int]]]:
            session = self._open_upload(relay)
            try:
                return session, self._start_uploads(session, sources)
            except BaseException:
                _abort(session)
                raise

        (session, uploaded), described = _described_while(
            add, lambda: with_retries(self.policy, f"stage on {self.bucket_id}", attempt), lambda got: got[1])
        relay.target = None  # the stage is done: no progress frame may follow its reply under its id
        return HfStaged(self._connection_key(), session, uploaded, sources, relay), StageResult("", described)

    def commit(self, staged: Staged | None, phases: Sequence[BatchRequest], *,
               progress: Progress | None = None) -> CommitResult:
        """Every byte first, in one Xet upload session (the stage's, with what the phases add beyond it), then
        each phase as one batch request to the Hub, in order, each sent only once the one before it landed."""
        if staged is not None and not (isinstance(staged, HfStaged) and staged.owner == self._connection_key()):
            raise BackendError(ErrorCode.BAD_REQUEST, f"commit on {self.bucket_id}: the stage was made for another "
                                                      "bucket or token")
        adds = [item for phase in phases for item in phase.add]
        copies = [item for phase in phases for item in phase.copy]
        missing = [item.src for item in copies if not item.xet_hash]
        copied = {info.path: info.xet_hash for info in self.paths_info(missing)} if missing else {}
        uploaded, described = _described_while(adds, lambda: self._push(staged, _sources(adds), progress), lambda got: got)
        results = []
        for phase in phases:
            lines = [_add_line(item, uploaded[_source_key(item)][0]) for item in phase.add]
            for item in phase.copy:
                xet_hash = item.xet_hash or copied.get(item.src)
                if not xet_hash:
                    raise BackendError(ErrorCode.NOT_FOUND, f"copy source {item.src} is not in bucket {self.bucket_id}")
                lines.append({"type": "copyFile", "path": item.dest, "xetHash": xet_hash, "mtime": _now_ms(),
                              "sourceRepoType": "bucket", "sourceRepoId": self.bucket_id})
            lines += [{"type": "deleteFile", "path": path} for path in phase.delete]
            if lines:
                body = b"".join(json.dumps(line).encode("utf-8") + b"\n" for line in lines)
                with_retries(self.policy, f"batch on {self.bucket_id}", lambda body=body: self._post_batch(body))
            results.append(BatchResult(len(phase.add), len(phase.copy), len(phase.delete),
                                       {item.dest: described[item.dest] for item in phase.add if item.dest in described}))
        return CommitResult(tuple(results))

    def _push(self, staged: Staged | None, sources: dict[str, str | bytes], progress: Progress | None) -> dict[str, tuple[str, int]]:
        """source key -> (Xet hash, size) of every source, all of them in the Xet storage when this returns:
        the stage's session gets what it lacks, then is finished. A session that fails is not reused: a retry
        uploads everything again in a new one (the storage dedups what had arrived), and a staged file that
        reads differently then has changed since it was staged, which fails the commit."""
        held = staged if isinstance(staged, HfStaged) else None
        everything = {**(held.sources if held else {}), **sources}
        if not everything:
            return {}
        relay = held.relay if held else _ProgressRelay(None)
        relay.target = progress
        first = [held.session] if held else []

        def attempt() -> dict[str, tuple[str, int]]:
            reuse = first.pop() if first else None
            session = reuse or self._open_upload(relay)
            try:
                got = {**held.uploaded} if reuse is not None and held else {}
                got.update(self._start_uploads(session, {k: v for k, v in everything.items() if k not in got}))
                session.wait_to_finish()
            except BaseException:
                _abort(session)
                raise
            return got

        try:
            uploaded = with_retries(self.policy, f"upload to {self.bucket_id}", attempt)
        finally:
            relay.target = None
        changed = [key for key, (xet_hash, _) in (held.uploaded.items() if held else ()) if uploaded[key][0] != xet_hash]
        if changed:
            raise BackendError(ErrorCode.BAD_REQUEST, f"commit on {self.bucket_id}: {changed[0].partition(':')[2]} "
                                                      "changed after it was staged")
        return uploaded

    def _open_upload(self, relay: "_ProgressRelay") -> Any:
        """A Xet upload session for this bucket: its write token from the bucket's token route (hf-storage-
        buckets: `GET /api/buckets/{id}/xet-write-token` answers `{accessToken, exp, casUrl}`), fetched by hf_xet
        itself, and refreshed by it when it runs out."""
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(token=self.token)
        return _xet_session().new_upload_commit(
            token_refresh_url=f"{self.api.endpoint}/api/buckets/{self.bucket_id}/xet-write-token",
            token_refresh_headers=headers, progress_callback=relay,
            custom_headers={key: value for key, value in headers.items() if key.lower() != "authorization"},
        )

    @staticmethod
    def _start_uploads(session: Any, sources: dict[str, str | bytes]) -> dict[str, tuple[str, int]]:
        """Hand every source to the session, then wait until hf_xet has taken each in (chunked and hashed; its
        data may still be on its way to the storage): source key -> (Xet hash, size)."""
        import hf_xet

        skip = {"sha256": hf_xet.SKIP_SHA256} if hasattr(hf_xet, "SKIP_SHA256") else {}
        handles = {}
        for key, source in sources.items():
            if isinstance(source, bytes):
                handles[key] = session.start_upload_bytes(source, **skip)
            else:
                _require_regular_file(source)
                handles[key] = session.start_upload_file(source, **skip)
        uploaded = {}
        for key, handle in handles.items():
            info = handle.result().xet_info
            uploaded[key] = (str(info.hash), int(info.file_size))
        return uploaded

    def _post_batch(self, body: bytes) -> None:
        """One batch request (hf-storage-buckets: `POST /api/buckets/{id}/batch`, NDJSON lines `addFile`,
        `copyFile`, `deleteFile`): the Hub applies what it can and lists what failed, in a 200 or a 422."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = {**build_hf_headers(token=self.token), "Content-Type": "application/x-ndjson"}
        response = get_session().post(f"{self.api.endpoint}/api/buckets/{self.bucket_id}/batch", headers=headers,
                                      content=body)
        if response.status_code in (200, 422):
            try:
                failed = response.json().get("failed")
            except (ValueError, AttributeError):
                failed = None
            if isinstance(failed, list) and failed:
                raise PartialBatchError(len(failed))
        hf_raise_for_status(response)

    # ------------------------------------------------------------------------------------ leases
    def lease(self, path: str, mode: str, *, content: str | None = None, expect: str | None = None) -> dict[str, Any]:
        """Compile leases on a Hub bucket, which has no conditional write. A create or a takeover is won by
        claim (`_claim`, docs/integrations.md "Compile leases on a Hub bucket"); a renewal (replace) and a
        delete check the lease holds `expect`, then write. Contents are compared by Xet hash, so only `read`
        transfers the file."""
        def hashed(text: str) -> str:
            return xet_hash_of_one_chunk(text.encode("utf-8"))

        if mode == "read":
            return {"ok": True, "content": self._read_small(path)}
        held = self._lease_hash(path)
        if mode == "create":
            if held is not None:
                return {"ok": held == hashed(str(content)), "content": None}
            return self._claim(path, str(content), None)
        if held is None:
            return {"ok": mode == "delete", "content": None}
        if mode in ("replace", "takeover") and held == hashed(str(content)):
            return {"ok": True, "content": content}
        if expect is not None and held != hashed(expect):
            return {"ok": False, "content": None}
        if mode == "delete":
            self.batch(add=(), copy=(), delete=(path,))
            return {"ok": True, "content": None}
        if mode == "takeover":
            return self._claim(path, str(content), held)
        self.batch(add=(AddFile(path, content=str(content)),), copy=(), delete=())
        ours = self._lease_hash(path) == hashed(str(content))
        return {"ok": ours, "content": content if ours else None}

    def _lease_hash(self, path: str) -> str | None:
        """The Xet hash of the lease at `path` ("" when the Hub gives none), None when there is none. An empty or
        oversized file, which cannot be read as a lease, has the hash of "": what `expect=""` names."""
        found = self.paths_info([path])
        if found and not 0 < found[0].size <= LEASE_MAX_BYTES:
            return xet_hash_of_one_chunk(b"")
        return str(found[0].xet_hash or "") if found else None

    def _claim(self, path: str, content: str, held: str | None) -> dict[str, Any]:
        """Write the lease `content` if this caller wins the claim round of the lease as it was seen (`held`: its
        Xet hash, None for no lease). Each contender writes a claim file of its own (a new path: nothing to
        overwrite), then lists the round's claims: a claim uploaded before ours or in the same instant (the
        bucket's clock, `uploaded_at`) beats ours, unless it is more than LEASE_CLAIM_TTL older (its claimant
        died before finishing). The winner checks the lease is still as seen, copies its claim onto it, and
        only then removes its claim; losers remove theirs and answer not ok."""
        pauses.reached("lease-write")
        round_ = f"{path}{LEASE_CLAIMS}/{held or 'new'}"
        claim = f"{round_}/{uuid.uuid4().hex}"
        self.batch(add=(AddFile(claim, content=content),), copy=(), delete=())
        leftovers: tuple[str, ...] = ()
        try:
            for attempt in range(3):
                claims = [item for item in self.list(round_, recursive=False) if isinstance(item, FileItem)]
                ours = next((item for item in claims if item.path == claim), None)
                if ours is not None or attempt == 2:
                    break
                time.sleep(0.2)
            if ours is None or not isinstance(ours.uploaded, (int, float)) or not ours.xet_hash:
                # Nothing can be ordered then: an error (the host compiles, with one line), never a loop of claims.
                raise BackendError(ErrorCode.INVALID_DATA, f"lease on {self.bucket_id}: the listing of {round_} "
                                                           "does not show our claim with its upload time")
            oldest = ours.uploaded - LEASE_CLAIM_TTL
            # Claims of claimants that died before removing theirs: ignored, and removed with ours.
            leftovers = tuple(item.path for item in claims if isinstance(item.uploaded, (int, float))
                              and item.uploaded < oldest)
            if any(item.path != claim and isinstance(item.uploaded, (int, float))
                   and oldest <= item.uploaded <= ours.uploaded for item in claims):
                return {"ok": False, "content": None}
            if self._lease_hash(path) != held:  # another round's winner wrote it after our look
                return {"ok": False, "content": None}
            self.batch(add=(), copy=(CopyFile(claim, path, ours.xet_hash),), delete=())
            won = self._lease_hash(path) == ours.xet_hash
            return {"ok": won, "content": content if won else None}
        finally:
            try:
                self.batch(add=(), copy=(), delete=(claim, *leftovers))
            except BackendError as exc:  # left behind: later claimants ignore it after LEASE_CLAIM_TTL
                log.info("could not remove lease claim %s: %s", claim, exc)

    def _read_small(self, path: str) -> str | None:
        """The text of a small file (a lease), None when it is absent, "" when it is too large to be one (a
        lease that cannot be read: `expect=""` replaces or deletes it)."""
        import tempfile

        found = self.paths_info([path])
        if not found:
            return None
        if found[0].size > LEASE_MAX_BYTES:
            return ""
        with tempfile.TemporaryDirectory(prefix="lease-") as folder:
            local = os.path.join(folder, "lease")
            result = self.download([DownloadFile(path, local, found[0].size, found[0].xet_hash, found[0].digest)])
            if result.failed:
                return None
            with open(local, "rb") as handle:
                return handle.read(LEASE_MAX_BYTES + 1).decode("utf-8", "replace")
