"""A local emulator of the Hugging Face Hub *bucket* HTTP API (stdlib only).

The REAL ``huggingface_hub`` (``HfApi(endpoint=emulator.endpoint)``) and the REAL ``hf_xet`` run against it end
to end with no network. Where the file bytes live is the ``xet`` option (default ``"local"``; the
``HUB_EMULATOR_XET`` environment variable changes the default, e.g. ``HUB_EMULATOR_XET=http pytest``):

``xet="local"``  the Xet token endpoints answer ``casUrl = local://<data_dir>/cas``: hf_xet keeps xorbs and
                 shards in that directory itself and the emulator reads file sizes back from the shards (see
                 ``xet_shards.py``). One transferring process at a time (see the caveat at the end).
``xet="http"``   the emulator also serves the Xet CAS HTTP API at ``casUrl = <endpoint>/cas/<store id>``
                 (``emulator.cas_url``), storing xorbs and shards under ``<data_dir>/cas`` (see ``xet_cas.py``).
                 Any number of processes may upload and download at the same instant; data survives a restart.

Hub endpoints (as sent and parsed by huggingface_hub 2.4.0)::

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

Model repo endpoints (read only; repos are made by ``emulator.create_model_repo``; ``{rev}`` is a branch or a
commit sha, percent-encoded as huggingface_hub sends it)::

    GET    /api/models/{ns}/{name}[/revision/{rev}] info {id, sha, private, siblings}; 404 RepoNotFound /
                                                   RevisionNotFound
    GET    /api/models/{id}/tree/{rev}[/{path}]    ?recursive=true|false (default false) &cursor=..., Link rel="next";
                                                   files {type, oid, size, path, xetHash?, lfs?}, folders
                                                   {type: "directory", oid, path}; 404 EntryNotFound for no folder
    POST   /api/models/{id}/paths-info/{rev}       form ``paths=..&paths=..&expand=..`` -> existing files and folders
    GET    /api/models/{id}/xet-read-token/{rev}   as for buckets
    HEAD   /{ns}/{name}/resolve/{rev}/{path}       X-Repo-Commit, ETag; a Xet-backed file adds X-Xet-Hash,
                                                   X-Linked-Size and Link rel="xet-auth" (content only through Xet);
                                                   a regular file's GET serves its bytes; an LFS file (not Xet)
                                                   answers 302 to /lfs-cdn/{sha256} with X-Linked-Size and
                                                   X-Linked-Etag (its sha256), as the Hub sends it to its LFS CDN
    GET    /lfs-cdn/{sha256}                       an LFS file's bytes (no token: the Hub's CDN URLs are signed)
    batch copyFile with sourceRepoType "model"     copies a Xet-backed file of the repo (any revision) by hash

Xet CAS endpoints in HTTP mode, relative to ``cas_url`` (Xet spec, hub-docs ``docs/xet/api.md``; the first group
is what hf_xet 1.8.0 calls)::

    GET    /v1/chunks/{prefix}/{chunk}             global dedup query: always 404 (no global dedup here)
    POST   /v1/xorb-grants/{prefix}/{xorb}         direct-upload grant: 404, so hf_xet uploads through the CAS
    POST   /v1/xorbs/{prefix}/{xorb}               upload a xorb -> {"was_inserted"}; 400 if malformed
    POST   /v2/shards                              register files -> NDJSON frames ending {"type": "result"}; 400 if
                                                   a term points at a missing xorb or past its chunks
    GET    /v2/reconstructions/{file}              {offset_into_first_range, terms, xorbs: {xorb: [{url, ranges}]}}
                                                   Range: bytes=a-b|a-|-n -> the covering whole chunks; 416 past end
    GET    /transfer/xorb/{prefix}/{xorb}?sig      presigned fetch URL (no token), Range -> 206, several ranges ->
                                                   multipart/byteranges (what hf_xet sends when multi-range fetching
                                                   is on); 403 on a bad or expired signature
    POST   /v1/shards                              register files -> {"result": 1 new | 0 known}
    GET    /v1/reconstructions/{file}              V1 shape: fetch_info {xorb: [{range, url, url_range}]}
    GET    /v1/reconstructions?file_id=..          batch (whole files): {files, fetch_info}
    HEAD   /v1/xorbs/{prefix}/{xorb}               200 / 404
    HEAD   /v1/files/{file}                        Content-Length = file size
    POST   /v1/telemetry                           accepted and dropped

CAS auth: bearer tokens minted by the token endpoints (HMAC-signed, scope read|write, ``xet_token_ttl``): 401
without / with a forged or expired token, 403 for a read token on an upload. Fetch URLs expire after
``fetch_url_ttl`` seconds. The signing key is ``<data_dir>/xet_signing.key``: tokens and URLs survive a restart.

Errors: unknown bucket -> 404 ``X-Error-Code: RepoNotFound`` (huggingface_hub raises ``BucketNotFoundError`` on
/api/buckets/ URLs); missing file on resolve -> 404 ``X-Error-Code: EntryNotFound``.

Auth: ``tokens=None`` accepts everyone as user ``"emulator"`` with full rights. Otherwise ``tokens`` maps a bearer
token to ``TokenInfo(user, write, orgs)``; a caller may act on namespaces ``{user, *orgs}``. A missing or unknown
token gets 401 on any write and 401 ``X-Error-Code: RepoNotFound`` on private buckets (i.e. BucketNotFoundError);
a valid token outside the bucket's namespace gets 404 RepoNotFound on private buckets and 403 on writes; a
read-only token gets 403 on create / delete / batch / xet-write-token.

Test hooks (they cover the CAS endpoints too; CAS paths start with ``/cas/<store id>/``):
    ``emulator.requests``        thread-safe log of the requests: iterating gives ``(method, path)`` (path without
                                 query string, still percent-encoded); ``.count(method=None, path_regex=None)``;
                                 ``.records(...)`` gives ``RequestRecord(method, path, bytes_in, status,
                                 bytes_out, range)``; ``.bytes_in(...)`` / ``.bytes_out(...)`` sum request / response
                                 body bytes, e.g. ``bytes_in("POST", "/v1/xorbs/")`` = xorb bytes uploaded.
                                 Cleared by ``emulator.reset_counts()``.
    ``emulator.add_fault(method, path_regex, status, *, times=1, headers=None, delay=0.0, body=None,
                         truncate=None, bandwidth=None)``
                                 the next ``times`` requests (``None`` = every request) whose method matches
                                 (``None`` = any) and whose path (with query) matches ``re.search(path_regex)``
                                 are answered with ``status`` after sleeping ``delay`` s; ``status == 0`` means
                                 sleep ``delay`` s then answer normally. ``truncate=N``: send the headers (full
                                 Content-Length) and only N body bytes, then drop the connection. ``bandwidth=B``:
                                 send the body at about B bytes/s. The request body is always read first.
                                 E.g. ``add_fault("GET", "/transfer/xorb/", 500)``, or a slow service:
                                 ``add_fault(None, "^/cas/", 0, times=None, delay=0.05, bandwidth=50e6)``.
    ``emulator.clear_faults()``
    ``emulator.link = Link(rate)``
                                 a network link of ``rate`` bytes/s that every response body crosses, shared by
                                 all connections (loopback has no bandwidth of its own: this gives transfers the
                                 speed of a real download). ``None`` (default) = loopback speed.
    ``emulator.errors``          tracebacks of unexpected exceptions in handlers (answered as 500).
    ``emulator.cas``             the ``CasStore`` (HTTP mode) or None.

State (buckets and their files ``path -> {size, xetHash, mtime, uploadedAt}``) lives in memory and is written
atomically to ``<data_dir>/hub_state.json`` after each mutation, so a new emulator on the same ``data_dir`` sees
the same buckets (and, via ``<data_dir>/cas``, the same bytes). Keep one mode per data_dir: the two modes store
bytes differently.

hf_xet caveat (1.8.0), local mode only: each upload commit / download group opens a redb database in the
directory and holds its lock until that object is dropped (HfApi drops it when the call returns; threads of one
process share it fine). A transfer from ANOTHER process overlapping in time fails with ``RuntimeError: ... Database
already open. Cannot acquire lock.`` So in local mode: one emulator data_dir per concurrently transferring
process, or a lock around transfers; or use HTTP mode. The emulator itself never opens that database.

hf_xet config note: it reads its ``HF_XET_*`` settings once per process (durations need a unit: ``"10s"``).
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

from .xet_cas import HEX64, CasError, CasStore, parse_range_header
from .xet_shards import ShardIndex

__all__ = ["HubEmulator", "TokenInfo", "RequestLog", "RequestRecord", "Fault", "XET_MODES"]

logger = logging.getLogger(__name__)

STATE_FILE = "hub_state.json"
ANONYMOUS_USER = "emulator"
XET_TOKEN_TTL = 3600
FETCH_URL_TTL = 3600
XET_MODES = ("local", "http")
DEFAULT_XET_MODE = "local"
XET_MODE_ENV = "HUB_EMULATOR_XET"  # overrides the default mode, e.g. to run a whole test suite in HTTP mode
CAS_PREFIX = "/cas"  # casUrl = <endpoint>/cas/<store id> in HTTP mode
_IO_PIECE = 1 << 20
LINK_PIECE = 256 << 10  # bytes per turn on a Link: fine enough that concurrent responses interleave


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
    truncate: int | None = None
    bandwidth: float | None = None


class Link:
    """A link of `rate` bytes/s shared by every response: each piece of a body waits its turn on it."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"a link rate is positive bytes/s, got {rate}")
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def cross(self, size: int) -> None:
        """Sleep until `size` more bytes have crossed the link."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + size / self.rate
            arrival = self._free_at
        time.sleep(max(0.0, arrival - now))


@dataclass
class RequestRecord:
    """One request: ``status`` and ``bytes_out`` (response body bytes actually written) fill in as it is answered."""

    method: str
    path: str
    bytes_in: int = 0
    status: int = 0
    bytes_out: int = 0
    range: str | None = None  # the request's Range header


class RequestLog:
    """Thread-safe list of the requests seen by the emulator.

    Iterating / indexing / ``snapshot()`` give ``(method, path)`` tuples; ``records()`` gives ``RequestRecord``s
    with status and body sizes, summed by ``bytes_in()`` / ``bytes_out()``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RequestRecord] = []

    def append(self, item: tuple[str, str] | RequestRecord) -> RequestRecord:
        record = item if isinstance(item, RequestRecord) else RequestRecord(item[0], item[1])
        with self._lock:
            self._items.append(record)
        return record

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def records(self, method: str | None = None, path_regex: str | None = None) -> list[RequestRecord]:
        pattern = re.compile(path_regex) if path_regex is not None else None
        with self._lock:
            items = list(self._items)
        return [
            r
            for r in items
            if (method is None or r.method == method.upper()) and (pattern is None or pattern.search(r.path))
        ]

    def snapshot(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.method, r.path) for r in self._items]

    def since(self, index: int) -> list[RequestRecord]:
        """The records from position `index` on (what a block that began at `len(log) == index` saw): O(new
        records), where `records()` copies the whole log."""
        with self._lock:
            return self._items[index:]

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        return len(self.records(method, path_regex))

    def bytes_in(self, method: str | None = None, path_regex: str | None = None) -> int:
        """Request body bytes received by the matching requests."""
        return sum(r.bytes_in for r in self.records(method, path_regex))

    def bytes_out(self, method: str | None = None, path_regex: str | None = None) -> int:
        """Response body bytes sent for the matching requests."""
        return sum(r.bytes_out for r in self.records(method, path_regex))

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


@dataclass
class _ModelRepo:
    """A model repo: branches -> commit sha, commit sha -> its files (path -> {size, oid, xetHash?, sha256?,
    content?, lfs?}). A file with `content` (hex) is a regular Git file, or with `lfs` an LFS file (its `oid`
    the Git blob id of its LFS pointer, its `sha256` that of its bytes); one with `xetHash` is Xet-backed."""

    id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "private": self.private, "branches": self.branches, "commits": self.commits}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _ModelRepo:
        return cls(id=data["id"], private=data["private"], branches=dict(data["branches"]), commits=dict(data["commits"]))

    def commit_of(self, revision: str) -> str:
        sha = self.branches.get(revision) or (revision if revision in self.commits else None)
        if sha is None:
            raise HttpError(404, f"Revision Not Found for url: {revision}", error_code="RevisionNotFound")
        return sha


def _git_blob_oid(content: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer a repo's Git tree holds for an LFS file (git-lfs spec v1)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _repo_file_item(path: str, f: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "file", "oid": f["oid"], "size": f["size"], "path": path}
    if f.get("xetHash"):
        item["xetHash"] = f["xetHash"]
    if f.get("sha256") and (f.get("xetHash") or f.get("lfs")):
        item["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": len(_lfs_pointer(f["sha256"], f["size"]))}
    return item


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

    request_queue_size = 1024  # many client processes connect at once; the default backlog (5) drops SYNs

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
        xet: str | None = None,
        xet_token_ttl: int = XET_TOKEN_TTL,
        fetch_url_ttl: int = FETCH_URL_TTL,
    ):
        if xet is None:
            xet = os.environ.get(XET_MODE_ENV) or DEFAULT_XET_MODE
        if xet not in XET_MODES:
            raise ValueError(f"xet must be one of {XET_MODES}, got {xet!r}")
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cas_dir = self.data_dir / "cas"
        self.cas_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.page_size = page_size
        self.tokens = tokens
        self.xet = xet
        self.xet_token_ttl = xet_token_ttl
        self.fetch_url_ttl = fetch_url_ttl
        self.requests = RequestLog()
        self.errors: list[str] = []
        # File sizes for batch addFile: parsed from hf_xet's local:// shards, or from the shards uploaded over HTTP.
        self.cas: CasStore | None = None
        if xet == "http":
            self.cas = CasStore(self.cas_dir, key_path=self.data_dir / "xet_signing.key")
        self.shards: ShardIndex | CasStore = self.cas if self.cas is not None else ShardIndex(self.cas_dir)
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self.link: Link | None = None
        self._lock = threading.RLock()
        self._buckets: dict[str, _Bucket] = {}
        self._models: dict[str, _ModelRepo] = {}
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
    def cas_url(self) -> str:
        """What the Xet token endpoints answer as ``casUrl``."""
        if self.cas is None:
            return f"local://{self.cas_dir}"
        return f"{self.endpoint}{CAS_PREFIX}/{self.cas.store_id}"

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
    def create_model_repo(self, repo_id: str, files: dict[str, bytes | dict[str, Any]], *, private: bool = False,
                          branch: str = "main") -> str:
        """Commit `files` as the whole content of `branch` of model repo `repo_id` (made if missing); returns
        the commit sha. A value is the bytes of a regular Git file, ``{"lfs": bytes}`` of an LFS file stored
        outside Xet (listed with its LFS sha256, its Git oid that of its pointer), or ``{"xetHash", "size"}`` of a
        Xet-backed file whose bytes the Xet store already holds (e.g. ``emulator.bucket_file(bucket, path)`` after
        an upload to a bucket: the Hub dedups by hash the same way)."""
        import hashlib

        stored: dict[str, dict[str, Any]] = {}
        for path, value in files.items():
            if isinstance(value, (bytes, bytearray)):
                stored[path] = {"size": len(value), "oid": _git_blob_oid(bytes(value)), "content": bytes(value).hex()}
            elif "lfs" in value:
                data = bytes(value["lfs"])
                sha256 = hashlib.sha256(data).hexdigest()
                stored[path] = {"size": len(data), "oid": _git_blob_oid(_lfs_pointer(sha256, len(data))),
                                "sha256": sha256, "lfs": True, "content": data.hex()}
            else:
                pointer = f"xet {value['xetHash']} {value['size']}".encode()
                stored[path] = {"size": int(value["size"]), "oid": _git_blob_oid(pointer),
                                "xetHash": str(value["xetHash"]).lower(), "sha256": value.get("sha256")}
        sha = hashlib.sha1(json.dumps([repo_id, branch, stored, time.time(), secrets.token_hex(4)],
                                      sort_keys=True).encode()).hexdigest()
        with self._lock:
            repo = self._models.setdefault(repo_id, _ModelRepo(id=repo_id, private=private))
            repo.commits[sha] = stored
            repo.branches[branch] = sha
            self._save()
        return sha

    def bucket_file(self, bucket_id: str, path: str) -> dict[str, Any]:
        """``{"xetHash", "size"}`` of a bucket's file: what ``create_model_repo`` takes for a Xet-backed file."""
        with self._lock:
            f = self._buckets[bucket_id].files[path]
            return {"xetHash": f["xetHash"], "size": f["size"]}

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
        truncate: int | None = None,
        bandwidth: float | None = None,
    ) -> Fault:
        fault = Fault(
            method=method.upper() if method else None,
            path_regex=re.compile(path_regex),
            status=status,
            times=times,
            headers=dict(headers or {}),
            delay=delay,
            body=body,
            truncate=truncate,
            bandwidth=bandwidth,
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
        self._models = {m["id"]: _ModelRepo.from_json(m) for m in data.get("models", [])}

    def _save(self) -> None:
        payload = json.dumps({"version": 1, "buckets": [b.to_json() for b in self._buckets.values()],
                              "models": [m.to_json() for m in self._models.values()]})
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

    def _xet_token(self, write: bool) -> tuple[dict[str, Any], dict[str, str]]:
        cas_url = self.cas_url
        if self.cas is not None:
            token, exp = self.cas.issue_token(write, self.xet_token_ttl)
        else:
            exp = int(time.time()) + self.xet_token_ttl
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

    def _get_model(self, caller: TokenInfo | None, repo_id: str) -> _ModelRepo:
        repo = self._models.get(repo_id)
        if repo is None or not (self.tokens is None or not repo.private
                                or (caller is not None and repo.namespace in caller.namespaces)):
            raise HttpError(401 if caller is None else 404, f"Repository {repo_id} not found", error_code="RepoNotFound")
        return repo

    def op_model_info(self, caller, repo_id: str, revision: str) -> dict[str, Any]:
        with self._lock:
            repo = self._get_model(caller, repo_id)
            sha = repo.commit_of(revision)
            files = repo.commits[sha]
            return {"id": repo.id, "_id": repo.id, "sha": sha, "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}

    def op_model_tree(self, caller, repo_id: str, revision: str, prefix: str, recursive: bool) -> list[dict]:
        with self._lock:
            repo = self._get_model(caller, repo_id)
            files = dict(repo.commits[repo.commit_of(revision)])
        folder = prefix.strip("/")
        base = folder + "/" if folder else ""
        inside = {p: f for p, f in files.items() if p.startswith(base)}
        if folder and not inside:
            raise HttpError(404, f"Entry {folder} not found", error_code="EntryNotFound")
        items: dict[str, dict[str, Any]] = {}
        for path, f in inside.items():
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                sub = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    items.setdefault(sub, {"type": "directory", "oid": _git_blob_oid(sub.encode()), "path": sub})
            if recursive or len(parts) == 1:
                items[path] = _repo_file_item(path, f)
        return [items[p] for p in sorted(items)]

    def op_model_paths_info(self, caller, repo_id: str, revision: str, paths: list[str]) -> list[dict]:
        with self._lock:
            repo = self._get_model(caller, repo_id)
            files = repo.commits[repo.commit_of(revision)]
        out = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in files:
                out.append(_repo_file_item(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "oid": _git_blob_oid(path.encode()), "path": path})
        return out

    def op_model_resolve(self, caller, repo_id: str, revision: str, path: str) -> tuple[str, dict[str, Any]]:
        with self._lock:
            repo = self._get_model(caller, repo_id)
            sha = repo.commit_of(revision)
            f = repo.commits[sha].get(path)
            if f is None:
                raise HttpError(404, f"Entry {path} not found in {repo_id}", error_code="EntryNotFound")
            return sha, dict(f)

    def lfs_object(self, sha256: str) -> bytes:
        """The bytes of an LFS file (not Xet) of any model repo, by sha256 (the Hub's LFS CDN)."""
        with self._lock:
            for repo in self._models.values():
                for files in repo.commits.values():
                    for f in files.values():
                        if f.get("lfs") and f.get("sha256") == sha256:
                            return bytes.fromhex(f["content"])
        raise HttpError(404, f"LFS object {sha256} not found")

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
        if source_type == "model":
            with self._lock:
                repo = self._models.get(source_id)
                if repo is None or not (self.tokens is None or not repo.private
                                        or (caller is not None and repo.namespace in caller.namespaces)):
                    raise HttpError(422, f"Source repository {source_id} not found")
                for files in repo.commits.values():
                    for f in files.values():
                        if f.get("xetHash") == xet_hash:
                            return {"size": f["size"], "xetHash": xet_hash}
            raise HttpError(422, f"Xet hash {xet_hash} not found in model {source_id}")
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
_MODEL_RESOLVE_ROUTE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_MODEL_ROUTE = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/(.*))?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two sends: with Nagle's algorithm the second waits for the client's delayed
    # ACK, 40 ms a request on loopback, which no real Hub front end costs.
    disable_nagle_algorithm = True
    server: _Server
    server_version = "HubEmulator/1.0"
    _record = RequestRecord("", "")  # replaced per request in _dispatch
    _fault: Fault | None = None

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
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        self._start_response(status, headers)
        if body and not head:
            self._write_body(body)

    def _start_response(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v).encode("ascii", "backslashreplace").decode("ascii"))
        self.end_headers()
        self._record.status = status

    def _write_body(self, data: bytes | memoryview) -> None:
        """Write response body bytes, applying the active fault's ``truncate`` / ``bandwidth``."""
        view = memoryview(data)
        fault = self._fault
        if fault is not None and fault.truncate is not None:
            room = max(0, fault.truncate - self._record.bytes_out)
            if room < len(view):
                if room:
                    self.wfile.write(view[:room])
                    self._record.bytes_out += room
                raise _CutConnection
        if fault is not None and fault.bandwidth:
            piece = max(1, min(len(view), int(fault.bandwidth / 20) or 1))
            for start in range(0, len(view), piece):
                part = view[start : start + piece]
                self.wfile.write(part)
                self._record.bytes_out += len(part)
                time.sleep(len(part) / fault.bandwidth)
            return
        link = self.emulator.link
        if link is not None:
            for start in range(0, len(view), LINK_PIECE):
                part = view[start : start + LINK_PIECE]
                link.cross(len(part))
                self.wfile.write(part)
                self._record.bytes_out += len(part)
            return
        self.wfile.write(view)
        self._record.bytes_out += len(view)

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
        self._record = self.emulator.requests.append(
            RequestRecord(method, split.path, bytes_in=len(body), range=self.headers.get("Range"))
        )
        self._fault = None
        head = method == "HEAD"
        try:
            fault = self._fault = self.emulator._take_fault(method, target)
            if fault is not None:
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.status:
                    payload = fault.body if fault.body is not None else json.dumps({"error": "injected fault"}).encode()
                    self._send(fault.status, payload, fault.headers, head=head)
                    return
            if split.path.startswith(CAS_PREFIX + "/"):
                self._route_cas(method, split.path[len(CAS_PREFIX) :], parse_qs(split.query), body, head)
            else:
                self._route(method, split.path, parse_qs(split.query), body, head)
        except HttpError as err:
            self._send_error(err, head=head)
        except _CutConnection:
            self._cut_connection()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            tb = traceback.format_exc()
            self.emulator.errors.append(tb)
            logger.error("hub emulator: unexpected error on %s %s\n%s", method, target, tb)
            if self._record.status:  # headers already out: a second response would corrupt the stream
                self._cut_connection()
                return
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

        if path.startswith("/lfs-cdn/") and method in ("GET", "HEAD"):
            data = emu.lfs_object(path[len("/lfs-cdn/"):])
            self._send(200, data, {"Content-Type": "application/octet-stream"}, head=head)
            return

        if path.startswith("/api/models/") or (_MODEL_RESOLVE_ROUTE.match(path) and not path.startswith(("/api/", "/buckets/"))):
            self._route_model(caller, method, path, query, body, head)
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
            data, headers = emu._xet_token(write=token_kind == "xet-write-token")
            self._send_json(200, data, headers)
            return

        raise HttpError(404, f"No route for {method} {path}")

    def _route_model(self, caller, method: str, path: str, query: dict[str, list[str]], body: bytes, head: bool) -> None:
        """The model repo endpoints (see the module docstring)."""
        emu = self.emulator
        m = _MODEL_RESOLVE_ROUTE.match(path)
        if m and not path.startswith("/api/"):
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"Method {method} not allowed")
            repo_id = f"{unquote(m[1])}/{unquote(m[2])}"
            sha, f = emu.op_model_resolve(caller, repo_id, unquote(m[3]), unquote(m[4]))
            headers = {"X-Repo-Commit": sha, "ETag": f'"{f["oid"]}"', "Content-Type": "application/octet-stream"}
            if f.get("xetHash"):
                headers.update({
                    "X-Xet-Hash": f["xetHash"], "X-Linked-Size": str(f["size"]),
                    "X-Linked-Etag": f'"{f.get("sha256") or f["xetHash"]}"',
                    "Link": f'<{self._endpoint()}/api/models/{repo_id}/xet-read-token/{sha}>; rel="xet-auth"',
                    "Content-Length": "0",
                })
                self._send(200, b"", headers, head=head)
                return
            if f.get("lfs"):
                headers.update({"ETag": f'"{f["sha256"]}"', "X-Linked-Etag": f'"{f["sha256"]}"',
                                "X-Linked-Size": str(f["size"]),
                                "Location": f"{self._endpoint()}/lfs-cdn/{f['sha256']}"})
                self._send(302, b"", headers, head=head)
                return
            self._send(200, bytes.fromhex(f["content"]), headers, head=head)
            return
        m = _MODEL_ROUTE.match(path)
        if not m:
            raise HttpError(404, f"No route for {method} {path}")
        repo_id, rest = f"{unquote(m[1])}/{unquote(m[2])}", m[3] or ""
        if method == "GET" and (rest == "" or rest.startswith("revision/")):
            revision = unquote(rest[len("revision/"):]) if rest else "main"
            self._send_json(200, emu.op_model_info(caller, repo_id, revision))
            return
        if method == "GET" and rest.startswith("tree/"):
            revision, _, sub = rest[len("tree/"):].partition("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            items = emu.op_model_tree(caller, repo_id, unquote(revision), unquote(sub), recursive)
            cursor = query.get("cursor", [None])[0]
            if cursor is not None:
                items = [i for i in items if (i["path"], i["type"]) > _decode_cursor(cursor)]
            page, more = items[: emu.page_size], len(items) > emu.page_size
            headers = {}
            if more:
                next_url = (f"{self._endpoint()}/api/models/{repo_id}/{rest}?recursive={'true' if recursive else 'false'}"
                            f"&expand=false&cursor={quote(_encode_cursor(page[-1]), safe='')}")
                headers["Link"] = f'<{next_url}>; rel="next"'
            self._send_json(200, page, headers)
            return
        if method == "POST" and rest.startswith("paths-info/"):
            form = parse_qs(body.decode("utf-8", "replace"))
            paths = form.get("paths", [])
            self._send_json(200, emu.op_model_paths_info(caller, repo_id, unquote(rest[len("paths-info/"):]), paths))
            return
        if method == "GET" and rest.startswith("xet-read-token/"):
            with emu._lock:
                repo = emu._get_model(caller, repo_id)
                repo.commit_of(unquote(rest[len("xet-read-token/"):]))
            data, headers = emu._xet_token(write=False)
            self._send_json(200, data, headers)
            return
        raise HttpError(404, f"No route for {method} {path}")

    def _cut_connection(self) -> None:
        """Drop the connection mid-body (truncation fault): the client sees fewer bytes than Content-Length."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---------------------------------------------------------------- Xet CAS (HTTP mode)
    def _route_cas(self, method: str, sub: str, query: dict[str, list[str]], body: bytes, head: bool) -> None:
        cas = self.emulator.cas
        store_id, _, rest = sub[1:].partition("/")
        if cas is None or store_id != cas.store_id:
            raise HttpError(404, f"No Xet CAS at {CAS_PREFIX}/{store_id} (xet={self.emulator.xet!r})")
        try:
            self._route_cas_inner(cas, method, "/" + rest, query, body, head)
        except CasError as e:
            headers = {"X-Error-Message": e.message, "Content-Type": "text/plain"}
            self._send(e.status, e.message.encode(), headers, head=head)

    def _route_cas_inner(self, cas: CasStore, method, sub, query, body, head) -> None:
        auth = self.headers.get("Authorization")

        m = re.match(r"^/transfer/xorb/([^/]+)/([0-9a-f]{64})$", sub)
        if m and method in ("GET", "HEAD"):  # presigned URL: no token, signature in the query string
            cas.check_fetch(m[2], query)
            self._send_xorb(cas, m[2], head)
            return

        m = re.match(r"^/v1/xorbs/([^/]+)/([^/]+)$", sub)
        if m:
            xorb_hash = _hex64(m[2])
            if method == "POST":
                cas.check_token(auth, write=True)
                self._send_json(200, {"was_inserted": cas.put_xorb(xorb_hash, body)})
                return
            if method == "HEAD":
                cas.check_token(auth, write=False)
                self._send(200 if cas.has_xorb(xorb_hash) else 404, b"", {"Content-Length": "0"}, head=True)
                return

        if sub == "/v1/shards" and method == "POST":
            cas.check_token(auth, write=True)
            self._send_json(200, {"result": 1 if cas.put_shard(body) else 0})  # 1 = SyncPerformed, 0 = Exists
            return

        if sub == "/v2/shards" and method == "POST":  # same, answered as NDJSON progress frames
            cas.check_token(auth, write=True)
            cas.put_shard(body)  # validation errors are plain 400s, before any frame
            frames = [
                {"type": "validating", "verified": 1, "total": 1},
                {"type": "committing", "stage": "syncing"},
                {"type": "result"},
            ]
            payload = b"".join(json.dumps(f).encode() + b"\n" for f in frames)
            self._send(200, payload, {"Content-Type": "application/x-ndjson"})
            return

        m = re.match(r"^/v([12])/reconstructions/([^/]+)$", sub)
        if m and method == "GET":
            cas.check_token(auth, write=False)
            offset, terms = cas.reconstruct(_hex64(m[2]), self.headers.get("Range"))
            self._send_json(200, self._reconstruction_json(cas, offset, terms, version=int(m[1])))
            return

        if sub in ("/v1/reconstructions", "/reconstructions") and method == "GET":  # batch, whole files
            cas.check_token(auth, write=False)
            files, all_terms = {}, []
            for file_hash in dict.fromkeys(_hex64(h) for h in query.get("file_id", [])):
                _, terms = cas.reconstruct(file_hash, None)
                files[file_hash] = [self._term_json(t) for t in terms]
                all_terms.extend(terms)
            fetch = self._reconstruction_json(cas, 0, all_terms, version=1)["fetch_info"]
            self._send_json(200, {"files": files, "fetch_info": fetch})
            return

        if re.match(r"^/v1/chunks/[^/]+/[^/]+$", sub) and method == "GET":
            cas.check_token(auth, write=False)  # global dedup: never a match here
            raise CasError(404, "chunk not tracked by global deduplication")

        m = re.match(r"^/v1/files/([^/]+)$", sub)
        if m and method == "HEAD":
            cas.check_token(auth, write=False)
            size = cas.size_of(_hex64(m[1]))
            if size is None:
                raise CasError(404, "file not found")
            self._send(200, b"", {"Content-Length": str(size)}, head=True)
            return

        if sub == "/v1/telemetry" and method == "POST":
            self._send_json(200, {})
            return

        raise CasError(404, f"No CAS route for {method} {sub}")

    @staticmethod
    def _term_json(term: tuple[str, int, int, int]) -> dict[str, Any]:
        xorb_hash, start, end, unpacked = term
        return {"hash": xorb_hash, "unpacked_length": unpacked, "range": {"start": start, "end": end}}

    def _reconstruction_json(self, cas: CasStore, offset: int, terms, *, version: int) -> dict[str, Any]:
        base = f"{self.emulator.cas_url}/transfer/xorb/default"
        ttl = self.emulator.fetch_url_ttl
        fetch = cas.fetch_ranges(terms)
        out: dict[str, Any] = {"offset_into_first_range": offset, "terms": [self._term_json(t) for t in terms]}
        if version == 1:  # one presigned URL + byte range per merged chunk range
            out["fetch_info"] = {
                x: [
                    {
                        "range": {"start": a, "end": b},
                        "url": f"{base}/{x}?{cas.sign_fetch(x, ttl)}",
                        "url_range": {"start": bs, "end": be},
                    }
                    for a, b, bs, be in spans
                ]
                for x, spans in fetch.items()
            }
        else:  # v2: one URL per xorb carrying every range (the client sends them as one multi-range request)
            out["xorbs"] = {
                x: [
                    {
                        "url": f"{base}/{x}?{cas.sign_fetch(x, ttl)}",
                        "ranges": [
                            {"chunks": {"start": a, "end": b}, "bytes": {"start": bs, "end": be}}
                            for a, b, bs, be in spans
                        ],
                    }
                ]
                for x, spans in fetch.items()
            }
        return out

    def _send_xorb(self, cas: CasStore, xorb_hash: str, head: bool) -> None:
        """Serve stored xorb bytes with RFC 7233 ranges (one range: 206; several: multipart/byteranges)."""
        path = cas.xorb_path(xorb_hash)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise CasError(404, f"xorb {xorb_hash} not found") from None
        with f:
            length = os.fstat(f.fileno()).st_size
            try:
                ranges = parse_range_header(self.headers.get("Range"), length)
            except CasError as e:
                self._send(416, e.message.encode(), {"Content-Range": f"bytes */{length}", "Content-Type": "text/plain"})
                return
            octet = "application/octet-stream"
            if ranges is None:
                self._start_response(200, {"Content-Type": octet, "Content-Length": str(length), "Accept-Ranges": "bytes"})
                parts = [(None, 0, length)]
            elif len(ranges) == 1:
                (start, end), = ranges
                headers = {"Content-Type": octet, "Content-Length": str(end - start)}
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
                self._start_response(206, headers)
                parts = [(None, start, end)]
            else:
                boundary = "xet_emulator_" + secrets.token_hex(8)
                parts = []
                total = 0
                for start, end in ranges:
                    preamble = (
                        f"--{boundary}\r\nContent-Type: {octet}\r\n"
                        f"Content-Range: bytes {start}-{end - 1}/{length}\r\n\r\n"
                    ).encode()
                    parts.append((preamble, start, end))
                    total += len(preamble) + (end - start) + 2
                closing = f"--{boundary}--\r\n".encode()
                total += len(closing)
                self._start_response(
                    206, {"Content-Type": f"multipart/byteranges; boundary={boundary}", "Content-Length": str(total)}
                )
            if head:
                return
            for preamble, start, end in parts:
                if preamble is not None:
                    self._write_body(preamble)
                f.seek(start)
                pos = start
                while pos < end:
                    piece = f.read(min(_IO_PIECE, end - pos))
                    if not piece:
                        raise _CutConnection  # the file shrank under us: never send a short body silently
                    self._write_body(piece)
                    pos += len(piece)
                if preamble is not None:
                    self._write_body(b"\r\n")
            if len(parts) > 1:
                self._write_body(closing)

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


class _CutConnection(Exception):
    """Raised to abandon a response mid-body and drop the connection."""


def _hex64(value: str) -> str:
    if not HEX64.match(value):
        raise CasError(400, f"malformed hash {value!r}: expected 64 lowercase hex characters")
    return value


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
