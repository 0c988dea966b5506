"""A directory used as a bucket: a mounted bucket, a shared filesystem (FSx, EFS, NFS), or the embedded default.

Every write lands atomically: written to `.incoming/` under the bucket root (same filesystem), then renamed
over its destination, so a reader on another host never sees half a file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..protocol import ErrorCode
from ..digests import StreamVerifier, file_digest, publish_algorithm
from .base import Backend, BackendError, Progress, reject_mismatched, validate_remote_path

log = logging.getLogger("bucket_server")

INCOMING = ".incoming"
#: The digest of each file, recorded when this project wrote it: `<root>/.digests/<path>` holds
#: "<algorithm>:<hex> <size> <mtime_ns>" (stale, hence ignored, when the file was replaced by another tool).
#: Sidecars written before BLAKE3 hold a bare sha256 hex: "<sha256> <size> <mtime_ns>".
DIGESTS = ".digests"
HIDDEN = (INCOMING, DIGESTS)


def copy_regular_file(source: str | os.PathLike[str], dest: str | os.PathLike[str],
                      on_bytes: Callable[[int], None] | None = None, limit: int | None = None,
                      written: Callable[[int], None] | None = None) -> int:
    """Copy the bytes of a regular file; a symlink or anything else is refused, never followed.

    The bytes move inside the kernel (sendfile) where it can, never through Python. limit: stop after this
    many bytes plus one (a file far larger than announced is not copied whole). on_bytes(moved) and
    written(bytes so far) are called after each step of COPY_STEP bytes."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BackendError(ErrorCode.BAD_REQUEST, f"{source} is a symlink: refused") from None
        raise
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise BackendError(ErrorCode.BAD_REQUEST, f"{source} is not a regular file: refused")
        with open(dest, "wb") as dst:
            wanted = limit + 1 if limit is not None else None
            copied = 0
            while wanted is None or copied < wanted:
                step = COPY_STEP if wanted is None else min(COPY_STEP, wanted - copied)
                moved = _copy_step(src, dst, copied, step)
                if not moved:
                    break
                copied += moved
                if on_bytes is not None:
                    on_bytes(moved)
                if written is not None:
                    written(copied)
            return copied


#: Small enough that a file's check follows its copy closely (StreamVerifier), large enough to cost nothing.
COPY_STEP = 4 << 20


def _copy_step(src: Any, dst: Any, offset: int, count: int) -> int:
    """Up to `count` bytes from `offset`: sendfile between files (Linux), else a read and a write."""
    if _SENDFILE_FILES:
        try:
            return os.sendfile(dst.fileno(), src.fileno(), offset, count)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK):
                raise
    src.seek(offset)
    data = src.read(count)
    dst.write(data)
    dst.flush()
    return len(data)


_SENDFILE_FILES = sys.platform.startswith("linux") and hasattr(os, "sendfile")


def _local_size(item: dict[str, Any]) -> int:
    try:
        return os.lstat(item["local_path"]).st_size if "local_path" in item else 0
    except OSError:
        return 0


class _Counter:
    """Bytes moved so far, reported to a progress callback."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def add(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


class DirBackend(Backend):
    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise BackendError(ErrorCode.BAD_REQUEST, f"directory bucket must be an absolute path, got {root!r}")
        self.root = Path(root)

    # -------------------------------------------------------------------------------- helpers
    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise BackendError(
                ErrorCode.BUCKET_NOT_FOUND,
                f"directory bucket {self.root} does not exist (create it with `neuron-cache create {self.root}`)",
            )

    def _local(self, path: str) -> Path:
        return self.root / validate_remote_path(path)

    def _file_item(self, path: str, info: os.stat_result) -> dict[str, Any]:
        return {"type": "file", "path": path, "size": info.st_size, "xet_hash": None, "mtime": info.st_mtime,
                "digest": self._read_digest(path, info)}

    def _digest_path(self, path: str) -> Path:
        return self.root / DIGESTS / validate_remote_path(path)

    def _read_digest(self, path: str, info: os.stat_result) -> str | None:
        try:
            value, size, mtime_ns = self._digest_path(path).read_text().split()
        except (OSError, ValueError):
            return None
        if int(size) != info.st_size or int(mtime_ns) != info.st_mtime_ns:
            return None
        return value if ":" in value else f"sha256:{value}"

    def _write_digest(self, path: str, digest: str) -> None:
        info = os.stat(self._local(path), follow_symlinks=False)
        target = self._digest_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._incoming()
        tmp.write_text(f"{digest} {info.st_size} {info.st_mtime_ns}\n")
        os.replace(tmp, target)

    def _stat_file(self, path: str) -> os.stat_result | None:
        try:
            info = os.stat(self._local(path), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info if stat.S_ISREG(info.st_mode) else None

    def _incoming(self) -> Path:
        incoming = self.root / INCOMING
        incoming.mkdir(exist_ok=True)
        return incoming / f"{os.getpid()}-{uuid.uuid4().hex}"

    def _install(self, tmp: Path, dest: str) -> None:
        target = self._local(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    # ------------------------------------------------------------------------------ interface
    def info(self) -> dict[str, Any]:
        self._require_root()
        size = files = 0
        for item in self._walk(""):
            size += item["size"]
            files += 1
        return {"id": str(self.root), "private": True, "size": size, "total_files": files}

    def create(self, *, private: bool | None) -> dict[str, Any]:
        existed = self.root.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        return {"created": not existed, "url": str(self.root)}

    def _walk(self, prefix: str):
        base = self.root / prefix if prefix else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [name for name in dirnames if name not in HIDDEN]
            dirnames.sort()
            for name in sorted(filenames):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                try:
                    info = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield self._file_item(rel, info)

    def list(self, prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
        self._require_root()
        prefix = validate_remote_path(prefix.rstrip("/"), allow_root=True)
        if recursive:
            return list(self._walk(prefix))
        base = self.root / prefix if prefix else self.root
        items: list[dict[str, Any]] = []
        try:
            entries = sorted(os.scandir(base), key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            if not prefix and entry.name in HIDDEN:
                continue
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                items.append({"type": "directory", "path": rel})
            elif stat.S_ISREG(info.st_mode):
                items.append(self._file_item(rel, info))
        return items

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        self._require_root()
        found = []
        for path in paths:
            info = self._stat_file(validate_remote_path(path))
            if info is not None:
                found.append(self._file_item(path, info))
        return found

    def download(self, files: list[dict[str, Any]], *, progress: Progress | None = None) -> dict[str, Any]:
        """Copy each file out, checked against its digest a block behind the copy (StreamVerifier): when the
        last byte is copied, little is left to hash. A file whose bytes do not match (or that is far larger
        than announced) is removed and reported, never left for the client. Digest manifests bind Xet
        hashes, which a directory bucket does not list: they are copied like any other file."""
        self._require_root()
        counter = _Counter(progress, sum(int(item.get("size") or 0) for item in files))
        verifier = StreamVerifier()
        started = time.perf_counter()
        total = 0
        failed = []
        try:
            for item in files:
                source = self._local(item["path"])
                dest = Path(item["local_path"])  # its folder is the client's to make: never recreate a removed one
                if self._stat_file(item["path"]) is None:
                    raise BackendError(ErrorCode.NOT_FOUND, f"{item['path']} is not in bucket {self.root}")
                limit = int(item["size"]) if item.get("size") is not None else None
                digest = item.get("digest")
                try:
                    copied = copy_regular_file(source, dest, counter.add if progress else None, limit=limit,
                                               written=lambda upto: verifier.written(str(dest), digest, upto))
                except FileNotFoundError:
                    raise BackendError(ErrorCode.BAD_REQUEST, f"cannot write {dest}: its folder is gone") from None
                total += copied
                if limit is not None and copied > limit:
                    verifier.abandon(str(dest))
                    dest.unlink(missing_ok=True)
                    failed.append({"path": item["path"], "reason": f"larger than the {limit} bytes listed"})
                else:
                    verifier.closed(str(dest), digest)
        finally:
            copied_in = time.perf_counter() - started
            problems = verifier.finish()
        log.info("copied %d files in %.3f s, %s", len(files), copied_in, verifier.summary())
        return {"files": len(files), "bytes": total, "failed": failed + reject_mismatched(files, problems)}

    def batch(self, *, add: list[dict[str, Any]], copy: list[dict[str, Any]], delete: list[str],
              progress: Progress | None = None) -> dict[str, Any]:
        self._require_root()
        counter = _Counter(progress, sum(_local_size(item) for item in add))
        algorithm = publish_algorithm()
        for item in copy:
            source = self._local(item["src"])
            if self._stat_file(item["src"]) is None:
                raise BackendError(ErrorCode.NOT_FOUND, f"copy source {item['src']} is not in bucket {self.root}")
            info = self._stat_file(item["src"])
            digest = self._read_digest(item["src"], info) if info else None
            tmp = self._incoming()
            try:
                os.link(source, tmp)
            except OSError:  # filesystems without hard links (some mounts): copy the bytes
                copy_regular_file(source, tmp)
            self._install(tmp, item["dest"])
            if digest is None:
                digest = file_digest(self._local(item["dest"]), algorithm)
            self._write_digest(item["dest"], digest)
        described: dict[str, dict[str, Any]] = {}
        for item in add:
            tmp = self._incoming()
            try:
                if "local_path" in item:
                    copy_regular_file(item["local_path"], tmp, counter.add if progress else None)
                else:
                    tmp.write_bytes(str(item.get("content", "")).encode("utf-8"))
                digest = file_digest(tmp, algorithm)  # of the bytes that land, read back from the page cache
                self._install(tmp, item["dest"])
            finally:
                tmp.unlink(missing_ok=True)
            self._write_digest(item["dest"], digest)
            if item.get("describe") and "local_path" in item:
                described[item["dest"]] = {"xet_hash": None, "digest": digest}
        for path in delete:
            self._local(path).unlink(missing_ok=True)
            self._digest_path(path).unlink(missing_ok=True)
        reply: dict[str, Any] = {"added": len(add), "copied": len(copy), "deleted": len(delete)}
        if described:
            reply["described"] = described
        return reply
