"""The local Neuron compile cache, as libneuronxla lays it out: where it is and what each entry is.

Reads the disk only: no network, no writes. Layout and states are described in docs/architecture.md:
`<root>/neuronxcc-<version>/MODULE_<hlo key>+<flags hash>/` holding the HLO, the flags, the NEFF and markers.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import settings
from .errors import ConfigurationError
from .neuron_sdk import ENV_CC_FLAGS, VERSION_PATTERN, cache_dir_from_flags, libneuronxla_cache_root, split_flags, writes_done_marker

DEFAULT_CACHE_ROOT = "/var/tmp/neuron-compile-cache"
ENV_CACHE_URL = "NEURON_COMPILE_CACHE_URL"

#: Where this project keeps its own bookkeeping (locks, temporary downloads) inside the cache root.
#: A dot folder: libneuronxla only looks at `neuronxcc-*` folders, and hf-mount users never sync it.
STATE_DIR_NAME = ".optimum-neuron-cache"

VERSION_DIR_PREFIX = "neuronxcc-"
DONE = "model.done"
NEFF = "model.neff"
LOG = "model.log"
HLO_FILES = ("model.hlo_module.pb", "model.hlo.pb")
FLAGS_FILES = ("compile_flags.json", "compile_flags.txt")
LOCK_SUFFIX = ".lock"

#: MODULE_<hlo key>+<flags hash>. Both halves are opaque (read, never recomputed) but must be plain
#: alphanumerics: a name that is not is noise (or an attack), never an entry.
_MODULE_RE = re.compile(r"^MODULE_[0-9A-Za-z]+\+[0-9A-Za-z]+$")
#: `neuronxcc-<version>`, the version as strict as `neuron_sdk.VERSION_PATTERN` (development builds such as
#: `neuronxcc-2.0.0.22266a0+a69f71e55` included): a folder name is hostile input, locally and in a bucket.
_VERSION_DIR_RE = re.compile(f"^neuronxcc-({VERSION_PATTERN})$")


def is_module_name(name: str) -> bool:
    """Whether `name` is an entry folder name: `MODULE_<alnum>+<alnum>`."""
    return bool(_MODULE_RE.fullmatch(name))


def version_from_dir_name(name: str) -> str | None:
    """The compiler version of a `neuronxcc-<version>` folder name, or None for anything else."""
    match = _VERSION_DIR_RE.fullmatch(name)
    return match.group(1) if match else None


def version_dir_name(compiler_version: str) -> str:
    """The folder name of a compiler version: `neuronxcc-<version>`."""
    return f"{VERSION_DIR_PREFIX}{compiler_version}"


# --------------------------------------------------------------------------------------------- root


@dataclass(frozen=True)
class CacheRoot:
    """The cache root libneuronxla would use, or why bucket sync cannot use it."""

    url: str
    #: The local directory, or None when the root is not a local path (s3://) or caching is off.
    path: Path | None
    #: Why sync is off (one line for the user), None when `path` is usable.
    disabled_reason: str | None = None
    #: Where the root came from: "argument", "--cache_dir in NEURON_CC_FLAGS", ... (for messages).
    source: str = "default"

    def require_directory(self, source: str | None = None) -> None:
        """Bad input, said in one line, when the root exists and is not a directory (a regular file)."""
        if self.path is not None and os.path.lexists(self.path) and not self.path.is_dir():
            raise ConfigurationError(f"the compile cache dir {self.path} (from {source or self.source}) is not a "
                                     "directory: pass a directory")


def resolve_cache_root(cache_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> CacheRoot:
    """Resolve the root with libneuronxla's precedence.

    1. `cache_dir` given by the caller (an override of this API, not of libneuronxla: the caller is then
       responsible for passing the same root to the compiler); 2. where libneuronxla is installed and
       `environ` is this process's, what libneuronxla itself answers (`CacheUrl.get_cache_url(<--cache_dir of
       NEURON_CC_FLAGS>).url`, as torch-neuronx's `neuron_parallel_compile` asks it); else 3. `--cache_dir` in
       NEURON_CC_FLAGS, 4. NEURON_COMPILE_CACHE_URL, 5. /var/tmp/neuron-compile-cache. `--no_cache` or an s3://
       root turns bucket sync off: it is reported through `disabled_reason`, never mistaken for a path.
    """
    env = os.environ if environ is None else environ
    flags = split_flags(env.get(ENV_CC_FLAGS, ""))
    if "--no_cache" in flags:
        return CacheRoot(
            url="", path=None, source=f"--no_cache in {ENV_CC_FLAGS}",
            disabled_reason=f"--no_cache is set in {ENV_CC_FLAGS}: the compiler caches nothing, so there is nothing to fetch or sync",
        )
    # libneuronxla reads os.environ: its answer is ours only for this process's own environment.
    from_sdk = libneuronxla_cache_root()[0] if cache_dir is None and env is os.environ else None
    if cache_dir is not None:
        url, source = os.fspath(cache_dir), "argument"
    elif from_sdk is not None:
        url, source = from_sdk, "libneuronxla (CacheUrl.get_cache_url)"
    elif (from_flags := cache_dir_from_flags(flags)) is not None:
        url, source = from_flags, f"--cache_dir in {ENV_CC_FLAGS}"
    elif env.get(ENV_CACHE_URL):
        url, source = env[ENV_CACHE_URL], ENV_CACHE_URL
    else:
        url, source = DEFAULT_CACHE_ROOT, "default"
    if not url.strip():
        raise ConfigurationError(f"the compile cache dir from {source} is empty: set it to a local directory")
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        return CacheRoot(
            url=url, path=None, source=source,
            disabled_reason=(
                f"the compile cache is {url} ({source}), which libneuronxla serves itself ({scheme}://); "
                "bucket sync needs a local cache dir"
            ),
        )
    local = url[len("file://") :] if url.startswith("file://") else url
    return CacheRoot(url=url, path=Path(local).expanduser().absolute(), source=source)


# ------------------------------------------------------------------------------------------ entries


class EntryState(str, enum.Enum):
    """What libneuronxla would make of an entry (see docs/architecture.md)."""
    SUCCESS = "success"
    LEGACY_SUCCESS = "legacy_success"  # compilers up to 2.14: a NEFF, no marker, no log (maybe a cached failure)
    FAILED = "failed"  # a cached compile failure (model.log), replayed by libneuronxla
    LOCKED = "locked"  # a compile in progress, or a stale lock left by a killed one
    TODO = "todo"  # HLO and flags only: what neuron_parallel_compile's extraction leaves
    INCOMPLETE = "incomplete"  # anything else: an interrupted compile or a partial copy

    @property
    def publishable(self) -> bool:
        """Only success entries ever leave the machine. A legacy entry (a NEFF alone, compilers up to 2.14)
        does only with NEURON_CACHE_PUBLISH_LEGACY=1: those compilers also cached failures as a NEFF
        (libneuronxla's "Got a cached failed neff"), so a NEFF alone does not prove a success."""
        if self is EntryState.LEGACY_SUCCESS:
            return settings.publish_legacy()
        return self is EntryState.SUCCESS


class EntryFiles(Mapping[str, int]):
    """The regular files directly inside an entry, name -> size. The names come from one read of the folder
    (the kernel's file types: symlinks and folders are left out, never followed); each size is read (lstat)
    the first time it is asked for, so that a warm run, which classifies its entries by their names only,
    makes no stat call per file. A file gone by then reads as 0 bytes."""

    __slots__ = ("_folder", "_names", "_order", "_sizes")

    def __init__(self, folder: str, names: Iterable[str]) -> None:
        self._folder = folder
        self._order = tuple(sorted(set(names)))
        self._names = frozenset(self._order)
        self._sizes: dict[str, int] = {}

    def __getitem__(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(name)
        size = self._sizes.get(name)
        if size is None:
            try:
                info = os.lstat(os.path.join(self._folder, name))
                size = info.st_size if stat.S_ISREG(info.st_mode) else 0
            except OSError:
                size = 0
            self._sizes[name] = size
        return size

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"EntryFiles({list(self._order)!r})"


def read_entry_files(path: Path) -> EntryFiles:
    """Regular files directly inside an entry (see EntryFiles). Symlinks and folders are ignored, never followed."""
    folder = os.fspath(path)
    names = []
    try:
        with os.scandir(folder) as it:
            for item in it:
                try:
                    if item.is_file(follow_symlinks=False):
                        names.append(item.name)
                except OSError:
                    continue
    except (FileNotFoundError, NotADirectoryError):
        return EntryFiles(folder, ())
    return EntryFiles(folder, names)


def classify(files: Mapping[str, int], compiler_version: str) -> EntryState:
    """The state libneuronxla would see for an entry holding `files` (see docs/architecture.md)."""
    names = set(files)
    if any(name.endswith(LOCK_SUFFIX) for name in names):
        return EntryState.LOCKED
    if DONE in names and NEFF in names:
        return EntryState.SUCCESS
    if LOG in names:
        return EntryState.FAILED
    if NEFF in names and DONE not in names and not writes_done_marker(compiler_version):
        return EntryState.LEGACY_SUCCESS
    if names & set(HLO_FILES) and names & set(FLAGS_FILES) and NEFF not in names and DONE not in names:
        return EntryState.TODO
    return EntryState.INCOMPLETE


@dataclass(frozen=True)
class LocalEntry:
    """One MODULE directory of the local cache."""

    compiler_version: str
    name: str  # MODULE_<hlo key>+<flags hash>
    path: Path
    state: EntryState
    files: Mapping[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`neuronxcc-<version>/MODULE_...`: the entry's path relative to the root, and in the flat area."""
        return f"{version_dir_name(self.compiler_version)}/{self.name}"


def commit_time(entry: LocalEntry) -> float | None:
    """When the entry became complete: the mtime of its commit file (`model.done`, else the NEFF of a legacy
    entry), read without following symlinks; None if it is gone."""
    name = DONE if DONE in entry.files else NEFF
    try:
        return os.lstat(entry.path / name).st_mtime
    except OSError:
        return None


def read_entry(path: Path, compiler_version: str) -> LocalEntry:
    """The entry at `path` (its regular files and its state); an empty entry when it is gone."""
    files = read_entry_files(path)
    return LocalEntry(compiler_version, path.name, path, classify(files, compiler_version), files)


def iter_version_dirs(root: Path) -> Iterator[tuple[str, Path]]:
    """(version, folder) for every `neuronxcc-<version>` folder under the root; other names are noise."""
    try:
        with os.scandir(root) as it:
            items = sorted(it, key=lambda item: item.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for item in items:
        version = version_from_dir_name(item.name)
        if version and item.is_dir(follow_symlinks=False):
            yield version, Path(item.path)


def scan_entries(root: Path, compiler_version: str | None = None) -> list[LocalEntry]:
    """Every MODULE entry under the root (of one compiler version, or all), sorted by key.

    Tolerates what else lives there: the root `lock` file, `0_REGISTRY/`, `MODULE_x` folders without `+`
    (whole traced models), legacy `USER_neuroncc-*` folders, stray files, symlinks.
    """
    entries: list[LocalEntry] = []
    for version, version_path in iter_version_dirs(root):
        if compiler_version is not None and version != compiler_version:
            continue
        try:
            with os.scandir(version_path) as it:
                items = sorted(it, key=lambda item: item.name)
        except OSError:
            continue
        for item in items:
            if is_module_name(item.name) and item.is_dir(follow_symlinks=False):
                entries.append(read_entry(Path(item.path), version))
    return entries
