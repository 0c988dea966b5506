"""A local emulator of the Hugging Face Hub *bucket* HTTP API (stdlib only).

The REAL ``huggingface_hub`` (``HfApi(endpoint=emulator.endpoint)``) and the REAL ``hf_xet`` run against it end to
end with no network: the Xet token endpoints answer ``casUrl = local://<data_dir>/cas``, so hf_xet keeps xorbs and
shards in that directory, and the emulator reads file sizes back from the shards (see ``xet_shards.py``).

Endpoints (as sent and parsed by huggingface_hub 2.4.0)::

    POST   /api/buckets/{ns}/{name}                create (body {"visibility": "private"|"public"}); ns "me" = caller
    GET    /api/buckets/{ns}/{name}                info {id, private, createdAt, size, totalFiles}
    DELETE /api/buckets/{ns}/{name}                delete
    GET    /api/buckets/{ns}                       list buckets of a namespace ("me" = caller)
    GET    /api/buckets/{id}/tree[/{prefix}]       ?recursive=true|false (default true) &cursor=..., Link rel="next"
    POST   /api/buckets/{id}/paths-info            {"paths": [...]} -> existing files only
    POST   /api/buckets/{id}/batch                 ndjson addFile / copyFile / deleteFile -> {"success", "failed"}
    GET    /api/buckets/{id}/xet-read-token        {accessToken, exp, casUrl} + X-Xet-* headers
    GET    /api/buckets/{id}/xet-write-token       same, needs write access
    HEAD   /buckets/{id}/resolve/{path}            X-Xet-Hash, X-Linked-Size, Link: <read token url>; rel="xet-auth"
    GET    /buckets/{id}/resolve/{path}            same headers, EMPTY body (content is only served through Xet)
    GET    /api/whoami-v2                          {"type": "user", "name": ...}

Errors: unknown bucket -> 404 ``X-Error-Code: RepoNotFound`` (huggingface_hub raises ``BucketNotFoundError`` on
/api/buckets/ URLs); missing file on resolve -> 404 ``X-Error-Code: EntryNotFound``.

Auth: ``tokens=None`` accepts everyone as user ``"emulator"`` with full rights. Otherwise ``tokens`` maps a bearer
token to ``TokenInfo(user, write, orgs)``; a caller may act on namespaces ``{user, *orgs}``. A missing or unknown
token gets 401 on any write and 401 ``X-Error-Code: RepoNotFound`` on private buckets (i.e. BucketNotFoundError);
a valid token outside the bucket's namespace gets 404 RepoNotFound on private buckets and 403 on writes; a
read-only token gets 403 on create / delete / batch / xet-write-token.

Test hooks:
    ``emulator.requests``        thread-safe log of ``(method, path)`` (path without query string, still
                                 percent-encoded); ``.count(method=None, path_regex=None)``; cleared by
                                 ``emulator.reset_counts()``.
    ``emulator.add_fault(method, path_regex, status, *, times=1, headers=None, delay=0.0, body=None)``
                                 the next ``times`` requests (``None`` = every request) whose method matches
                                 (``None`` = any) and whose path (with query) matches ``re.search(path_regex)``
                                 are answered with ``status`` after sleeping ``delay`` s; ``status == 0`` means
                                 sleep ``delay`` s then answer normally. The request body is always read first.
    ``emulator.clear_faults()``
    ``emulator.errors``          tracebacks of unexpected exceptions in handlers (answered as 500).

State (buckets and their files ``path -> {size, xetHash, mtime, uploadedAt}``) lives in memory and is written
atomically to ``<data_dir>/hub_state.json`` after each mutation, so a new emulator on the same ``data_dir`` sees
the same buckets (and, via ``<data_dir>/cas``, the same bytes).

hf_xet caveat (1.8.0): in ``local://`` mode each upload commit / download group opens a redb database in the
directory and holds its lock until that object is dropped (HfApi drops it when the call returns; threads of one
process share it fine). A transfer from ANOTHER process overlapping in time fails with ``RuntimeError: ... Database
already open. Cannot acquire lock.`` So: one emulator data_dir per concurrently transferring process, or a lock
around transfers. The emulator itself never opens that database (it only reads ``*.mdb`` shard files).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .xet_shards import ShardIndex

__all__ = ["HubEmulator", "TokenInfo", "RequestLog", "Fault"]

logger = logging.getLogger(__name__)

STATE_FILE = "hub_state.json"
ANONYMOUS_USER = "emulator"
XET_TOKEN_TTL = 3600


@dataclass(frozen=True)
class TokenInfo:
    """What a bearer token grants: acting as ``user`` (and for ``orgs``), with or without write access."""

    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()

    @property
    def namespaces(self) -> frozenset[str]:
        return frozenset((self.user, *self.orgs))


@dataclass
class Fault:
    method: str | None
    path_regex: re.Pattern[str]
    status: int
    times: int | None
    headers: dict[str, str]
    delay: float
    body: bytes | None


class RequestLog:
    """Thread-safe list of ``(method, path)`` seen by the emulator."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, str]] = []

    def append(self, item: tuple[str, str]) -> None:
        with self._lock:
            self._items.append(item)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def snapshot(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._items)

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        pattern = re.compile(path_regex) if path_regex is not None else None
        return sum(
            1
            for m, p in self.snapshot()
            if (method is None or m == method.upper()) and (pattern is None or pattern.search(p))
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __iter__(self):
        return iter(self.snapshot())

    def __getitem__(self, index):
        return self.snapshot()[index]

    def __repr__(self) -> str:
        return f"RequestLog({self.snapshot()!r})"


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class _Bucket:
    id: str
    private: bool
    created_at: float
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {size, xetHash, mtime, uploadedAt}

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.id.split("/", 1)[1],
            "private": self.private,
            "createdAt": _iso(self.created_at),
            "size": sum(f["size"] for f in self.files.values()),
            "totalFiles": len(self.files),
        }

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "private": self.private, "createdAt": self.created_at, "files": self.files}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Bucket:
        return cls(id=data["id"], private=data["private"], created_at=data["createdAt"], files=dict(data["files"]))


def _file_item(path: str, f: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "file",
        "path": path,
        "size": f["size"],
        "xetHash": f["xetHash"],
        "mtime": _iso(f["mtime"] / 1000.0),
        "uploadedAt": _iso(f["uploadedAt"]),
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address, handler, emulator: HubEmulator):
        self.emulator = emulator
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # quiet: no traceback on stderr per connection
        logger.debug("hub emulator: connection error from %s", client_address, exc_info=True)

    def close_open_connections(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubEmulator:
    """Local Hub bucket API. See the module docstring for endpoints, auth rules and test hooks."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        page_size: int = 1000,
        tokens: dict[str, TokenInfo] | None = None,
    ):
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cas_dir = self.data_dir / "cas"
        self.cas_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.page_size = page_size
        self.tokens = tokens
        self.requests = RequestLog()
        self.errors: list[str] = []
        self.shards = ShardIndex(self.cas_dir)
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self._lock = threading.RLock()
        self._buckets: dict[str, _Bucket] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._load()

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def state_file(self) -> Path:
        return self.data_dir / STATE_FILE

    def start(self) -> HubEmulator:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]  # a restart (stop/start) keeps the same port
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_open_connections()  # keep-alive connections would otherwise keep being served
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks
    def reset_counts(self) -> None:
        self.requests.clear()

    def add_fault(
        self,
        method: str | None,
        path_regex: str,
        status: int,
        *,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        body: bytes | None = None,
    ) -> Fault:
        fault = Fault(
            method=method.upper() if method else None,
            path_regex=re.compile(path_regex),
            status=status,
            times=times,
            headers=dict(headers or {}),
            delay=delay,
            body=body,
        )
        with self._faults_lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if fault.method not in (None, method) or not fault.path_regex.search(target):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    # ------------------------------------------------------------------ state
    def buckets(self) -> dict[str, dict[str, Any]]:
        """Snapshot of the state: ``{bucket_id: {id, private, createdAt, files: {path: {...}}}}``."""
        with self._lock:
            return json.loads(json.dumps({k: b.to_json() for k, b in self._buckets.items()}))

    def _load(self) -> None:
        if not self.state_file.exists():
            return
        data = json.loads(self.state_file.read_text())
        self._buckets = {b["id"]: _Bucket.from_json(b) for b in data.get("buckets", [])}

    def _save(self) -> None:
        payload = json.dumps({"version": 1, "buckets": [b.to_json() for b in self._buckets.values()]})
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".hub_state.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ------------------------------------------------------------------ auth helpers
    def _caller(self, authorization: str | None) -> TokenInfo | None:
        """The caller's rights; None for an anonymous caller (only when tokens are configured)."""
        if self.tokens is None:
            return TokenInfo(ANONYMOUS_USER, write=True)
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self.tokens.get(authorization[7:].strip())

    def _can_see(self, caller: TokenInfo | None, bucket: _Bucket) -> bool:
        if self.tokens is None or not bucket.private:
            return True
        return caller is not None and bucket.namespace in caller.namespaces

    def _get_bucket(self, caller: TokenInfo | None, bucket_id: str) -> _Bucket:
        bucket = self._buckets.get(bucket_id)
        if bucket is None or not self._can_see(caller, bucket):
            # Like the Hub: an anonymous caller gets 401 whether the bucket is private or missing.
            status = 401 if caller is None else 404
            raise HttpError(status, f"Bucket {bucket_id} not found", error_code="RepoNotFound")
        return bucket

    def _require_write(self, caller: TokenInfo | None, namespace: str) -> None:
        if self.tokens is None:
            return
        if caller is None:
            raise HttpError(401, "Invalid or missing credentials")
        if not caller.write:
            raise HttpError(403, "This token does not have write access")
        if namespace not in caller.namespaces:
            raise HttpError(403, f"You don't have the rights to write in namespace {namespace}")

    def _resolve_namespace(self, caller: TokenInfo | None, namespace: str) -> str:
        if namespace != "me":
            return namespace
        if caller is None:
            raise HttpError(401, "Invalid or missing credentials")
        return caller.user

    def _xet_token(self) -> tuple[dict[str, Any], dict[str, str]]:
        exp = int(time.time()) + XET_TOKEN_TTL
        cas_url = f"local://{self.cas_dir}"
        token = "xet_" + secrets.token_hex(8)
        body = {"accessToken": token, "exp": exp, "casUrl": cas_url}
        headers = {"X-Xet-Cas-Url": cas_url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)}
        return body, headers

    # ------------------------------------------------------------------ API operations
    def op_create(self, caller, endpoint: str, namespace: str, name: str, body: dict) -> tuple[int, dict]:
        namespace = self._resolve_namespace(caller, namespace)
        if caller is None:
            raise HttpError(401, "Invalid or missing credentials")
        bucket_id = f"{namespace}/{name}"
        url = f"{endpoint}/buckets/{bucket_id}"
        with self._lock:
            existing = self._buckets.get(bucket_id)
            if existing is not None and self._can_see(caller, existing):
                raise HttpError(409, "You already created this bucket", extra={"url": url, "id": bucket_id})
            self._require_write(caller, namespace)
            if existing is not None:
                raise HttpError(409, "Bucket already exists", extra={"url": url, "id": bucket_id})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            self._buckets[bucket_id] = _Bucket(id=bucket_id, private=private, created_at=time.time())
            self._save()
        return 200, {"url": url, "id": bucket_id, "name": name}

    def op_delete_bucket(self, caller, bucket_id: str) -> tuple[int, dict]:
        with self._lock:
            bucket = self._get_bucket(caller, bucket_id)
            self._require_write(caller, bucket.namespace)
            del self._buckets[bucket_id]
            self._save()
        return 200, {}

    def op_list_buckets(self, caller, namespace: str, search: str | None) -> list[dict]:
        namespace = self._resolve_namespace(caller, namespace)
        with self._lock:
            return [
                b.info()
                for b in sorted(self._buckets.values(), key=lambda b: b.id)
                if b.namespace == namespace and self._can_see(caller, b) and (not search or search in b.id)
            ]

    def op_tree(self, caller, bucket_id: str, prefix: str, recursive: bool) -> list[dict]:
        with self._lock:
            bucket = self._get_bucket(caller, bucket_id)
            files = {p: dict(f) for p, f in bucket.files.items() if p.startswith(prefix)}
        if recursive:
            return [_file_item(p, files[p]) for p in sorted(files)]
        # Non-recursive: direct children of the "directory" named by the prefix (prefix + "/"), plus the
        # lexical siblings the raw prefix also matches (e.g. "logs.json" for prefix "logs") relative to the
        # prefix's parent directory. Folders come back as {"type": "directory", "path", "uploadedAt"}.
        directory = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
        parent = prefix[: prefix.rfind("/") + 1]
        entries: dict[tuple[str, str], dict] = {}
        for path, f in files.items():
            base = directory if path.startswith(directory) else parent
            rest = path[len(base) :]
            if "/" in rest:
                folder = base + rest.split("/", 1)[0]
                key = (folder, "directory")
                seen = entries.get(key)
                if seen is None or seen["_uploaded"] < f["uploadedAt"]:
                    entries[key] = {
                        "type": "directory",
                        "path": folder,
                        "uploadedAt": _iso(f["uploadedAt"]),
                        "_uploaded": f["uploadedAt"],
                    }
            else:
                entries[(path, "file")] = _file_item(path, f)
        items = [entries[k] for k in sorted(entries)]
        for item in items:
            item.pop("_uploaded", None)
        return items

    def op_paths_info(self, caller, bucket_id: str, paths: list[str]) -> list[dict]:
        with self._lock:
            bucket = self._get_bucket(caller, bucket_id)
            return [_file_item(p, bucket.files[p]) for p in dict.fromkeys(paths) if p in bucket.files]

    def op_resolve(self, caller, bucket_id: str, path: str) -> dict[str, Any]:
        with self._lock:
            bucket = self._get_bucket(caller, bucket_id)
            f = bucket.files.get(path)
            if f is None:
                raise HttpError(404, f"Entry {path} not found in bucket {bucket_id}", error_code="EntryNotFound")
            return dict(f)

    def op_batch(self, caller, bucket_id: str, raw: bytes) -> tuple[int, dict]:
        try:
            ops = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"Invalid ndjson body: {e}") from e
        with self._lock:
            bucket = self._get_bucket(caller, bucket_id)
            self._require_write(caller, bucket.namespace)
        failed: list[dict[str, str]] = []
        success = 0
        for op in ops:
            kind = op.get("type")
            path = op.get("path")
            if not isinstance(path, str) or not path:
                failed.append({"path": str(path), "error": "missing path"})
                continue
            try:
                if kind == "addFile":
                    size = self.shards.size_of(str(op.get("xetHash", "")))  # outside the lock: may read files
                    if size is None:
                        raise HttpError(422, f"Unknown xet hash {op.get('xetHash')}")
                    entry = {"size": size, "xetHash": op["xetHash"].lower()}
                elif kind == "copyFile":
                    entry = self._copy_source(caller, op)
                elif kind == "deleteFile":
                    entry = None
                else:
                    raise HttpError(422, f"Unknown operation type {kind!r}")
            except HttpError as e:
                failed.append({"path": path, "error": e.message})
                continue
            with self._lock:
                bucket = self._buckets.get(bucket_id)
                if bucket is None:
                    failed.append({"path": path, "error": "bucket was deleted"})
                    continue
                if entry is None:
                    bucket.files.pop(path, None)
                else:
                    mtime = op.get("mtime")
                    now = time.time()
                    entry["mtime"] = int(mtime) if isinstance(mtime, (int, float)) else int(now * 1000)
                    entry["uploadedAt"] = now
                    bucket.files[path] = entry
            success += 1
        with self._lock:
            self._save()
        status = 422 if (ops and not success) else 200
        return status, {"success": success, "failed": failed}

    def _copy_source(self, caller, op: dict) -> dict[str, Any]:
        xet_hash = str(op.get("xetHash", "")).lower()
        source_type = op.get("sourceRepoType")
        source_id = op.get("sourceRepoId")
        if source_type != "bucket":
            raise HttpError(422, f"Copy from a {source_type!r} repository is not supported by the emulator")
        with self._lock:
            source = self._buckets.get(source_id)
            if source is None or not self._can_see(caller, source):
                raise HttpError(422, f"Source bucket {source_id} not found")
            for f in source.files.values():
                if f["xetHash"] == xet_hash:
                    return {"size": f["size"], "xetHash": xet_hash}
        raise HttpError(422, f"Xet hash {xet_hash} not found in bucket {source_id}")


_BUCKET_ROUTE = re.compile(r"^/api/buckets/([^/]+)/([^/]+)(?:/(.*))?$")
_RESOLVE_ROUTE = re.compile(r"^/buckets/([^/]+)/([^/]+)/resolve/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "HubEmulator/1.0"

    def log_message(self, format: str, *args) -> None:  # quiet
        logger.debug("%s - %s", self.address_string(), format % args)

    # ---------------------------------------------------------------- plumbing
    @property
    def emulator(self) -> HubEmulator:
        return self.server.emulator

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head=False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, str(v).encode("ascii", "backslashreplace").decode("ascii"))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, err: HttpError, *, head: bool = False) -> None:
        headers = {"X-Error-Message": err.message}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        body = json.dumps({"error": err.message, **err.extra}).encode()
        self._send(err.status, body, headers, head=head)

    def _endpoint(self) -> str:
        return self.emulator.endpoint

    # ---------------------------------------------------------------- dispatch
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        body = self._read_body()  # always, even on errors: keeps keep-alive connections in sync
        target = self.path
        split = urlsplit(target)
        self.emulator.requests.append((method, split.path))
        head = method == "HEAD"
        try:
            fault = self.emulator._take_fault(method, target)
            if fault is not None:
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.status:
                    payload = fault.body if fault.body is not None else json.dumps({"error": "injected fault"}).encode()
                    self._send(fault.status, payload, fault.headers, head=head)
                    return
            self._route(method, split.path, parse_qs(split.query), body, head)
        except HttpError as err:
            self._send_error(err, head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            tb = traceback.format_exc()
            self.emulator.errors.append(tb)
            logger.error("hub emulator: unexpected error on %s %s\n%s", method, target, tb)
            try:
                self._send_error(HttpError(500, "internal emulator error"), head=head)
            except OSError:
                self.close_connection = True

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes, head: bool) -> None:
        emu = self.emulator
        caller = emu._caller(self.headers.get("Authorization"))

        if path == "/api/whoami-v2" and method == "GET":
            if caller is None:
                raise HttpError(401, "Invalid or missing credentials")
            self._send_json(200, {"type": "user", "name": caller.user, "orgs": [{"name": o} for o in caller.orgs]})
            return

        m = _RESOLVE_ROUTE.match(path)
        if m and method in ("GET", "HEAD"):
            bucket_id = f"{unquote(m[1])}/{unquote(m[2])}"
            f = emu.op_resolve(caller, bucket_id, unquote(m[3]))
            endpoint = self._endpoint()
            headers = {
                "X-Xet-Hash": f["xetHash"],
                "X-Linked-Size": str(f["size"]),
                "ETag": f'"{f["xetHash"]}"',
                "Link": f'<{endpoint}/api/buckets/{bucket_id}/xet-read-token>; rel="xet-auth"',
                "Content-Type": "application/octet-stream",
                "Content-Length": "0",
            }
            self._send(200, b"", headers, head=head)
            return

        m = re.match(r"^/api/buckets/([^/]+)/?$", path)
        if m and method == "GET":
            search = query.get("search", [None])[0]
            self._send_json(200, emu.op_list_buckets(caller, unquote(m[1]), search))
            return

        m = _BUCKET_ROUTE.match(path)
        if not m:
            raise HttpError(404, f"No route for {method} {path}")
        namespace, name, rest = unquote(m[1]), unquote(m[2]), m[3]
        bucket_id = f"{namespace}/{name}"

        if rest is None or rest == "":
            if method == "POST":
                status, data = emu.op_create(caller, self._endpoint(), namespace, name, _json_or_empty(body))
                self._send_json(status, data)
            elif method == "GET":
                with emu._lock:
                    info = emu._get_bucket(caller, bucket_id).info()
                self._send_json(200, info)
            elif method == "DELETE":
                status, data = emu.op_delete_bucket(caller, bucket_id)
                self._send_json(status, data)
            else:
                raise HttpError(405, f"Method {method} not allowed")
            return

        if (rest == "tree" or rest.startswith("tree/")) and method == "GET":
            prefix = unquote(rest[len("tree/") :]) if rest.startswith("tree/") else ""
            recursive = query.get("recursive", ["true"])[0].lower() not in ("false", "0", "no")
            self._send_tree(caller, bucket_id, rest, prefix, recursive, query.get("cursor", [None])[0])
            return

        if rest == "paths-info" and method == "POST":
            paths = _json_or_empty(body).get("paths")
            if not isinstance(paths, list):
                raise HttpError(400, "Body must be {'paths': [...]}")
            self._send_json(200, emu.op_paths_info(caller, bucket_id, [str(p) for p in paths]))
            return

        if rest == "batch" and method == "POST":
            status, data = emu.op_batch(caller, bucket_id, body)
            self._send_json(status, data)
            return

        token_kind = rest.split("/", 1)[0]
        if token_kind in ("xet-read-token", "xet-write-token") and method == "GET":
            with emu._lock:
                bucket = emu._get_bucket(caller, bucket_id)
                if token_kind == "xet-write-token":
                    emu._require_write(caller, bucket.namespace)
            data, headers = emu._xet_token()
            self._send_json(200, data, headers)
            return

        raise HttpError(404, f"No route for {method} {path}")

    def _send_tree(self, caller, bucket_id, rest, prefix, recursive, cursor) -> None:
        emu = self.emulator
        items = emu.op_tree(caller, bucket_id, prefix, recursive)
        if cursor is not None:
            items = [i for i in items if (i["path"], i["type"]) > _decode_cursor(cursor)]
        page, more = items[: emu.page_size], len(items) > emu.page_size
        headers = {}
        if more:
            last = page[-1]
            next_url = (
                f"{self._endpoint()}/api/buckets/{bucket_id}/{rest}"
                f"?recursive={'true' if recursive else 'false'}&cursor={quote(_encode_cursor(last), safe='')}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(200, page, headers)


def _encode_cursor(item: dict) -> str:
    return json.dumps([item["path"], item["type"]])


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        path, kind = json.loads(cursor)
        return str(path), str(kind)
    except (ValueError, TypeError) as e:
        raise HttpError(400, "Invalid cursor") from e


def _json_or_empty(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"Invalid JSON body: {e}") from e
    if not isinstance(data, dict):
        raise HttpError(400, "JSON body must be an object")
    return data
