"""Hub model repos, read only, through the bucket server: optimum-neuron's Git cache repos (upstreams, import).

`RepoClient` speaks the same file items as `BucketClient` (`list`, `paths_info`, `download`), so the fetch
planner and executor (`fetch.py`) install a repo's entries exactly as a bucket's: verified by the server,
sizes checked here, each entry renamed into place whole.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bucket_server.messages import DownloadFile

from .buckets import BucketRef
from .client import ProgressCallback, _connection, read_token, result_of
from . import settings
from .errors import ConfigurationError

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"^{_PART}/{_PART}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,254}$")
MODELS_SCHEME = "hf://models/"


@dataclass(frozen=True)
class RepoRef:
    """A Hub model repo at a revision (a branch, a tag or a commit sha)."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{MODELS_SCHEME}{self.repo_id}" + ("" if self.revision == "main" else f"@{self.revision}")

    def to_wire(self) -> dict[str, str]:
        return {"type": "model", "id": self.repo_id, "revision": self.revision}


def parse_repo(spec: str, revision: str | None = None) -> RepoRef:
    """`org/name`, `hf://models/org/name`, either with `@<revision>`; ConfigurationError in one line otherwise."""
    text = spec.strip()
    if text.startswith(MODELS_SCHEME):
        text = text[len(MODELS_SCHEME):]
    elif text.startswith("https://huggingface.co/"):
        text = text[len("https://huggingface.co/"):]
    text = text.rstrip("/")
    if "@" in text:
        text, _, at = text.partition("@")
        revision = revision or at
    revision = revision or "main"
    if not _REPO_ID_RE.match(text) or "--" in text or ".." in text:
        raise ConfigurationError(f"model repo {spec!r} is not `org/name` (e.g. aws-neuron/optimum-neuron-cache)")
    if not _REVISION_RE.match(revision) or ".." in revision or "//" in revision:
        raise ConfigurationError(f"revision {revision!r} of {text} is not a branch, tag or commit sha")
    return RepoRef(text, revision)


class RepoClient:
    """Read a model repo through the bucket server, with the caller's token."""

    def __init__(self, repo: RepoRef, environ: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        settings.check_client(env)
        if env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise ConfigurationError(f"HF_HUB_OFFLINE is set: the model repo {repo} cannot be reached; unset it to use it")
        self.repo = repo
        self.environ = env
        self._token = read_token(env)
        self.requests = 0

    def call(self, op: str, *, bucket: BucketRef | None = None, progress: ProgressCallback | None = None, **args: Any) -> Any:
        """One operation on the repo (and, for `repo_copy`, the destination bucket); errors raise typed."""
        message: dict[str, Any] = {"op": op, "args": args, "repo": self.repo.to_wire()}
        if bucket is not None:
            message["bucket"] = bucket.to_wire()
        if self._token:
            message["auth"] = {"token": self._token}
        self.requests += 1
        return result_of(op, _connection(self.environ).request(message, progress), str(self.repo)).to_wire()

    def resolve(self) -> str:
        """The commit sha the revision points at now."""
        return str(self.call("repo_info")["sha"])

    def pinned(self) -> RepoClient:
        """A client of the same repo at the commit its revision points at now: what it reads stays consistent."""
        other = RepoClient(RepoRef(self.repo.repo_id, self.resolve()), self.environ)
        other.requests = self.requests
        return other

    def list(self, prefix: str, *, recursive: bool = True) -> list[dict[str, Any]]:
        return self.call("repo_list", prefix=prefix, recursive=recursive)

    def folders(self, prefix: str) -> list[str]:
        return [item["path"].rsplit("/", 1)[-1] for item in self.list(prefix, recursive=False)
                if item.get("type") == "directory" and isinstance(item.get("path"), str)]

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        return self.call("repo_paths_info", paths=paths) if paths else []

    def download(self, files: Iterable[DownloadFile | Mapping[str, Any]], *,
                 progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Download files to local paths, each verified by the server; see bucket_server.backends.repo. Files
        are DownloadFile (what a bucket's download takes: `fetch.download_checked` reads either), or their wire
        form with an optional "blob_id"."""
        wire = [item.to_wire() if isinstance(item, DownloadFile) else dict(item) for item in files]
        files = [{**item, "blob_id": item.get("blob_id")} for item in wire]
        return self.call("repo_download", files=files, progress=progress)

    def copy_into(self, bucket: BucketRef, copies: list[dict[str, Any]]) -> dict[str, Any]:
        """Copy Xet-backed files into a Hub bucket by hash, on the Hub's side: [{"xet_hash", "dest"}]."""
        return self.call("repo_copy", bucket=bucket, copies=copies)
