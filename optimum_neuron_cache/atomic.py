"""The one atomic write: a reader sees the old file or the new one, never half of either.

Every small file this package writes (the saved bucket setting, the host's stats, journal records, the shim,
session status files) goes through `atomic_write`: a temporary file beside the target (unique per process and
call, so two writers, or a writer and a signal handler, never share one), then a rename. `exchange` swaps two
folders in one step (a fetched entry for a cached failure, fetch.py).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path


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
