"""Content digests: what a downloaded file is checked against before the client may install it.

A digest is `<algorithm>:<hex>`. Hub buckets list each file's Xet hash (`xet:...`), which hf_xet recomputes
from the bytes; directory buckets written by this project keep a BLAKE3 digest (`blake3:...`) beside each
file, recorded when it was published (older ones kept a sha256, still checked). A file whose bytes do not
match is never handed to the client.

Hashing costs CPU, not I/O (the file was just written, it is in the page cache), so it runs beside the
transfer: a `Verifier` hashes each whole file on its own thread as soon as hf_xet hands it over (Hub). In a
directory bucket the server's own copy hashes each block between its read and its write
(`backends/dir.py::copy_checked`, a `streaming_hasher`), several files at once. Little is left to hash when
the transfer ends.

Recomputing a Xet hash (content-defined chunking, then a Merkle tree) runs at about 1.5 GB/s on one core;
BLAKE3 runs at about 7 GB/s, and spreads one file over every core. So a download may name *digest
manifests*: small JSON files of the same request (export records) whose `digests` object binds Xet hashes to
BLAKE3 digests recorded when the files were published. A file listed as `xet:H` whose H a manifest binds is
checked by BLAKE3 instead; if that check fails, the Xet hash still decides, so a wrong manifest costs time,
never a good file.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

from .protocol import MAX_RECORD_BYTES

ALGORITHMS = ("xet", "blake3", "sha256")


def split(digest: str) -> tuple[str, str] | None:
    """(algorithm, hex) of a digest string such as `blake3:<hex>`, or None when it is not one."""
    algorithm, _, value = digest.partition(":")
    if algorithm not in ALGORITHMS or len(value) != 64 or value.strip("0123456789abcdef"):  # lowercase hex only
        return None
    return algorithm, value


def _has_blake3() -> bool:
    """The blake3 package is a server requirement, but a server run from the caller's interpreter
    (NEURON_CACHE_SERVER_MODE=current) may lack it: then sha256 and hf_xet do its work."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return False
    return True


def publish_algorithm() -> str:
    """What a directory bucket records for new files, and a sync describes: BLAKE3 (several times faster
    than sha256, and as strong), or sha256 where the blake3 package is missing."""
    return "blake3" if _has_blake3() else "sha256"


def file_digest(path: str | os.PathLike[str], algorithm: str, *, every_core: bool = True) -> str:
    """`<algorithm>:<hex>` of a file's bytes (blake3 or sha256; Xet hashes go through `xet_hashes`).
    every_core: spread a large file's BLAKE3 over every core (faster, but about 15% more CPU in all: not
    while a transfer needs the cores too)."""
    if algorithm == "blake3":
        import blake3

        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if every_core else blake3.blake3()
        return f"blake3:{hasher.update_mmap(os.fspath(path)).hexdigest()}"
    if algorithm == "sha256":
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    raise ValueError(f"no file digest for algorithm {algorithm!r}")


#: Xet cuts no chunk shorter than 8 KiB, so a file of up to 8 KiB is a single chunk.
XET_ONE_CHUNK = 8 * 1024
#: The key of Xet's chunk hashes (a constant of the Xet protocol, "DATA_KEY" in its hashing spec).
_XET_DATA_KEY = bytes((102, 151, 245, 119, 91, 149, 80, 222, 49, 53, 203, 172, 165, 151, 24, 28, 157, 228, 33, 16,
                       155, 235, 43, 88, 180, 208, 176, 75, 147, 173, 242, 41))


def xet_hash_of_one_chunk(data: bytes) -> str:
    """The Xet hash of a file of at most XET_ONE_CHUNK bytes: its chunk hash (BLAKE3 keyed with the data
    key), hashed again with an all-zero key, printed as Xet prints hashes (four little-endian 64-bit
    words). Two BLAKE3 calls instead of a call into hf_xet, which costs about a millisecond per file
    whatever its size: commit files and export records are this small."""
    if not data:
        return "0" * 64
    import blake3

    chunk = blake3.blake3(data, key=_XET_DATA_KEY).digest()
    root = blake3.blake3(chunk, key=bytes(32)).digest()
    return "".join(root[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def xet_hashes(paths: Sequence[str]) -> list[str]:
    """Xet hashes of files: one-chunk files directly, the others in one hf_xet call (hashed in parallel)."""
    import hf_xet

    hashes: dict[int, str] = {}
    if _has_blake3():  # else hf_xet hashes every file
        for index, path in enumerate(paths):
            if os.path.getsize(path) <= XET_ONE_CHUNK:
                with open(path, "rb") as handle:
                    data = handle.read(XET_ONE_CHUNK + 1)
                if len(data) <= XET_ONE_CHUNK:
                    hashes[index] = xet_hash_of_one_chunk(data)
    rest = [index for index in range(len(paths)) if index not in hashes]
    if rest:
        hashes.update(zip(rest, (info.hash for info in hf_xet.hash_files([paths[index] for index in rest]))))
    return [hashes[index] for index in range(len(paths))]


#: How a mismatch names each algorithm to the user.
_NAMES = {"xet": "Xet hash", "blake3": "BLAKE3 digest", "sha256": "sha256"}


def mismatches(files: Sequence[tuple[str, str]], *, every_core: bool = True) -> dict[str, str]:
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
            # A shortcut never rejects a good file: a one-chunk file that seems wrong is hashed by hf_xet too.
            doubtful = [path for path, expected in xet if actual[path] != expected and os.path.getsize(path) <= XET_ONE_CHUNK]
            if doubtful:
                import hf_xet

                actual.update(zip(doubtful, (info.hash for info in hf_xet.hash_files(doubtful))))
        for algorithm, pairs in by_algorithm.items():
            for path, _ in pairs:
                actual[path] = file_digest(path, algorithm, every_core=every_core).split(":", 1)[1]
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
                problems[path] = mismatch_reason(algorithm, expected, got)
    return problems


def mismatch_reason(algorithm: str, expected: str, got: str) -> str:
    """The one line a user reads when a file does not match its digest."""
    return f"content does not match its {_NAMES[algorithm]} (expected {expected[:12]}…, got {got[:12]}…)"


def streaming_hasher(algorithm: str) -> Any:
    """A hasher fed block by block (BLAKE3, sha256), or None (a Xet hash needs the whole file)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3" and _has_blake3():
        import blake3

        return blake3.blake3()
    return None


#: A digest manifest is an export record: a larger one than the protocol's record limit is not read.
MANIFEST_MAX_BYTES = MAX_RECORD_BYTES


def read_manifest(path: str | os.PathLike[str]) -> dict[str, str]:
    """A manifest's bindings, Xet hash -> `blake3:<hex>` (or `sha256:<hex>`), from its `digests` object.
    Anything unusable (not JSON, too large, a malformed hash or digest) is left out: the file it would
    have covered is then checked by its Xet hash."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MANIFEST_MAX_BYTES + 1)
        document = json.loads(raw) if len(raw) <= MANIFEST_MAX_BYTES else None
    except (OSError, ValueError):
        return {}
    digests = document.get("digests") if isinstance(document, dict) else None
    if not isinstance(digests, dict):
        return {}
    return {key: value for key, value in digests.items()
            if isinstance(key, str) and split(f"xet:{key}") is not None
            and isinstance(value, str) and (split(value) or ("xet", ""))[0] != "xet"}


def _fall_back_to_xet(problems: dict[str, str], substituted: dict[str, str]) -> dict[str, str]:
    """Files that failed a manifest's digest are checked again by their listed Xet hash, which decides."""
    retry = [(path, substituted[path]) for path in problems if path in substituted]
    if not retry:
        return problems
    kept = {path: why for path, why in problems.items() if path not in substituted}
    for path, why in mismatches(retry).items():
        kept[path] = f"{why}, nor the digest recorded when it was published" if why.startswith("content") else why
    return kept


_STOP = object()


class _BackgroundCheck:
    """What both verifiers share: a queue of work for one background thread (started on first use), the
    problems it finds (local path -> why), and how long `finish` waited for it once the transfer was over."""

    _thread_name = "verify"

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._problems: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._draining = False  # set by `finish`: the transfer is over
        self.waited = 0.0

    def _put(self, item: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, str]:
        """Wait for the last checks; local path -> why it does not match."""
        started = time.perf_counter()
        self._draining = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self.waited = time.perf_counter() - started
        return dict(self._problems)

    def summary(self) -> str:
        """For the server log: what the checks cost once the transfer was over."""
        return f"then waited {self.waited:.3f} s for the last hashes"


class Verifier(_BackgroundCheck):
    """Checks whole files against their digests on a background thread while the transfer goes on.

    `submit` each file as soon as it is complete on disk; `finish` waits for the last hash. Files that
    arrive together are hashed in one batch. The files named in `manifests` (local paths) are read as
    digest manifests: they are checked first, and the other files wait until every manifest has been
    submitted, so that they can use its bindings."""

    def __init__(self, manifests: Collection[str] = ()) -> None:
        super().__init__()
        self._manifests = frozenset(manifests)
        #: Xet hash -> the digest a manifest recorded for it (None: manifests disagreed, use the Xet hash).
        self._bindings: dict[str, str | None] = {}
        self.by_manifest = 0  # files checked by a manifest's digest rather than their Xet hash

    def submit(self, path: str, digest: str | None) -> None:
        """A file is complete on disk: check it against `digest` (or learn a manifest's bindings)."""
        if digest or path in self._manifests:
            self._put((path, digest))

    def _learn(self, manifest: str, digest: str | None) -> None:
        if digest:
            problems = mismatches([(manifest, digest)])
            if problems:  # reported (and the file removed) like any other; its bindings are not used
                self._problems.update(problems)
                return
        for xet_hash, bound in read_manifest(manifest).items():
            known = self._bindings.setdefault(xet_hash, bound)
            if known != bound:
                self._bindings[xet_hash] = None

    def _check(self, files: list[tuple[str, str]]) -> None:
        substituted: dict[str, str] = {}  # local path -> the listed Xet digest it was checked without
        checked = []
        for path, digest in files:
            bound = self._bindings.get(digest[4:]) if digest.startswith("xet:") else None
            if bound:
                substituted[path] = digest
                digest = bound
            checked.append((path, digest))
        self.by_manifest += len(substituted)
        # While the transfer runs, one core per hash; once it is over, what is left may use every core.
        self._problems.update(_fall_back_to_xet(mismatches(checked, every_core=self._draining), substituted))

    def _run(self) -> None:
        waiting = set(self._manifests)
        held: list[tuple[str, str]] = []
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            stop = any(item is _STOP for item in batch)
            files = [item for item in batch if item is not _STOP]
            for path, digest in (item for item in files if item[0] in waiting):
                waiting.discard(path)
                self._learn(path, digest)
            held += [item for item in files if item[0] not in self._manifests and item[1]]
            if held and (stop or not waiting):
                self._check(held)
                held = []
            if stop:
                return

    def summary(self) -> str:
        """For the server log: the wait after the transfer and how many files a manifest's digest checked."""
        return f"{super().summary()} ({self.by_manifest} files checked by a manifest's digest)"
