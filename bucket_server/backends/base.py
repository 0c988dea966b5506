"""The interface every bucket backend implements, and the checks every one of them applies.

Items on the wire are plain dicts: files are {"type": "file", "path", "size", "xet_hash", "mtime"},
folders {"type": "directory", "path"}. Paths are bucket-relative, '/'-separated, validated on the way in.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..protocol import ErrorCode


#: progress(done_bytes, total_bytes), called from any thread.
Progress = Callable[[int, int], None]


class BackendError(Exception):
    """An error the server reports to the client with a code (the client maps codes to typed exceptions)."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


def validate_remote_path(path: Any, *, allow_root: bool = False) -> str:
    """Reject what could escape a bucket or a local root: absolute paths, '..', backslashes, NUL, empties."""
    if not isinstance(path, str):
        raise BackendError(ErrorCode.BAD_REQUEST, f"remote path must be a string, got {type(path).__name__}")
    if path == "" and allow_root:
        return path
    if (
        not path
        or len(path) > 1024
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise BackendError(ErrorCode.BAD_REQUEST, f"unsafe remote path {path!r}")
    return path


class Backend(abc.ABC):
    """One bucket. Methods are called concurrently from the server's connection threads."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """{"id", "private", "size", "total_files"}; BUCKET_NOT_FOUND when it does not exist."""

    @abc.abstractmethod
    def create(self, *, private: bool | None) -> dict[str, Any]:
        """Create the bucket if missing (exists-ok); {"created": bool, "url": str}."""

    @abc.abstractmethod
    def list(self, prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
        """Files (and, when not recursive, folders) strictly under the folder `prefix` ("" for the root)."""

    @abc.abstractmethod
    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        """The files among `paths` that exist; missing ones are left out."""

    @abc.abstractmethod
    def download(self, files: list[dict[str, Any]], *, progress: Progress | None = None) -> dict[str, Any]:
        """Download [{"path", "local_path", "size"?, "xet_hash"?, "digest"?, "manifest"?}]; {"files": n,
        "bytes": n, "failed": [{"path", "reason"}]}. Each file with a digest is checked against it (a
        manifest's binding for its Xet hash first, see digests.py); one that fails is deleted and listed."""

    @abc.abstractmethod
    def batch(self, *, add: list[dict[str, Any]], copy: list[dict[str, Any]], delete: list[str],
              progress: Progress | None = None) -> dict[str, Any]:
        """Apply copies, then adds, then deletes.

        add: [{"dest", "local_path", "describe"?} | {"dest", "content": str}]; copy: [{"src", "dest", "xet_hash"?}]
        copies within the bucket (server-side by hash where the backend can). Returns counts, and for the
        added files asked to be described, "described": {dest: {"xet_hash", "digest"}}: what a manifest
        records for them.
        """


#: What a lease operation may do (see Backend.lease); a lease file holds at most LEASE_MAX_BYTES.
LEASE_MODES = ("read", "create", "replace", "delete")
LEASE_MAX_BYTES = 4096


def check_lease_args(mode: Any, content: Any, expect: Any) -> None:
    """Reject a malformed lease request before anything is read or written."""
    if mode not in LEASE_MODES:
        raise BackendError(ErrorCode.BAD_REQUEST, f"lease mode must be one of {', '.join(LEASE_MODES)}, got {mode!r}")
    for name, value in (("content", content), ("expect", expect)):
        if value is not None and (not isinstance(value, str) or len(value.encode("utf-8")) > LEASE_MAX_BYTES):
            raise BackendError(ErrorCode.BAD_REQUEST, f"lease {name} must be a string of at most {LEASE_MAX_BYTES} bytes")
    if mode in ("create", "replace") and content is None:
        raise BackendError(ErrorCode.BAD_REQUEST, f"lease {mode} needs content")
    if mode == "replace" and expect is None:
        raise BackendError(ErrorCode.BAD_REQUEST, "lease replace needs expect")


def reject_mismatched(files: list[dict[str, Any]], problems: dict[str, str]) -> list[dict[str, Any]]:
    """Delete each downloaded file the verifier found wrong (local path -> why), so the client never sees
    it; the failures to report, as [{"path", "reason"}]."""
    failed = []
    for item in files:
        reason = problems.get(str(item["local_path"]))
        if reason:
            Path(item["local_path"]).unlink(missing_ok=True)
            failed.append({"path": item["path"], "reason": reason})
    return failed


class FileSizeWatcher:
    """Report a transfer's progress by watching the sizes of the files it writes (for transfers whose
    library gives no progress callback). Use as a context manager around the transfer."""

    def __init__(self, paths: list[str], total: int, progress: Progress | None, interval: float = 0.2) -> None:
        self.paths = paths
        self.total = total
        self.progress = progress
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _done(self) -> int:
        done = 0
        for path in self.paths:
            try:
                done += os.stat(path).st_size
            except OSError:
                pass
        return min(done, self.total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.progress(self._done(), self.total)

    def __enter__(self) -> "FileSizeWatcher":
        if self.progress is not None:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if exc[0] is None:
                self.progress(self.total, self.total)
