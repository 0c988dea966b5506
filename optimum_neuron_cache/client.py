"""Talk to the bucket server: start it on demand, reuse one connection, map error codes to exceptions.

A `BucketClient` is bound to one bucket. Connections are shared per socket by every client of the process
(a deliberate cache: the handshake is paid once). If the server dies, the next request restarts it, and an
idempotent request is retried once.

Requests and results are the typed messages of `bucket_server.messages`. `BucketClient.send` is the client's
edge: every reply is validated there, once; a listing's untrusted items are left out with one warning per
reply. The bucket methods (`list`, `download`, ...) return the validated result in its wire form (plain
dicts, as callers have always read them).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from bucket_server import PROTOCOL_VERSION
from bucket_server.messages import (
    OPS, AddFile, BatchRequest, CommitRequest, CopyFile, CreateRequest, CreateResult, DownloadFile, DownloadRequest, FolderItem, InfoRequest,
    LeaseRequest, ListRequest, MessageError, PathsInfoRequest, StageRequest, StatusRequest, StatusResult, op_of,
    parse_result,
)
from bucket_server.protocol import ErrorCode, FrameError, encode, read_frame, write_frame

from . import crashpoints
from ._version import __version__
from .buckets import BucketRef
from . import settings
from .errors import (
    BucketAuthError,
    BucketNotFoundError,
    ConfigurationError,
    ProtocolMismatchError,
    RemoteError,
    RemoteInvalidDataError,
    RemoteUnavailableError,
    ServerError,
)
from .server_launcher import ServerAddress, connect_server, ensure_server, server_address

log = logging.getLogger("optimum_neuron_cache")

CONNECT_ATTEMPTS = 4
#: Crash-test phases (crashpoints.py) reached once a request of these operations is on the wire.
_ON_THE_WIRE = {"download": "download-sent", "batch": "batch-sent", "stage": "stage-sent", "commit": "commit-sent"}
#: Read-only operations sent right behind the handshake on a new connection, without waiting for its reply: a
#: server of another protocol version may run one before the client hangs up on it, which changes nothing.
_PIPELINED = frozenset({"list", "paths_info", "info"})
#: progress(done_bytes, total_bytes) of a transfer, reported by the server while it runs.
ProgressCallback = Callable[[int, int], None]
#: Operations that can be sent twice with the same effect: retried once after a server restart (messages.OPS
#: says which).
IDEMPOTENT = frozenset(name for name, op in OPS.items() if op.idempotent)

_ERRORS: dict[str, type[RemoteError]] = {
    ErrorCode.BUCKET_NOT_FOUND.value: BucketNotFoundError,
    ErrorCode.UNAUTHORIZED.value: BucketAuthError,
    ErrorCode.FORBIDDEN.value: BucketAuthError,
    ErrorCode.NOT_FOUND.value: RemoteInvalidDataError,
    ErrorCode.UNAVAILABLE.value: RemoteUnavailableError,
    ErrorCode.INVALID_DATA.value: RemoteInvalidDataError,
    ErrorCode.PROTOCOL_MISMATCH.value: ProtocolMismatchError,
    ErrorCode.INTERNAL.value: ServerError,
}


def read_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The caller's Hub token, as huggingface_hub finds it (HF_TOKEN, then the stored token file),
    read without importing huggingface_hub."""
    from .buckets import hf_home

    env = os.environ if environ is None else environ
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(name, "").strip():
            return env[name].strip()
    path = Path(env["HF_TOKEN_PATH"]).expanduser() if env.get("HF_TOKEN_PATH") else hf_home(env) / "token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None


def _count(value: Any) -> int | None:
    """A progress figure of a reply: a whole number of bytes (a float, a bool, text or a huge number is None)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None


class _Connection:
    """One socket to the server; requests on it are serialized by a lock."""

    #: The uid the server must run as; None is our own. Only tests set another, to see a foreign server refused.
    expected_uid: int | None = None

    def __init__(self, address: ServerAddress, environ: Mapping[str, str]) -> None:
        self.address = address
        self.environ = environ
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.server_info: dict[str, Any] = {}
        self.next_id = 0
        #: The id of a handshake sent ahead (`send_ahead`) whose reply the next request reads first.
        self.handshake: int | None = None
        #: A read-only request sent ahead (`send_ahead`): (its id, the message without its id). The next request
        #: reads its reply: its own if it is the same message, else the reply is dropped.
        self.ahead: tuple[int, dict[str, Any]] | None = None
        #: The server sends a frame at least every 5 s while a request runs: silence this long means it hung.
        self.timeout = settings.request_timeout(environ)

    def send_ahead(self, first: dict[str, Any] | None = None) -> bool:
        """Connect and send the handshake now, without waiting for its reply (the next request reads it), so the
        round trip overlaps whatever the caller does meanwhile (a warm run's local scan and journal). With
        `first` (a read-only request the caller expects to send next), send it too, behind the handshake or on
        the connection already open: the next request that is the same message takes its reply, any other
        drops it. Only a server that is running and not busy is connected to here: starting one, a full backlog
        and every failure are left to the next request, which meets them as it would without this. Returns
        whether `first` was sent."""
        if not self.lock.acquire(blocking=False):  # another thread of this process is talking to the server
            return False
        try:
            if self.ahead is not None:
                return False
            sock, frames = self.sock, []
            if sock is None:
                try:
                    sock = connect_server(self.address, self.timeout, expected_uid=self.expected_uid,
                                          on_busy=_leave_to_the_request)
                except Exception:
                    return False
                frames.append(self._hello())
            if first is not None and first["op"] in _PIPELINED:
                frames.append(self._numbered(dict(first)))
            if not frames:
                return False
            try:
                sock.sendall(b"".join(encode(frame) for frame in frames))
            except BaseException as exc:
                sock.close()
                self.close()
                if not isinstance(exc, Exception):  # Ctrl-C goes up; a failed send is the request's to meet
                    raise
                return False
            if self.sock is None:
                self.sock, self.handshake = sock, frames[0]["id"]
            if frames[-1]["op"] != "hello":
                self.ahead = (frames[-1]["id"], dict(first))  # type: ignore[arg-type]
                return True
            return False
        finally:
            self.lock.release()

    def _finish_handshake(self) -> None:
        """Read the reply of the handshake `send_ahead` sent; a connection that failed meanwhile is
        closed, for the request to connect anew as it would have."""
        hello_id, self.handshake = self.handshake, None
        if hello_id is None or self.sock is None:
            return
        try:
            reply = self._await(hello_id)
        except (OSError, FrameError):
            self.close()
            return
        self._check_hello(reply)

    def _take_ahead(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The reply of the request sent ahead when it is `message`; else it is read and dropped (None). A
        connection that failed meanwhile is closed (None), for the request to connect anew."""
        assert self.ahead is not None
        (ahead_id, sent), self.ahead = self.ahead, None
        if self.sock is None:
            return None
        try:
            reply = self._await(ahead_id)
        except (OSError, FrameError):
            self.close()
            return None
        return reply if sent == message else None

    def _hello(self) -> dict[str, Any]:
        return self._numbered({"op": "hello", "args": {"protocol": PROTOCOL_VERSION, "client_version": __version__}})

    def _check_hello(self, reply: dict[str, Any]) -> None:
        """Take the server's handshake reply, or hang up and raise (ProtocolMismatchError: the caller replaces
        the server)."""
        if not reply.get("ok"):
            error = reply.get("error") or {}
            self.close()  # a server of another protocol may have run a request sent behind the handshake: read-only, so harmless
            if error.get("code") == ErrorCode.PROTOCOL_MISMATCH.value:
                raise ProtocolMismatchError(f"bucket server at {self.address.socket_path}: {error.get('message')}")
            raise ServerError(f"bucket server handshake failed: {error.get('message')}")
        self.server_info = reply["result"]

    def _connect(self, first: dict[str, Any] | None = None) -> int | None:
        """Connect and shake hands; with `first` (a read-only request), send it right behind the handshake and
        return its id, for the caller to await its reply: a warm run's one request costs one round trip, not
        two. A server that is dying (killed, but its socket not yet closed by the kernel) can still accept a
        connection and then reset it: that is a failed start, not a failed request, so connecting is tried a
        few times, each time through ensure_server. So is a refused connect or a missing socket: a server that
        is restarting, or exiting idle as we connect."""
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                return self._connect_once(dict(first) if first is not None else None)
            except (ConnectionError, FileNotFoundError, FrameError):
                self.close()
                if attempt + 1 == CONNECT_ATTEMPTS:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _connect_once(self, first: dict[str, Any] | None) -> int | None:
        # Through the verified runtime directory, with a full backlog retried, and refused unless the server
        # is our own uid: nothing is written before that check. The server is started (or a stale socket
        # replaced) only when no server answers: a running one costs a warm run one connect, not two.
        try:
            self.sock = connect_server(self.address, self.timeout, expected_uid=self.expected_uid)
        except (FileNotFoundError, ConnectionRefusedError):
            ensure_server(self.address, self.environ)
            self.sock = connect_server(self.address, self.timeout, expected_uid=self.expected_uid)
        hello = self._hello()
        frames = [hello] if first is None else [hello, self._numbered(first)]
        self.sock.sendall(b"".join(encode(frame) for frame in frames))
        self._check_hello(self._await(hello["id"]))
        return frames[1]["id"] if first is not None else None

    def _numbered(self, message: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
        self.next_id += 1
        message["id"] = self.next_id
        if progress is not None:
            message["progress"] = True
        return message

    def _exchange(self, message: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
        assert self.sock is not None
        write_frame(self.sock, self._numbered(message, progress))
        if message["op"] in _ON_THE_WIRE:
            crashpoints.reached(_ON_THE_WIRE[message["op"]])
        return self._await(message["id"], progress)

    def _await(self, request_id: int, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """The reply to request `request_id`, passing progress frames on and skipping heartbeats."""
        assert self.sock is not None
        while True:
            reply = read_frame(self.sock)
            if reply is None:
                raise ConnectionResetError("the bucket server closed the connection")
            if reply.get("id") != request_id:
                raise FrameError("reply does not match the request")
            if "ok" not in reply:  # a heartbeat or a progress frame: the request is still running
                if progress is not None and isinstance(reply.get("progress"), dict):
                    done, total = (_count(reply["progress"].get(name)) for name in ("done", "total"))
                    if done is not None and total is not None:  # a figure that is no count is left out
                        progress(done, total)
                continue
            return reply

    def close(self) -> None:
        self.handshake = self.ahead = None
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def request(self, message: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
        return self.request_counted(message, progress)[0]

    def request_counted(self, message: dict[str, Any], progress: ProgressCallback | None = None) -> tuple[dict[str, Any], bool]:
        """The reply to `message`, and whether it was sent here (False: it was sent ahead, `send_ahead`)."""
        attempts = 2 if message["op"] in IDEMPOTENT else 1
        with self.lock:
            for attempt in range(attempts):
                try:
                    if self.handshake is not None:
                        self._finish_handshake()
                    if self.ahead is not None and (reply := self._take_ahead(message)) is not None:
                        return reply, False
                    if self.sock is None:
                        first = self._connect(message if message["op"] in _PIPELINED and progress is None else None)
                        if first is not None:
                            return self._await(first), True
                    return self._exchange(dict(message), progress), True
                except ProtocolMismatchError:
                    self._replace_server()
                    if attempt + 1 == attempts:
                        raise
                except (OSError, FrameError) as exc:
                    self.close()
                    if attempt + 1 == attempts:
                        raise ServerError(f"lost the bucket server ({type(exc).__name__}: {exc}); log: {self.address.log_path}") from None
                except BaseException:
                    # Interrupted (Ctrl-C) mid-request: the rest of the reply would desynchronize the stream.
                    self.close()
                    raise
        raise AssertionError("unreachable")

    def _replace_server(self) -> None:
        """A server of another protocol version holds the socket: ask it to stop so ours can start."""
        try:
            sock = connect_server(self.address, 5, expected_uid=self.expected_uid)
        except OSError:
            sock = None
        if sock is not None:
            try:
                write_frame(sock, {"id": 0, "op": "shutdown", "args": {}})
                read_frame(sock)
            except (OSError, FrameError):
                pass
            finally:
                sock.close()
        with self.address.open_dir() as rundir:
            rundir.unlink(self.address.socket_path.name)


class _Busy(Exception):
    """The server's listen backlog is full: an early handshake leaves the waiting to the request."""


def _leave_to_the_request() -> None:
    raise _Busy()


#: One connection per (socket, pid): a deliberate cache, so the handshake is paid once per process.
#: The pid is part of the key so that a fork()ed child never shares its parent's socket.
_connections: dict[tuple[Path, int], _Connection] = {}
_connections_lock = threading.Lock()


def _connection(environ: Mapping[str, str], address: ServerAddress | None = None) -> _Connection:
    """This process's connection to the server of `environ` (at `address` when the caller knows it already)."""
    address = server_address(environ) if address is None else address
    key = (address.socket_path, os.getpid())
    with _connections_lock:
        conn = _connections.get(key)
        if conn is None:
            conn = _connections[key] = _Connection(address, dict(environ))
        return conn


def running_server(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Status of the bucket server for this user, host and endpoint, without starting one (None: not running)."""
    env = dict(os.environ if environ is None else environ)
    address = server_address(env)
    try:
        sock = connect_server(address, 5)
    except OSError:
        return None
    try:
        write_frame(sock, {"id": 1, "op": "status", "args": {}})
        reply = read_frame(sock)
    except (OSError, FrameError):
        return None
    finally:
        sock.close()
    if not (reply and reply.get("ok")):
        return None
    try:
        return StatusResult.from_wire(reply.get("result")).to_wire()
    except MessageError:
        return None


def stop_server(environ: Mapping[str, str] | None = None, timeout: float = 10.0) -> bool:
    """Ask the running server to exit and wait until its socket is gone. False if none was running."""
    env = dict(os.environ if environ is None else environ)
    address = server_address(env)
    with _connections_lock:
        for key in [key for key in _connections if key[0] == address.socket_path]:
            _connections.pop(key).close()
    try:
        sock = connect_server(address, 5)
    except OSError:
        return False
    try:
        write_frame(sock, {"id": 1, "op": "shutdown", "args": {}})
        read_frame(sock)
    except (OSError, FrameError):
        return False
    finally:
        sock.close()
    deadline = time.monotonic() + timeout
    with address.open_dir() as rundir:
        while rundir.exists(address.socket_path.name) and time.monotonic() < deadline:
            time.sleep(0.02)
    return True


def result_of(op: str, reply: dict[str, Any], where: str) -> Any:
    """A reply's typed result, validated here, once (for bucket and model-repo requests alike): an error reply
    raises its typed exception; a result that cannot be trusted raises RemoteInvalidDataError; a listing's
    untrusted items are left out, with one warning naming `where`."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        code = str(error.get("code"))
        text = str(error.get("message") or code)
        if code == ErrorCode.BAD_REQUEST.value:
            raise RemoteInvalidDataError(text)
        raise _ERRORS.get(code, ServerError)(text)
    try:
        result = parse_result(op, reply.get("result"))
    except (MessageError, RecursionError) as exc:
        raise RemoteInvalidDataError(f"{op} on {where}: the reply cannot be trusted: "
                                     f"{exc if isinstance(exc, MessageError) else 'nested too deeply'}") from None
    skipped = getattr(result, "skipped", ())
    if skipped:
        log.warning("optimum-neuron-cache: %s on %s: skipped %d listed item(s) that cannot be trusted, e.g. %s",
                    op, where, len(skipped), skipped[0])
    return result


class BucketClient:
    """Bucket operations for one bucket, through the bucket server."""

    def __init__(self, bucket: BucketRef, environ: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        settings.check_client(env)  # bad settings fail here, in one line, before any request or server start
        if bucket.kind == "hf" and env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise ConfigurationError(f"HF_HUB_OFFLINE is set: the Hub bucket {bucket} cannot be reached; unset it to use the bucket")
        self.bucket = bucket
        self.environ = env
        self._token = read_token(env) if bucket.kind == "hf" else None
        #: Requests sent by this client: the figure benchmarks and "cheap when warm" are judged by.
        self.requests = 0
        self._address: ServerAddress | None = None  # the server's, worked out at the first request

    def _connection(self) -> _Connection:
        if self._address is None:
            self._address = server_address(self.environ)
        return _connection(self.environ, self._address)

    def _message(self, request: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"op": op_of(request).name, "args": request.to_wire(), "bucket": self.bucket.to_wire()}
        if self._token:
            message["auth"] = {"token": self._token}
        return message

    def connect_ahead(self, first: PathsInfoRequest | ListRequest | InfoRequest | None = None) -> None:
        """Start connecting to a running server now (see `_Connection.send_ahead`): the next request then finds
        the handshake done. With `first`, a read-only request this client expects to send next, send it too,
        on a new connection or the one already open: sending the same request later takes its reply (any other
        request drops it). Never raises, never starts a server."""
        try:
            if self._connection().send_ahead(self._message(first) if first is not None else None):
                self.requests += 1
        except Exception:
            return  # a bad address or setting: the first request raises it, as it would without this

    def send(self, request: Any, *, progress: ProgressCallback | None = None) -> Any:
        """Send one typed request (a request class of bucket_server.messages) and return its typed result,
        validated here, once. An error reply raises its typed exception; a result that cannot be trusted
        raises RemoteInvalidDataError; a listing's untrusted items are left out, with one warning."""
        message = self._message(request)
        self.requests += 1
        reply, sent = self._connection().request_counted(message, progress)
        if not sent:  # sent ahead, and counted then
            self.requests -= 1
        return result_of(message["op"], reply, f"bucket {self.bucket}")

    # Bucket operations (see bucket_server.backends.base.Backend for their contracts); each returns the
    # validated result in its wire form.
    def info(self) -> dict[str, Any]:
        """The bucket's id, privacy, size and file count (BucketNotFoundError when it does not exist)."""
        return self.send(InfoRequest()).to_wire()

    def create(self, *, private: bool | None = None) -> CreateResult:
        """Create the bucket if missing (exists-ok): whether it was created, and the id the Hub gave it."""
        return self.send(CreateRequest(private))

    def list(self, prefix: str, *, recursive: bool = True) -> list[dict[str, Any]]:
        """The files (and, not recursive, folders) strictly under the folder `prefix`."""
        return self.send(ListRequest(prefix, recursive)).to_wire()

    def folders(self, prefix: str) -> list[str]:
        """The names of the folders directly under `prefix` ("" for the root): the one way folders are listed."""
        return [item.path.rsplit("/", 1)[-1] for item in self.send(ListRequest(prefix, False)).items
                if isinstance(item, FolderItem)]

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        """The files among `paths` that exist (missing ones are left out): one request per 1000 paths on the
        server's side."""
        return self.send(PathsInfoRequest(tuple(paths))).to_wire() if paths else []

    def download(self, files: Iterable[DownloadFile | Mapping[str, Any]], *,
                 progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Download files to local paths, each checked by the server against its digest; see Backend.download.
        Files are DownloadFile, or their wire form."""
        return self.send(DownloadRequest(_typed(DownloadFile, files, "download")), progress=progress).to_wire()

    def batch(self, *, add: Iterable[AddFile | Mapping[str, Any]] | None = None,
              copy: Iterable[CopyFile | Mapping[str, Any]] | None = None, delete: Iterable[str] | None = None,
              progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Copies, then adds, then deletes, in one request; see Backend.batch. Items are AddFile and CopyFile,
        or their wire form."""
        request = BatchRequest(_typed(AddFile, add or (), "batch"), _typed(CopyFile, copy or (), "batch"),
                               tuple(delete or ()))
        return self.send(request, progress=progress).to_wire()

    def stage(self, add: Iterable[AddFile | Mapping[str, Any]], *, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Upload the bytes of files a `commit` will add, adding them nowhere yet; see Backend.stage:
        {"stage", "described"}."""
        return self.send(StageRequest(_typed(AddFile, add, "stage")), progress=progress).to_wire()

    def commit(self, stage: str, phases: Iterable[BatchRequest | Mapping[str, Any]], *,
               progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Batches applied in order, each once the one before it landed, with the bytes of `stage`; see
        Backend.commit. A phase is a BatchRequest, or its wire form {"add", "copy", "delete"} (each optional;
        items as `batch` takes them)."""
        return self.send(CommitRequest(stage, _typed(BatchRequest, phases, "commit")), progress=progress).to_wire()

    def lease(self, path: str, mode: str, *, content: str | None = None, expect: str | None = None) -> dict[str, Any]:
        """A compile lease file: read, create, replace or delete it, conditionally; see Backend.lease."""
        return self.send(LeaseRequest(path, mode, content, expect)).to_wire()

    def server_status(self) -> dict[str, Any]:
        """The server's status (pid, versions, uptime, connections)."""
        return self.send(StatusRequest()).to_wire()


_Item = TypeVar("_Item")


def _typed(cls: type[_Item], items: Iterable[Any], op: str) -> tuple[_Item, ...]:
    """Request items as `cls` (given typed, or in their wire form), checked as the server checks them: one
    that it would refuse (an unsafe path, a relative local path) raises RemoteInvalidDataError, as the
    server's bad_request would, before anything is sent."""
    try:
        return tuple(cls.from_wire(item.to_wire() if isinstance(item, cls) else item) for item in items)  # type: ignore[attr-defined]
    except MessageError as exc:
        raise RemoteInvalidDataError(f"bad {op} request: {exc}") from None
