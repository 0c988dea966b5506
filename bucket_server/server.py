"""The bucket server process: a Unix socket, length-prefixed JSON frames, one thread per connection.

One server per user, host and endpoint (the socket path encodes them; the client starts it under a file
lock). It exits after `idle_timeout` seconds with no connection open and no request running, so its idle
timer can never fire in the middle of a transfer. Bucket tokens arrive with each request and never reach
the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from . import PROTOCOL_VERSION
from .backends import Backend, BackendError
from .private_dir import UnsafeRuntimeDir, open_private_dir, peer_uid
from .protocol import ErrorCode, FrameError, read_frame, write_frame

log = logging.getLogger("bucket_server")
SERVER_VERSION = "0.1.0"


#: Linux names an open directory /proc/self/fd/<fd>: binding through it uses the checked descriptor, not a name.
_HAS_PROC_FD = os.path.isdir("/proc/self/fd")


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


def _remove_uncollected(request: dict[str, Any]) -> None:
    """The client of a download is gone (killed mid-transfer): nobody will collect its files. Remove what this
    server wrote for it, and the folders that held them once empty (its entry folders and its temp folder),
    so that a download still running when the next run swept the dead client's temp folder leaves nothing."""
    files = request.get("args", {}).get("files")
    folders: set[str] = set()
    for item in files if isinstance(files, list) else []:
        path = item.get("local_path") if isinstance(item, dict) else None
        if isinstance(path, str) and os.path.isabs(path):
            try:
                os.unlink(path)
            except OSError:
                pass
            folders.update((os.path.dirname(path), os.path.dirname(os.path.dirname(path))))
    for folder in sorted(folders, key=len, reverse=True):  # deepest first; a folder with anything else stays
        try:
            os.rmdir(folder)
        except OSError:
            pass
    log.info("download abandoned by its client: removed %d files it would have collected", len(files or []))


class _Heartbeat:
    """While a request runs, a frame {"id", "heartbeat": true} every few seconds: the client tells a long
    transfer from a hung server by these, and gives up on a server that sends nothing for a while."""

    def __init__(self, conn: socket.socket, request_id: Any, write_lock: threading.Lock) -> None:
        self.conn, self.request_id, self.write_lock = conn, request_id, write_lock
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_INTERVAL):
            try:
                with self.write_lock:
                    write_frame(self.conn, {"id": self.request_id, "heartbeat": True})
            except OSError:
                return

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


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
        with self.lock:
            self.connections += connections
            self.requests += requests
            self.last_change = time.monotonic()

    def idle_for(self) -> float:
        with self.lock:
            if self.connections or self.requests:
                return 0.0
            return time.monotonic() - self.last_change


class BucketServer:
    def __init__(self, socket_path: str, endpoint: str, idle_timeout: float, backlog: int = socket.SOMAXCONN) -> None:
        self.socket_path = socket_path
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        #: The listen backlog: as deep as the kernel allows, for many ranks connecting at once (tests set it small).
        self.backlog = backlog
        self._dir_fd = -1
        self.activity = Activity()
        self.started = time.time()
        self.stopping = threading.Event()
        self._hf_api: Any = None
        self._policy: Any = None
        self._api_lock = threading.Lock()
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "hello": self.op_hello,
            "status": self.op_status,
            "shutdown": self.op_shutdown,
            "info": lambda req: self.backend(req).info(),
            "create": lambda req: self.backend(req).create(private=req["args"].get("private")),
            "list": lambda req: self.backend(req).list(
                str(req["args"].get("prefix", "")), recursive=bool(req["args"].get("recursive", True))
            ),
            "paths_info": lambda req: self.backend(req).paths_info(list(req["args"]["paths"])),
            "download": lambda req: self.backend(req).download(list(req["args"]["files"]), progress=req.get("_emit")),
            "batch": lambda req: self.backend(req).batch(
                add=list(req["args"].get("add", [])),
                copy=list(req["args"].get("copy", [])),
                delete=list(req["args"].get("delete", [])),
                progress=req.get("_emit"),
            ),
        }

    # ------------------------------------------------------------------------------ backends
    def hf_api(self) -> Any:
        with self._api_lock:
            if self._hf_api is None:
                try:
                    from huggingface_hub import HfApi
                except ImportError as exc:
                    raise BackendError(ErrorCode.INTERNAL, f"huggingface_hub is not installed in the server environment: {exc}") from None
                from .backends.hf import RetryPolicy, configure_http

                self._policy = RetryPolicy.from_env()
                configure_http(self._policy)
                self._hf_api = HfApi(endpoint=self.endpoint)
            return self._hf_api

    def backend(self, request: dict[str, Any]) -> Backend:
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

    # ------------------------------------------------------------------------------ server ops
    def op_hello(self, request: dict[str, Any]) -> dict[str, Any]:
        wanted = request["args"].get("protocol")
        if wanted != PROTOCOL_VERSION:
            raise BackendError(
                ErrorCode.PROTOCOL_MISMATCH, f"server speaks protocol {PROTOCOL_VERSION}, client asked for {wanted}"
            )
        return self.op_status(request)

    def op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            from importlib.metadata import version

            hub_version = version("huggingface_hub")
        except Exception:
            hub_version = None
        return {
            "protocol": PROTOCOL_VERSION,
            "server_version": SERVER_VERSION,
            "pid": os.getpid(),
            "socket": self.socket_path,
            "endpoint": self.endpoint,
            "python": sys.executable,
            "huggingface_hub": hub_version,
            "uptime": time.time() - self.started,
            "idle_timeout": self.idle_timeout,
            "connections": self.activity.connections,
            "requests": max(0, self.activity.requests - 1),  # the others: this status request is running too
            "idle_for": time.monotonic() - self.activity.last_operation,
        }

    def op_shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        self.stopping.set()
        return {"stopping": True}

    # ------------------------------------------------------------------------------ connections
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        request_id = request.get("id")
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        started = time.monotonic()
        try:
            if handler is None:
                raise BackendError(ErrorCode.BAD_REQUEST, f"unknown operation {op!r}")
            if not isinstance(request.get("args", {}), dict):
                raise BackendError(ErrorCode.BAD_REQUEST, "args must be an object")
            request.setdefault("args", {})
            request.setdefault("_emit", None)
            result = handler(request)
            log.info("%s ok in %.3fs", op, time.monotonic() - started)
            return {"id": request_id, "ok": True, "result": result}
        except BackendError as exc:
            log.info("%s failed in %.3fs: %s: %s", op, time.monotonic() - started, exc.code.value, exc.message)
            if exc.__cause__ is not None:
                log.debug("cause: %s", "".join(traceback.format_exception(exc.__cause__)))
            return {"id": request_id, "ok": False, "error": {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}}
        except (KeyError, TypeError, ValueError) as exc:
            log.info("%s bad request: %r", op, exc)
            return {"id": request_id, "ok": False, "error": {"code": ErrorCode.BAD_REQUEST.value, "message": f"bad arguments for {op}: {exc!r}", "retryable": False}}
        except Exception as exc:
            log.error("%s crashed: %s", op, traceback.format_exc())
            return {"id": request_id, "ok": False, "error": {"code": ErrorCode.INTERNAL.value, "message": f"{op}: {type(exc).__name__}: {exc}", "retryable": False}}

    def serve_connection(self, conn: socket.socket) -> None:
        self.activity.change(connections=1)
        write_lock = threading.Lock()
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
                if request.get("progress"):
                    request["_emit"] = _progress_emitter(conn, request.get("id"), write_lock)
                self.activity.change(requests=1)
                heartbeat = _Heartbeat(conn, request.get("id"), write_lock)
                try:
                    with heartbeat:
                        response = self.handle(request)
                    try:
                        with write_lock:
                            write_frame(conn, response)
                    except OSError:
                        if request.get("op") == "download":
                            _remove_uncollected(request)
                        raise
                finally:  # a request counts as running until its files are handed over or removed
                    self.activity.change(requests=-1)
                    if request.get("op") not in ("status", "hello"):
                        self.activity.last_operation = time.monotonic()
        except OSError as exc:
            log.info("connection ended: %s", exc)
        finally:
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
        sock = self.bind()
        name = os.path.basename(self.socket_path)
        bound_inode = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_ino
        sock.settimeout(0.25)
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
                threading.Thread(target=self.serve_connection, args=(conn,), daemon=True).start()
        finally:
            sock.close()
            try:  # remove the socket only if it is still ours (a newer server may have replaced it)
                if os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False).st_ino == bound_inode:
                    os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            os.close(self._dir_fd)
            self._dir_fd = -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bucket_server", description="optimum-neuron-cache bucket server")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    parser.add_argument("--log-level", default=os.environ.get("NEURON_CACHE_SERVER_LOG_LEVEL", "INFO"))
    # Settings the client validated and passes as arguments (it scrubs them from our environment). Minimal
    # stand-in until the server validates them itself: they reach the code that read them from the environment.
    for flag, variable in (("--retry-budget", "NEURON_CACHE_RETRY_BUDGET"), ("--retry-attempts", "NEURON_CACHE_RETRY_ATTEMPTS"),
                           ("--http-timeout", "NEURON_CACHE_HTTP_TIMEOUT"), ("--metadata-timeout", "NEURON_CACHE_METADATA_TIMEOUT"),
                           ("--xet-retry-duration", "NEURON_CACHE_XET_RETRY_DURATION")):
        parser.add_argument(flag, dest=variable, type=int if flag == "--retry-attempts" else float, default=None)
    args = parser.parse_args(argv)
    for variable in ("NEURON_CACHE_RETRY_BUDGET", "NEURON_CACHE_RETRY_ATTEMPTS", "NEURON_CACHE_HTTP_TIMEOUT", "NEURON_CACHE_METADATA_TIMEOUT"):
        if getattr(args, variable) is not None:
            os.environ[variable] = str(getattr(args, variable))
    if getattr(args, "NEURON_CACHE_XET_RETRY_DURATION") is not None:
        os.environ["NEURON_CACHE_XET_RETRY_DURATION"] = f"{round(args.NEURON_CACHE_XET_RETRY_DURATION * 1000)}ms"
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(process)d %(levelname)s %(message)s")
    # huggingface_hub reads these at import: no telemetry, no progress bars on a log file.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # hf_xet retries its own requests for about 105 s by default: bound them like every other request.
    os.environ.setdefault("HF_XET_CLIENT_RETRY_MAX_DURATION", os.environ.get("NEURON_CACHE_XET_RETRY_DURATION", "10s"))
    os.environ["HF_ENDPOINT"] = args.endpoint
    try:
        BucketServer(args.socket, args.endpoint, args.idle_timeout).serve_forever()
    except UnsafeRuntimeDir as exc:
        log.error("%s: the server will not bind there", exc)  # one line in the log, which the client quotes
        return 1
    return 0
