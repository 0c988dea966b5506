"""Content digests: what a downloaded file is checked against before the client may install it.

A digest is `<algorithm>:<hex>`. Hub buckets list each file's Xet hash (`xet:...`), which hf_xet recomputes
from the bytes; directory buckets written by this project keep a BLAKE3 digest (`blake3:...`) beside each
file, recorded when it was published (older ones kept a sha256, still checked). A file whose bytes do not
match is never handed to the client.

Hashing costs CPU, not I/O (the file was just written, it is in the page cache), so a `Verifier` hashes each
file on its own thread as soon as the transfer hands it over, while the rest of the transfer goes on: only
the last file's hash is left to wait for when the transfer ends.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

ALGORITHMS = ("xet", "blake3", "sha256")


def split(digest: str) -> tuple[str, str] | None:
    algorithm, _, value = digest.partition(":")
    if algorithm not in ALGORITHMS or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        return None
    return algorithm, value


def publish_algorithm() -> str:
    """What a directory bucket records for new files: BLAKE3 (several times faster than sha256, and as
    strong), or sha256 where the blake3 package is missing (a server run from an interpreter without it)."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return "sha256"
    return "blake3"


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """`<algorithm>:<hex>` of a file's bytes (blake3 or sha256; Xet hashes go through `xet_hashes`)."""
    if algorithm == "blake3":
        import blake3

        return f"blake3:{blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(os.fspath(path)).hexdigest()}"
    if algorithm == "sha256":
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    raise ValueError(f"no file digest for algorithm {algorithm!r}")


def xet_hashes(paths: Sequence[str]) -> list[str]:
    import hf_xet

    return [info.hash for info in hf_xet.hash_files(list(paths))]


#: How a mismatch names each algorithm to the user.
_NAMES = {"xet": "Xet hash", "blake3": "BLAKE3 digest", "sha256": "sha256"}


def mismatches(files: Sequence[tuple[str, str]]) -> dict[str, str]:
    """For (local path, digest) pairs: local path -> why it does not match. Unknown algorithms fail closed."""
    problems: dict[str, str] = {}
    by_algorithm: dict[str, list[tuple[str, str]]] = {}
    for path, digest in files:
        parsed = split(digest)
        if parsed is None:
            problems[path] = f"unusable digest {digest!r}"
            continue
        by_algorithm.setdefault(parsed[0], []).append((path, parsed[1]))
    actual: dict[str, str] = {}
    xet = by_algorithm.pop("xet", [])
    try:
        if xet:  # one call: hf_xet hashes several files in parallel
            actual.update(zip((path for path, _ in xet), xet_hashes([path for path, _ in xet])))
        for algorithm, pairs in by_algorithm.items():
            for path, _ in pairs:
                actual[path] = file_digest(path, algorithm).split(":", 1)[1]
    except Exception as exc:  # an unreadable file: check the others one by one
        if len(files) > 1:
            for path, digest in files:
                problems.update(mismatches([(path, digest)]))
            return problems
        return {files[0][0]: f"could not be read back to check it ({type(exc).__name__}: {exc})"}
    for algorithm, pairs in (("xet", xet), *by_algorithm.items()):
        for path, expected in pairs:
            got = actual[path]
            if got != expected:
                problems[path] = (f"content does not match its {_NAMES[algorithm]} "
                                  f"(expected {expected[:12]}…, got {got[:12]}…)")
    return problems


class Verifier:
    """Checks files against their digests on a background thread while the transfer goes on.

    `submit` each file as soon as it is complete on disk; `finish` waits for the last hash and returns
    local path -> why it does not match. Files that arrive together are hashed in one batch."""

    _STOP = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._problems: dict[str, str] = {}
        self._thread: threading.Thread | None = None

    def submit(self, path: str, digest: str | None) -> None:
        if not digest:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
            self._thread.start()
        self._queue.put((path, digest))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            stop = any(item is self._STOP for item in batch)
            files = [item for item in batch if item is not self._STOP]
            if files:
                self._problems.update(mismatches(files))
            if stop:
                return

    def finish(self) -> dict[str, str]:
        if self._thread is not None:
            self._queue.put(self._STOP)
            self._thread.join()
            self._thread = None
        return dict(self._problems)
