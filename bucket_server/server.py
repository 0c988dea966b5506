"""The bucket server process: a Unix socket, length-prefixed JSON frames, one thread per connection at a time.

One server per user, host and endpoint (the socket path encodes them; the client starts it under a file
lock). It exits after `idle_timeout` seconds with no connection open and no request running, so its idle
timer can never fire in the middle of a transfer. Bucket tokens arrive with each request and never reach
the log.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import os
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from . import PROTOCOL_VERSION
from .backends import Backend, BackendError
from .backends.base import Staged
from .messages import (
    OPS, BatchRequest, CommitRequest, CommitResult, DownloadRequest, HelloRequest, ListRequest, ListResult, MessageError,
    LeaseResult, PathsInfoRequest, PathsInfoResult, RepoCopyRequest, RepoCopyResult, RepoInfoResult, RepoListResult,
    RepoPathsInfoResult, ShutdownResult, StageRequest, StageResult, StatusResult, parse_request,
)
from .private_dir import UnsafeRuntimeDir, open_private_dir, peer_uid
from .protocol import ErrorCode, FrameError, read_frame, write_frame

log = logging.getLogger("bucket_server")
SERVER_VERSION = "0.1.0"


#: Linux names an open directory /proc/self/fd/<fd>: binding through it uses the checked descriptor, not a name.
_HAS_PROC_FD = os.path.isdir("/proc/self/fd")


def _plain_id(value: Any) -> bool:
    """Whether a request's id is one the reply can echo: none, an integer or a short string (never a nested value)."""
    if isinstance(value, str):
        return len(value) <= 256
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _progress_emitter(conn: socket.socket, request_id: Any, write_lock: threading.Lock) -> Callable[[int, int], None]:
    """Progress frames for a request that asked for them: {"id", "progress": {"done", "total"}}, at most
    ten a second (plus the last one), written under the connection's lock (backends report from threads)."""
    last = [0.0]

    def emit(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        try:
            with write_lock:
                write_frame(conn, {"id": request_id, "progress": {"done": int(done), "total": int(total)}})
        except OSError:
            pass  # the client went away; the request finishes and its reply fails to send

    return emit


HEARTBEAT_INTERVAL = 5.0


def _remove_uncollected(args: DownloadRequest) -> None:
    """The client of a download is gone (killed mid-transfer): nobody will collect its files. Remove what this
    server wrote for it, and the folders that held them once empty (a file's folder and the one above it),
    up to the deepest folder that holds every file of the request (the client's temp folder: records and
    manifests sit in it, entries one level down) and never above it: the folder that holds the client's temp
    folder is shared with other clients. So a download still running when the next run swept the dead
    client's temp folder leaves nothing. The local paths were validated (absolute) at the server's edge."""
    paths = [item.local_path for item in args.files]
    if not paths:
        return
    top = os.path.commonpath([os.path.dirname(path) for path in paths])
    folders: set[str] = set()
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
        folder = os.path.dirname(path)
        for candidate in (folder, os.path.dirname(folder)):  # an entry's folder and the temp folder above it
            if candidate == top or candidate.startswith(top.rstrip(os.sep) + os.sep):
                folders.add(candidate)
    for folder in sorted(folders, key=len, reverse=True):  # deepest first; a folder with anything else stays
        try:
            os.rmdir(folder)
        except OSError:
            pass
    log.info("download abandoned by its client: removed %d files it would have collected", len(paths))


@functools.lru_cache(maxsize=1)
def _hub_version() -> str | None:
    """The installed huggingface_hub's version, read once: reading package metadata costs about 0.5 ms, and
    every connection's handshake reports it."""
    try:
        from importlib.metadata import version

        return version("huggingface_hub")
    except Exception:
        return None


class Heartbeats:
    """While a request runs, a frame {"id", "heartbeat": true} at least every HEARTBEAT_INTERVAL: the client tells
    a long transfer from a hung server by these, and gives up on a server that sends nothing for a while.

    One thread beats for every running request of the server: a thread per request cost each request, a
    handshake as much as a download, a thread start and join. A request whose connection is busy writing (a
    reply or a progress frame) skips that beat: the frame being written says the same."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        #: token -> [connection, request id, its write lock, when it last got a frame from us]
        self._running: dict[int, list[Any]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def running(self, conn: socket.socket, request_id: Any, write_lock: threading.Lock) -> Iterator[None]:
        """Beat for this request while the block runs."""
        token = next(self._tokens)
        with self._lock:
            self._running[token] = [conn, request_id, write_lock, time.monotonic()]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval / 4)
            now = time.monotonic()
            with self._lock:
                due = [(token, beat) for token, beat in self._running.items() if now - beat[3] >= self.interval / 2]
            for token, (conn, request_id, write_lock, _) in due:
                if not write_lock.acquire(blocking=False):
                    continue
                try:
                    with self._lock:
                        if token not in self._running:  # finished meanwhile: its reply may be on the wire already
                            continue
                        self._running[token][3] = now
                    write_frame(conn, {"id": request_id, "heartbeat": True})
                except OSError:
                    pass
                finally:
                    write_lock.release()


class ConnectionThreads:
    """The threads that serve connections, one connection at a time each. A new connection goes to a thread
    already waiting for one when there is any (a hand-off: about 30 us) rather than to a thread started for it
    (about 80 us, and more on a busy host, on the path of every new client's handshake). One thread waits from
    the start; a thread whose connection ended waits for the next, up to `keep` waiting, and exits beyond."""

    def __init__(self, serve: Callable[[socket.socket], None], keep: int = 4) -> None:
        self._serve = serve
        self._keep = keep
        self._lock = threading.Lock()
        self._waiting = 0
        self._handed: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()

    def start(self) -> None:
        """Start the first waiting thread."""
        self._start(None)

    def serve(self, conn: socket.socket) -> None:
        """Serve `conn` on a waiting thread, or on a new one when none waits."""
        with self._lock:
            if self._waiting:
                self._waiting -= 1
                self._handed.put(conn)
                return
        self._start(conn)

    def _start(self, conn: socket.socket | None) -> None:
        threading.Thread(target=self._run, args=(conn,), name="connection", daemon=True).start()

    def _run(self, conn: socket.socket | None) -> None:
        while True:
            if conn is not None:
                try:
                    self._serve(conn)
                except Exception:  # serve_connection handles its own errors: this is a bug, logged, the thread goes on
                    log.error("serving a connection crashed: %s", traceback.format_exc())
            with self._lock:
                if self._waiting >= self._keep:
                    return
                self._waiting += 1
            conn = self._handed.get()


@dataclass
class Activity:
    """Connections open and requests running: the server is idle only when both are zero."""

    connections: int = 0
    requests: int = 0
    last_change: float = field(default_factory=time.monotonic)
    #: When the last bucket operation finished (status queries do not count): what `server status` calls idle.
    last_operation: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def change(self, connections: int = 0, requests: int = 0) -> None:
        """Count connections and requests in (+1) or out (-1); any change restarts the idle clock."""
        with self.lock:
            self.connections += connections
            self.requests += requests
            self.last_change = time.monotonic()

    def idle_for(self) -> float:
        """Seconds with no connection open and no request running (0 while there is either)."""
        with self.lock:
            if self.connections or self.requests:
                return 0.0
            return time.monotonic() - self.last_change


class ConnectionStages:
    """The stages a connection made and has not committed yet (by name). Requests on one connection run one
    after the other, so no lock. At most MAX_OPEN of them: a client that stages without committing lets its
    oldest go."""

    MAX_OPEN = 4

    def __init__(self) -> None:
        self._open: dict[str, Staged] = {}

    def keep(self, staged: Staged) -> str:
        name = secrets.token_hex(8)
        self._open[name] = staged
        while len(self._open) > self.MAX_OPEN:
            self._open.pop(next(iter(self._open))).abort()
        return name

    def take(self, name: str) -> Staged:
        staged = self._open.pop(name, None)
        if staged is None:
            raise BackendError(ErrorCode.NOT_FOUND, f"no stage {name!r} on this connection (the server restarted, "
                                                    "or it was committed already): stage again")
        return staged

    def abort_all(self) -> None:
        while self._open:
            self._open.popitem()[1].abort()


class BucketServer:
    """The server: accepts connections on its socket, serves each on a thread of its own while it lasts
    (`ConnectionThreads`), exits when idle."""

    def __init__(self, socket_path: str, endpoint: str, idle_timeout: float, backlog: int = socket.SOMAXCONN,
                 policy: Any = None) -> None:
        """`policy`: the hf backend's RetryPolicy (its defaults when None)."""
        self.socket_path = socket_path
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        #: The listen backlog: as deep as the kernel allows, for many ranks connecting at once (tests set it small).
        self.backlog = backlog
        self._dir_fd = -1
        self.activity = Activity()
        self.heartbeats = Heartbeats()
        self.started = time.time()
        self.stopping = threading.Event()
        self._hf_api: Any = None
        self._policy: Any = policy
        self._api_lock = threading.Lock()
        #: op -> handler(request frame, its args as messages.parse_request typed them) -> the op's result type.
        #: The same operations as messages.OPS (tests/test_messages.py checks it).
        self._handlers: dict[str, Callable[[dict[str, Any], Any], Any]] = {
            "hello": self.op_hello,
            "status": lambda req, args: self.op_status(),
            "shutdown": lambda req, args: self.op_shutdown(),
            "info": lambda req, args: self.backend(req).info(),
            "create": lambda req, args: self.backend(req).create(private=args.private),
            "list": self.op_list,
            "paths_info": self.op_paths_info,
            "download": lambda req, args: self.backend(req).download(args.files, progress=req.get("_emit")),
            "batch": self.op_batch,
            "stage": self.op_stage,
            "commit": self.op_commit,
            # Model repos, read only (optimum-neuron's Git caches): request["repo"] = {"type": "model", "id", "revision"}.
            "repo_info": lambda req, args: RepoInfoResult.from_wire(self.repo(req).resolve()),
            "repo_list": lambda req, args: RepoListResult.from_wire(self.repo(req).list(args.prefix, recursive=args.recursive)),
            "repo_paths_info": lambda req, args: RepoPathsInfoResult.from_wire(self.repo(req).paths_info(list(args.paths))),
            "repo_download": lambda req, args: self.repo(req).download(args.files, progress=req.get("_emit")),
            "repo_copy": self.op_repo_copy,
            "lease": lambda req, args: LeaseResult.from_wire(
                self.backend(req).lease(args.path, args.mode, content=args.content, expect=args.expect)),
        }

    # ------------------------------------------------------------------------------ backends
    def hf_api(self) -> Any:
        """The one HfApi of this server, made at first use (huggingface_hub is imported only then), after
        its HTTP client is given our timeouts and its own retries are turned off."""
        with self._api_lock:
            if self._hf_api is None:
                try:
                    from huggingface_hub import HfApi
                except ImportError as exc:
                    raise BackendError(ErrorCode.INTERNAL, f"huggingface_hub is not installed in the server environment: {exc}") from None
                from .backends.hf import RetryPolicy, configure_http

                if self._policy is None:
                    self._policy = RetryPolicy()
                configure_http(self._policy)
                self._hf_api = HfApi(endpoint=self.endpoint)
            return self._hf_api

    def backend(self, request: dict[str, Any]) -> Backend:
        """The backend of the request's bucket (a directory, or a Hub bucket with the request's token)."""
        bucket = request.get("bucket")
        if not isinstance(bucket, dict) or not isinstance(bucket.get("location"), str):
            raise BackendError(ErrorCode.BAD_REQUEST, "request names no bucket")
        kind, location = bucket.get("kind"), bucket["location"]
        if kind == "dir":
            from .backends.dir import DirBackend

            return DirBackend(location)
        if kind == "hf":
            from .backends.hf import HfBackend

            token = (request.get("auth") or {}).get("token")
            return HfBackend(self.hf_api(), location, token if isinstance(token, str) else None, self._policy)
        raise BackendError(ErrorCode.BAD_REQUEST, f"unknown bucket kind {kind!r}")

    def repo(self, request: dict[str, Any]) -> Any:
        """The model repo a request names, at its revision, with the request's token (read only)."""
        from .backends.repo import RepoSource, parse_repo

        repo_id, revision = parse_repo(request.get("repo"))
        token = (request.get("auth") or {}).get("token")
        return RepoSource(self.hf_api(), repo_id, revision, token if isinstance(token, str) else None, self._policy)

    def op_repo_copy(self, request: dict[str, Any], args: RepoCopyRequest) -> RepoCopyResult:
        """Copy Xet-backed files of the request's model repo into its bucket by hash, on the Hub's side."""
        from .backends.hf import HfBackend
        from .backends.repo import copy_into_bucket, parse_repo

        repo_id, _ = parse_repo(request.get("repo"))
        bucket = self.backend(request)
        if not isinstance(bucket, HfBackend):
            raise BackendError(ErrorCode.BAD_REQUEST, "a copy by Xet hash needs a Hub bucket (stream the files into a directory bucket)")
        return RepoCopyResult.from_wire(copy_into_bucket(bucket, repo_id, [item.to_wire() for item in args.copies]))

    # ------------------------------------------------------------------------------ server ops
    def op_hello(self, request: dict[str, Any], args: HelloRequest) -> StatusResult:
        """The handshake: the server's status, or protocol_mismatch (the client then replaces this server)."""
        if args.protocol != PROTOCOL_VERSION:
            raise BackendError(
                ErrorCode.PROTOCOL_MISMATCH, f"server speaks protocol {PROTOCOL_VERSION}, client asked for {args.protocol}"
            )
        return self.op_status()

    def op_status(self) -> StatusResult:
        """What `neuron-cache server status` shows: versions, pid, socket, endpoint, activity."""
        return StatusResult(
            protocol=PROTOCOL_VERSION,
            pid=os.getpid(),
            server_version=SERVER_VERSION,
            socket=self.socket_path,
            endpoint=self.endpoint,
            python=sys.executable,
            huggingface_hub=_hub_version(),
            uptime=time.time() - self.started,
            idle_timeout=self.idle_timeout,
            connections=self.activity.connections,
            requests=max(0, self.activity.requests - 1),  # the others: this status request is running too
            idle_for=time.monotonic() - self.activity.last_operation,
        )

    def op_shutdown(self) -> ShutdownResult:
        """Stop accepting; the serving loop exits within its accept timeout."""
        self.stopping.set()
        return ShutdownResult()

    # ------------------------------------------------------------------------------ bucket ops
    def op_list(self, request: dict[str, Any], args: ListRequest) -> ListResult:
        """The backend's listing, as the op's result."""
        return ListResult(tuple(self.backend(request).list(args.prefix, recursive=args.recursive)))

    def op_paths_info(self, request: dict[str, Any], args: PathsInfoRequest) -> PathsInfoResult:
        """The backend's paths-info, as the op's result."""
        return PathsInfoResult(tuple(self.backend(request).paths_info(args.paths)))

    def op_batch(self, request: dict[str, Any], args: BatchRequest) -> Any:
        """Copies, then adds, then deletes, by the backend."""
        return self.backend(request).batch(add=args.add, copy=args.copy, delete=args.delete,
                                           progress=request.get("_emit"))

    def op_stage(self, request: dict[str, Any], args: StageRequest) -> StageResult:
        """Upload the bytes a commit of this connection will add; the stage is kept under a new name on the
        connection (until its commit, or until the connection closes)."""
        staged, result = self.backend(request).stage(args.add, progress=request.get("_emit"))
        if staged is None:
            return result
        stages: ConnectionStages = request["_stages"]
        return StageResult(stages.keep(staged), result.described)

    def op_commit(self, request: dict[str, Any], args: CommitRequest) -> CommitResult:
        """The phases in order, with the bytes of the named stage of this connection."""
        stages: ConnectionStages = request["_stages"]
        staged = stages.take(args.stage) if args.stage else None
        try:
            return self.backend(request).commit(staged, args.phases, progress=request.get("_emit"))
        finally:
            if staged is not None:
                staged.abort()  # committed (nothing left to let go) or failed (nothing of it was added)

    # ------------------------------------------------------------------------------ connections
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request -> its reply frame. Never raises: the args are validated here, once, into the op's
        request type (a MessageError is bad_request); a BackendError is its code; anything else is internal
        (with the traceback in the log). The typed args are kept in request["_args"]."""
        request_id = request.get("id")
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        started = time.monotonic()
        try:
            if handler is None or op not in OPS:
                raise BackendError(ErrorCode.BAD_REQUEST, f"unknown operation {op!r}")
            try:
                request["_args"] = args = parse_request(op, request.get("args"))
            except MessageError as exc:
                raise BackendError(ErrorCode.BAD_REQUEST, f"bad arguments for {op}: {exc}") from None
            request.setdefault("_emit", None)
            request.setdefault("_stages", ConnectionStages())  # a request handled alone: its own, empty
            result = handler(request, args)
            if not isinstance(result, OPS[op].result):
                raise BackendError(ErrorCode.INTERNAL, f"the {op} handler returned a {type(result).__name__}, "
                                                       f"not a {OPS[op].result.__name__}")
            # A handshake or a status is no event worth a line (one per connection: a warm run pays the write).
            log.log(logging.DEBUG if op in ("hello", "status") else logging.INFO, "%s ok in %.3fs", op,
                    time.monotonic() - started)
            return {"id": request_id, "ok": True, "result": result.to_wire()}
        except BackendError as exc:
            log.info("%s failed in %.3fs: %s: %s", op, time.monotonic() - started, exc.code.value, exc.message)
            if exc.__cause__ is not None:
                log.debug("cause: %s", "".join(traceback.format_exception(exc.__cause__)))
            return {"id": request_id, "ok": False, "error": {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}}
        except (KeyError, TypeError, ValueError) as exc:
            log.info("%s bad request: %r", op, exc)
            return {"id": request_id, "ok": False, "error": {"code": ErrorCode.BAD_REQUEST.value, "message": f"bad arguments for {op}: {exc!r}", "retryable": False}}
        except RecursionError:  # args nested just under the decoder's bound, then too deep for a repr or a walk
            log.info("%s bad request: arguments nested too deeply", op)
            return {"id": request_id, "ok": False, "error": {
                "code": ErrorCode.BAD_REQUEST.value, "message": f"bad arguments for {op}: nested too deeply",
                "retryable": False}}
        except Exception as exc:
            log.error("%s crashed: %s", op, traceback.format_exc())
            return {"id": request_id, "ok": False, "error": {"code": ErrorCode.INTERNAL.value, "message": f"{op}: {type(exc).__name__}: {exc}", "retryable": False}}

    def serve_connection(self, conn: socket.socket) -> None:
        """Requests of one client, one after the other, until it hangs up; another uid gets nothing."""
        self.activity.change(connections=1)
        write_lock = threading.Lock()
        stages = ConnectionStages()
        try:
            uid = peer_uid(conn)
            if uid is not None and uid != os.getuid():
                log.warning("refused a connection from uid %s", uid)
                return
            while not self.stopping.is_set():
                try:
                    request = read_frame(conn)
                except FrameError as exc:
                    log.info("dropping a connection: %s", exc)
                    try:
                        write_frame(conn, {"id": None, "ok": False, "error": {"code": ErrorCode.BAD_REQUEST.value, "message": str(exc), "retryable": False}})
                    except OSError:
                        pass
                    return
                if request is None:
                    return
                if not _plain_id(request.get("id")):  # echoed in every frame of the reply: it must encode back
                    with write_lock:
                        write_frame(conn, {"id": None, "ok": False, "error": {
                            "code": ErrorCode.BAD_REQUEST.value, "message": "a request's id is a number or a string",
                            "retryable": False}})
                    continue
                if request.get("progress"):
                    request["_emit"] = _progress_emitter(conn, request.get("id"), write_lock)
                request["_stages"] = stages
                self.activity.change(requests=1)
                try:
                    with self.heartbeats.running(conn, request.get("id"), write_lock):
                        response = self.handle(request)
                    try:
                        with write_lock:
                            write_frame(conn, response)
                    except OSError:
                        if isinstance(request.get("_args"), DownloadRequest):
                            _remove_uncollected(request["_args"])
                        raise
                finally:  # a request counts as running until its files are handed over or removed
                    self.activity.change(requests=-1)
                    if request.get("op") not in ("status", "hello"):
                        self.activity.last_operation = time.monotonic()
        except OSError as exc:
            log.info("connection ended: %s", exc)
        finally:
            stages.abort_all()  # the client is gone: its stages will never be committed
            conn.close()
            self.activity.change(connections=-1)

    def bind(self) -> socket.socket:
        """Bind under a temporary name, listen, then rename into place: a client never finds a socket file
        that does not yet accept connections. All of it goes through the verified directory descriptor."""
        directory, name = os.path.split(self.socket_path)
        self._dir_fd = fd = open_private_dir(directory or ".")
        tmp = f"{name}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp, dir_fd=fd)
        except FileNotFoundError:
            pass
        target = f"/proc/self/fd/{fd}/{tmp}" if _HAS_PROC_FD else os.path.join(directory, tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            sock.bind(target)
        finally:
            os.umask(old_umask)
        sock.listen(self.backlog)
        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        return sock

    def serve_forever(self) -> None:
        """Bind, then accept until shut down or idle for idle_timeout; the socket is removed only if it is
        still this server's."""
        sock = self.bind()
        name = os.path.basename(self.socket_path)
        bound_inode = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_ino
        sock.settimeout(0.25)
        threads = ConnectionThreads(self.serve_connection)
        threads.start()
        log.info("serving %s on %s (pid %d, idle timeout %ss)", self.endpoint, self.socket_path, os.getpid(), self.idle_timeout)
        try:
            while not self.stopping.is_set():
                if self.activity.idle_for() > self.idle_timeout:
                    log.info("idle for %ss: exiting", self.idle_timeout)
                    break
                try:
                    conn, _ = sock.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    log.error("accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                conn.settimeout(None)
                threads.serve(conn)
        finally:
            sock.close()
            try:  # remove the socket only if it is still ours (a newer server may have replaced it)
                if os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_ino == bound_inode:
                    os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            os.close(self._dir_fd)
            self._dir_fd = -1


#: How long hf_xet retries a request of its own (its default is about 105 s). A dead Xet storage behind a live
#: Hub API costs a whole run this plus about 2.5 s (hf_xet's last backoff), the listing and the server's start:
#: 4 s keeps that under 10 s (6 s measured 9.6 s).
XET_RETRY_DURATION = 4.0


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit code 2 (argparse would print its usage first)."""

    def error(self, message: str) -> "NoReturn":
        """Print one line naming the bad argument, and exit with code 2."""
        self.exit(2, f"{self.prog}: {message} (see python -m bucket_server --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _attempts(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The server's settings come from its command line only, validated here: it never reads NEURON_CACHE_*
    from the environment it inherited (a bad value there would break every later client for its whole life).
    The defaults live here and in RetryPolicy."""
    from .backends.hf import RetryPolicy

    defaults = RetryPolicy()
    parser = _OneLineParser(prog="bucket_server", description="optimum-neuron-cache bucket server")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--idle-timeout", type=_seconds, default=300.0, metavar="SECONDS",
                        help="exit after this long with no connection open and no request running (300)")
    parser.add_argument("--retry-budget", type=_seconds, default=defaults.budget, metavar="SECONDS",
                        help=f"all attempts of one Hub operation, timeouts and waits included ({defaults.budget:g})")
    parser.add_argument("--retry-attempts", type=_attempts, default=defaults.attempts, metavar="N",
                        help=f"attempts of one Hub operation at most ({defaults.attempts})")
    parser.add_argument("--http-timeout", type=_seconds, default=defaults.timeout, metavar="SECONDS",
                        help=f"timeout of a request that carries a transfer, such as a batch's commit ({defaults.timeout:g})")
    parser.add_argument("--metadata-timeout", type=_seconds, default=defaults.metadata_timeout, metavar="SECONDS",
                        help=f"timeout of a metadata request (info, list, paths-info), at most --http-timeout "
                             f"({defaults.metadata_timeout:g})")
    parser.add_argument("--xet-retry-duration", type=_seconds, default=None, metavar="SECONDS",
                        help="how long hf_xet retries its own requests (HF_XET_CLIENT_RETRY_MAX_DURATION; default: "
                             f"that variable when the server inherited it, else {XET_RETRY_DURATION:g})")
    parser.add_argument("--log-level", type=_log_level, default="INFO", metavar="LEVEL")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the server with the settings of its command line; 2 for a bad argument, 1 for an unsafe runtime
    directory."""
    args = parse_args(argv)
    from .backends.hf import RetryPolicy

    policy = RetryPolicy(budget=args.retry_budget, attempts=args.retry_attempts, timeout=args.http_timeout,
                         metadata_timeout=args.metadata_timeout)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    # huggingface_hub reads these at import: no telemetry, no progress bars on a log file.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # hf_xet retries its own requests for about 105 s by default: bound them like every other request.
    if args.xet_retry_duration is not None:
        os.environ["HF_XET_CLIENT_RETRY_MAX_DURATION"] = f"{round(args.xet_retry_duration * 1000)}ms"
    else:
        os.environ.setdefault("HF_XET_CLIENT_RETRY_MAX_DURATION", f"{round(XET_RETRY_DURATION * 1000)}ms")
    os.environ["HF_ENDPOINT"] = args.endpoint
    log.info("retries: %d attempts within %g s; timeouts: %g s for metadata, %g s for transfers; hf_xet retries "
             "for %s", policy.attempts, policy.budget, policy.request_timeout(transfer=False), policy.timeout,
             os.environ["HF_XET_CLIENT_RETRY_MAX_DURATION"])
    try:
        BucketServer(args.socket, args.endpoint, args.idle_timeout, policy=policy).serve_forever()
    except UnsafeRuntimeDir as exc:
        log.error("%s: the server will not bind there", exc)  # one line in the log, which the client quotes
        return 1
    return 0
