"""A `neuronx-cc` in front of the real one: on a local miss, the bucket's flat area is asked for the exact MODULE.

libneuronxla's wrapper calls the compiler by name, through PATH, once per graph that its local cache lacks:

    neuronx-cc compile --framework=XLA <workdir>/model.MODULE_<hlo key>+<flags hash>.hlo_module.pb \\
        --output <workdir>/model.MODULE_<hlo key>+<flags hash>.neff --target=trn1 ... --verbose=35

The MODULE name in those file names is the cache key. Put this shim first on PATH
(`install_compiler_shim(dir)` then `PATH=dir:$PATH`, or `compiler_shim_on_path()` in-process) and each call:

1. looks up `neuronxcc-<ver>/MODULE_.../` in the bucket's flat area (one paths-info request, which also asks
   for the host's cached failures: those the flat area holds complete are swapped for it, fetch.py);
2. if the entry is complete there (its NEFF and its commit file), downloads the NEFF, checks its size
   against the listing, and renames it onto `--output`: the compiler is never run, and libneuronxla
   installs the NEFF into its cache as if it had compiled it;
3. else takes the graph's compile lease (compile_leases.py): when another host holds a live one, it waits
   for that host's entry and installs it as in 2, without compiling; an abandoned lease is taken over;
4. else (or holding the lease) runs the real compiler, unchanged (same arguments, stdin/stdout/stderr, exit
   code), renewing the lease meanwhile, and when it succeeds publishes the entry to the flat area: the HLO
   and flags libneuronxla put in its cache entry, the new NEFF, then `model.done`, content before commit
   file. Then it drops the lease.

This gives hits across models that share graphs, which no per-model fetch can.

Safety:
- anything the shim does not recognize exactly (`--version`, other frameworks, no MODULE-named input, an
  output that is not a `.neff` named after the same MODULE, a remote entry with `wrapped_neff.hlo`, whose
  destination the command line does not say) goes to the real compiler untouched, by `exec`;
- the real compiler is the first `neuronx-cc` on PATH that is not a shim (or NEURON_CACHE_REAL_COMPILER),
  and it runs with the shim's directories removed from PATH and NEURON_CACHE_SHIM_INSIDE=1 set, so
  nothing can recurse;
- the bucket being unreachable costs one warning line and the compile runs as without the shim; a host-wide
  note then makes the following calls skip the bucket for NEURON_CACHE_SHIM_BACKOFF seconds (default 300);
- `--output` appears only whole (temp file in the same folder, size check, rename); nothing is ever written
  into the compile cache by the shim: libneuronxla stays the only writer of its entries.

Environment: NEURON_CACHE_SHIM=0 makes the shim a pure pass-through; NEURON_CACHE_SHIM_PUBLISH=0 turns
publishing off; NEURON_CACHE_LEASES=0 turns compile leases off (NEURON_CACHE_LEASE_* tune them). The bucket, cache dir and compiler version resolve as everywhere else (NEURON_CACHE_BUCKET,
NEURON_CC_FLAGS / NEURON_COMPILE_CACHE_URL, the installed neuronx-cc or NEURON_CC_VERSION).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from .. import settings
from ..errors import ConfigurationError

from ..atomic import RefusedStateFile, atomic_write, open_state_file, read_state_file, read_state_json
from ..processes import alive, pid_start

if TYPE_CHECKING:
    from ..client import BucketClient
    from ..compile_leases import LeaseKeeper, Waited
    from ..local_cache import LocalEntry

SHIM_MARKER = "optimum-neuron-cache compiler shim"
COMPILER_NAME = "neuronx-cc"
ENV_INSIDE = settings.SHIM_INSIDE
ENV_REAL = settings.REAL_COMPILER
ENV_SHIM = settings.SHIM
ENV_PUBLISH = settings.SHIM_PUBLISH
ENV_BACKOFF = settings.SHIM_BACKOFF
_T = TypeVar("_T")

#: Cached failures asked about per lookup, at most: with its own graph, the paths-info stays one request upstream.
MAX_FAILURES_ASKED = 100

_INPUT_RE = re.compile(r"(MODULE_[0-9A-Za-z]+\+[0-9A-Za-z]+)\.(hlo_module\.pb|hlo\.pb)$")


def _say(message: str) -> None:
    print(f"optimum-neuron-cache: {message}", file=sys.stderr, flush=True)


def _setting(read: Callable[[Mapping[str, str]], _T], environ: Mapping[str, str], default: _T) -> _T:
    """A shim setting, or its default with one line when it is malformed: a typo never costs the compile."""
    try:
        return read(environ)
    except ConfigurationError as exc:
        _say(f"{exc} (using {default!r})")
        return default


# ------------------------------------------------------------------------------------ installation


#: Where the shim keeps the bytecode of what it imports when PYTHONDONTWRITEBYTECODE is set (under the user's cache
#: folder, as `$XDG_CACHE_HOME/optimum-neuron-cache/bytecode`, named by its source paths): the shim is one process
#: per graph, and without it each one compiled the package from source again (docs/performance.md).
BYTECODE_FOLDER = ("optimum-neuron-cache", "bytecode")


def _shim_script(python: str) -> str:
    folder = ", ".join(repr(part) for part in BYTECODE_FOLDER)
    return (f"#!{python}\n# {SHIM_MARKER}: looks compiled graphs up in the bucket before running the real neuronx-cc\n"
            "import os, sys\n"
            "if sys.dont_write_bytecode and sys.pycache_prefix is None:  # one process per graph: keep its bytecode\n"
            "    cache = os.path.abspath(os.path.expanduser(os.environ.get('XDG_CACHE_HOME') or '~/.cache'))\n"
            f"    sys.pycache_prefix, sys.dont_write_bytecode = os.path.join(cache, {folder}), False\n"
            "from optimum_neuron_cache.integrations.compiler_shim import main\nsys.exit(main())\n")


def install_compiler_shim(directory: str | os.PathLike[str], python: str | None = None) -> Path:
    """Write the shim as `<directory>/neuronx-cc` (atomically); put `directory` first on PATH to use it."""
    path = Path(directory).expanduser().absolute() / COMPILER_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _shim_script(python or sys.executable), mode=0o755)
    return path


def enable_compiler_shim(directory: str | os.PathLike[str] | None = None) -> Path:
    """Install the shim and put it first on this process's PATH (children, e.g. libneuronxla's wrapper,
    inherit it). Returns the shim's path. With no directory, a private temp directory is used."""
    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="neuron-cache-shim-"))
    shim = install_compiler_shim(folder)
    entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry).absolute() != shim.parent]
    os.environ["PATH"] = os.pathsep.join([str(shim.parent), *entries])
    return shim


@contextlib.contextmanager
def compiler_shim_on_path(directory: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """`enable_compiler_shim` for the length of a block; PATH is restored afterwards."""
    previous = os.environ.get("PATH")
    try:
        yield enable_compiler_shim(directory)
    finally:
        if previous is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = previous


def is_shim(path: str | os.PathLike[str]) -> bool:
    """Whether the executable at `path` is this shim (by its marker line), so it is never taken for the real
    compiler."""
    try:
        with open(path, "rb") as handle:
            return SHIM_MARKER.encode() in handle.read(4096)
    except OSError:
        return False


def find_real_compiler(environ: Mapping[str, str], me: str | None = None) -> tuple[str | None, list[str]]:
    """(the real neuronx-cc, the PATH entries holding shims). NEURON_CACHE_REAL_COMPILER wins when it is
    not a shim itself; else the first `neuronx-cc` on PATH that is neither this script nor a shim."""
    me_real = os.path.realpath(me) if me else None
    shim_dirs: list[str] = []
    found = None
    for entry in environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(entry or ".", COMPILER_NAME)
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        if (me_real and os.path.realpath(candidate) == me_real) or is_shim(candidate):
            shim_dirs.append(entry)
            continue
        if found is None:
            found = candidate
    explicit = settings.real_compiler(environ)
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK) and not is_shim(explicit):
            return explicit, shim_dirs
        _say(f"{ENV_REAL}={explicit} is not an executable compiler; using PATH")
    return found, shim_dirs


# ---------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class CompileRequest:
    """A `neuronx-cc compile` call of libneuronxla's, for one cache entry."""

    module: str
    #: The HLO file the compiler was given, and its name in a cache entry (`model.hlo_module.pb`).
    hlo_path: Path
    hlo_name: str
    output: Path


def parse_compile_request(argv: list[str]) -> CompileRequest | None:
    """The request, when the command line is exactly libneuronxla's compile of one MODULE; else None."""
    if "compile" not in argv:
        return None
    framework = output = None
    inputs: list[tuple[str, re.Match[str]]] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in ("--output", "--framework") and index + 1 < len(argv):
            value = argv[index + 1]
            if token == "--output":
                output = value
            else:
                framework = value
            index += 2
            continue
        if token.startswith("--output="):
            output = token.split("=", 1)[1]
        elif token.startswith("--framework="):
            framework = token.split("=", 1)[1]
        elif not token.startswith("-"):
            match = _INPUT_RE.search(os.path.basename(token))
            if match:
                inputs.append((token, match))
        index += 1
    if (framework or "").upper() != "XLA" or output is None or len(inputs) != 1:
        return None
    source, match = inputs[0]
    module = match.group(1)
    out_name = os.path.basename(output)
    if not out_name.endswith(".neff") or module not in out_name or not os.path.isfile(source):
        return None
    return CompileRequest(module=module, hlo_path=Path(source), hlo_name=f"model.{match.group(2)}", output=Path(output))


# ------------------------------------------------------------------------------------ the bucket side


class _Shim:
    def __init__(self, request: CompileRequest, environ: Mapping[str, str], real: str) -> None:
        from ..local_cache import resolve_cache_root

        self.request = request
        self.env = environ
        self.real = real
        root = resolve_cache_root(None, environ)
        self.root = root.path
        self.version = self._compiler_version()
        self.backoff = _setting(settings.shim_backoff, environ, 300.0)

    # -- which compiler version's folder this compile belongs to
    def _compiler_version(self) -> str | None:
        from ..local_cache import iter_version_dirs
        from ..neuron_sdk import ENV_COMPILER_VERSION, neuronx_cc_version, validate_compiler_version

        if self.root is not None:  # libneuronxla made the entry (and holds its lock) before calling us
            owners = [version for version, folder in iter_version_dirs(self.root) if (folder / self.request.module).is_dir()]
            if len(owners) == 1:
                return owners[0]
        version = neuronx_cc_version()
        if version:
            return version
        if self.env.get(ENV_COMPILER_VERSION):
            try:
                return validate_compiler_version(self.env[ENV_COMPILER_VERSION], source=ENV_COMPILER_VERSION)
            except ValueError:
                return None
        return self._probed_version()

    def _probed_version(self) -> str | None:
        """`<real compiler> --version`, remembered per compiler binary (it takes seconds)."""
        from ..neuron_sdk import probe_compiler_version

        try:
            info = os.stat(self.real)
        except OSError:
            return None
        key = hashlib.sha256(f"{os.path.realpath(self.real)}\0{info.st_mtime_ns}\0{info.st_size}".encode()).hexdigest()[:24]
        memo = self._state_dir() / "compiler-versions.json"
        known = _read_json(memo)
        if isinstance(known.get(key), str):
            return known[key]
        version = probe_compiler_version(self.real)
        if version:
            _write_json(memo, {**known, key: version})
        return version

    def _state_dir(self) -> Path:
        from ..local_cache import STATE_DIR_NAME

        base = self.root / STATE_DIR_NAME / "shim" if self.root else Path(tempfile.gettempdir()) / f"optimum-neuron-cache-shim-{os.getuid()}"
        base.mkdir(parents=True, exist_ok=True)
        return base

    # -- the host-wide "bucket is down" note
    def _breaker(self, bucket: str) -> Path:
        return self._state_dir() / f"down-{hashlib.sha256(bucket.encode()).hexdigest()[:16]}"

    def bucket_down(self, bucket: str) -> bool:
        try:
            age = time.time() - self._breaker(bucket).stat().st_mtime
        except OSError:
            return False
        return age < self.backoff

    def note_down(self, bucket: str) -> None:
        with contextlib.suppress(OSError):
            self._breaker(bucket).touch()

    # -- the run's waits on other hosts' leases: NEURON_CACHE_LEASE_MAX_WAIT bounds them all together
    def _waits(self) -> Path | None:
        """The note of the seconds this run waited (one line per wait). The run is the process that calls the
        compiler (libneuronxla's, or neuron_parallel_compile's), known by its pid and start time."""
        parent = os.getppid()
        start = pid_start(parent)
        try:
            return None if start is None else self._state_dir() / "waits" / f"{parent}-{start}"
        except OSError:  # no state folder: each graph's wait is bounded alone
            return None

    def run_waited(self) -> float:
        """Seconds this run already waited on other hosts' leases (a note that cannot be read counts as 0)."""
        path = self._waits()
        try:
            raw = read_state_file(path, 1 << 16) if path is not None else b""
        except OSError:  # missing, or not a note of ours
            raw = b""
        total = 0.0
        for line in raw.split(b"\n"):
            with contextlib.suppress(ValueError):
                seconds = float(line)
                if 0.0 <= seconds <= 1e7:  # also false for NaN
                    total += seconds
        return total

    def note_run_wait(self, seconds: float) -> None:
        """Add a wait to the run's note (appended: concurrent compiles of the run each add theirs), and drop
        the notes of runs that are gone."""
        path = self._waits()
        if path is None or seconds <= 0:
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(exist_ok=True)
            fd = open_state_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, f"{seconds:.3f}\n".encode())
            finally:
                os.close(fd)
            for name in os.listdir(path.parent):
                pid, _, start = name.partition("-")
                if pid.isdecimal() and start.isdecimal() and not alive(int(pid), int(start)):
                    with contextlib.suppress(OSError):
                        os.unlink(path.parent / name)

    # -- lookup
    def try_install(self) -> bool:
        """Install the NEFF from the flat area onto --output. True on a hit; False to compile."""
        from .. import remote_layout as layout
        from ..buckets import embedded_default, resolve_bucket
        from ..client import BucketClient
        from ..errors import BucketNotFoundError, NeuronCacheError
        from ..fetch import complete_flat_entries, download_checked, flat_manifests, flat_probe_paths

        if self.version is None:
            return False
        bucket = resolve_bucket(None, self.env)
        if self.bucket_down(str(bucket)):
            return False
        prefix = layout.flat_entry_prefix(self.version, self.request.module)
        failed = self.cached_failures()
        try:
            client = BucketClient(bucket, self.env)
            info = client.paths_info(flat_probe_paths(self.version, [self.request.module, *(e.name for e in failed)]))
        except BucketNotFoundError:
            if bucket != embedded_default(self.env):
                _say(f"bucket {bucket} not found; compiling")
            return False
        except ConfigurationError as exc:  # a bad setting, not a bad bucket: no backoff note
            _say(f"{exc} (compiling without the bucket)")
            return False
        except (NeuronCacheError, OSError) as exc:
            self.note_down(str(bucket))
            _say(f"bucket lookup skipped, {bucket}: {exc} (compiling; the bucket is skipped for {self.backoff:g}s)")
            return False
        if failed:
            self.heal(client, failed, info)
        files = complete_flat_entries(self.version, info).get(self.request.module)
        if files is None:
            return False
        if "wrapped_neff.hlo" in files:
            return False  # the compile would also have to produce it, and the command line does not say where
        remote_hlo = files.get(self.request.hlo_name)
        if remote_hlo is not None and remote_hlo.size != self.request.hlo_path.stat().st_size:
            _say(f"{self.request.module} in {bucket} has another HLO than this compile's; compiling")
            return False
        output = self.request.output
        staging = Path(tempfile.mkdtemp(prefix=".neuron-cache-", dir=output.parent))
        try:
            staged = staging / "model.neff"
            try:
                problems = download_checked(client, [(files["model.neff"], staged)],
                                            flat_manifests(self.version, info, [self.request.module]))
            except (NeuronCacheError, OSError) as exc:
                self.note_down(str(bucket))
                _say(f"download of {prefix}/model.neff failed: {exc}; compiling")
                return False
            if problems:
                _say(f"{problems[staged]}; compiling")
                return False
            os.replace(staged, output)
        finally:
            for leftover in staging.iterdir() if staging.exists() else []:
                leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                staging.rmdir()
        self.note_served()
        _say(f"{self.request.module}: cached NEFF from {bucket} (neuronxcc-{self.version}), no compile")
        return True

    def note_served(self) -> None:
        """One line `MODULE` appended to NEURON_CACHE_SHIM_REPORT when set (`parallel-compile run` sets it): the
        graphs served without a compile, which the run reports as fetched, not compiled. Best effort."""
        path = self.env.get(settings.SHIM_REPORT)
        if not path:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{self.request.module}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            _say(f"{self.request.module} not noted in {settings.SHIM_REPORT} ({exc})")

    # -- cached failures of this host, healed by the flat area (asked in the lookup's paths-info)
    def cached_failures(self) -> "list[LocalEntry]":
        """This compiler version's cached failures (model.log) in the local cache, which libneuronxla replays (the
        first MAX_FAILURES_ASKED by name)."""
        from ..local_cache import EntryState, scan_entries

        if self.root is None or self.version is None:
            return []
        failed = [entry for entry in scan_entries(self.root, self.version) if entry.state is EntryState.FAILED]
        return failed[:MAX_FAILURES_ASKED]

    def heal(self, client: "BucketClient", failed: "list[LocalEntry]", info: list[dict[str, object]]) -> None:
        """Swap the cached failures whose complete entry the flat area holds for the bucket's, and say so (one
        line). Anything going wrong costs one line, never the lookup of this compile's own graph."""
        from ..fetch import heal_from_flat, heal_line

        assert self.root is not None and self.version is not None
        try:
            result = heal_from_flat(client, self.root, self.version, failed, info)
        except Exception as exc:
            _say(f"cached failures not replaced by the bucket's entries ({type(exc).__name__}: {exc})")
            return
        if line := heal_line(result.healed, self.version):
            _say(line)

    # -- read-through upstreams (on a bucket miss)
    def try_upstreams(self) -> bool:
        """Install the NEFF from the first upstream (NEURON_CACHE_UPSTREAM, `neuron-cache set --upstream`) whose
        flat area holds this graph complete. True on a hit (the caller then publishes it to the bucket)."""
        from ..errors import NeuronCacheError
        from ..upstreams import configured_upstreams, find_entry, install_neff

        if self.version is None:
            return False
        try:
            upstreams = configured_upstreams(self.env)
        except ConfigurationError as exc:
            _say(f"{exc} (compiling without upstreams)")
            return False
        for upstream in upstreams:
            if self.bucket_down(str(upstream)):
                continue
            try:
                hit = find_entry(upstream, self.version, self.request.module, self.env)
                if hit is None or "wrapped_neff.hlo" in hit.files:
                    continue
                remote_hlo = hit.files.get(self.request.hlo_name)
                if remote_hlo is not None and remote_hlo.size != self.request.hlo_path.stat().st_size:
                    continue
                problem = install_neff(hit.client, hit.files["model.neff"], self.request.output)
            except ConfigurationError as exc:
                _say(f"{exc} (upstream {upstream} skipped)")
                continue
            except (NeuronCacheError, OSError) as exc:
                self.note_down(str(upstream))
                _say(f"upstream lookup skipped, {upstream}: {exc} (skipped for {self.backoff:g}s)")
                continue
            if problem:
                _say(f"{problem} (upstream {upstream})")
                continue
            self.note_served()
            _say(f"{self.request.module}: cached NEFF from upstream {upstream} (neuronxcc-{self.version}), no compile")
            return True
        return False

    # -- publish
    def publish(self) -> bool | None:
        """Publish the freshly compiled entry to the flat area: libneuronxla's HLO and flags, our NEFF, done.
        Entries that earlier compiles of this host left in the journal of the flat area go with it. True when
        this call published the entry, False when the bucket had it already (another host compiled it too),
        None when nothing was tried or it failed."""
        import shutil

        from .. import remote_layout as layout
        from ..buckets import embedded_default, resolve_bucket
        from ..client import BucketClient
        from ..errors import NeuronCacheError
        from ..host_state import HostState
        from ..journal import JournalKey
        from ..local_cache import FLAGS_FILES, read_entry, version_dir_name
        from ..neuron_sdk import writes_done_marker
        from ..publish import defer, publish_leftovers

        if self.version is None or self.root is None or not self.request.output.is_file():
            return None
        entry_dir = self.root / version_dir_name(self.version) / self.request.module
        flags = [name for name in FLAGS_FILES if (entry_dir / name).is_file() and not (entry_dir / name).is_symlink()]
        if not flags:
            return None  # not libneuronxla's layout: the cache is published by the next context or `neuron-cache sync`
        bucket = resolve_bucket(None, self.env)
        key = JournalKey(str(bucket), self.version, None, layout.DEFAULT_TASK)
        if self.bucket_down(str(bucket)):
            with contextlib.suppress(OSError):
                defer(self.root, key, [self.request.module])
            return None
        state = HostState(self.root)
        try:
            with state.temp_dir() as tmp:
                staged = tmp / self.request.module
                staged.mkdir()
                hlo = entry_dir / self.request.hlo_name
                shutil.copyfile(hlo if hlo.is_file() and not hlo.is_symlink() else self.request.hlo_path, staged / self.request.hlo_name)
                shutil.copyfile(entry_dir / flags[0], staged / flags[0])
                shutil.copyfile(self.request.output, staged / "model.neff")
                if writes_done_marker(self.version):
                    (staged / "model.done").write_bytes(b"")
                entry = read_entry(staged, self.version)
                if not entry.state.publishable:
                    return None
                client = BucketClient(bucket, self.env)
                publication = publish_leftovers(client, self.root, key, area=None, with_entries=[entry],
                                                create_bucket=bucket == embedded_default(self.env))
            if publication is not None and self.request.module in publication.result.published:
                _say(f"{self.request.module}: published to {bucket} ({layout.flat_entry_prefix(self.version, self.request.module)})")
                return True
            if publication is not None and self.request.module in publication.plan.present:
                return False
            return None
        except (NeuronCacheError, OSError) as exc:
            self.note_down(str(bucket))
            _say(f"publication of {self.request.module} skipped, {bucket}: {exc} (journaled for the next run)")
            return None

    # -- compile leases
    def lease_keeper(self) -> "LeaseKeeper | None":
        """The keeper of this compile's lease, or None: leases off, the bucket known down, no version."""
        from ..buckets import resolve_bucket
        from ..client import BucketClient
        from ..compile_leases import LeaseKeeper, LeaseSettings

        if self.version is None or not _setting(settings.leases_enabled, self.env, True):
            return None
        bucket = resolve_bucket(None, self.env)
        if self.bucket_down(str(bucket)):
            return None
        lease_settings = _setting(LeaseSettings.from_env, self.env, LeaseSettings())
        return LeaseKeeper(BucketClient(bucket, self.env), self.version, lease_settings)


# --------------------------------------------------------------------------------------- the command


def _child_env(environ: Mapping[str, str], shim_dirs: list[str]) -> dict[str, str]:
    env = dict(environ)
    drop = {os.path.realpath(entry or ".") for entry in shim_dirs}
    env["PATH"] = os.pathsep.join(entry for entry in environ.get("PATH", "").split(os.pathsep)
                                  if os.path.realpath(entry or ".") not in drop)
    env[ENV_INSIDE] = "1"
    return env


def _run(real: str, argv: list[str], env: dict[str, str]) -> int:
    """Run the real compiler as a child (stdio inherited), forwarding SIGTERM/SIGINT; its exit code."""
    process = subprocess.Popen([real, *argv], env=env)
    previous = {}

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            previous[signum] = signal.signal(signum, forward)
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    """The shim as `neuronx-cc`: a hit installs the NEFF and exits 0; anything else runs the real compiler and
    returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    real, shim_dirs = find_real_compiler(env, sys.argv[0] if sys.argv and sys.argv[0] else None)
    if real is None:
        _say(f"no real {COMPILER_NAME} found on PATH after the shim (install the Neuron SDK, or set {ENV_REAL})")
        return 127
    child_env = _child_env(env, shim_dirs)
    request = None
    if not settings.shim_inside(env) and _setting(settings.shim_enabled, env, True):
        request = parse_compile_request(argv)
    if request is None:  # not ours to handle: become the real compiler (exit code, signals, stdio all preserved)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(real, [real, *argv], child_env)
    shim = None
    try:
        shim = _Shim(request, env, real)
        if shim.try_install():
            return 0
        if shim.try_upstreams():
            _publish_upstream_hit(shim, env)
            return 0
    except Exception as exc:  # our bug must never cost the compile
        _say(f"lookup failed unexpectedly ({type(exc).__name__}: {exc}); compiling")
    keeper = None
    if shim is not None:
        try:
            keeper = shim.lease_keeper()
        except Exception as exc:
            _say(f"compile lease skipped ({type(exc).__name__}: {exc}); compiling")
    if keeper is None:
        return _compile(shim, real, argv, child_env, env)
    return _compile_under_lease(shim, keeper, real, argv, child_env, env)


def _compile(shim: "_Shim | None", real: str, argv: list[str], child_env: dict[str, str], env: Mapping[str, str]) -> int:
    """Run the real compiler, then publish what it made; its exit code."""
    return _compile_and_publish(shim, real, argv, child_env, env)[0]


def _compile_and_publish(shim: "_Shim | None", real: str, argv: list[str], child_env: dict[str, str],
                         env: Mapping[str, str]) -> tuple[int, bool | None]:
    """(the real compiler's exit code, whether this call published the entry: see `_Shim.publish`)."""
    code = _run(real, argv, child_env)
    published = None
    if code == 0 and shim is not None and _setting(settings.shim_publish, env, True):
        try:
            published = shim.publish()
        except Exception as exc:
            _say(f"publication failed unexpectedly ({type(exc).__name__}: {exc})")
    return code, published


def _compile_under_lease(shim: "_Shim", keeper: "LeaseKeeper", real: str, argv: list[str], child_env: dict[str, str],
                         env: Mapping[str, str]) -> int:
    """Take the graph's lease, or wait for the host that holds it and install its entry; compile only when
    this host holds the lease, the wait ran out, or the bucket failed (one line each)."""
    from ..compile_leases import Action
    from ..errors import NeuronCacheError, RemoteInvalidDataError
    from ..stats import Stats, record_run

    module = shim.request.module
    figures = Stats()
    with keeper:
        waited = None
        began = time.monotonic()
        try:
            waited = wait_for_graph_here(keeper, module, shim.run_waited())
            if waited.waited:
                shim.note_run_wait(time.monotonic() - began)
        except (NeuronCacheError, OSError) as exc:
            if not isinstance(exc, RemoteInvalidDataError):  # a lease the bucket refused is this graph's problem
                shim.note_down(str(keeper.client.bucket))
            _say(f"compile lease of {module} skipped, {keeper.client.bucket}: {exc} (compiling)")
        except Exception as exc:
            _say(f"compile lease of {module} failed unexpectedly ({type(exc).__name__}: {exc}); compiling")
        if waited is not None and waited.decision.action is Action.FETCH:
            try:
                if shim.try_install():
                    if waited.waited:
                        record_run(Stats(lease_fetched_after_wait=1))
                    return 0
            except Exception as exc:
                _say(f"install after waiting failed unexpectedly ({type(exc).__name__}: {exc}); compiling")
        held = module in keeper.held
        code, published = _compile_and_publish(shim, real, argv, child_env, env)
        if held:
            figures.lease_compiled = 1
            try:
                released = keeper.release(module)
            except Exception as exc:  # the lease goes stale and is swept: nobody waits on it past `stale`
                _say(f"could not drop the compile lease of {module}: {exc}")
                released = True
            if not released or published is False:
                figures.lease_compiled_twice = 1
        elif published is False:
            figures.lease_compiled_twice = 1
    record_run(figures)
    return code


def _publish_upstream_hit(shim: _Shim, env: Mapping[str, str]) -> None:
    """What an upstream gave goes to the bucket now (the one publish path), so the next run finds it at home."""
    if not _setting(settings.shim_publish, env, True):
        return
    try:
        shim.publish()
    except Exception as exc:
        _say(f"publication of the upstream's entry failed unexpectedly ({type(exc).__name__}: {exc})")


def wait_for_graph_here(keeper: "LeaseKeeper", module: str, waited_before: float = 0.0) -> "Waited":
    """`compile_leases.wait_for_graph`, saying its waits, takeovers and give-ups on stderr."""
    from ..compile_leases import wait_for_graph

    return wait_for_graph(keeper, module, say=_say, waited_before=waited_before)


def _read_json(path: Path) -> dict[str, object]:
    """A memo of the shim's state folder: {} when missing or unreadable; one line when it is refused (not a
    regular file: a FIFO there is never waited on)."""
    try:
        return read_state_json(path) or {}
    except RefusedStateFile as exc:
        _say(f"ignoring {path} ({exc.why}): not a memo of this package's; the next write replaces it")
    except OSError:
        pass
    return {}


def _write_json(path: Path, data: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        atomic_write(path, json.dumps(data))


def real_compiler_besides(shim: Path) -> str | None:
    """The real compiler a shim installed at `shim` would run (PATH without the shim's folder), or None."""
    path = os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if os.path.realpath(entry or ".") != str(shim.parent))
    return find_real_compiler({**os.environ, "PATH": path}, str(shim))[0]


def install_main(argv: list[str] | None = None) -> int:
    """`python -m optimum_neuron_cache.integrations.compiler_shim DIR` is `neuron-cache shim install DIR`."""
    from ..cli import cli

    return cli.main(["shim", "install", *(sys.argv[1:] if argv is None else argv)], prog_name="neuron-cache")


if __name__ == "__main__":
    sys.exit(install_main())
