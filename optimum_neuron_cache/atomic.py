"""The one atomic write: a reader sees the old file or the new one, never half of either.

Every small file this package writes (the saved bucket setting, the host's stats, journal records, the shim,
session status files) goes through `atomic_write`: a temporary file beside the target (unique per process and
call, so two writers, or a writer and a signal handler, never share one), then a rename.
"""

from __future__ import annotations

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
