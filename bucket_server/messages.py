"""Typed messages between the client and the bucket server, shared by both sides.

Each operation has a request class (its `args`) and a result class, registered together in `OPS`; the items
inside them (a listed file or folder, a file to download, a batch's add or copy, a failure) have classes too.
Each class has a validating `from_wire` and a `to_wire` that gives the same JSON as the protocol always had.

Validation happens once, at each edge:
- the server parses a request's args with `parse_request` before any handler runs (a `MessageError` is
  answered with `bad_request`), so handlers and backends only see typed, checked values;
- the client parses a reply's result with `parse_result`. Listings carry bucket data, which is hostile: an
  item that cannot be trusted (unsafe path, a size that is not a whole number of bytes up to
  MAX_FILE_BYTES, a hash that is not text, an unknown type) costs only itself. It is left out and named in
  the result's `skipped`, for the client's one warning per reply. Anything else malformed rejects the
  whole message.

Adding an operation: its request and result classes here, one `Op` line in `OPS`, a handler in
`server.BucketServer._handlers` (a test checks both tables name the same operations), a backend method if it
touches a bucket, a client method, and a row in docs/protocol.md.

Standard library only: the client (any environment) imports this module as well as the server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

#: No file of a cache entry or record is this large: a listing that says so is corrupt or hostile.
MAX_FILE_BYTES = 2**40
#: The digest a directory bucket lists for a file whose sidecar does not describe it (changed after it was
#: published, or the sidecar tampered with): never handed over, never a version of anything. One value, for
#: the backend that lists it and every reader.
STALE_DIGEST = "stale"
#: A request or reply's byte total (a sum of file sizes) is below this: exactly representable as a float.
MAX_TOTAL_BYTES = 2**53
#: The longest remote path accepted (buckets have their own, smaller limits).
MAX_PATH_CHARS = 1024
#: The longest local path, hash, digest, reason, URL or version string accepted.
MAX_TEXT_CHARS = 4096


class MessageError(ValueError):
    """A message that does not have the shape its operation requires; the text says what was wrong."""


# ---------------------------------------------------------------------------------------------- field checks
def _short(value: Any) -> str:
    """A value as an error names it: its repr, cut short (a hostile path may be long, a hostile value deep)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply, or an int too long to print
        return f"<a {type(value).__name__} that cannot be shown>"
    return text if len(text) <= 120 else text[:117] + "..."


def remote_path(value: Any, what: str = "remote path", *, allow_root: bool = False) -> str:
    """A bucket-relative path that can escape neither a bucket nor a local root: no absolute path, no '..'
    or '.' or empty segment, no backslash, no NUL ('' only with `allow_root`, for the bucket's root)."""
    if not isinstance(value, str):
        raise MessageError(f"{what} must be a string, got {type(value).__name__}")
    if value == "" and allow_root:
        return value
    parts = value.split("/")  # membership tests on the list: listings of many thousand files pass through here
    if (
        not value
        or len(value) > MAX_PATH_CHARS
        or value.startswith("/")
        or "\\" in value
        or "\x00" in value
        or "" in parts
        or "." in parts
        or ".." in parts
    ):
        raise MessageError(f"unsafe {what} {_short(value)}")
    return value


def folder_path(value: Any, what: str = "prefix") -> str:
    """A folder of the bucket ('' for the root); a trailing '/' is dropped."""
    if not isinstance(value, str):
        raise MessageError(f"{what} must be a string, got {type(value).__name__}")
    return remote_path(value.rstrip("/"), what, allow_root=True)


def local_path(value: Any, what: str = "local_path") -> str:
    """An absolute local path (the server's working folder is not the client's), without NUL."""
    text = bounded_text(value, what)
    if "\x00" in text or not os.path.isabs(text):
        raise MessageError(f"{what} must be an absolute path without NUL, got {_short(text)}")
    return text


def bounded_text(value: Any, what: str) -> str:
    """A string of at most MAX_TEXT_CHARS characters."""
    if not isinstance(value, str):
        raise MessageError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise MessageError(f"{what} is longer than {MAX_TEXT_CHARS} characters")
    return value


def optional_text(value: Any, what: str) -> str | None:
    """None, or a string as `bounded_text` accepts it."""
    return None if value is None else bounded_text(value, what)


def whole_number(value: Any, what: str, *, maximum: int) -> int:
    """An int from 0 to `maximum` (never a bool, a float, a string or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise MessageError(f"{what} must be a whole number from 0 to {maximum}, got {_short(value)}")
    return value


def byte_size(value: Any, what: str = "size") -> int:
    """A file's size: a whole number of bytes from 0 to MAX_FILE_BYTES."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FILE_BYTES:
        raise MessageError(f"{what} is not a valid number of bytes (0 to {MAX_FILE_BYTES}): {_short(value)}")
    return value


def optional_seconds(value: Any) -> float | None:
    """None, or a finite number (a time stamp or a duration); anything else (an int too large for a float
    included) reads as None: such figures are only ever shown, and a bad one must not cost a whole reply."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def flag(value: Any, what: str, default: bool) -> bool:
    """A JSON boolean; absent (None) is `default`."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MessageError(f"{what} must be true or false, got {_short(value)}")
    return value


def wire_object(value: Any, what: str) -> Mapping[str, Any]:
    """A JSON object."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise MessageError(f"{what} must be an object, got {type(value).__name__}")
    return value


def wire_array(value: Any, what: str) -> Sequence[Any]:
    """A JSON array."""
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"{what} must be an array, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------- items
@dataclass(frozen=True)
class FileItem:
    """A file of the bucket, as a listing or paths-info describes it."""

    path: str
    size: int
    xet_hash: str | None = None
    mtime: float | None = None
    #: What the bytes hash to (`xet:<hex>`, `blake3:<hex>`, `sha256:<hex>`), STALE_DIGEST for a directory
    #: bucket's file changed after it was published, or None.
    digest: str | None = None
    #: When the bucket got the file (the Hub's upload time; a directory bucket's file time), or None. `mtime`
    #: is, on the Hub, the uploader's local file time: ages (prune, scrub) are judged by this one.
    uploaded: float | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "FileItem":
        """A listed file; MessageError names what cannot be trusted."""
        item = wire_object(value, "listed file")
        path = remote_path(item.get("path"), "listed path")
        return cls(path, byte_size(item.get("size"), f"size of {path}"), optional_text(item.get("xet_hash"), "xet_hash"),
                   optional_seconds(item.get("mtime")), optional_text(item.get("digest"), "digest"),
                   optional_seconds(item.get("uploaded")))

    def to_wire(self) -> dict[str, Any]:
        """{"type": "file", "path", "size", "xet_hash", "mtime", "digest", "uploaded"}."""
        return {"type": "file", "path": self.path, "size": self.size, "xet_hash": self.xet_hash, "mtime": self.mtime,
                "digest": self.digest, "uploaded": self.uploaded}


@dataclass(frozen=True)
class FolderItem:
    """A folder directly under a listed folder (non-recursive listings only)."""

    path: str

    @classmethod
    def from_wire(cls, value: Any) -> "FolderItem":
        """A listed folder; MessageError for an unsafe path."""
        return cls(remote_path(wire_object(value, "listed folder").get("path"), "listed folder"))

    def to_wire(self) -> dict[str, Any]:
        """{"type": "directory", "path"}."""
        return {"type": "directory", "path": self.path}


ListItem = Union[FileItem, FolderItem]


def list_item_from_wire(value: Any) -> ListItem:
    """A listing item by its `type`; MessageError for an unknown type or an untrusted field."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "file":
        return FileItem.from_wire(value)
    if kind == "directory":
        return FolderItem.from_wire(value)
    raise MessageError(f"listing item of unknown type {_short(kind)}")


def _shown(value: Any) -> str:
    path = value.get("path") if isinstance(value, Mapping) else None
    return _short(path if path is not None else value)


def tolerant_items(value: Any, what: str, parse: Any) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """Parse each item of an array of bucket data: (the items that can be trusted, "<path>: why" for each one
    left out). Only a value that is not an array at all is a MessageError."""
    kept, skipped = [], []
    for raw in wire_array(value, what):
        try:
            kept.append(parse(raw))
        except MessageError as exc:
            skipped.append(f"{_shown(raw)}: {exc}")
    return tuple(kept), tuple(skipped)


@dataclass(frozen=True)
class DownloadFile:
    """One file of a download request: with `size` and `xet_hash` the server makes no metadata request; with
    `digest` it checks the bytes (no digest, no check); `manifest` marks a digest manifest (an export record)."""

    path: str
    local_path: str
    size: int | None = None
    xet_hash: str | None = None
    digest: str | None = None
    manifest: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> "DownloadFile":
        """A file to download; MessageError for an unsafe remote path, a relative local path, a bad size."""
        item = wire_object(value, "file to download")
        size = item.get("size")
        return cls(remote_path(item.get("path")), local_path(item.get("local_path")),
                   None if size is None else byte_size(size), optional_text(item.get("xet_hash"), "xet_hash"),
                   optional_text(item.get("digest"), "digest"), flag(item.get("manifest"), "manifest", False))

    def to_wire(self) -> dict[str, Any]:
        """{"path", "local_path", "size"?, "xet_hash"?, "digest"?, "manifest"?}: what is unset is left out."""
        wire: dict[str, Any] = {"path": self.path, "local_path": self.local_path}
        for name in ("size", "xet_hash", "digest"):
            if getattr(self, name) is not None:
                wire[name] = getattr(self, name)
        if self.manifest:
            wire["manifest"] = True
        return wire


@dataclass(frozen=True)
class AddFile:
    """One file a batch adds at `dest`: a local regular file's bytes, or `content` (UTF-8 text). `describe`
    asks for its Xet hash and digest in the reply (what a digest manifest records)."""

    dest: str
    local_path: str | None = None
    content: str = ""
    describe: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> "AddFile":
        """A file to add; MessageError for an unsafe dest, a relative local path or non-text content."""
        item = wire_object(value, "file to add")
        dest = remote_path(item.get("dest"), "dest")
        if "local_path" in item:
            return cls(dest, local_path(item["local_path"]), describe=flag(item.get("describe"), "describe", False))
        content = item.get("content", "")
        if not isinstance(content, str):
            raise MessageError(f"content of {dest} must be a string, got {type(content).__name__}")
        return cls(dest, content=content, describe=flag(item.get("describe"), "describe", False))

    def to_wire(self) -> dict[str, Any]:
        """{"dest", "local_path", "describe"?} or {"dest", "content"}."""
        wire: dict[str, Any] = {"dest": self.dest}
        if self.local_path is not None:
            wire["local_path"] = self.local_path
        else:
            wire["content"] = self.content
        if self.describe:
            wire["describe"] = True
        return wire


@dataclass(frozen=True)
class CopyFile:
    """A copy within the bucket (server-side by Xet hash on the Hub; `xet_hash` saves the server a lookup)."""

    src: str
    dest: str
    xet_hash: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "CopyFile":
        """A copy; MessageError for an unsafe src or dest."""
        item = wire_object(value, "copy")
        return cls(remote_path(item.get("src"), "src"), remote_path(item.get("dest"), "dest"),
                   optional_text(item.get("xet_hash"), "xet_hash"))

    def to_wire(self) -> dict[str, Any]:
        """{"src", "dest", "xet_hash"?}."""
        wire: dict[str, Any] = {"src": self.src, "dest": self.dest}
        if self.xet_hash is not None:
            wire["xet_hash"] = self.xet_hash
        return wire


#: Failure kinds: the bytes came and are not what the bucket lists (MISMATCH: corrupt, or changed since), or
#: they did not come at all (TRANSFER: an HTTP error, a timeout, a path that is not a regular file; nothing is
#: known of the content). Only a MISMATCH says anything about the bucket's content.
MISMATCH = "mismatch"
TRANSFER = "transfer"


@dataclass(frozen=True)
class Failure:
    """A downloaded file the server refused (deleted before the client could see it), why, and its kind."""

    path: str
    reason: str
    kind: str = MISMATCH

    @classmethod
    def from_wire(cls, value: Any) -> "Failure":
        """A failure of a download reply (no `kind`: a mismatch, as every failure was before kinds)."""
        item = wire_object(value, "failure")
        kind = item.get("kind", MISMATCH)
        if kind not in (MISMATCH, TRANSFER):
            raise MessageError(f"failure kind must be {MISMATCH!r} or {TRANSFER!r}, got {_short(kind)}")
        return cls(bounded_text(item.get("path"), "failed path"), bounded_text(item.get("reason"), "reason"), kind)

    def to_wire(self) -> dict[str, Any]:
        """{"path", "reason", "kind"?}: the kind only when it is not a mismatch."""
        wire = {"path": self.path, "reason": self.reason}
        if self.kind != MISMATCH:
            wire["kind"] = self.kind
        return wire


@dataclass(frozen=True)
class Described:
    """What the bucket now lists for an added file marked `describe`: its Xet hash (None on a directory
    bucket) and the digest of the bytes uploaded."""

    xet_hash: str | None
    digest: str

    @classmethod
    def from_wire(cls, value: Any) -> "Described":
        """A described file of a batch reply."""
        item = wire_object(value, "described file")
        return cls(optional_text(item.get("xet_hash"), "xet_hash"), bounded_text(item.get("digest"), "digest"))

    def to_wire(self) -> dict[str, Any]:
        """{"xet_hash", "digest"}."""
        return {"xet_hash": self.xet_hash, "digest": self.digest}


# ---------------------------------------------------------------------------------------------- requests
def _args(value: Any, op: str) -> Mapping[str, Any]:
    return wire_object({} if value is None else value, f"args of {op}")


@dataclass(frozen=True)
class HelloRequest:
    """The handshake: the server answers its status, or protocol_mismatch."""

    #: None when the client sent no whole number: it speaks some other protocol.
    protocol: int | None
    client_version: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "HelloRequest":
        """Whatever the client says its protocol is, this is not a bad request: a client of another protocol
        (even one that sends no number) must get protocol_mismatch, the handler's answer, so it replaces us."""
        args = _args(value, "hello")
        protocol = args.get("protocol")
        version = args.get("client_version")
        return cls(protocol if isinstance(protocol, int) and not isinstance(protocol, bool) else None,
                   version if isinstance(version, str) and len(version) <= MAX_TEXT_CHARS else None)

    def to_wire(self) -> dict[str, Any]:
        """{"protocol", "client_version"}."""
        return {"protocol": self.protocol, "client_version": self.client_version}


@dataclass(frozen=True)
class _NoArgs:
    """An operation without arguments (whatever args come along are ignored, as they always were)."""

    @classmethod
    def from_wire(cls, value: Any) -> Any:
        """The one value of the class; args must still be an object."""
        _args(value, cls.__name__)
        return cls()

    def to_wire(self) -> dict[str, Any]:
        """{}."""
        return {}


class StatusRequest(_NoArgs):
    """The server's status (`neuron-cache server status`)."""


class ShutdownRequest(_NoArgs):
    """Stop the server."""


class InfoRequest(_NoArgs):
    """The bucket's id, visibility, size and file count."""


@dataclass(frozen=True)
class CreateRequest:
    """Create the bucket if it is missing (exists-ok)."""

    private: bool | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "CreateRequest":
        """`private` is true, false or null (the Hub's default)."""
        private = _args(value, "create").get("private")
        if private is not None and not isinstance(private, bool):
            raise MessageError(f"private must be true, false or null, got {_short(private)}")
        return cls(private)

    def to_wire(self) -> dict[str, Any]:
        """{"private"}."""
        return {"private": self.private}


@dataclass(frozen=True)
class ListRequest:
    """The files (and, not recursive, folders) strictly under the folder `prefix`."""

    prefix: str = ""
    recursive: bool = True

    @classmethod
    def from_wire(cls, value: Any) -> "ListRequest":
        """`prefix` is a safe folder ('' for the root, a trailing '/' dropped); `recursive` defaults to true."""
        args = _args(value, "list")
        return cls(folder_path(args.get("prefix", "")), flag(args.get("recursive"), "recursive", True))

    def to_wire(self) -> dict[str, Any]:
        """{"prefix", "recursive"}."""
        return {"prefix": self.prefix, "recursive": self.recursive}


@dataclass(frozen=True)
class PathsInfoRequest:
    """Which of these files exist, with their sizes, hashes and digests."""

    paths: tuple[str, ...]

    @classmethod
    def from_wire(cls, value: Any) -> "PathsInfoRequest":
        """Every path must be safe."""
        return cls(tuple(remote_path(path) for path in wire_array(_args(value, "paths_info").get("paths"), "paths")))

    def to_wire(self) -> dict[str, Any]:
        """{"paths"}."""
        return {"paths": list(self.paths)}


@dataclass(frozen=True)
class DownloadRequest:
    """Files to download to local paths (their folders must exist), each checked against its digest."""

    files: tuple[DownloadFile, ...]

    @classmethod
    def from_wire(cls, value: Any) -> "DownloadRequest":
        """Every file as DownloadFile.from_wire accepts it."""
        files = wire_array(_args(value, "download").get("files"), "files")
        return cls(tuple(DownloadFile.from_wire(item) for item in files))

    def to_wire(self) -> dict[str, Any]:
        """{"files": [...]}."""
        return {"files": [item.to_wire() for item in self.files]}


@dataclass(frozen=True)
class BatchRequest:
    """Copies, then adds, then deletes, in one request."""

    add: tuple[AddFile, ...] = ()
    copy: tuple[CopyFile, ...] = ()
    delete: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> "BatchRequest":
        """Each list may be absent (empty); every path must be safe."""
        args = _args(value, "batch")
        return cls(tuple(AddFile.from_wire(item) for item in wire_array(args.get("add", []), "add")),
                   tuple(CopyFile.from_wire(item) for item in wire_array(args.get("copy", []), "copy")),
                   tuple(remote_path(path, "path to delete") for path in wire_array(args.get("delete", []), "delete")))

    def to_wire(self) -> dict[str, Any]:
        """{"add", "copy", "delete"}."""
        return {"add": [item.to_wire() for item in self.add], "copy": [item.to_wire() for item in self.copy],
                "delete": list(self.delete)}


#: A commit applies at most this many phases (a publish needs two).
MAX_PHASES = 8


@dataclass(frozen=True)
class StageRequest:
    """Upload the bytes of files that a `commit` on the same connection will add, and add them nowhere yet:
    a publish then pays one transfer session for all its batches. Files marked `describe` come back with
    their Xet hash and digest (keyed by `dest`), which is what the publisher writes its manifests from."""

    add: tuple[AddFile, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> "StageRequest":
        """Every path must be safe, every local path absolute."""
        args = _args(value, "stage")
        return cls(tuple(AddFile.from_wire(item) for item in wire_array(args.get("add", []), "add")))

    def to_wire(self) -> dict[str, Any]:
        """{"add"}."""
        return {"add": [item.to_wire() for item in self.add]}


@dataclass(frozen=True)
class CommitRequest:
    """Batches applied in order, each only once the one before it has landed whole: what makes "content
    before commit file" one request. `stage` names a stage of this connection whose bytes the adds reuse
    (by local path or content), "" for none; every other byte is uploaded before the first phase."""

    stage: str = ""
    phases: tuple[BatchRequest, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> "CommitRequest":
        """One to MAX_PHASES phases, each a batch's args."""
        args = _args(value, "commit")
        stage = args.get("stage", "")
        if not isinstance(stage, str) or len(stage) > 64:
            raise MessageError(f"stage must be a short string, got {_short(stage)}")
        phases = wire_array(args.get("phases"), "phases")
        if not 1 <= len(phases) <= MAX_PHASES:
            raise MessageError(f"a commit has 1 to {MAX_PHASES} phases, got {len(phases)}")
        return cls(stage, tuple(BatchRequest.from_wire(phase) for phase in phases))

    def to_wire(self) -> dict[str, Any]:
        """{"stage", "phases"}."""
        return {"stage": self.stage, "phases": [phase.to_wire() for phase in self.phases]}


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class StatusResult:
    """What the server says about itself (hello and status). Only `protocol` and `pid` are required: a
    server of another version may have fewer fields."""

    protocol: int
    pid: int
    server_version: str | None = None
    socket: str | None = None
    endpoint: str | None = None
    python: str | None = None
    huggingface_hub: str | None = None
    uptime: float | None = None
    idle_timeout: float | None = None
    connections: int | None = None
    requests: int | None = None
    idle_for: float | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "StatusResult":
        """A status reply; MessageError when protocol or pid is not a whole number."""
        item = wire_object(value, "status")
        counts = {name: item.get(name) for name in ("connections", "requests")}
        return cls(
            protocol=whole_number(item.get("protocol"), "protocol", maximum=2**31),
            pid=whole_number(item.get("pid"), "pid", maximum=2**31),
            **{name: optional_text(item.get(name), name)
               for name in ("server_version", "socket", "endpoint", "python", "huggingface_hub")},
            **{name: optional_seconds(item.get(name)) for name in ("uptime", "idle_timeout", "idle_for")},
            **{name: count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
               for name, count in counts.items()},
        )

    def to_wire(self) -> dict[str, Any]:
        """Every field, by name."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class ShutdownResult:
    """The server is stopping."""

    stopping: bool = True

    @classmethod
    def from_wire(cls, value: Any) -> "ShutdownResult":
        """{"stopping": true}."""
        return cls(flag(wire_object(value, "shutdown reply").get("stopping"), "stopping", True))

    def to_wire(self) -> dict[str, Any]:
        """{"stopping"}."""
        return {"stopping": self.stopping}


@dataclass(frozen=True)
class InfoResult:
    """The bucket's id, visibility, size and file count. The numbers are bucket data: one that is not a
    whole number in bounds reads as None (they are only ever shown)."""

    id: str
    private: bool | None = None
    size: int | None = None
    total_files: int | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "InfoResult":
        """An info reply; MessageError only when the id is not text."""
        item = wire_object(value, "info")
        private = item.get("private")
        numbers = {}
        for name in ("size", "total_files"):
            try:
                numbers[name] = whole_number(item.get(name), name, maximum=MAX_TOTAL_BYTES)
            except MessageError:
                numbers[name] = None
        return cls(bounded_text(item.get("id"), "id"), private if isinstance(private, bool) else None,
                   numbers["size"], numbers["total_files"])

    def to_wire(self) -> dict[str, Any]:
        """{"id", "private", "size", "total_files"}."""
        return {"id": self.id, "private": self.private, "size": self.size, "total_files": self.total_files}


@dataclass(frozen=True)
class CreateResult:
    """Whether the bucket was created now (False: it existed), where it is, and the id the Hub gave it (its
    namespace and casing may differ from the one asked for; '' for a directory)."""

    created: bool
    url: str
    bucket_id: str = ""

    @classmethod
    def from_wire(cls, value: Any) -> "CreateResult":
        """A create reply."""
        item = wire_object(value, "create reply")
        created = item.get("created")
        if not isinstance(created, bool):
            raise MessageError(f"created must be true or false, got {_short(created)}")
        return cls(created, bounded_text(item.get("url"), "url"), bounded_text(item.get("bucket_id", ""), "bucket_id"))

    def to_wire(self) -> dict[str, Any]:
        """{"created", "url", "bucket_id"}."""
        return {"created": self.created, "url": self.url, "bucket_id": self.bucket_id}


@dataclass(frozen=True)
class ListResult:
    """A listing: files, and folders when not recursive. On the wire, a plain array."""

    items: tuple[ListItem, ...] = ()
    #: "<path>: why" for each listed item left out as untrusted (never on the wire).
    skipped: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_wire(cls, value: Any) -> "ListResult":
        """Tolerant: an untrusted item is left out and named in `skipped`."""
        items, skipped = tolerant_items(value, "listing", list_item_from_wire)
        return cls(items, skipped)

    def to_wire(self) -> list[dict[str, Any]]:
        """[item, ...]."""
        return [item.to_wire() for item in self.items]


@dataclass(frozen=True)
class PathsInfoResult:
    """The requested files that exist. On the wire, a plain array."""

    files: tuple[FileItem, ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_wire(cls, value: Any) -> "PathsInfoResult":
        """Tolerant, like a listing: an untrusted file is left out (it reads as missing)."""
        files, skipped = tolerant_items(value, "paths info", FileItem.from_wire)
        return cls(files, skipped)

    def to_wire(self) -> list[dict[str, Any]]:
        """[file, ...]."""
        return [item.to_wire() for item in self.files]


@dataclass(frozen=True)
class DownloadResult:
    """How many files were asked for, the bytes moved, and the files refused (deleted by the server)."""

    files: int
    bytes: int
    failed: tuple[Failure, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> "DownloadResult":
        """A download reply; strict (a failure the client missed would be a file it trusts)."""
        item = wire_object(value, "download reply")
        return cls(whole_number(item.get("files"), "files", maximum=MAX_TOTAL_BYTES),
                   whole_number(item.get("bytes"), "bytes", maximum=MAX_TOTAL_BYTES),
                   tuple(Failure.from_wire(failure) for failure in wire_array(item.get("failed", []), "failed")))

    def to_wire(self) -> dict[str, Any]:
        """{"files", "bytes", "failed": [...]}."""
        return {"files": self.files, "bytes": self.bytes, "failed": [failure.to_wire() for failure in self.failed]}


@dataclass(frozen=True)
class BatchResult:
    """Counts of what a batch did, and the added files it was asked to describe (dest -> Described)."""

    added: int = 0
    copied: int = 0
    deleted: int = 0
    described: Mapping[str, Described] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "BatchResult":
        """A batch reply."""
        item = wire_object(value, "batch reply")
        described = wire_object(item.get("described", {}), "described")
        return cls(*(whole_number(item.get(name, 0), name, maximum=MAX_TOTAL_BYTES) for name in ("added", "copied", "deleted")),
                   {remote_path(dest, "described dest"): Described.from_wire(info) for dest, info in described.items()})

    def to_wire(self) -> dict[str, Any]:
        """{"added", "copied", "deleted", "described"?} ("described" only when some file was)."""
        wire: dict[str, Any] = {"added": self.added, "copied": self.copied, "deleted": self.deleted}
        if self.described:
            wire["described"] = {dest: info.to_wire() for dest, info in self.described.items()}
        return wire


@dataclass(frozen=True)
class StageResult:
    """The stage's name on this connection ("" when the backend stages nothing: a directory bucket writes
    at commit), and the staged files marked `describe` (dest -> Described)."""

    stage: str = ""
    described: Mapping[str, Described] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> "StageResult":
        """A stage reply."""
        item = wire_object(value, "stage reply")
        stage = item.get("stage", "")
        if not isinstance(stage, str) or len(stage) > 64:
            raise MessageError(f"stage must be a short string, got {_short(stage)}")
        described = wire_object(item.get("described", {}), "described")
        return cls(stage, {remote_path(dest, "described dest"): Described.from_wire(info) for dest, info in described.items()})

    def to_wire(self) -> dict[str, Any]:
        """{"stage", "described"}."""
        return {"stage": self.stage, "described": {dest: info.to_wire() for dest, info in self.described.items()}}


@dataclass(frozen=True)
class CommitResult:
    """What each phase did, in order (all of them: a phase that fails fails the request)."""

    phases: tuple[BatchResult, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> "CommitResult":
        """A commit reply."""
        item = wire_object(value, "commit reply")
        return cls(tuple(BatchResult.from_wire(phase) for phase in wire_array(item.get("phases", []), "phases")))

    def to_wire(self) -> dict[str, Any]:
        """{"phases"}."""
        return {"phases": [phase.to_wire() for phase in self.phases]}


# ---------------------------------------------------------------------------------------------- model repos
# Read-only operations on a Hub model repo (optimum-neuron's Git cache repos): the frame names it as
# "repo": {"type": "model", "id", "revision"} (server.BucketServer.repo validates it), and `repo_copy` also
# names the destination bucket. Files carry their Git blob id besides what a bucket's files carry.
@dataclass(frozen=True)
class RepoFileItem(FileItem):
    """A file of a model repo: a bucket file's fields and its Git blob id (what a regular file is checked by)."""

    blob_id: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "RepoFileItem":
        """A listed repo file; MessageError names what cannot be trusted."""
        base = FileItem.from_wire(value)
        return cls(**{name: getattr(base, name) for name in FileItem.__dataclass_fields__},
                   blob_id=optional_text(wire_object(value, "listed file").get("blob_id"), "blob_id"))

    def to_wire(self) -> dict[str, Any]:
        """A file item with "blob_id"."""
        return {**super().to_wire(), "blob_id": self.blob_id}


def repo_item_from_wire(value: Any) -> Union[RepoFileItem, FolderItem]:
    """A repo listing item by its `type`."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "file":
        return RepoFileItem.from_wire(value)
    if kind == "directory":
        return FolderItem.from_wire(value)
    raise MessageError(f"listing item of unknown type {_short(kind)}")


@dataclass(frozen=True)
class RepoDownloadFile(DownloadFile):
    """A repo file to download: a bucket download's fields and the Git blob id to check a regular file by."""

    blob_id: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "RepoDownloadFile":
        """A repo file to download; MessageError as DownloadFile's, or for a blob id that is not text."""
        base = DownloadFile.from_wire(value)
        return cls(**{name: getattr(base, name) for name in DownloadFile.__dataclass_fields__},
                   blob_id=optional_text(wire_object(value, "file to download").get("blob_id"), "blob_id"))

    def to_wire(self) -> dict[str, Any]:
        """A download file with "blob_id" when it has one."""
        wire = super().to_wire()
        if self.blob_id is not None:
            wire["blob_id"] = self.blob_id
        return wire


@dataclass(frozen=True)
class RepoCopy:
    """A Xet-backed repo file to copy into the request's Hub bucket at `dest`, by its Xet hash."""

    xet_hash: str
    dest: str

    @classmethod
    def from_wire(cls, value: Any) -> "RepoCopy":
        """A copy by hash; MessageError for an unsafe dest or a missing hash."""
        item = wire_object(value, "copy")
        return cls(bounded_text(item.get("xet_hash"), "xet_hash"), remote_path(item.get("dest"), "dest"))

    def to_wire(self) -> dict[str, Any]:
        """{"xet_hash", "dest"}."""
        return {"xet_hash": self.xet_hash, "dest": self.dest}


class RepoInfoRequest(_NoArgs):
    """The commit the repo's revision points at (pin it for what follows)."""


class RepoListRequest(ListRequest):
    """The repo's files (and, not recursive, folders) under the folder `prefix`."""


class RepoPathsInfoRequest(PathsInfoRequest):
    """Which of these files exist at the revision."""


@dataclass(frozen=True)
class RepoDownloadRequest:
    """Repo files to download to local paths, each verified by the server (Xet hash or Git blob id)."""

    files: tuple[RepoDownloadFile, ...]

    @classmethod
    def from_wire(cls, value: Any) -> "RepoDownloadRequest":
        """Every file as RepoDownloadFile.from_wire accepts it."""
        files = wire_array(_args(value, "repo_download").get("files"), "files")
        return cls(tuple(RepoDownloadFile.from_wire(item) for item in files))

    def to_wire(self) -> dict[str, Any]:
        """{"files": [...]}."""
        return {"files": [item.to_wire() for item in self.files]}


@dataclass(frozen=True)
class RepoCopyRequest:
    """Server-side copies of the repo's Xet-backed files into the request's Hub bucket."""

    copies: tuple[RepoCopy, ...]

    @classmethod
    def from_wire(cls, value: Any) -> "RepoCopyRequest":
        """Every copy as RepoCopy.from_wire accepts it."""
        copies = wire_array(_args(value, "repo_copy").get("copies"), "copies")
        return cls(tuple(RepoCopy.from_wire(item) for item in copies))

    def to_wire(self) -> dict[str, Any]:
        """{"copies": [...]}."""
        return {"copies": [item.to_wire() for item in self.copies]}


@dataclass(frozen=True)
class RepoInfoResult:
    """The repo's id, the commit sha its revision points at, and its visibility."""

    id: str
    sha: str
    private: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> "RepoInfoResult":
        """A repo_info reply; MessageError when the sha is not 40 hex digits."""
        item = wire_object(value, "repo info")
        sha = bounded_text(item.get("sha"), "sha")
        if len(sha) != 40 or any(char not in "0123456789abcdef" for char in sha):
            raise MessageError(f"sha must be 40 lowercase hex digits, got {_short(sha)}")
        return cls(bounded_text(item.get("id"), "id"), sha, flag(item.get("private"), "private", False))

    def to_wire(self) -> dict[str, Any]:
        """{"id", "sha", "private"}."""
        return {"id": self.id, "sha": self.sha, "private": self.private}


@dataclass(frozen=True)
class RepoListResult:
    """A repo listing: files with blob ids, and folders when not recursive. On the wire, a plain array."""

    items: tuple[Union[RepoFileItem, FolderItem], ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_wire(cls, value: Any) -> "RepoListResult":
        """Tolerant: an untrusted item is left out and named in `skipped`."""
        items, skipped = tolerant_items(value, "repo listing", repo_item_from_wire)
        return cls(items, skipped)

    def to_wire(self) -> list[dict[str, Any]]:
        """[item, ...]."""
        return [item.to_wire() for item in self.items]


@dataclass(frozen=True)
class RepoPathsInfoResult:
    """The requested repo files that exist. On the wire, a plain array."""

    files: tuple[RepoFileItem, ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_wire(cls, value: Any) -> "RepoPathsInfoResult":
        """Tolerant: an untrusted file is left out (it reads as missing)."""
        files, skipped = tolerant_items(value, "repo paths info", RepoFileItem.from_wire)
        return cls(files, skipped)

    def to_wire(self) -> list[dict[str, Any]]:
        """[file, ...]."""
        return [item.to_wire() for item in self.files]


@dataclass(frozen=True)
class RepoCopyResult:
    """How many files were copied by hash."""

    copied: int = 0

    @classmethod
    def from_wire(cls, value: Any) -> "RepoCopyResult":
        """A repo_copy reply."""
        return cls(whole_number(wire_object(value, "repo copy reply").get("copied", 0), "copied", maximum=MAX_TOTAL_BYTES))

    def to_wire(self) -> dict[str, Any]:
        """{"copied"}."""
        return {"copied": self.copied}


# ---------------------------------------------------------------------------------------------- the registry
# ---------------------------------------------------------------------------------------------- compile leases
#: What a lease operation may do (see Backend.lease); a lease file holds at most LEASE_MAX_BYTES.
LEASE_MODES = ("read", "create", "replace", "takeover", "delete")
LEASE_MAX_BYTES = 4096


def _lease_text(value: Any, what: str, limit: int = LEASE_MAX_BYTES) -> str | None:
    """None, or a string of at most `limit` bytes in UTF-8."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or len(value.encode("utf-8", "replace")) > limit:
        raise MessageError(f"lease {what} must be a string of at most {limit} bytes")
    return value


@dataclass(frozen=True)
class LeaseRequest:
    """Read, create, replace or delete a compile lease file, conditionally (see Backend.lease)."""

    path: str
    mode: str
    content: str | None = None
    expect: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "LeaseRequest":
        """A safe path; a known mode; content for create and replace, expect for replace; both small."""
        args = _args(value, "lease")
        mode = args.get("mode")
        if mode not in LEASE_MODES:
            raise MessageError(f"lease mode must be one of {', '.join(LEASE_MODES)}, got {_short(mode)}")
        content, expect = _lease_text(args.get("content"), "content"), _lease_text(args.get("expect"), "expect")
        if mode in ("create", "replace", "takeover") and not content:  # "" is what an unreadable lease reads as
            raise MessageError(f"lease {mode} needs content")
        if mode in ("replace", "takeover") and expect is None:
            raise MessageError(f"lease {mode} needs expect")
        return cls(remote_path(args.get("path"), "lease path"), mode, content, expect)

    def to_wire(self) -> dict[str, Any]:
        """{"path", "mode", "content", "expect"}."""
        return {"path": self.path, "mode": self.mode, "content": self.content, "expect": self.expect}


@dataclass(frozen=True)
class LeaseResult:
    """Whether the operation took effect, and the file's content after it when the backend knows it cheaply
    (bucket data: only its size is checked here; compile_leases.Holder.parse judges the rest)."""

    ok: bool
    content: str | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "LeaseResult":
        """A lease reply."""
        item = wire_object(value, "lease reply")
        ok = item.get("ok")
        if not isinstance(ok, bool):
            raise MessageError(f"ok must be true or false, got {_short(ok)}")
        return cls(ok, _lease_text(item.get("content"), "content", 2 * LEASE_MAX_BYTES))

    def to_wire(self) -> dict[str, Any]:
        """{"ok", "content"}."""
        return {"ok": self.ok, "content": self.content}


@dataclass(frozen=True)
class Op:
    """An operation: the class of its args, the class of its result, and whether sending it twice has the
    same effect as once (the client then resends it once over a new connection after losing the server)."""

    name: str
    request: type
    result: type
    idempotent: bool = True


#: Every operation of the protocol: the one place an operation's types are registered.
OPS: dict[str, Op] = {op.name: op for op in (
    Op("hello", HelloRequest, StatusResult),
    Op("status", StatusRequest, StatusResult),
    Op("shutdown", ShutdownRequest, ShutdownResult, idempotent=False),
    Op("info", InfoRequest, InfoResult),
    Op("create", CreateRequest, CreateResult),
    Op("list", ListRequest, ListResult),
    Op("paths_info", PathsInfoRequest, PathsInfoResult),
    Op("download", DownloadRequest, DownloadResult),
    Op("batch", BatchRequest, BatchResult),
    # A stage lives on its connection (nothing of it is visible): staging again over a new one is harmless,
    # but a commit sent again over a new connection finds no stage there, so it is not resent.
    Op("stage", StageRequest, StageResult),
    Op("commit", CommitRequest, CommitResult, idempotent=False),
    Op("repo_info", RepoInfoRequest, RepoInfoResult),
    Op("repo_list", RepoListRequest, RepoListResult),
    Op("repo_paths_info", RepoPathsInfoRequest, RepoPathsInfoResult),
    Op("repo_download", RepoDownloadRequest, DownloadResult),
    Op("repo_copy", RepoCopyRequest, RepoCopyResult),
    # Idempotent by design: redoing a lease operation that took effect answers ok (see Backend.lease).
    Op("lease", LeaseRequest, LeaseResult),
)}
_OP_OF_REQUEST: dict[type, Op] = {op.request: op for op in OPS.values()}


def op_of(request: Any) -> Op:
    """The operation a request object belongs to."""
    try:
        return _OP_OF_REQUEST[type(request)]
    except KeyError:
        raise MessageError(f"{type(request).__name__} is not a request of any operation") from None


def parse_request(op: str, args: Any) -> Any:
    """The typed args of a request to `op` (the server's edge); MessageError for an unknown op or bad args."""
    if op not in OPS:
        raise MessageError(f"unknown operation {op!r}")
    return OPS[op].request.from_wire(args)


def parse_result(op: str, result: Any) -> Any:
    """The typed result of a reply to `op` (the client's edge); MessageError when it cannot be trusted."""
    if op not in OPS:
        raise MessageError(f"unknown operation {op!r}")
    return OPS[op].result.from_wire(result)
