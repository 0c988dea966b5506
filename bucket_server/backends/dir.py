"""A directory used as a bucket: a mounted bucket, a shared filesystem (FSx, EFS, NFS), or the embedded default.

Every write lands atomically: written to `.incoming/` under the bucket root (same filesystem), then renamed
over its destination, so a reader on another host never sees half a file.

The tree is anyone's on the team to write, so every name in it is hostile input (see dirtree.py): no symlink
below the root is ever followed, for reading or writing; names that are not UTF-8 or not safe remote paths
are skipped with one log warning; a file changed after it was published (its sidecar describes other
bytes) is listed with the digest STALE and never handed over.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..messages import (
    LEASE_MAX_BYTES, AddFile, BatchResult, CopyFile, CreateResult, Described, DownloadFile, DownloadResult, Failure,
    STALE_DIGEST, TRANSFER, FileItem, FolderItem, InfoResult, ListItem,
)
from ..protocol import ErrorCode
from ..digests import file_digest, mismatch_reason, mismatches, publish_algorithm, split, streaming_hasher
from . import dirtree
from .base import Backend, BackendError, Progress, local_size, reject_mismatched, validate_remote_path
from .dirtree import Dirs, Refused

log = logging.getLogger("bucket_server")

INCOMING = ".incoming"
#: The digest of each file, recorded when this project wrote it: `<root>/.digests/<path>` holds lines
#: "<algorithm>:<hex> <size> <mtime_ns>"; the line whose size and mtime are the file's is its digest.
#: Sidecars written before BLAKE3 hold a bare sha256 hex: "<sha256> <size> <mtime_ns>". NO_DIGEST in place
#: of a digest: a file this project did not write, whose size alone is checked.
DIGESTS = ".digests"
HIDDEN = (INCOMING, DIGESTS)
NO_DIGEST = "none"
#: What a listing gives as the digest of a file whose sidecar does not describe it: changed after it was
#: published (or the sidecar was tampered with). `download` refuses such a file.
STALE = STALE_DIGEST
SIDECAR_MAX_BYTES = 4096
#: `.incoming/` files of a dead writer of this host are swept at once; any writer's after this long.
INCOMING_MAX_AGE = 24 * 3600.0
#: The compile leases' folder (remote_layout.LEASES_DIR). A lease path that holds anything but a regular file
#: (a symlink, a FIFO, a folder) is listed as a file of size 0 with a STALE digest, so that hosts see a lease
#: held by an unknown host (taken over once stale) instead of a path where no lease can be created.
LEASES = "leases"
LEASE_SUFFIX = ".lease"
SWEEP_INTERVAL = 60.0
_HOST = socket.gethostname().replace("/", "_") or "host"
_last_sweep: dict[str, float] = {}
_sweep_lock = threading.Lock()


def sidecar_digest(raw: bytes | None, info: os.stat_result) -> str | None:
    """What a sidecar says of the file `info` describes: None without a sidecar (size checks only), the
    digest recorded for these bytes, or STALE: a sidecar that describes other bytes, or none readable."""
    if raw is None:
        return None
    for line in raw.decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) != 3 or not (fields[1].isdecimal() and fields[2].isdecimal()):
            continue
        if int(fields[1]) != info.st_size or int(fields[2]) != info.st_mtime_ns:
            continue
        if fields[0] == NO_DIGEST:
            return None
        digest = fields[0] if ":" in fields[0] else f"sha256:{fields[0]}"
        return digest if split(digest) is not None else STALE
    return STALE


def _sidecar_line(value: str, info: os.stat_result) -> str:
    return f"{value} {info.st_size} {info.st_mtime_ns}"


def incoming_name() -> str:
    """`<host>.<pid>.<random>`: whose it is, so that the files of writers that died can be swept."""
    return f"{_HOST}.{os.getpid()}.{uuid.uuid4().hex}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def lease_occupant(path: str) -> bool:
    """Whether `path` is a compile lease's (`leases/<folder>/<name>.lease`): listed whatever it holds."""
    if not (path.startswith(LEASES + "/") and path.endswith(LEASE_SUFFIX)):  # cheap: asked of every listed name
        return False
    return path.count("/") == 2


def _abandoned(name: str, info: os.stat_result, now: float) -> bool:
    """An `.incoming/` file no live writer will rename: its writer was a process of this host that died, or
    it is older than a day (whoever wrote it)."""
    if now - info.st_mtime > INCOMING_MAX_AGE:
        return True
    fields = name.rsplit(".", 2)
    return len(fields) == 3 and fields[0] == _HOST and fields[1].isdecimal() and not _pid_alive(int(fields[1]))


COPY_STEP = 4 << 20
"""What a sendfile copy moves per call (a progress report after each)."""


def copy_between(src: int, dst: int, on_bytes: Callable[[int], None] | None = None, limit: int | None = None) -> int:
    """Copy the bytes of the open regular file `src` into `dst`; the bytes move inside the kernel (sendfile)
    where it can, never through Python. limit: stop after this many bytes plus one (a file far larger than
    announced is not copied whole). on_bytes(moved) is called after each step of COPY_STEP bytes."""
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
    return copied


def _copy_step(src: int, dst: int, offset: int, count: int) -> int:
    """Up to `count` bytes from `offset`: sendfile between files (Linux), else a read and a write."""
    if _SENDFILE_FILES:
        try:
            return os.sendfile(dst, src, offset, count)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK):
                raise
    data = os.pread(src, count, offset)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


#: What a checked copy reads, hashes and writes at a time: small enough to stay in the core's cache from the
#: read to the write, so the hash and the write read it there rather than from memory.
CHECKED_BLOCK = 1 << 20
_buffers = threading.local()


def copy_hashed(src: int, dst: int, hasher: Any, on_bytes: Callable[[int], None] | None = None,
                limit: int | None = None) -> int:
    """Copy `src` into `dst` through one reused buffer, feeding the hasher each block between its read and
    its write: the bytes hashed are the very bytes written, read once. (A sendfile copy, then reading the
    copy back to hash it, costs a second pass over every byte.) limit and on_bytes as in copy_between."""
    buffer = getattr(_buffers, "block", None)
    if buffer is None:
        buffer = _buffers.block = memoryview(bytearray(CHECKED_BLOCK))
    wanted = limit + 1 if limit is not None else None
    copied = 0
    while wanted is None or copied < wanted:
        got = os.readv(src, [buffer if wanted is None or wanted - copied >= CHECKED_BLOCK else buffer[:wanted - copied]])
        if not got:
            break
        block = buffer[:got]
        hasher.update(block)
        while block:
            block = block[os.write(dst, block):]
        copied += got
        if on_bytes is not None:
            on_bytes(got)
    return copied


def copy_checked(src: int, dst: int, dest: str, digest: str | None, limit: int | None,
                 on_bytes: Callable[[int], None] | None) -> tuple[int, str | None]:
    """Copy `src` into `dst` (the file at local path `dest`) and check the bytes written against `digest`;
    closes both descriptors. Returns (bytes copied, why they do not match, or None). No digest: sizes only.
    A digest that cannot be computed block by block (a Xet hash) is checked on the whole file after."""
    parsed = split(digest) if digest else None
    hasher = streaming_hasher(parsed[0]) if parsed else None
    try:
        try:
            if hasher is None:
                copied = copy_between(src, dst, on_bytes, limit)
            else:
                copied = copy_hashed(src, dst, hasher, on_bytes, limit)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    if not digest or (limit is not None and copied > limit):
        return copied, None
    if hasher is None:
        return copied, mismatches([(dest, digest)]).get(dest)
    got = hasher.hexdigest()
    return copied, None if got == parsed[1] else mismatch_reason(parsed[0], parsed[1], got)


#: Files copied at once by a download: each worker copies and checks whole files, so that the check of one
#: runs on one core while the copy of another runs on the next (on 2 cores, the check no longer waits for
#: the copy's core to be free). A few more help on a network filesystem, where each read waits on the wire.
COPIERS = max(2, min(4, os.cpu_count() or 1))


_SENDFILE_FILES = sys.platform.startswith("linux") and hasattr(os, "sendfile")


def open_upload_source(source: str | os.PathLike[str]) -> int:
    """A local file to upload (the client's own path): a symlink or anything but a regular file is refused."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BackendError(ErrorCode.BAD_REQUEST, f"{source} is a symlink: refused") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BackendError(ErrorCode.BAD_REQUEST, f"{source} is not a regular file: refused")
    return fd


def _fd_path(fd: int) -> str:
    """A path that opens the very file behind `fd` (Linux), for hashing it by name."""
    return f"/proc/self/fd/{fd}"


class _Counter:
    """Bytes moved so far, reported to a progress callback (from any thread)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            done = self.done
        if self.progress is not None:
            self.progress(done, self.total)


def _parts(path: str, *, allow_root: bool = False) -> list[str]:
    """The components of a validated remote path; a path whose names are not UTF-8 is refused too."""
    path = validate_remote_path(path, allow_root=allow_root)
    if not dirtree.safe_name(path.replace("/", "_") or "_"):
        raise BackendError(ErrorCode.BAD_REQUEST, f"unsafe remote path {dirtree.shown(path)!r}")
    return path.split("/") if path else []


class DirBackend(Backend):
    """A directory used as a bucket; every path under its root is hostile (see the module docstring)."""
    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise BackendError(ErrorCode.BAD_REQUEST, f"directory bucket must be an absolute path, got {root!r}")
        self.root = Path(root)

    # -------------------------------------------------------------------------------- helpers
    def _open(self) -> Dirs:
        """The root (the user's own path, opened normally) and the folders below it, never through a symlink."""
        try:
            return Dirs(dirtree.open_root(str(self.root)))
        except (FileNotFoundError, NotADirectoryError):
            raise BackendError(
                ErrorCode.BUCKET_NOT_FOUND,
                f"directory bucket {self.root} does not exist (create it with `neuron-cache create {self.root}`)",
            ) from None

    def _refused(self, exc: Refused) -> BackendError:
        return BackendError(ErrorCode.INVALID_DATA, f"{dirtree.shown(exc.path)} in directory bucket {self.root} "
                            f"{exc.what} (nothing is read or written through it; remove it)")

    def _warn_skipped(self, skipped: list[str]) -> None:
        if skipped:
            examples = ", ".join(dirtree.shown(path) for path in skipped[:3])
            log.warning("directory bucket %s: skipped %d names that are not valid UTF-8 or not safe bucket paths "
                        "(%s%s)", self.root, len(skipped), examples, ", ..." if len(skipped) > 3 else "")

    def _file_item(self, path: str, info: os.stat_result, shadow: int | None) -> FileItem:
        if not stat.S_ISREG(info.st_mode):  # a lease path's odd occupant (lease_occupant): never handed over
            return FileItem(path, 0, None, info.st_mtime, STALE, uploaded=info.st_mtime)
        raw = dirtree.read_small(shadow, path.rsplit("/", 1)[-1], SIDECAR_MAX_BYTES)
        # Every write lands by a rename of a new file: its mtime is when it was written to the bucket.
        return FileItem(path, info.st_size, None, info.st_mtime, sidecar_digest(raw, info), uploaded=info.st_mtime)

    def _sidecar(self, dirs: Dirs, parts: list[str], info: os.stat_result) -> tuple[str | None, bytes | None]:
        """(digest or STALE or None, the raw sidecar) of the file at `parts`, whose lstat is `info`."""
        raw = dirtree.read_small(dirs.find([DIGESTS, *parts[:-1]]), parts[-1], SIDECAR_MAX_BYTES)
        return sidecar_digest(raw, info), raw

    def _walk(self, dirs: Dirs, parts: list[str], *, with_dirs: Callable[[str], None] | None = None) -> Iterator[FileItem]:
        try:
            top = dirs.get(parts)
        except FileNotFoundError:
            return
        except (OSError, Refused) as exc:
            log.warning("directory bucket %s: not listing %s: %s", self.root, dirtree.shown("/".join(parts)), exc)
            return
        skipped: list[str] = []
        for path, info, shadow in dirtree.walk_files(top, "/".join(parts), skipped=skipped,
                                                     hidden=HIDDEN if not parts else (),
                                                     shadow=dirs.find([DIGESTS, *parts]), with_dirs=with_dirs,
                                                     keep=lease_occupant):
            yield self._file_item(path, info, shadow)
        self._warn_skipped(skipped)

    def _incoming(self, dirs: Dirs) -> int:
        fd = self._dir(dirs, [INCOMING], create=True)
        self._sweep(fd)
        return fd

    def _dir(self, dirs: Dirs, parts: list[str], *, create: bool = False) -> int:
        try:
            return dirs.get(parts, create=create)
        except Refused as exc:
            raise self._refused(exc) from None

    def _sweep(self, incoming: int) -> None:
        """Remove the `.incoming/` files no writer will rename (see _abandoned); at most once a minute per
        bucket and server, so that the cost stays bounded whatever the number of writes."""
        now = time.time()
        with _sweep_lock:
            if now - _last_sweep.get(str(self.root), 0.0) < SWEEP_INTERVAL:
                return
            _last_sweep[str(self.root)] = now
        removed = 0
        try:
            entries = list(os.scandir(incoming))
        except OSError:
            return
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode) and _abandoned(entry.name, info, now):
                    dirtree.unlink(incoming, entry.name)
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("directory bucket %s: removed %d files of dead writers from %s/", self.root, removed, INCOMING)

    def _write_sidecar(self, dirs: Dirs, incoming: int, parts: list[str], lines: list[str]) -> None:
        """Write `.digests/<path>` through descriptors: a new file in `.incoming/`, renamed over the old one
        (a symlink there is replaced, never followed)."""
        parent = self._dir(dirs, [DIGESTS, *parts[:-1]], create=True)
        tmp = incoming_name()
        fd = dirtree.create_file(incoming, tmp)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write("".join(f"{line}\n" for line in lines))
            os.replace(tmp, parts[-1], src_dir_fd=incoming, dst_dir_fd=parent)
        finally:
            dirtree.unlink(incoming, tmp)

    def _install(self, dirs: Dirs, incoming: int, tmp: str, parts: list[str], lines: list[str]) -> None:
        """Rename `.incoming/<tmp>` over the file at `parts`, with its sidecar `lines`. The sidecar goes first
        and keeps the line of the file it replaces, so a reader at any instant (or after a kill) finds a
        line for the file it sees; once the rename is done, the old line goes."""
        parent = self._dir(dirs, parts[:-1], create=True)
        old = dirtree.lstat(parent, parts[-1])
        kept: list[str] = []
        if old is not None and stat.S_ISREG(old.st_mode):
            digest, _ = self._sidecar(dirs, parts, old)
            if digest != STALE:
                kept = [_sidecar_line(digest or NO_DIGEST, old)]
        self._write_sidecar(dirs, incoming, parts, lines + kept)
        try:
            os.replace(tmp, parts[-1], src_dir_fd=incoming, dst_dir_fd=parent)
        except IsADirectoryError:
            raise BackendError(ErrorCode.INVALID_DATA, f"{dirtree.shown('/'.join(parts))} in directory bucket "
                               f"{self.root} is a folder: cannot write a file there") from None
        if kept:
            self._write_sidecar(dirs, incoming, parts, lines)

    # ------------------------------------------------------------------------------ interface
    def info(self) -> InfoResult:
        """The bucket's size and file count."""
        size = files = 0
        with self._open() as dirs:
            for item in self._walk(dirs, []):
                size += item.size
                files += 1
        return InfoResult(str(self.root), True, size, files)

    def create(self, *, private: bool | None) -> CreateResult:
        """Create the root folder if missing."""
        existed = self.root.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        return CreateResult(not existed, str(self.root))

    def list(self, prefix: str, *, recursive: bool) -> list[ListItem]:
        """Files (and, not recursive, folders) under `prefix`, reached without following a symlink."""
        parts = _parts(prefix.rstrip("/"), allow_root=True)
        with self._open() as dirs:
            if recursive:
                return list(self._walk(dirs, parts))
            folders: list[str] = []
            files = list(self._walk(dirs, parts, with_dirs=folders.append))
            return sorted([FolderItem(path) for path in folders] + files, key=lambda item: item.path)

    def paths_info(self, paths: Sequence[str]) -> list[FileItem]:
        """The regular files among `paths`, with their digests (a stale sidecar says so)."""
        found = []
        with self._open() as dirs:
            for path in paths:
                parts = _parts(path)
                parent = dirs.find(parts[:-1])
                info = dirtree.lstat(parent, parts[-1]) if parent is not None else None
                if info is not None and (stat.S_ISREG(info.st_mode) or lease_occupant(path)):
                    found.append(self._file_item(path, info, dirs.find([DIGESTS, *parts[:-1]])))
        return found

    def _open_source(self, dirs: Dirs, path: str) -> tuple[int, list[str]]:
        """The bucket file at `path`, open for reading: NOT_FOUND when missing; Refused when it, or a folder
        on its way, is a symlink or not what it should be."""
        parts = _parts(path)
        try:
            return dirtree.open_file(dirs.get(parts[:-1]), parts[-1], shown=path), parts
        except (FileNotFoundError, NotADirectoryError):
            raise BackendError(ErrorCode.NOT_FOUND, f"{path} is not in bucket {self.root}") from None

    def download(self, files: Sequence[DownloadFile], *, progress: Progress | None = None) -> DownloadResult:
        """Copy each file out, hashing each block between its read and its write (copy_checked), on COPIERS
        threads, largest files first. A file whose bytes do not match (or that is far larger than announced)
        is removed and reported, never left for the client. So is a file changed after it was published
        (its sidecar is STALE), or that is a symlink: those are not even copied. Digest manifests bind Xet
        hashes, which a directory bucket does not list: they are copied like any other file."""
        counter = _Counter(progress, sum(item.size or 0 for item in files))
        on_bytes = counter.add if progress else None
        started = time.perf_counter()
        failed: list[Failure] = []
        problems: dict[str, str] = {}
        total = 0
        error: BaseException | None = None
        jobs: list[tuple[DownloadFile, Future[tuple[int, str | None]]]] = []
        with self._open() as dirs, ThreadPoolExecutor(max_workers=max(1, min(COPIERS, len(files))),
                                                      thread_name_prefix="dir-copy") as pool:
            try:
                # Largest first: the cores finish together rather than one waiting on a big file at the end.
                for item in sorted(files, key=lambda item: -(item.size or 0)):
                    opened = self._open_copy(dirs, item, failed)
                    if opened is not None:
                        src, out, digest = opened
                        jobs.append((item, pool.submit(copy_checked, src, out, item.local_path, digest, item.size, on_bytes)))
            finally:
                for item, job in jobs:
                    try:
                        copied, why = job.result()
                    except BaseException as exc:  # a failing write (a full disk): the download fails, after the others
                        error = error or exc
                        Path(item.local_path).unlink(missing_ok=True)
                        continue
                    total += copied
                    if item.size is not None and copied > item.size:
                        Path(item.local_path).unlink(missing_ok=True)
                        failed.append(Failure(item.path, f"larger than the {item.size} bytes listed"))
                    elif why is not None:
                        problems[item.local_path] = why
        if error is not None:
            raise error
        log.info("copied and checked %d files in %.3f s", len(files), time.perf_counter() - started)
        return DownloadResult(len(files), total, tuple(failed + reject_mismatched(files, problems)))

    def _open_copy(self, dirs: Dirs, item: DownloadFile, failed: list[Failure]) -> tuple[int, int, str | None] | None:
        """The source (from the bucket, never through a symlink) and the destination of one file to download,
        open, and the digest to check it against; None (a failure added) when it must not be copied."""
        try:
            src, parts = self._open_source(dirs, item.path)
        except Refused as exc:  # not read: nothing is known of its bytes
            failed.append(Failure(item.path, exc.what if exc.path == item.path else
                                  f"is under {dirtree.shown(exc.path)}, which {exc.what}", TRANSFER))
            return None
        try:
            info = os.fstat(src)
            if item.size is not None and info.st_size > item.size:
                failed.append(Failure(item.path, f"larger than the {item.size} bytes listed"))
                os.close(src)
                return None
            digest = item.digest  # None: sizes only (no sidecar, or NEURON_CACHE_VERIFY=0)
            if digest is None or split(digest) is None:  # the sidecar decides (STALE, no digest)
                recorded, _ = self._sidecar(dirs, parts, info)
                if recorded == STALE:
                    failed.append(Failure(item.path, "changed after it was published (its size or time differs "
                                                     "from its digest record): refused"))
                    os.close(src)
                    return None
                if digest == STALE:  # published again since the listing
                    digest = recorded
            # else the bytes are checked against the listing's digest, which a file changed since then fails:
            # its sidecar need not be read a second time (one read per file, not two)
            try:  # its folder is the client's to make: never recreate a removed one
                out = os.open(item.local_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                raise BackendError(ErrorCode.BAD_REQUEST, f"cannot write {item.local_path}: its folder is gone") from None
        except BaseException:
            os.close(src)
            raise
        return src, out, digest

    def _writable(self, path: str) -> list[str]:
        parts = _parts(path)
        if parts[0] in HIDDEN:
            raise BackendError(ErrorCode.BAD_REQUEST, f"{path}: {parts[0]}/ is the bucket's own bookkeeping")
        return parts

    def _copy(self, dirs: Dirs, incoming: int, item: CopyFile, algorithm: str) -> None:
        """A copy within the bucket: a hard link where the filesystem allows (else the bytes). It carries the
        source's digest, or its staleness: a file changed after it was published does not become trusted
        by being copied."""
        dest = self._writable(item.dest)
        try:
            src, parts = self._open_source(dirs, item.src)
        except Refused as exc:
            raise self._refused(exc) from None
        tmp = incoming_name()
        try:
            info = os.fstat(src)
            digest, raw = self._sidecar(dirs, parts, info)
            try:
                os.link(parts[-1], tmp, src_dir_fd=dirs.get(parts[:-1]), dst_dir_fd=incoming, follow_symlinks=False)
                linked = dirtree.lstat(incoming, tmp)
                if linked is None or (linked.st_dev, linked.st_ino) != (info.st_dev, info.st_ino):
                    raise BackendError(ErrorCode.INVALID_DATA, f"copy source {item.src} changed during the copy")
            except OSError:  # filesystems without hard links (some mounts): copy the bytes
                dirtree.unlink(incoming, tmp)
                out = dirtree.create_file(incoming, tmp)
                try:
                    copy_between(src, out)
                finally:
                    os.close(out)
            landed = dirtree.lstat(incoming, tmp)
            if digest == STALE:
                lines = [line for line in (raw or b"").decode("ascii", "replace").splitlines() if line.strip()][:4] or [f"{STALE} 0 0"]
            else:
                if digest is None:
                    digest = file_digest(_fd_path(src), algorithm)
                lines = [_sidecar_line(digest, landed)]
            self._install(dirs, incoming, tmp, dest, lines)
        finally:
            os.close(src)
            dirtree.unlink(incoming, tmp)  # a rename onto a hard link of the same file leaves it in place

    def _add(self, dirs: Dirs, incoming: int, item: AddFile, algorithm: str,
             on_bytes: Callable[[int], None] | None) -> str:
        dest = self._writable(item.dest)
        tmp = incoming_name()
        out = dirtree.create_file(incoming, tmp)
        try:
            try:
                hasher = streaming_hasher(algorithm)  # of the bytes that land: those written from its buffer
                if item.local_path is not None:
                    src = open_upload_source(item.local_path)
                    try:
                        if hasher is not None:
                            copy_hashed(src, out, hasher, on_bytes)
                        else:
                            copy_between(src, out, on_bytes)
                    finally:
                        os.close(src)
                else:
                    data = memoryview(item.content.encode("utf-8"))
                    if hasher is not None:
                        hasher.update(data)
                    while data:
                        data = data[os.write(out, data):]
                digest = f"{algorithm}:{hasher.hexdigest()}" if hasher is not None else file_digest(_fd_path(out), algorithm)
                landed = os.fstat(out)
            finally:
                os.close(out)
            self._install(dirs, incoming, tmp, dest, [_sidecar_line(digest, landed)])
        finally:
            dirtree.unlink(incoming, tmp)
        return digest

    def batch(self, *, add: Sequence[AddFile], copy: Sequence[CopyFile], delete: Sequence[str],
              progress: Progress | None = None) -> BatchResult:
        """Copies, then adds, then deletes; each write lands whole (.incoming/, then a rename), with its digest
        sidecar."""
        counter = _Counter(progress, sum(local_size(item) for item in add))
        algorithm = publish_algorithm()
        described: dict[str, Described] = {}
        with self._open() as dirs:
            incoming = self._incoming(dirs)
            for item in copy:
                self._copy(dirs, incoming, item, algorithm)
            for item in add:
                digest = self._add(dirs, incoming, item, algorithm, counter.add if progress else None)
                if item.describe and item.local_path is not None:
                    described[item.dest] = Described(None, digest)
            for path in delete:
                parts = self._writable(path)
                for folder in (parts[:-1], [DIGESTS, *parts[:-1]]):
                    parent = dirs.find(folder)
                    if parent is not None:
                        dirtree.unlink(parent, parts[-1])
        return BatchResult(len(add), len(copy), len(delete), described)

    # ------------------------------------------------------------------------------------ leases
    def lease(self, path: str, mode: str, *, content: str | None = None, expect: str | None = None) -> dict[str, Any]:
        """Compile leases, atomic on one filesystem: a new lease is hard-linked into place from `.incoming/`
        (link() fails when the name exists: an exclusive create whose content is complete before it is
        visible); a replace or delete first renames the current file away into `.incoming/` (only one
        caller can), checks what it grabbed, and puts it back when it was not `expect`. No digest sidecar:
        a lease is never downloaded as an entry."""
        parts = self._writable(path)
        with self._open() as dirs:
            if mode == "read":
                parent = dirs.find(parts[:-1])
                return {"ok": True, "content": self._lease_text(parent, parts[-1])}
            incoming = self._incoming(dirs)
            parent = self._dir(dirs, parts[:-1], create=True)
            if mode == "create":
                return self._lease_link(incoming, parent, parts[-1], str(content))
            grabbed = incoming_name()
            try:
                os.rename(parts[-1], grabbed, src_dir_fd=parent, dst_dir_fd=incoming)
            except FileNotFoundError:  # nothing there: a delete is done; a replace has nothing to replace
                return {"ok": mode == "delete", "content": None}
            try:
                held = self._lease_text(incoming, grabbed)
                if expect is not None and held != expect and not (mode in ("replace", "takeover") and held == content):
                    self._lease_put_back(incoming, grabbed, parent, parts[-1])
                    return {"ok": False, "content": self._lease_text(parent, parts[-1])}
                if mode == "delete":
                    return {"ok": True, "content": None}
                return self._lease_link(incoming, parent, parts[-1], str(content))
            finally:
                dirtree.remove(incoming, grabbed)  # a folder that sat at the lease path goes whole

    def _lease_text(self, parent: int | None, name: str) -> str | None:
        """The lease's text; "" when something is there that cannot be a lease (a symlink, a FIFO, a folder, a
        file over LEASE_MAX_BYTES or unreadable): `expect=""` replaces or deletes it."""
        raw = dirtree.read_small(parent, name, LEASE_MAX_BYTES + 1)
        if raw is None:
            return None
        return "" if len(raw) > LEASE_MAX_BYTES else raw.decode("utf-8", "replace")

    def _lease_link(self, incoming: int, parent: int, name: str, content: str) -> dict[str, Any]:
        tmp = incoming_name()
        fd = dirtree.create_file(incoming, tmp)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(content)
            try:
                os.link(tmp, name, src_dir_fd=incoming, dst_dir_fd=parent, follow_symlinks=False)
            except FileExistsError:
                held = self._lease_text(parent, name)
                return {"ok": held == content, "content": held}
            return {"ok": True, "content": content}
        finally:
            dirtree.unlink(incoming, tmp)

    def _lease_put_back(self, incoming: int, grabbed: str, parent: int, name: str) -> None:
        """Return a grabbed lease that was not the expected one, unless someone made a new one meanwhile."""
        try:
            os.link(grabbed, name, src_dir_fd=incoming, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            pass
        except PermissionError:  # a folder (no hard link): it could not be a lease anyway; it goes
            pass
