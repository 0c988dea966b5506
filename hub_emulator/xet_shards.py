"""Read file sizes out of Xet shard files (``*.mdb``), stdlib only.

Why: the bucket ``batch`` endpoint receives ``{"type": "addFile", "path", "xetHash", "mtime"}`` and no size; the
real Hub reads the size from Xet storage. ``hf_xet`` pointed at ``casUrl = local://<dir>`` writes its shards into
``<dir>`` (``xet/xorbs/shards/<hash>.mdb`` for the uploaded, "server side" copy and ``xet/shard-cache/`` for its
own cache, as of hf_xet 1.8.0), so the emulator can learn every committed file's size by parsing them.

Format (MDB shard, from the Xet spec ``spec/shard.md`` in huggingface/xet-core, mirrored in hub-docs
``docs/xet/shard.md``; byte order checked against shards written by hf_xet 1.8.0). Little-endian throughout::

    header       48 B   tag[32] ("HFRepoMetaData\\0" + magic), u64 version (=2), u64 footer_size
    file info    repeated until a bookend entry (32 x 0xFF, 16 x 0x00):
      FileDataSequenceHeader   48 B  file_hash[32], u32 file_flags, u32 num_entries, 8 B unused
      FileDataSequenceEntry    48 B  x num_entries: cas_hash[32], u32 cas_flags,
                                     u32 unpacked_segment_bytes, u32 chunk_start, u32 chunk_end
      FileVerificationEntry    48 B  x num_entries   if file_flags & 0x80000000
      FileMetadataExt          48 B  x 1             if file_flags & 0x40000000
    CAS info     repeated until a bookend (read by ``parse_shard_full`` for the HTTP CAS):
      CASChunkSequenceHeader   48 B  xorb_hash[32], u32 flags, u32 num_entries, u32 bytes_in_xorb, u32 bytes_on_disk
      CASChunkSequenceEntry    48 B  x num_entries: chunk_hash[32], u32 byte_start, u32 unpacked_bytes, 8 B unused
    footer                           (not needed here; absent from uploaded shards)

A file's size is the sum of its entries' ``unpacked_segment_bytes``. A 0-byte file has the all-zero hash and
zero entries (hf_xet still records it in the shard).

Hash text form: the 32 hash bytes are four little-endian u64 words and the hex string prints each word as a
big-endian number, i.e. every 8-byte group is byte-reversed: ``hex(b[0:8][::-1]) + hex(b[8:16][::-1]) + ...``.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EMPTY_FILE_HASH",
    "ParsedShard",
    "ShardFormatError",
    "ShardIndex",
    "hash_to_hex",
    "parse_shard",
    "parse_shard_file",
    "parse_shard_full",
]

#: Xet hash that hf_xet reports for a 0-byte file.
EMPTY_FILE_HASH = "0" * 64

_ENTRY = 48
_TAG_PREFIX = b"HFRepoMetaData\x00"
_HEADER_VERSION = 2
_BOOKEND = b"\xff" * 32
_FLAG_VERIFICATION = 0x80000000
_FLAG_METADATA_EXT = 0x40000000
# hf_xet's own client-side shard caches inside a local:// directory: not proof that an upload completed.
_CLIENT_CACHE_DIRS = frozenset({"shard-cache", "shard-session"})


class ShardFormatError(ValueError):
    """The bytes are not a (complete) MDB shard."""


def hash_to_hex(raw: bytes) -> str:
    """Text form of a 32-byte Xet hash (each 8-byte little-endian word printed big-endian)."""
    if len(raw) != 32:
        raise ValueError("a Xet hash is 32 bytes")
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def parse_shard(data: bytes) -> dict[str, int]:
    """Return ``{xet_hash_hex: file_size}`` for every file described in the shard's file-info section."""
    if len(data) < 2 * _ENTRY or not data.startswith(_TAG_PREFIX):
        raise ShardFormatError("missing MDB shard header")
    (version,) = struct.unpack_from("<Q", data, 32)
    if version != _HEADER_VERSION:
        raise ShardFormatError(f"unsupported shard header version {version}")
    sizes: dict[str, int] = {}
    offset = _ENTRY
    while True:
        if offset + _ENTRY > len(data):
            raise ShardFormatError("file info section not terminated (truncated shard?)")
        file_hash = data[offset : offset + 32]
        if file_hash == _BOOKEND:
            return sizes
        flags, num_entries = struct.unpack_from("<II", data, offset + 32)
        end = offset + _ENTRY * (1 + num_entries)
        if end > len(data):
            raise ShardFormatError("file entry runs past the end of the shard")
        size = 0
        for entry in range(offset + _ENTRY, end, _ENTRY):
            (unpacked,) = struct.unpack_from("<I", data, entry + 36)
            size += unpacked
        sizes[hash_to_hex(file_hash)] = size
        offset = end
        if flags & _FLAG_VERIFICATION:
            offset += _ENTRY * num_entries
        if flags & _FLAG_METADATA_EXT:
            offset += _ENTRY


@dataclass
class ParsedShard:
    """Everything the HTTP CAS needs from an uploaded shard.

    ``files``: file hash -> terms ``[(xorb_hash, unpacked_bytes, chunk_start, chunk_end), ...]`` (end exclusive).
    ``xorbs``: xorb hash -> ``[(chunk_hash, unpacked_bytes), ...]`` from the CAS info section (the xorbs this
    upload created; often empty when everything was deduplicated).
    """

    files: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)
    xorbs: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def parse_shard_full(data: bytes) -> ParsedShard:
    """Parse the file info AND the CAS info sections of a shard (with or without its footer)."""
    if len(data) < 2 * _ENTRY or not data.startswith(_TAG_PREFIX):
        raise ShardFormatError("missing MDB shard header")
    (version,) = struct.unpack_from("<Q", data, 32)
    if version != _HEADER_VERSION:
        raise ShardFormatError(f"unsupported shard header version {version}")
    parsed = ParsedShard()
    offset = _ENTRY
    while True:  # file info section
        if offset + _ENTRY > len(data):
            raise ShardFormatError("file info section not terminated (truncated shard?)")
        file_hash = data[offset : offset + 32]
        if file_hash == _BOOKEND:
            offset += _ENTRY
            break
        flags, num_entries = struct.unpack_from("<II", data, offset + 32)
        end = offset + _ENTRY * (1 + num_entries)
        if end > len(data):
            raise ShardFormatError("file entry runs past the end of the shard")
        terms = []
        for entry in range(offset + _ENTRY, end, _ENTRY):
            _cas_flags, unpacked, start, stop = struct.unpack_from("<IIII", data, entry + 32)
            if stop <= start:
                raise ShardFormatError("empty or inverted chunk range in a file term")
            terms.append((hash_to_hex(data[entry : entry + 32]), unpacked, start, stop))
        parsed.files[hash_to_hex(file_hash)] = terms
        offset = end
        if flags & _FLAG_VERIFICATION:
            offset += _ENTRY * num_entries
        if flags & _FLAG_METADATA_EXT:
            offset += _ENTRY
    while True:  # CAS info section
        if offset + _ENTRY > len(data):
            if offset == len(data):  # tolerate a shard cut right after the file info bookend
                return parsed
            raise ShardFormatError("CAS info section not terminated (truncated shard?)")
        xorb_hash = data[offset : offset + 32]
        if xorb_hash == _BOOKEND:
            return parsed
        (num_entries,) = struct.unpack_from("<I", data, offset + 36)
        end = offset + _ENTRY * (1 + num_entries)
        if end > len(data):
            raise ShardFormatError("CAS entry runs past the end of the shard")
        parsed.xorbs[hash_to_hex(xorb_hash)] = [
            (hash_to_hex(data[e : e + 32]), struct.unpack_from("<I", data, e + 36)[0])
            for e in range(offset + _ENTRY, end, _ENTRY)
        ]
        offset = end


def parse_shard_file(path: str | os.PathLike) -> dict[str, int]:
    return parse_shard(Path(path).read_bytes())


class ShardIndex:
    """Sizes of every file known to the shards under a directory (searched recursively, skipping hf_xet's
    client-side caches ``shard-cache/`` and ``shard-session/``).

    Parsed shards are cached by file name (shard names are content hashes, so a name never changes meaning);
    a miss rescans the directory for new shards. A shard that fails to parse (e.g. caught mid-write) is not
    cached and is retried on the next miss. Thread-safe.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._parsed: set[str] = set()
        self._sizes: dict[str, int] = {EMPTY_FILE_HASH: 0}

    def size_of(self, xet_hash: str) -> int | None:
        """Size of the file with this Xet hash, or None when no shard knows it."""
        xet_hash = xet_hash.lower()
        with self._lock:
            if xet_hash not in self._sizes:
                self._rescan()
            return self._sizes.get(xet_hash)

    def _rescan(self) -> None:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.rglob("*.mdb")):
            if shard.name in self._parsed or not shard.is_file():
                continue
            if _CLIENT_CACHE_DIRS.intersection(shard.relative_to(self.root).parts[:-1]):
                continue
            try:
                sizes = parse_shard_file(shard)
            except (OSError, ShardFormatError, struct.error):
                continue
            self._sizes.update(sizes)
            self._parsed.add(shard.name)
