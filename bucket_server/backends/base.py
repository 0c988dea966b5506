"""The interface every bucket backend implements, and the checks every one of them applies.

Backends take and return the typed messages of `bucket_server.messages`: the server has validated a request's
arguments before a backend sees them (paths are bucket-relative, '/'-separated and safe; local paths are
absolute), and turns what a backend returns into the reply's JSON.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..messages import (
    MISMATCH, TRANSFER, AddFile, BatchRequest, BatchResult, CommitResult, CopyFile, CreateResult, DownloadFile,
    DownloadResult, Failure, FileItem, InfoResult, ListItem, MessageError, StageResult, remote_path,
)
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
    """`messages.remote_path` for a backend's own use: an unsafe path is a BAD_REQUEST BackendError."""
    try:
        return remote_path(path, allow_root=allow_root)
    except MessageError as exc:
        raise BackendError(ErrorCode.BAD_REQUEST, str(exc)) from None


class Backend(abc.ABC):
    """One bucket. Methods are called concurrently from the server's connection threads."""

    @abc.abstractmethod
    def info(self) -> InfoResult:
        """The bucket's id, visibility, size and file count; BUCKET_NOT_FOUND when it does not exist."""

    @abc.abstractmethod
    def create(self, *, private: bool | None) -> CreateResult:
        """Create the bucket if missing (exists-ok)."""

    @abc.abstractmethod
    def list(self, prefix: str, *, recursive: bool) -> list[ListItem]:
        """Files (and, when not recursive, folders) strictly under the folder `prefix` ("" for the root)."""

    @abc.abstractmethod
    def paths_info(self, paths: Sequence[str]) -> list[FileItem]:
        """The files among `paths` that exist; missing ones are left out."""

    @abc.abstractmethod
    def download(self, files: Sequence[DownloadFile], *, progress: Progress | None = None) -> DownloadResult:
        """Download each file to its local path. Each file with a digest is checked against it (a manifest's
        binding for its Xet hash first, see digests.py); one that fails is deleted and listed in `failed`."""

    @abc.abstractmethod
    def batch(self, *, add: Sequence[AddFile], copy: Sequence[CopyFile], delete: Sequence[str],
              progress: Progress | None = None) -> BatchResult:
        """Apply copies, then adds, then deletes.

        Copies are within the bucket (server-side by hash where the backend can). The result counts them, and
        describes the added files marked `describe` (their Xet hash and digest): what a manifest records.
        """

    def stage(self, add: Sequence[AddFile], *, progress: Progress | None = None) -> tuple["Staged | None", StageResult]:
        """Upload the bytes of `add` for a later `commit`, adding them nowhere: (what the commit reuses, or None
        when this backend stages nothing; the reply, describing the files marked `describe`). This default
        stages nothing: a backend whose writes cost nothing per batch (a directory) writes at commit."""
        return None, StageResult()

    def commit(self, staged: "Staged | None", phases: Sequence[BatchRequest], *,
               progress: Progress | None = None) -> CommitResult:
        """Apply `phases` in order, each a batch, each only once the one before it has landed: a failure in one
        stops there (the phases after it are not applied). `staged` is what `stage` returned on this
        connection. This default runs each phase as a `batch`. A local file the commit already wrote (to
        the flat area) is copied within the bucket where it goes again (the model's area: a hard link in a
        directory), right after the phase's own writes. Progress counts the bytes of every phase."""
        written: dict[str, str] = {}  # local path -> where this commit writes it first
        plan: list[tuple[list[AddFile], list[CopyFile]]] = []
        for phase in phases:
            adds, again = [], []
            for item in phase.add:
                first = written.get(item.local_path) if item.local_path is not None else None
                if first is None:
                    adds.append(item)
                    if item.local_path is not None:
                        written[item.local_path] = item.dest
                else:
                    again.append(CopyFile(first, item.dest))
            plan.append((adds, again))
        total = sum(local_size(item) for adds, _ in plan for item in adds)
        results, done = [], 0
        for phase, (adds, again) in zip(phases, plan):
            report = (lambda now, _of, base=done: progress(base + now, total)) if progress is not None else None
            result = self.batch(add=adds, copy=phase.copy, delete=phase.delete, progress=report)
            if again:
                self.batch(add=(), copy=again, delete=())
            results.append(BatchResult(len(phase.add), len(phase.copy), len(phase.delete), result.described))
            done += sum(local_size(item) for item in adds)
        return CommitResult(tuple(results))

    def lease(self, path: str, mode: str, *, content: str | None = None, expect: str | None = None) -> dict[str, Any]:
        """A small advisory lease file (compile leases): {"ok": bool, "content": str | None}, the args already
        checked by messages.LeaseRequest.

        read: its content (None when absent). create: write `content` only if no file is there. replace (a
        renewal by the holder) and takeover (of an abandoned lease): write `content` only if the file holds
        `expect`; of takeovers racing on one lease, one wins (on a Hub bucket too, by claim). delete: remove
        it only if it holds `expect` (any content when `expect` is None). Each is idempotent: redoing one that
        took effect answers ok (a file that already holds `content`; a file already gone). `content` in the
        reply is the file's content after the operation, when the backend knows it without another transfer,
        else None.
        """
        raise BackendError(ErrorCode.BAD_REQUEST, f"{type(self).__name__} has no leases")


class Staged(abc.ABC):
    """What a backend's `stage` uploaded, held by the server for the connection that staged it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Let it go unused (its connection closed, or its commit failed): nothing was added anywhere."""


def local_size(item: AddFile) -> int:
    """The bytes of an add's local file, which progress counts (0 for inline content, and for a file that is
    gone: its write reports that)."""
    try:
        return os.lstat(item.local_path).st_size if item.local_path is not None else 0
    except OSError:
        return 0


def reject_mismatched(files: Sequence[DownloadFile], problems: dict[str, str],
                      not_transferred: Mapping[str, str] | None = None) -> list[Failure]:
    """Delete each downloaded file the verifier found wrong (local path -> why), or that did not transfer
    (likewise; kind TRANSFER), so the client never sees it; the failures to report."""
    failed = []
    for item in files:
        unread = (not_transferred or {}).get(item.local_path)
        reason = unread or problems.get(item.local_path)
        if reason:
            Path(item.local_path).unlink(missing_ok=True)
            failed.append(Failure(item.path, reason, TRANSFER if unread else MISMATCH))
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
