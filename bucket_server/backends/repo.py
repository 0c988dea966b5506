"""A Hub model repo at a revision, read only: what optimum-neuron's Git cache repos are (upstreams, imports).

Everything it answers is hostile input, as a bucket's listing is: paths go through `validate_remote_path`,
sizes must be whole numbers of bytes, hashes 64 (Xet, sha256) or 40 (Git) hex digits; anything else is
left out of a listing. Every Hub call runs within the server's retry policy (`hf.with_retries`), with the
timeouts `hf.configure_http` gives every request of this process.

Downloads are verified like a bucket's: a Xet-backed file by its Xet hash (hf_xet, on the `Verifier`'s
thread as it lands), an LFS file stored outside Xet by its LFS sha256 (its Git blob id is its pointer's), a
regular Git file by its Git blob id; a file that does not match is deleted and reported, never handed over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..digests import Verifier, mismatches
from ..messages import DownloadResult, RepoDownloadFile
from ..protocol import ErrorCode
from .base import BackendError, FileSizeWatcher, Progress, reject_mismatched, validate_remote_path
from .hf import RetryPolicy, _join_each, _xet_session, map_exception, with_retries

log = logging.getLogger("bucket_server")

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,254}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_READ_PIECE = 1 << 20
#: No cache file is this large: a listing that says so is corrupt or hostile.
MAX_FILE_BYTES = 2**40


def parse_repo(value: Any) -> tuple[str, str]:
    """(repo id, revision) of a request's `repo` ({"type": "model", "id", "revision"?}); bad ones are bad_request."""
    if not isinstance(value, dict) or value.get("type", "model") != "model":
        raise BackendError(ErrorCode.BAD_REQUEST, "request names no model repo ({'type': 'model', 'id': 'org/name'})")
    repo_id, revision = value.get("id"), value.get("revision") or "main"
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise BackendError(ErrorCode.BAD_REQUEST, f"model repo id {repo_id!r} is not `org/name`")
    if not isinstance(revision, str) or not _REVISION_RE.match(revision) or ".." in revision or "//" in revision:
        raise BackendError(ErrorCode.BAD_REQUEST, f"revision {revision!r} is not a branch, tag or commit sha")
    return repo_id, revision


def _size(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FILE_BYTES:
        return None
    return value


def file_item(entry: Any) -> dict[str, Any] | None:
    """A RepoFile as the wire's file item, or None when anything in it cannot be trusted (left out)."""
    path, size = getattr(entry, "path", None), _size(getattr(entry, "size", None))
    blob_id = getattr(entry, "blob_id", None)
    xet_hash = getattr(entry, "xet_hash", None)
    lfs = getattr(entry, "lfs", None)
    sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
    try:
        path = validate_remote_path(path)
    except BackendError:
        return None
    if size is None or not (isinstance(blob_id, str) and _HEX40.match(blob_id)):
        return None
    if xet_hash is not None and not (isinstance(xet_hash, str) and _HEX64.match(xet_hash)):
        return None
    if sha256 is not None and not (isinstance(sha256, str) and _HEX64.match(sha256)):
        sha256 = None
    digest = f"xet:{xet_hash}" if xet_hash else (f"sha256:{sha256}" if sha256 else None)
    return {"type": "file", "path": path, "size": size, "xet_hash": xet_hash, "digest": digest, "blob_id": blob_id}


def git_blob_id(path: str | os.PathLike[str]) -> str:
    """The Git blob id of a file's bytes: what a repo listing gives as a regular file's `oid`."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as stream:
        while piece := stream.read(_READ_PIECE):
            digest.update(piece)
    return digest.hexdigest()


class RepoSource:
    """One model repo at one revision, with the calling client's token (read only)."""

    def __init__(self, api: Any, repo_id: str, revision: str, token: str | None, policy: RetryPolicy | None = None) -> None:
        self.api = api
        self.repo_id = repo_id
        self.revision = revision
        self.token: str | bool = token or False
        self.policy = policy or RetryPolicy()

    def _run(self, what: str, fn: Any) -> Any:
        try:
            return with_retries(self.policy, f"{what} {self.repo_id}@{self.revision}", fn)
        except BackendError as exc:
            if exc.code == ErrorCode.BUCKET_NOT_FOUND:  # said of a bucket by map_exception: say it of the repo
                raise BackendError(exc.code, f"{what} {self.repo_id}@{self.revision}: model repo or revision not found "
                                             "(or private and the token cannot see it)") from exc
            raise

    def resolve(self) -> dict[str, Any]:
        """The revision's commit sha: pin it, so a listing and the downloads that follow read one commit."""
        info = self._run("model info", lambda: self.api.model_info(self.repo_id, revision=self.revision, token=self.token))
        sha = getattr(info, "sha", None)
        if not (isinstance(sha, str) and _HEX40.match(sha)):
            raise BackendError(ErrorCode.INVALID_DATA, f"model info of {self.repo_id}@{self.revision} gives no commit sha")
        return {"id": self.repo_id, "sha": sha, "private": bool(getattr(info, "private", False))}

    def list(self, prefix: str, *, recursive: bool) -> list[dict[str, Any]]:
        """Files (and, when not recursive, folders) under the folder `prefix`; a missing folder is empty."""
        prefix = validate_remote_path(prefix.rstrip("/"), allow_root=True)

        def run() -> list[dict[str, Any]]:
            items = []
            for entry in self.api.list_repo_tree(self.repo_id, path_in_repo=prefix or None, recursive=recursive,
                                                 revision=self.revision, token=self.token):
                if hasattr(entry, "blob_id"):
                    item = file_item(entry)
                    if item is not None and item["path"].startswith(f"{prefix}/" if prefix else ""):
                        items.append(item)
                elif not recursive and isinstance(getattr(entry, "path", None), str):
                    try:
                        items.append({"type": "directory", "path": validate_remote_path(entry.path)})
                    except BackendError:
                        continue
            return items

        try:
            return self._run("list", run)
        except BackendError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return []
            raise

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        """The files among `paths` that exist at the revision; missing ones (and folders) are left out."""
        for path in paths:
            validate_remote_path(path)
        found: list[dict[str, Any]] = []
        for start in range(0, len(paths), 1000):
            chunk = paths[start:start + 1000]
            entries = self._run("paths-info", lambda chunk=chunk: self.api.get_paths_info(
                self.repo_id, chunk, revision=self.revision, token=self.token))
            found += [item for item in (file_item(entry) for entry in entries if hasattr(entry, "blob_id")) if item]
        return found

    def download(self, files: Sequence[RepoDownloadFile], *, progress: Progress | None = None) -> DownloadResult:
        """Download files of the repo to local paths, each verified (see the module docstring); files that do
        not match or do not transfer are deleted and listed in `failed`."""
        items = self._with_info(list(files))
        total = sum(int(item.size or 0) for item in items)
        with FileSizeWatcher([item.local_path for item in items], total, progress):
            problems = self._run("download from", lambda: self._download(items))
        return DownloadResult(len(items), total, tuple(reject_mismatched(items, problems)))

    def _with_info(self, items: list[RepoDownloadFile]) -> list[RepoDownloadFile]:
        """The files with what the repo lists for them (size, hashes, digest) where the request left it out."""
        unknown = [item.path for item in items if item.size is None or not (item.xet_hash or item.blob_id)]
        if not unknown:
            return items
        known = {info["path"]: info for info in self.paths_info(unknown)}
        missing = [path for path in unknown if path not in known]
        if missing:
            raise BackendError(ErrorCode.NOT_FOUND, f"download from {self.repo_id}: {len(missing)} file(s) not in the repo: "
                                                    f"{', '.join(missing[:3])}")
        return [replace(item, size=known[item.path]["size"], xet_hash=known[item.path]["xet_hash"],
                        blob_id=known[item.path]["blob_id"], digest=known[item.path]["digest"])
                if item.path in known else item for item in items]

    def _download(self, items: list[RepoDownloadFile]) -> dict[str, str]:
        """One attempt: local path -> why the file cannot be handed over."""
        problems: dict[str, str] = {}
        git_items = [item for item in items if not item.xet_hash]
        errors: list[BaseException] = []
        for item in git_items:  # one file that does not transfer costs only itself, as with Xet files
            try:
                problems.update(self._download_git(item))
            except Exception as exc:
                errors.append(exc)
                Path(item.local_path).unlink(missing_ok=True)
                problems[item.local_path] = f"did not transfer: {map_exception(exc, 'download').message}"
        if git_items and len(errors) == len(git_items) == len(items):
            raise errors[0]
        xet_items = [item for item in items if item.xet_hash]
        if xet_items:
            problems.update(self._download_xet(xet_items))
        return problems

    def _download_git(self, item: RepoDownloadFile) -> dict[str, str]:
        """A file stored in Git or in LFS (not Xet) over HTTP, checked by size, then by its LFS sha256 (the
        `sha256:` digest the listing gives an LFS file) or else its Git blob id."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        local = item.local_path
        url = hf_hub_url(self.repo_id, item.path, revision=self.revision, endpoint=self.api.endpoint)
        limit = int(item.size or 0)
        with get_session().stream("GET", url, headers=build_hf_headers(token=self.token), follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
            hf_raise_for_status(response)
            written = 0
            with open(local, "wb") as out:
                for piece in response.iter_bytes():
                    written += len(piece)
                    if written > limit:
                        return {local: f"is larger than the {limit} bytes the repo lists"}
                    out.write(piece)
        if isinstance(item.digest, str) and item.digest.startswith("sha256:"):  # LFS: the blob id is the pointer's
            return mismatches([(local, item.digest)], every_core=False)
        expected = item.blob_id
        if isinstance(expected, str) and git_blob_id(local) != expected:
            return {local: "content does not match its Git blob id"}
        return {}

    def _download_xet(self, items: list[RepoDownloadFile]) -> dict[str, str]:
        """Xet-backed files in one download group, each checked by its Xet hash as it lands."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        verifier = Verifier()
        problems: dict[str, str] = {}
        for item in items:
            if not item.size:
                Path(item.local_path).write_bytes(b"")
        transfers = [item for item in items if item.size]
        failed: dict[str, BaseException] = {}
        try:
            if transfers:
                url = hf_hub_url(self.repo_id, transfers[0].path, revision=self.revision, endpoint=self.api.endpoint)
                metadata = self.api.get_hf_file_metadata(url=url, token=self.token)
                if metadata.xet_file_data is None:
                    raise BackendError(ErrorCode.INVALID_DATA, f"{self.repo_id}: {transfers[0].path} is listed as Xet-backed "
                                                               "but its metadata names no Xet storage")
                headers = build_hf_headers(token=self.token)
                group = _xet_session().new_file_download_group(
                    token_refresh_url=metadata.xet_file_data.refresh_route, token_refresh_headers=headers,
                    custom_headers={key: value for key, value in headers.items() if key.lower() != "authorization"},
                )
                try:
                    _join_each(group, transfers, verifier, failed, first_byte_within=self.policy.budget)
                except Exception as exc:
                    if not failed:
                        raise
                    log.debug("download group of %s closed with: %s", self.repo_id, exc)
            for item in items:
                if not item.size:
                    verifier.submit(item.local_path, item.digest)
        finally:
            problems.update(verifier.finish())
        if transfers and len(failed) == len(transfers):
            first = next(iter(failed.values()))
            cause = map_exception(first, f"download from {self.repo_id}")
            raise BackendError(cause.code, f"{cause.message} (none of {len(transfers)} files came through)") from first
        problems.update({path: f"did not transfer: {type(exc).__name__}: {exc}" for path, exc in failed.items()})
        return problems


def copy_into_bucket(bucket: Any, repo_id: str, copies: list[dict[str, Any]]) -> dict[str, Any]:
    """Server-side copies of Xet-backed repo files into a Hub bucket, by Xet hash (no byte moves):
    huggingface_hub's `batch_bucket_files(copy=[("model", repo_id, xet_hash, dest)])`."""
    ops = []
    for item in copies:
        xet_hash = item.get("xet_hash")
        if not (isinstance(xet_hash, str) and _HEX64.match(xet_hash)):
            raise BackendError(ErrorCode.BAD_REQUEST, f"copy from {repo_id}: {xet_hash!r} is not a Xet hash")
        ops.append(("model", repo_id, xet_hash, validate_remote_path(item.get("dest"))))
    if ops:
        bucket._call("copy into", bucket.api.batch_bucket_files, bucket.bucket_id, copy=ops)
    return {"copied": len(ops)}
