"""Small state files: written whole (`atomic_write`), opened without blocking (`open_state_file`, `read_state_file`).

Every small file this package writes (the saved bucket setting, the host's stats, journal records, the shim,
session status files) goes through `atomic_write`: a temporary file beside the target, then a rename. Every
one it reads or opens again is hostile input: opened non-blocking and unfollowed, refused unless regular.
`exchange` swaps two folders in one step (a fetched entry for a cached failure, fetch.py).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

#: Added to every open of a state file: a symlink is not followed, a FIFO or a device never blocks the opener.
STATE_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class RefusedStateFile(OSError):
    """A state file that is not a regular file (a FIFO, a device, a folder, a symlink) or is too large to be
    ours: never read. `why` says what it is, for the one warning line."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(errno.EINVAL, why, str(path))
        self.why = why


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def open_state_file(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A descriptor on the regular file at `path`, opened with `flags` | `STATE_OPEN_FLAGS` (never blocking,
    never through a symlink). Raises RefusedStateFile for anything else (FileNotFoundError when missing)."""
    try:
        fd = os.open(path, flags | STATE_OPEN_FLAGS, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedStateFile(path, "a symlink") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.ENOTDIR) or exc.errno == errno.EWOULDBLOCK:
            try:
                raise RefusedStateFile(path, _kind(os.lstat(path).st_mode)) from None
            except (FileNotFoundError, NotADirectoryError):
                pass
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedStateFile(path, _kind(info.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole content of the regular file at `path`, at most `limit` bytes (a larger file is not ours:
    RefusedStateFile). FileNotFoundError when missing, RefusedStateFile for anything but a regular file."""
    fd = open_state_file(path)
    try:
        if os.fstat(fd).st_size > limit:
            raise RefusedStateFile(path, f"larger than {limit} bytes")
        chunks, size = [], 0
        while chunk := os.read(fd, limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise RefusedStateFile(path, f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


#: A state file holding one JSON object (a memo, a status, the stats) is a few kB; a larger one is not ours.
MAX_STATE_JSON_BYTES = 1024 * 1024


def read_state_json(path: str | os.PathLike[str], limit: int = MAX_STATE_JSON_BYTES) -> dict | None:
    """The JSON object in the state file at `path`, or None when it is missing, torn or not an object.
    RefusedStateFile when it is not a regular file or is over `limit` bytes: say so (one line), never wait."""
    try:
        data = json.loads(read_state_file(path, limit))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def temp_name(path: Path) -> Path:
    """`.<name>.<pid>.<random>.tmp` beside `path`: hidden, and named after the file and the writer."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, data: str | bytes, *, mode: int | None = None,
                 before_rename: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` whole: temp file, optional chmod, `before_rename()` (crash tests), rename. On any
    error the temp file is removed and the error raised; the target is untouched."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: renameat2's flag that swaps its two paths (Linux 3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs among others).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (`renameat2(RENAME_EXCHANGE)`): at every instant each path names one of the two,
    whole. False when this system or filesystem cannot (the caller then falls back); other errors raise OSError."""
    import ctypes  # rarely needed: kept off the package's import path

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))
