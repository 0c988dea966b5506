"""Which bucket to use: parse a bucket name and resolve the default.

`hf://buckets/<ns>/<name>` or `<ns>/<name>` is a Hub bucket; an absolute or ./relative path, `~/...` or a
`file://` URL is a directory used as a bucket (a mounted bucket, a shared filesystem, or the embedded
default). Resolution: explicit argument, then NEURON_CACHE_BUCKET, then the saved setting
(`neuron-cache set`), then the embedded default directory under the user's cache dir.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import settings
from .atomic import atomic_write
from .errors import InvalidBucketError

ENV_BUCKET = settings.BUCKET
SETTING_FILE_NAME = "neuron_cache_bucket"
_HUB_PART_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class BucketRef:
    """A bucket as this package names it: a Hub bucket (`ns/name`) or a directory used as one."""
    kind: Literal["hf", "dir"]
    #: `ns/name` for a Hub bucket, the absolute directory for a dir bucket.
    location: str

    def __str__(self) -> str:
        return f"hf://buckets/{self.location}" if self.kind == "hf" else self.location

    def to_wire(self) -> dict[str, str]:
        """How the bucket server's requests name it."""
        return {"kind": self.kind, "location": self.location}


def parse_bucket(spec: str) -> BucketRef:
    """Parse a bucket name; raise InvalidBucketError with a one-line message saying what is accepted."""
    text = spec.strip()
    if not text:
        raise InvalidBucketError("the bucket name is empty: pass `<namespace>/<name>`, hf://buckets/<ns>/<name> or a directory")
    if text.startswith("file://"):
        return BucketRef("dir", str(Path(text[len("file://") :]).expanduser().absolute()))
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return BucketRef("dir", str(Path(text).expanduser().absolute()))
    bucket_id = text
    for prefix in ("hf://buckets/", "https://huggingface.co/buckets/"):
        if text.startswith(prefix):
            bucket_id = text[len(prefix) :].rstrip("/")
            break
    else:
        if "://" in text:
            raise InvalidBucketError(
                f"bucket {spec!r}: unsupported scheme; use hf://buckets/<ns>/<name>, <ns>/<name> or a directory path"
            )
    parts = bucket_id.split("/")
    if len(parts) != 2 or not all(_HUB_PART_RE.match(part) and "--" not in part and ".." not in part for part in parts):
        raise InvalidBucketError(
            f"bucket {spec!r} is not a Hub bucket id (`<namespace>/<name>`) nor a directory "
            "(write local paths as /abs/path, ./relative/path or file://...)"
        )
    return BucketRef("hf", bucket_id)


def hf_home(environ: Mapping[str, str] | None = None) -> Path:
    """huggingface_hub's home (HF_HOME, else `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`)."""
    env = os.environ if environ is None else environ
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser()
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "huggingface"


def user_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where this package keeps per-user files (stats, the embedded default bucket)."""
    env = os.environ if environ is None else environ
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "optimum-neuron-cache"


def embedded_default(environ: Mapping[str, str] | None = None) -> BucketRef:
    """A directory bucket for trying the project with no account: nothing leaves the machine."""
    return BucketRef("dir", str((user_cache_dir(environ) / "default-bucket").absolute()))


def setting_path(environ: Mapping[str, str] | None = None) -> Path:
    """The file holding the saved default bucket (`neuron-cache set`)."""
    return hf_home(environ) / SETTING_FILE_NAME


def read_saved_bucket(environ: Mapping[str, str] | None = None) -> str | None:
    """The saved default bucket's name, or None when none is saved."""
    try:
        value = setting_path(environ).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return value or None


def save_bucket(bucket: BucketRef | None, environ: Mapping[str, str] | None = None) -> Path:
    """Save (or, with None, forget) the default bucket. Written atomically: readers never see half a name."""
    path = setting_path(environ)
    if bucket is None:
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, str(bucket) + "\n")
    return path


def resolve_bucket(explicit: str | BucketRef | None = None, environ: Mapping[str, str] | None = None) -> BucketRef:
    """The bucket to use: the explicit one, else NEURON_CACHE_BUCKET, else the saved one, else the embedded default."""
    return bucket_and_source(explicit, environ)[0]


def bucket_and_source(explicit: str | BucketRef | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[BucketRef, str]:
    """The bucket to use (as `resolve_bucket`), and where it was named: "argument", the variable, the saved
    setting's file, or "embedded default"."""
    if isinstance(explicit, BucketRef):
        return explicit, "argument"
    env = os.environ if environ is None else environ
    if explicit:
        return parse_bucket(explicit), "argument"
    from_env = settings.bucket(env)
    if from_env:
        return parse_bucket(from_env), ENV_BUCKET
    saved = read_saved_bucket(env)
    if saved:
        return parse_bucket(saved), f"saved in {setting_path(env)}"
    return embedded_default(env), "embedded default"
