"""Storage and protocol logic of the emulator's HTTP Xet CAS (stdlib only; the HTTP side lives in ``hub.py``).

What is stored (under ``<data_dir>/cas`` of the emulator)::

    xorbs/<xorb_hash>        the chunk section of every uploaded xorb, bytes as sent (chunks stay compressed:
                             the client decompresses), the footer stripped; first upload of a hash wins
    shards/<sha256>.mdb      every uploaded shard, bytes as sent (file reconstructions + CAS info)

and the HMAC key for the Xet access tokens and the presigned fetch URLs in ``key_path`` (the emulator uses
``<data_dir>/xet_signing.key``), so tokens and URLs stay valid across an emulator restart on the same data_dir.

Everything is derived from those files: a new store on the same directory reloads the shards at start and
reads a xorb's chunk headers on first use. Thread-safe; several emulator *threads* share one store, and a
second emulator *process* must not write to the same directory at the same time.

Formats (Xet spec: hub-docs ``docs/xet/xorb.md``, ``shard.md``, ``download-protocol.md``, ``api.md``):

* xorb = chunks, then optionally a footer: each chunk is an 8-byte header (u8 version = 0, u24 LE compressed
  size, u8 compression scheme, u24 LE uncompressed size) and the compressed bytes. The footer ends with a u32 LE
  that gives the footer's length without those 4 bytes. Chunk ``i``'s byte range in the stored xorb is
  ``[offsets[i], offsets[i+1])``; a fetch must cover whole chunks (the client parses headers from byte 0).
* reconstruction term = ``(xorb, [chunk_start, chunk_end), unpacked_length)``; a file is the concatenation of
  its terms' decompressed chunks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .xet_shards import EMPTY_FILE_HASH, ParsedShard, ShardFormatError, parse_shard_full

__all__ = ["CasError", "CasStore", "XorbIndex", "scan_xorb"]

HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_HEADER = 8
_MAX_CHUNK = 1 << 24  # u24 sizes: a real chunk is at most 128 KiB uncompressed
_MAX_SCHEME = 15  # 0 none, 1 LZ4, 2 byte-grouping + LZ4; leave room for newer schemes
MAX_XORB_BYTES = 64 * 1024 * 1024 + 1024 * 1024  # 64 MiB limit on the serialized xorb, plus footer slack


class CasError(Exception):
    """An error the CAS answers with ``status`` (400 malformed, 404 unknown, 416 range, ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class XorbIndex:
    """Chunk layout of a stored xorb: ``offsets`` has ``n + 1`` entries, ``sizes`` the ``n`` unpacked sizes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.sizes)

    @property
    def length(self) -> int:
        return self.offsets[-1]


def _parse_header(header: bytes) -> tuple[int, int] | None:
    """``(compressed, uncompressed)`` sizes of a chunk header, or None when these bytes are not one."""
    if len(header) < _CHUNK_HEADER or header[0] != 0 or header[4] > _MAX_SCHEME:
        return None
    compressed = int.from_bytes(header[1:4], "little")
    uncompressed = int.from_bytes(header[5:8], "little")
    if compressed == 0 or uncompressed == 0:
        return None
    return compressed, uncompressed


def scan_xorb(data: bytes | memoryview) -> XorbIndex:
    """Walk the chunk headers of a serialized xorb (with or without footer). Raises CasError(400) if malformed."""
    data = memoryview(data)
    n = len(data)
    offsets, sizes = [0], []
    pos = 0
    while pos + _CHUNK_HEADER <= n:
        sizes_ = _parse_header(bytes(data[pos : pos + _CHUNK_HEADER]))
        if sizes_ is None or pos + _CHUNK_HEADER + sizes_[0] > n:
            break
        pos += _CHUNK_HEADER + sizes_[0]
        offsets.append(pos)
        sizes.append(sizes_[1])
    rest = n - pos
    if rest:
        # Whatever follows the chunks must be a footer: its last 4 bytes give its length minus those 4 bytes.
        if rest < 4 or int.from_bytes(bytes(data[n - 4 :]), "little") != rest - 4:
            raise CasError(400, f"malformed xorb: {rest} trailing bytes after {len(sizes)} chunks are not a footer")
    if not sizes:
        raise CasError(400, "malformed xorb: no chunk")
    return XorbIndex(tuple(offsets), tuple(sizes))


def _scan_xorb_file(path: Path) -> XorbIndex:
    offsets, sizes = [0], []
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < length:
            f.seek(pos)
            parsed = _parse_header(f.read(_CHUNK_HEADER))
            if parsed is None or pos + _CHUNK_HEADER + parsed[0] > length:
                raise CasError(500, f"stored xorb {path.name} is corrupt at byte {pos}")
            pos += _CHUNK_HEADER + parsed[0]
            offsets.append(pos)
            sizes.append(parsed[1])
    return XorbIndex(tuple(offsets), tuple(sizes))


def _write_new(path: Path, data: bytes | memoryview) -> bool:
    """Create ``path`` with ``data`` atomically unless it exists; True when this call created it."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if another writer got there first: first upload wins
            return True
        except FileExistsError:
            return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def parse_range_header(value: str | None, length: int) -> list[tuple[int, int]] | None:
    """RFC 7233 ``bytes=`` ranges as ``[(start, end_exclusive), ...]`` clamped to ``length``; None if absent.

    Raises CasError(416) when the header is malformed or a range starts at or past ``length``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value.lower().startswith("bytes="):
        raise CasError(416, f"unsupported Range header {value!r}")
    ranges = []
    for spec in value[6:].split(","):
        spec = spec.strip()
        start_s, sep, end_s = spec.partition("-")
        try:
            if not sep or (not start_s and not end_s):
                raise ValueError
            if not start_s:  # suffix: the last N bytes
                start, end = max(0, length - int(end_s)), length
            else:
                start = int(start_s)
                end = length if not end_s else min(length, int(end_s) + 1)
                if int(end_s or length) < start:
                    raise ValueError
        except ValueError:
            raise CasError(416, f"malformed Range header {value!r}") from None
        if start >= length:
            raise CasError(416, f"range {spec} starts past the end ({length} bytes)")
        ranges.append((start, end))
    return ranges


class CasStore:
    """Xorbs, shards and the file table of the HTTP CAS. See the module docstring."""

    def __init__(self, root: str | os.PathLike, key_path: str | os.PathLike | None = None):
        self.root = Path(root)
        self.key_path = Path(key_path) if key_path is not None else self.root / "signing.key"
        self.xorb_dir = self.root / "xorbs"
        self.shard_dir = self.root / "shards"
        self.xorb_dir.mkdir(parents=True, exist_ok=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, tuple[tuple[str, int, int, int], ...]] = {EMPTY_FILE_HASH: ()}
        self._xorbs: dict[str, XorbIndex] = {}
        self.key = self._load_key()
        # Part of casUrl: hf_xet names its client-side shard cache after the CAS URL, so a new store (another
        # data_dir) never shares a cache with an older one that happened to get the same port.
        self.store_id = hashlib.sha256(b"store-id:" + self.key).hexdigest()[:16]
        for shard in sorted(self.shard_dir.glob("*.mdb")):
            try:
                self._register(parse_shard_full(shard.read_bytes()))
            except (OSError, ShardFormatError, struct.error):
                continue

    # ---------------------------------------------------------------- signing (tokens and fetch URLs)
    def _load_key(self) -> bytes:
        path = self.key_path
        try:
            key = path.read_bytes()
            if len(key) == 32:
                return key
        except FileNotFoundError:
            pass
        _write_new(path, secrets.token_bytes(32))
        return path.read_bytes()

    def _sign(self, message: str) -> str:
        return hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest()[:32]

    def issue_token(self, write: bool, ttl: int) -> tuple[str, int]:
        exp = int(time.time()) + ttl
        scope = "write" if write else "read"
        return f"xet_{scope}_{exp}_{self._sign(f'token:{scope}:{exp}')}", exp

    def check_token(self, authorization: str | None, *, write: bool) -> None:
        """Raise CasError 401 (missing, forged or expired token) or 403 (read token on a write endpoint)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise CasError(401, "missing Xet access token")
        parts = authorization[7:].strip().split("_")
        if len(parts) != 4 or parts[0] != "xet" or not parts[2].isdigit():
            raise CasError(401, "invalid Xet access token")
        _, scope, exp, sig = parts
        if not hmac.compare_digest(sig, self._sign(f"token:{scope}:{exp}")):
            raise CasError(401, "invalid Xet access token")
        if int(exp) < time.time():
            raise CasError(401, "expired Xet access token")
        if write and scope != "write":
            raise CasError(403, "this Xet token has read scope only")

    def sign_fetch(self, xorb_hash: str, ttl: int) -> str:
        exp = int(time.time()) + ttl
        return f"X-Xet-Expires={exp}&X-Xet-Signature={self._sign(f'fetch:{xorb_hash}:{exp}')}"

    def check_fetch(self, xorb_hash: str, query: dict[str, list[str]]) -> None:
        exp = (query.get("X-Xet-Expires") or [""])[0]
        sig = (query.get("X-Xet-Signature") or [""])[0]
        if not exp.isdigit() or not hmac.compare_digest(sig, self._sign(f"fetch:{xorb_hash}:{exp}")):
            raise CasError(403, "invalid signature on the fetch URL")
        if int(exp) < time.time():
            raise CasError(403, "fetch URL expired")

    # ---------------------------------------------------------------- xorbs
    def xorb_path(self, xorb_hash: str) -> Path:
        return self.xorb_dir / xorb_hash

    def has_xorb(self, xorb_hash: str) -> bool:
        return self.xorb_path(xorb_hash).is_file()

    def put_xorb(self, xorb_hash: str, data: bytes) -> bool:
        """Store a serialized xorb (footer stripped); True if it was new. Raises CasError(400) if malformed."""
        if len(data) > MAX_XORB_BYTES:
            raise CasError(400, f"xorb of {len(data)} bytes exceeds the 64 MiB limit")
        index = scan_xorb(data)
        inserted = _write_new(self.xorb_path(xorb_hash), memoryview(data)[: index.length])
        if inserted:  # a writer that lost the race must not cache its own layout: the stored bytes are the winner's
            with self._lock:
                self._xorbs.setdefault(xorb_hash, index)
        return inserted

    def xorb_index(self, xorb_hash: str) -> XorbIndex:
        with self._lock:
            index = self._xorbs.get(xorb_hash)
        if index is not None:
            return index
        path = self.xorb_path(xorb_hash)
        if not path.is_file():
            raise CasError(404, f"xorb {xorb_hash} not found")
        index = _scan_xorb_file(path)
        with self._lock:
            return self._xorbs.setdefault(xorb_hash, index)

    # ---------------------------------------------------------------- shards and files
    def put_shard(self, data: bytes) -> bool:
        """Validate and register an uploaded shard; True if it was new. Raises CasError(400) if invalid."""
        try:
            parsed = parse_shard_full(data)
        except (ShardFormatError, struct.error) as e:
            raise CasError(400, f"invalid shard: {e}") from e
        for file_hash, terms in parsed.files.items():
            for xorb_hash, unpacked, start, end in terms:
                try:
                    index = self.xorb_index(xorb_hash)
                except CasError as e:
                    raise CasError(400, f"file {file_hash} references an unknown xorb {xorb_hash}") from e
                if end > index.num_chunks:
                    raise CasError(400, f"file {file_hash}: chunks [{start}, {end}) out of xorb {xorb_hash}")
                if sum(index.sizes[start:end]) != unpacked:
                    raise CasError(400, f"file {file_hash}: term size {unpacked} does not match xorb {xorb_hash}")
        name = hashlib.sha256(data).hexdigest()
        inserted = _write_new(self.shard_dir / f"{name}.mdb", data)
        self._register(parsed)
        return inserted

    def _register(self, parsed: ParsedShard) -> None:
        with self._lock:
            for file_hash, terms in parsed.files.items():
                self._files.setdefault(file_hash, tuple(terms))

    def size_of(self, file_hash: str) -> int | None:
        """Size of a registered file (same contract as ``ShardIndex.size_of``)."""
        with self._lock:
            terms = self._files.get(file_hash.lower())
        return None if terms is None else sum(t[1] for t in terms)

    def file_terms(self, file_hash: str) -> tuple[tuple[str, int, int, int], ...]:
        with self._lock:
            terms = self._files.get(file_hash)
        if terms is None:
            raise CasError(404, f"file {file_hash} not found")
        return terms

    # ---------------------------------------------------------------- reconstruction
    def reconstruct(self, file_hash: str, range_header: str | None) -> tuple[int, list[tuple[str, int, int, int]]]:
        """``(offset_into_first_range, [(xorb, chunk_start, chunk_end, unpacked_length), ...])`` for the whole file
        or for the byte range of a ``Range: bytes=a-b`` header (whole chunks; the client trims)."""
        terms = self.file_terms(file_hash)
        size = sum(t[1] for t in terms)
        ranges = parse_range_header(range_header, size)
        if ranges is None:
            return 0, [(x, a, b, n) for x, n, a, b in terms]
        if len(ranges) != 1:
            raise CasError(416, "a reconstruction takes a single byte range")
        start, end = ranges[0]
        out: list[tuple[str, int, int, int]] = []
        offset_into_first = 0
        pos = 0  # file offset of the current term / chunk
        for xorb_hash, unpacked, a, b in terms:
            if pos >= end:
                break
            if pos + unpacked <= start:  # the whole term is before the range
                pos += unpacked
                continue
            sizes = self.xorb_index(xorb_hash).sizes
            first = None
            taken = 0
            for i in range(a, b):
                chunk_start, pos = pos, pos + sizes[i]
                if pos <= start:
                    continue
                if chunk_start >= end:
                    break
                if first is None:
                    first = i
                    if not out:
                        offset_into_first = start - chunk_start
                last = i
                taken += sizes[i]
            if first is not None:
                out.append((xorb_hash, first, last + 1, taken))
        return offset_into_first, out

    def fetch_ranges(self, terms: list[tuple[str, int, int, int]]) -> dict[str, list[tuple[int, int, int, int]]]:
        """Per xorb, the merged chunk ranges the terms need: ``[(chunk_start, chunk_end, byte_start, byte_end_incl)]``."""
        wanted: dict[str, list[tuple[int, int]]] = {}
        for xorb_hash, a, b, _ in terms:
            wanted.setdefault(xorb_hash, []).append((a, b))
        out: dict[str, list[tuple[int, int, int, int]]] = {}
        for xorb_hash, spans in wanted.items():
            offsets = self.xorb_index(xorb_hash).offsets
            merged: list[list[int]] = []
            for a, b in sorted(spans):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            out[xorb_hash] = [(a, b, offsets[a], offsets[b] - 1) for a, b in merged]
        return out
