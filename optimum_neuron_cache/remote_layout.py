"""The bucket layout contract, in one place, as pure functions.

    neuronxcc-<ver>/MODULE_<key>/<file>                                    flat area: the local cache tree, as is
    neuronxcc-<ver>/models/<org>--<name>/<task>/MODULE_<key>/<file>        per-model area
    neuronxcc-<ver>/models/<org>--<name>/<task>/exports/<record id>.json   export records, for lookup
    neuronxcc-<ver>/models/<org>--<name>/<task>/digests/<id>.json          digest manifests of the area
    neuronxcc-<ver>/models/<org>--<name>/<task>/.stamp.json                the area's stamp: new at every change
    neuronxcc-<ver>/digests/MODULE_<key>.json                              digest manifest of a flat entry
    leases/neuronxcc-<ver>/MODULE_<key>.lease                              compile leases (compile_leases.py)

Leases sit outside every compiler version's folder, so the flat area stays the local cache tree and no
fetch, listing of an area or mount of the bucket as a cache root ever meets one as an entry.

Tools outside this package that read these paths (hf-mount users mounting the flat area, scripts reading
records) rely on them: change them only with a migration. optimum-neuron does not use this layout: its
released cache is a Git model repo and its unmerged bucket PR (#1102) has a layout of its own; both are read
here as they are (the functions at the end), never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucket_server.messages import MAX_FILE_BYTES as _MESSAGES_MAX_FILE_BYTES
from bucket_server.messages import STALE_DIGEST

from .errors import ConfigurationError, InvalidModelIdError
from .local_cache import DONE, NEFF, is_module_name, version_dir_name, version_from_dir_name
from .neuron_sdk import writes_done_marker

#: The only files that may ever leave the machine. Logs, locks and anything else stay local.
PUBLISHABLE_FILES = frozenset(
    {
        "model.neff",
        "model.done",
        "model.hlo_module.pb",
        "model.hlo.pb",
        "compile_flags.json",
        "compile_flags.txt",
        "wrapped_neff.hlo",
    }
)

MODELS_DIR = "models"
LEASES_DIR = "leases"
LEASE_SUFFIX = ".lease"
EXPORTS_DIR = "exports"
#: Digest manifests: beside the flat area's entries (never inside them, never installed), and in a model's area.
DIGESTS_DIR = "digests"
#: A model area's stamp: rewritten (new bytes) by every publication to the area, removed by a prune of it. A
#: warm run asks for this one path instead of listing the area (fetch.memo_plan). Its leading dot sorts it
#: before every other name of the area, so a paged listing reads it before the entries it vouches for.
AREA_STAMP = ".stamp.json"
DEFAULT_TASK = "default"

# Hub repo names: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
_TASK_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_RECORD_ID_RE = re.compile(r"^[0-9a-f]{16,64}$")


def is_publishable(filename: str) -> bool:
    """Whether a file may ever leave the machine (the allow-list)."""
    return filename in PUBLISHABLE_FILES


def commit_file(files: Iterable[str], compiler_version: str) -> str:
    """The file whose presence vouches for an entry, hence published last: `model.done`, or for compilers
    up to 2.14 (which write no marker) the NEFF itself."""
    return DONE if DONE in set(files) or writes_done_marker(compiler_version) else NEFF


# ----------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelRef:
    """A model as the bucket names it."""

    #: What the user passed (a Hub id, or a local directory).
    model_id: str
    #: The folder under `models/`: `<org>--<name>`, `<name>`, or `local--<dir>-<content hash>`.
    folder: str
    is_local: bool = False


def _check_hub_part(part: str, model_id: str) -> None:
    if not _HUB_NAME_RE.match(part) or "--" in part or ".." in part:
        raise InvalidModelIdError(
            f"model id {model_id!r} is not a Hub model id (`org/name` of letters, digits, '-', '_', '.') "
            "nor an existing local directory"
        )


def _local_model_folder(path: Path) -> str:
    """Key a local model directory by content: its folder name plus a hash of its config.json.

    Two copies of the same checkpoint share entries; two different checkpoints in folders of the same name
    do not. Without a config.json, the hash covers the sorted names and sizes of its files.
    """
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    else:
        for item in sorted(path.iterdir()):
            if item.is_file():
                digest.update(f"{item.name}\0{item.stat().st_size}\n".encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-.") or "model"
    name = re.sub(r"-{2,}", "-", name)[:64]
    return f"local--{name}-{digest.hexdigest()[:12]}"


def model_ref(model_id: str | os.PathLike[str]) -> ModelRef:
    """Validate a model id and give its bucket folder. Local directories are keyed by content."""
    text = os.fspath(model_id)
    if text and os.path.isdir(os.path.expanduser(text)):  # as transformers' from_pretrained does: an existing directory is local
        path = Path(text).expanduser()
        return ModelRef(model_id=str(path.resolve()), folder=_local_model_folder(path.resolve()), is_local=True)
    parts = text.split("/")
    if not text or len(parts) > 2:
        raise InvalidModelIdError(
            f"model id {text!r} is not a Hub model id (`org/name`) nor an existing local directory"
        )
    for part in parts:
        _check_hub_part(part, text)
    return ModelRef(model_id=text, folder="--".join(parts))


def reuse_casing(folder: str, existing: Iterable[str]) -> str:
    """Model ids are case-insensitive on the Hub: reuse the casing the bucket already has for `folder`."""
    wanted = folder.lower()
    matches = sorted(name for name in existing if name.lower() == wanted)
    if folder in matches:
        return folder
    return matches[0] if matches else folder


def is_task_name(name: str) -> bool:
    """Whether a listed folder name can be a task (`task_name` would take it)."""
    return bool(_TASK_RE.match(name))


def task_name(task: str | None) -> str:
    """A validated task name (`default` when none is given); bad input raises ConfigurationError."""
    if task is None or task == "":
        return DEFAULT_TASK
    if not _TASK_RE.match(task):
        raise ConfigurationError(
            f"task {task!r} is not a task name (lowercase letters, digits, '-', '_', '.'; e.g. text-generation)"
        )
    return task


# ------------------------------------------------------------------------------------------ paths


def version_prefix(compiler_version: str) -> str:
    """`neuronxcc-<version>`: a compiler version's top folder, in the bucket as in the cache."""
    return version_dir_name(compiler_version)


def flat_entry_prefix(compiler_version: str, module: str) -> str:
    """An entry's folder in the flat area (the local cache tree, as is)."""
    return f"{version_prefix(compiler_version)}/{module}"


def flat_file_path(compiler_version: str, module: str, filename: str) -> str:
    """A file of an entry in the flat area."""
    return f"{flat_entry_prefix(compiler_version, module)}/{filename}"


def area_entry_prefix(area_prefix: str, module: str) -> str:
    """An entry's folder in a model's area (`area_prefix` as found in the bucket, with its casing)."""
    return f"{area_prefix}/{module}"


def area_file_path(area_prefix: str, module: str, filename: str) -> str:
    """A file of an entry in a model's area."""
    return f"{area_entry_prefix(area_prefix, module)}/{filename}"


def models_prefix(compiler_version: str) -> str:
    """The folder of a compiler version's model areas."""
    return f"{version_prefix(compiler_version)}/{MODELS_DIR}"


def model_area_prefix(compiler_version: str, folder: str, task: str) -> str:
    """A model's area for a task: `neuronxcc-<ver>/models/<folder>/<task>`."""
    return f"{models_prefix(compiler_version)}/{folder}/{task}"


def model_entry_prefix(compiler_version: str, folder: str, task: str, module: str) -> str:
    """An entry's folder in a model's area."""
    return f"{model_area_prefix(compiler_version, folder, task)}/{module}"


def model_folder_prefix(compiler_version: str, folder: str) -> str:
    """A model's folder (its tasks are below it)."""
    return f"{models_prefix(compiler_version)}/{folder}"


def exports_prefix(compiler_version: str, folder: str, task: str) -> str:
    """The folder of a model area's export records."""
    return area_exports_prefix(model_area_prefix(compiler_version, folder, task))


def area_exports_prefix(area_prefix: str) -> str:
    """The folder of the export records of a model area (`area_prefix` as found in the bucket)."""
    return f"{area_prefix}/{EXPORTS_DIR}"


def area_record_path(area_prefix: str, record_file: str) -> str:
    """An export record of a model area, by file name (`<record id>.json`)."""
    return f"{area_exports_prefix(area_prefix)}/{record_file}"


def record_area(record_path: str) -> str | None:
    """The model area of an export record's path (`<area>/exports/<name>.json`), or None for another path."""
    area, _, rest = record_path.rpartition(f"/{EXPORTS_DIR}/")
    return area if area and rest.endswith(".json") and "/" not in rest else None


def export_record_path(compiler_version: str, folder: str, task: str, record_id: str) -> str:
    """Where an export record lives; a malformed record id raises ValueError."""
    if not _RECORD_ID_RE.match(record_id):
        raise ValueError(f"bad export record id {record_id!r}")
    return area_record_path(model_area_prefix(compiler_version, folder, task), f"{record_id}.json")


# ------------------------------------------------------------------------------ digest manifests


def flat_manifest_path(compiler_version: str, module: str) -> str:
    """The digest manifest of one flat-area entry: beside the entries, not in one (the flat area's MODULE
    folders stay the local cache tree, as is)."""
    return f"{version_prefix(compiler_version)}/{DIGESTS_DIR}/{module}.json"


def area_manifests_prefix(area_prefix: str) -> str:
    """The folder of a model area's digest manifests (one per publication to the area)."""
    return f"{area_prefix}/{DIGESTS_DIR}"


#: A manifest id: 16 hex characters of the sha256 of its bindings.
_MANIFEST_ID_RE = re.compile(r"^[0-9a-f]{16}\.json$")
#: A model area holds one manifest per publication; a fetch reads at most this many (the newest).
MAX_AREA_MANIFESTS = 32


def is_area_manifest(path: str, area_prefix: str) -> bool:
    """Whether a listed path is one of a model area's digest manifests (`<area>/digests/<16 hex>.json`)."""
    prefix = area_manifests_prefix(area_prefix) + "/"
    return path.startswith(prefix) and bool(_MANIFEST_ID_RE.match(path[len(prefix):]))


def digest_manifest(bindings: Mapping[str, str]) -> tuple[str, str]:
    """(file name, content) of a digest manifest binding Xet hashes to digests recorded at publish:
    `{"schema": 1, "digests": {xet hash: "blake3:<hex>"}}`, the same `digests` object export records carry.
    Named by content, so publishing the same bindings twice writes one file."""
    content = json.dumps({"schema": 1, "digests": dict(sorted(bindings.items()))}, sort_keys=True, separators=(",", ":"))
    return f"{hashlib.sha256(content.encode()).hexdigest()[:16]}.json", content


# ------------------------------------------------------------------------------------- area stamps


def area_stamp_path(area_prefix: str) -> str:
    """The stamp of a model area (`<area>/.stamp.json`)."""
    return f"{area_prefix}/{AREA_STAMP}"


def area_stamp(written: float, nonce: str) -> str:
    """A new stamp's content: `{"schema": 1, "written": <time>, "nonce": <hex>}`. Only its identity matters
    (readers compare what the bucket lists for it, never read it): the nonce makes every stamp new bytes."""
    return json.dumps({"schema": 1, "written": round(written, 3), "nonce": nonce}, separators=(",", ":"))


def stamp_token(item: Mapping[str, Any] | None) -> str | None:
    """What identifies one version of an area's stamp, from a listing or paths-info item: its size and
    content hash (Xet hash on the Hub, digest in a directory bucket). None when the item cannot tell versions
    apart (no hash, a stale digest, an untrusted size): a reader then lists the area."""
    if item is None or item.get("type", "file") != "file":
        return None
    remote = remote_file(item)
    if remote is None or not (remote.xet_hash or remote.digest) or remote.digest == STALE_DIGEST:
        return None
    return f"{remote.size}:{remote.xet_hash or ''}:{remote.digest or ''}"


def module_of(entry_key: str) -> str:
    """The MODULE name of an entry key (`neuronxcc-<ver>/MODULE_...`, as `flat_entry_prefix` makes it)."""
    return entry_key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class VersionPath:
    """A path under a compiler version's folder, classified: an entry's file (flat area when `area` is "",
    else `<model folder>/<task>`), an export record (`module` and `filename` empty, `record` set), a
    digest manifest (`manifest` set: the flat area's `MODULE_<key>.json`, or an area's `<id>.json`), or an
    area's stamp (`stamp`)."""

    area: str
    module: str = ""
    filename: str = ""
    record: str = ""
    manifest: str = ""
    #: The area's stamp (`AREA_STAMP`).
    stamp: bool = False


def split_version_path(compiler_version: str, path: str) -> VersionPath | None:
    """Classify a bucket path under `neuronxcc-<ver>/`, or None for anything the layout does not allow there."""
    prefix = version_prefix(compiler_version) + "/"
    if not path.startswith(prefix):
        return None
    parts = path[len(prefix):].split("/")
    if len(parts) == 2 and is_module_name(parts[0]) and is_publishable(parts[1]):
        return VersionPath("", parts[0], parts[1])
    if len(parts) == 2 and parts[0] == DIGESTS_DIR and parts[1].endswith(".json") and is_module_name(parts[1][:-5]):
        return VersionPath("", manifest=parts[1])
    if len(parts) == 4 and parts[0] == MODELS_DIR and parts[3] == AREA_STAMP:
        return VersionPath(f"{parts[1]}/{parts[2]}", stamp=True)
    if len(parts) == 5 and parts[0] == MODELS_DIR:
        area = f"{parts[1]}/{parts[2]}"
        if is_module_name(parts[3]) and is_publishable(parts[4]):
            return VersionPath(area, parts[3], parts[4])
        if parts[3] == EXPORTS_DIR and parts[4].endswith(".json"):
            return VersionPath(area, record=parts[4])
        if parts[3] == DIGESTS_DIR and _MANIFEST_ID_RE.match(parts[4]):
            return VersionPath(area, manifest=parts[4])
    return None


@dataclass(frozen=True)
class RemoteFile:
    """A file of the bucket, as a listing (or paths-info) describes it."""

    filename: str
    path: str
    size: int
    xet_hash: str | None
    #: What the bytes must hash to (`xet:<hex>`, `blake3:<hex>` or `sha256:<hex>`); the server checks it
    #: before handing the file over.
    digest: str | None = None


def remote_file(item: Mapping[str, Any]) -> RemoteFile | None:
    """A listing item as a RemoteFile, or None when it cannot be trusted (a size `listed_size` refuses, a
    hash or digest that is not a string)."""
    path, size = item.get("path"), listed_size(item)
    if not isinstance(path, str) or size is None:
        return None
    xet_hash, digest = item.get("xet_hash"), item.get("digest")
    if not (xet_hash is None or isinstance(xet_hash, str)) or not (digest is None or isinstance(digest, str)):
        return None
    return RemoteFile(path.rsplit("/", 1)[-1], path, size, xet_hash, digest)


def complete_remote_entry(files: Mapping[str, Any], compiler_version: str) -> bool:
    """A remote entry (file name -> what the bucket lists) can be installed only if its commit file
    (model.done, or the NEFF for compilers up to 2.14) is there, and with it the NEFF: anything less is a
    partial upload."""
    return NEFF in files and commit_file(files, compiler_version) in files


@dataclass(frozen=True)
class AreaFile:
    """A file of an entry, found in a listing of the flat or a per-model area."""

    module: str
    filename: str


def parse_area_path(path: str, area_prefix: str) -> AreaFile | None:
    """`<area_prefix>/MODULE_x/<file>` -> AreaFile, or None for anything else (exports, noise, unsafe names).

    Remote paths are untrusted: only `MODULE_<alnum>+<alnum>/<allow-listed file>` is accepted, so nothing
    like `..`, an absolute path or a backslash can ever become a local path.
    """
    if not path.startswith(area_prefix + "/"):
        return None
    rest = path[len(area_prefix) + 1 :].split("/")
    if len(rest) != 2:
        return None
    module, filename = rest
    if not is_module_name(module) or not is_publishable(filename):
        return None
    return AreaFile(module, filename)


def parse_version_prefix(name: str) -> str | None:
    """The compiler version of a top-level `neuronxcc-<ver>` folder of the bucket."""
    return version_from_dir_name(name)


def versions_in(root_folders: Iterable[str]) -> list[str]:
    """The compiler versions among the names of a bucket's (or repo's) top-level folders, sorted: every other
    name is noise (`client.folders("")` gives the names; the survey, which reports the noise, lists the root
    itself)."""
    return sorted({version for name in root_folders if (version := parse_version_prefix(name))})


#: No file of an entry or record is this large: a listing that says so is corrupt or hostile. One limit, shared
#: with the client's edge (bucket_server.messages.FileItem), which already leaves such files out of a reply.
MAX_FILE_BYTES = _MESSAGES_MAX_FILE_BYTES


def listed_size(item: Mapping[str, Any]) -> int | None:
    """The size a listing gives for a file, or None when it is not a whole number of bytes from 0 to
    MAX_FILE_BYTES (a listing is bucket data: `1e309`, `-1`, `true` or `"12"` must not become a size)."""
    size = item.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        return None
    return size


# ------------------------------------------------------------------- optimum-neuron's own layouts (read only)
#
# Two layouts written by optimum-neuron, read so that what its users have is usable as it is (never written):
#
# - its released cache, a Git model repo (e.g. aws-neuron/optimum-neuron-cache; optimum/neuron/cache/hub_cache.py):
#       neuronxcc-<ver>/MODULE_<key>/<file>                                  entries, as the local cache has them
#       neuronxcc-<ver>/0_REGISTRY/<optimum-neuron ver>/<...>/<hash>.json     one export configuration each
#           (a serialized ModelCacheEntry), at <model_type>/<org>/<model>/, or under `inference/` / `training/`
#           in older releases; an `<arch digest>/` folder (ModelCacheEntry.arch_digest) is accepted as well.
#           No MODULE keys: optimum-neuron finds entries graph by graph at compile time.
# - the layout of its unmerged bucket PR (huggingface/optimum-neuron#1102, optimum/neuron/cache/bucket_cache.py):
#       neuronxcc-<ver>/<org>/<name>/<task>/MODULE_<key>/<file>               a model's area ("default" task)
#       neuronxcc-<ver>/<org>/<name>/<task>/exports/<on ver>/<8 hex>.json      the bare export config

REGISTRY_DIR = "0_REGISTRY"
_ON_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+_-]{0,63}$")
_REGISTRY_NAME_RE = re.compile(r"^[0-9a-f]{8,128}\.json$")
_PR1102_RECORD_RE = re.compile(r"^[0-9a-f]{8}\.json$")


def hub_model_folder(model_id: str) -> str | None:
    """`<org>--<name>` (or `<name>`) for a Hub model id read from a remote file, or None when it is not one.
    Never looks at the local filesystem: a remote model id is never taken for a local directory."""
    parts = model_id.split("/") if isinstance(model_id, str) else []
    if not 1 <= len(parts) <= 2 or not all(_HUB_NAME_RE.match(part) and "--" not in part and ".." not in part for part in parts):
        return None
    return "--".join(parts)


def registry_prefix(compiler_version: str) -> str:
    """The registry folder of a compiler version in an optimum-neuron Git cache repo."""
    return f"{version_prefix(compiler_version)}/{REGISTRY_DIR}"


@dataclass(frozen=True)
class RegistryPath:
    """A registry file of an optimum-neuron Git cache repo, classified from its path alone."""

    compiler_version: str
    #: The optimum-neuron version that wrote it.
    on_version: str
    #: The folders between that version and the file: (arch digest,), (model_type, org, model), or with a mode.
    folders: tuple[str, ...]
    name: str


def parse_registry_path(compiler_version: str, path: str) -> RegistryPath | None:
    """`neuronxcc-<ver>/0_REGISTRY/<on ver>/<folders...>/<hash>.json` -> RegistryPath, None for anything else."""
    prefix = registry_prefix(compiler_version) + "/"
    if not isinstance(path, str) or not path.startswith(prefix):
        return None
    parts = path[len(prefix):].split("/")
    if not 3 <= len(parts) <= 6 or not _ON_VERSION_RE.match(parts[0]) or not _REGISTRY_NAME_RE.match(parts[-1]):
        return None
    if any(not part or part in (".", "..") or not _HUB_NAME_RE.match(part) for part in parts[1:-1]):
        return None
    return RegistryPath(compiler_version, parts[0], tuple(parts[1:-1]), parts[-1])


def pr1102_area_prefix(compiler_version: str, model_id: str, task: str) -> str | None:
    """A model's area in the layout of optimum-neuron PR #1102 (`neuronxcc-<ver>/<org>/<name>/<task>`), or None
    for a model id that layout cannot name (a local directory)."""
    folder = hub_model_folder(model_id)
    if folder is None:
        return None
    return f"{version_prefix(compiler_version)}/{model_id}/{task}"


def pr1102_exports_prefix(area_prefix: str) -> str:
    """The folder of a PR #1102 area's records (`exports/<optimum-neuron version>/<8 hex>.json` below it)."""
    return f"{area_prefix}/{EXPORTS_DIR}"


def is_pr1102_record_path(area_prefix: str, path: str) -> bool:
    """Whether `path` is `<area>/exports/<optimum-neuron version>/<8 hex>.json`."""
    if not isinstance(path, str) or not path.startswith(pr1102_exports_prefix(area_prefix) + "/"):
        return False
    parts = path[len(pr1102_exports_prefix(area_prefix)) + 1:].split("/")
    return len(parts) == 2 and bool(_ON_VERSION_RE.match(parts[0])) and bool(_PR1102_RECORD_RE.match(parts[1]))


# ------------------------------------------------------------------ whole-bucket walks (prune, scrub, du)
#
# Bucket lifecycle commands see every path of a bucket, not one model's area: these classify a listed path
# wherever it is, and build the paths of what they remove. Nothing else builds or splits bucket paths.

#: Oldest and newest times a listing may give (2000-01-01 to 2200-01-01): anything else is corrupt or hostile.
_MIN_TIME, _MAX_TIME = 946684800.0, 7258118400.0


def listed_time(item: Mapping[str, Any]) -> float | None:
    """When a listed file was written to the bucket (seconds since the epoch, the server's `uploaded`), or
    None when the listing does not say or says something that is not a plausible time. Never the Hub's
    `mtime`: that is the uploader's local file time, which may be far older than the upload."""
    value = item.get("uploaded")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _MIN_TIME <= value <= _MAX_TIME:
        return None  # the range test is also false for NaN
    return float(value)


@dataclass(frozen=True)
class BucketPath:
    """A listed path, classified: its compiler version and its place there (see VersionPath)."""

    compiler_version: str
    where: VersionPath


def classify_path(path: str) -> BucketPath | None:
    """Any bucket path as the layout places it, or None for a name the layout does not allow."""
    top = path.split("/", 1)[0]
    version = parse_version_prefix(top)
    if version is None:
        return None
    where = split_version_path(version, path)
    return BucketPath(version, where) if where is not None else None


def area_prefix_of(compiler_version: str, area: str) -> str:
    """The folder of an area as VersionPath names it: "" is the flat area, else `<model folder>/<task>`."""
    if not area:
        return version_prefix(compiler_version)
    folder, _, task = area.partition("/")
    return model_area_prefix(compiler_version, folder, task)


def entry_prefix_of(compiler_version: str, area: str, module: str) -> str:
    """An entry's folder in the flat area (area "") or a model's area (`<model folder>/<task>`)."""
    return area_entry_prefix(area_prefix_of(compiler_version, area), module)


def entry_file_of(compiler_version: str, area: str, module: str, filename: str) -> str:
    """A file of an entry in the flat area (area "") or a model's area (`<model folder>/<task>`)."""
    return area_file_path(area_prefix_of(compiler_version, area), module, filename)


def record_file_of(compiler_version: str, area: str, record_file: str) -> str:
    """An export record of a model's area (`<model folder>/<task>`), by file name."""
    return area_record_path(area_prefix_of(compiler_version, area), record_file)


def area_folder(area: str) -> str:
    """The model folder of an area (`<model folder>/<task>` -> `<model folder>`); "" for the flat area."""
    return area.partition("/")[0]


# ----------------------------------------------------------------------------------------- leases


def leases_prefix(compiler_version: str | None = None) -> str:
    """The folder of the compile leases (of one compiler version when given)."""
    return LEASES_DIR if compiler_version is None else f"{LEASES_DIR}/{version_prefix(compiler_version)}"


def lease_path(compiler_version: str, module: str) -> str:
    """The lease on compiling one graph: `leases/neuronxcc-<ver>/MODULE_<key>.lease`."""
    if not is_module_name(module):
        raise ValueError(f"bad module name {module!r}")
    return f"{leases_prefix(compiler_version)}/{module}{LEASE_SUFFIX}"


@dataclass(frozen=True)
class LeasePath:
    """A lease file found in a listing: which compiler version and graph it is for."""

    compiler_version: str
    module: str


def parse_lease_path(path: str) -> LeasePath | None:
    """`leases/neuronxcc-<ver>/MODULE_<key>.lease` -> LeasePath, or None for anything else (untrusted)."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != LEASES_DIR or not parts[2].endswith(LEASE_SUFFIX):
        return None
    version = version_from_dir_name(parts[1])
    module = parts[2][: -len(LEASE_SUFFIX)]
    if version is None or not is_module_name(module):
        return None
    return LeasePath(version, module)
