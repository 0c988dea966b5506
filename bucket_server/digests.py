"""Content digests: what a downloaded file is checked against before the client may install it.

A digest is `<algorithm>:<hex>`. Hub buckets list each file's Xet hash (`xet:...`), which hf_xet recomputes
locally from the bytes; directory buckets written by this project keep a sha256 (`sha256:...`) beside
each file, recorded when it was published. A file whose bytes do not match is never handed to the client.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

ALGORITHMS = ("xet", "sha256")


def split(digest: str) -> tuple[str, str] | None:
    algorithm, _, value = digest.partition(":")
    if algorithm not in ALGORITHMS or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        return None
    return algorithm, value


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def xet_hashes(paths: Sequence[str]) -> list[str]:
    import hf_xet

    return [info.hash for info in hf_xet.hash_files(list(paths))]


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
    xet = by_algorithm.get("xet", [])
    if xet:
        for (path, expected), actual in zip(xet, xet_hashes([path for path, _ in xet])):
            if actual != expected:
                problems[path] = f"content does not match its Xet hash (expected {expected[:12]}…, got {actual[:12]}…)"
    for path, expected in by_algorithm.get("sha256", []):
        actual = sha256_file(path)
        if actual != expected:
            problems[path] = f"content does not match its sha256 (expected {expected[:12]}…, got {actual[:12]}…)"
    return problems
