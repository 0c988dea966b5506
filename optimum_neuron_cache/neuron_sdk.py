"""What the Neuron SDK on this machine says, when it is there.

The SDK is published on AWS's Neuron pip repository only; PyPI's `neuronx-cc`, `libneuronxla` and
`torch-neuronx` are placeholders whose import raises ImportError("WRONG PACKAGE ..."). Every read here
catches that, so the package works (with an explicit compiler version) where the SDK is absent.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import CompilerVersionError

#: neuronx-cc versions look like 2.21.33363.0+82129205 (the +hash part is absent from pip metadata); early
#: development builds have letters in the fourth part, as in the folder `neuronxcc-2.0.0.22266a0+a69f71e55`.
#: Every part is bounded and ASCII (`\d` would take any Unicode digit): the version names a folder, locally
#: and in a bucket, so nothing else may pass.
VERSION_PATTERN = r"[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,9}(?:\.[0-9]{1,12}[0-9a-z]{0,12})?(?:\+[0-9a-zA-Z]{1,40})?"
_VERSION_RE = re.compile(f"^{VERSION_PATTERN}$")

ENV_COMPILER_VERSION = "NEURON_CC_VERSION"
ENV_CC_FLAGS = "NEURON_CC_FLAGS"


def split_flags(value: str) -> list[str]:
    """NEURON_CC_FLAGS as tokens; a string shlex cannot parse (an odd quote) falls back to whitespace."""
    try:
        return shlex.split(value)
    except ValueError:
        return value.split()


def last_flag_value(flags: list[str], name: str) -> str | None:
    """The value of the last `NAME=X` or `NAME X` in compiler flags (an argparse parser keeps the last one)."""
    found = None
    for index, token in enumerate(flags):
        if token.startswith(f"{name}="):
            found = token.split("=", 1)[1]
        elif token == name and index + 1 < len(flags):
            found = flags[index + 1]
    return found


def cache_dir_from_flags(flags: list[str]) -> str | None:
    """The value of the last --cache_dir=X or --cache_dir X, as libneuronxla's parser keeps the last one."""
    return last_flag_value(flags, "--cache_dir")


@dataclass(frozen=True)
class SdkInfo:
    """Versions of the Neuron SDK packages that import on this machine (None: absent or a placeholder)."""

    neuronx_cc: str | None
    libneuronxla: str | None
    torch_neuronx: str | None


def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # ImportError of PyPI's placeholders, or a broken install: the SDK is not usable
        return None
    version = getattr(module, "__version__", None)
    return str(version) if version else None


@lru_cache(maxsize=1)
def sdk_info() -> SdkInfo:
    """Detect the SDK once per process (imports are slow and the answer does not change)."""
    return SdkInfo(
        neuronx_cc=_module_version("neuronxcc"),
        libneuronxla=_module_version("libneuronxla"),
        torch_neuronx=_module_version("torch_neuronx"),
    )


def validate_compiler_version(version: str, *, source: str) -> str:
    """Return `version` stripped, or raise a one-line error naming where it came from."""
    version = version.strip()
    if version.startswith("neuronxcc-"):
        version = version[len("neuronxcc-") :]
    if not _VERSION_RE.fullmatch(version):
        raise CompilerVersionError(
            f"compiler version {version!r} from {source} is not a neuronx-cc version "
            "(expected e.g. 2.21.33363.0+82129205, as printed by `neuronx-cc --version`)"
        )
    return version


def resolve_compiler_version(explicit: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The neuronx-cc version whose cache entries to fetch and publish.

    An explicit argument wins (warming a cache for another fleet is legitimate; a mismatch with the installed
    compiler is warned about); then the installed compiler's `neuronxcc.__version__` (or the version libneuronxla
    reports, when neuronxcc itself does not import); then NEURON_CC_VERSION.
    Never guessed from the cache's folders.
    """
    return compiler_version_and_source(explicit, environ)[0]


def compiler_version_and_source(explicit: str | None = None,
                                environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The compiler version (as `resolve_compiler_version`) and where it came from."""
    env = os.environ if environ is None else environ
    installed, source = sdk_info().neuronx_cc, "the installed neuronx-cc"
    if not installed:  # libneuronxla without an importable neuronxcc may still say which compiler it drives
        lib = libneuronxla_info()
        installed, source = (lib.compiler_version if lib else None), "libneuronxla"
    if explicit:
        version = validate_compiler_version(explicit, source="the compiler_version argument")
        if installed and version != installed:
            logging.getLogger("optimum_neuron_cache").warning(
                "optimum-neuron-cache: compiler_version %s differs from the installed neuronx-cc %s: its entries "
                "live in neuronxcc-%s, which this compiler does not read", version, installed, version,
            )
        return version, "argument"
    if installed:
        return validate_compiler_version(installed, source="neuronxcc.__version__"), source
    from_env = env.get(ENV_COMPILER_VERSION)
    if from_env:
        return validate_compiler_version(from_env, source=ENV_COMPILER_VERSION), ENV_COMPILER_VERSION
    raise CompilerVersionError(
        "cannot tell the neuronx-cc version: the Neuron SDK is not installed here; "
        f"pass compiler_version=... (CLI: --compiler-version) or set {ENV_COMPILER_VERSION}=2.21.33363.0+82129205"
    )


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 21, 33363, 0) for 2.21.33363.0+82129205, (2, 0, 0, 22266) for 2.0.0.22266a0: for comparisons such
    as 'up to 2.14' (a development build's letters are ignored)."""
    return tuple(int(re.match(r"[0-9]*", part).group() or 0) for part in version.split("+", 1)[0].split("."))


def writes_done_marker(version: str) -> bool:
    """Compilers 2.15 and newer write `model.done` last; older ones have no marker."""
    return version_tuple(version)[:2] >= (2, 15)


# ------------------------------------------------------------------------------------ libneuronxla
#
# libneuronxla is what actually reads and writes the compile cache (its `neuron_cc_wrapper` calls
# `neuronx-cc`). When it is installed, it is the authority on two things this package otherwise derives:
# the cache root (`libneuronxla.neuron_cc_cache.CacheUrl.get_cache_url()`) and the compiler version whose
# `neuronxcc-<version>` folder it uses. Everything below is read duck-typed and best effort: an SDK that
# moved an attribute costs a `None`, never an exception.

#: `neuronx-cc --version` prints e.g. "NeuronX Compiler version 2.21.33363.0+82129205".
_VERSION_IN_TEXT_RE = re.compile(rf"(?<![\w.])({VERSION_PATTERN})(?![\w.+])")


@dataclass(frozen=True)
class LibneuronxlaInfo:
    """What an installed libneuronxla says (None fields: it could not be read)."""

    version: str | None
    #: The compile cache root libneuronxla resolves (a path, or an s3:// URL).
    cache_url: str | None
    #: The neuronx-cc version libneuronxla compiles with, hence its `neuronxcc-<version>` folder.
    compiler_version: str | None
    #: Where `compiler_version` came from ("libneuronxla", "neuronxcc"), or None.
    compiler_version_source: str | None = None
    #: What could not be read, one line (None when everything was).
    problem: str | None = None


def _valid_version(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value.startswith("neuronxcc-"):
        value = value[len("neuronxcc-") :]
    return value if _VERSION_RE.fullmatch(value) else None


def _libneuronxla_cache_url(cache_module: object, cache_dir: str | None) -> str | None:
    """`CacheUrl.get_cache_url(cache_dir).url`, called as torch-neuronx's `neuron_parallel_compile` and Ray's
    Neuron backend call it: with the `--cache_dir` of NEURON_CC_FLAGS (None when there is none), since
    libneuronxla's own resolution without the argument ignores that flag."""
    cache_url_cls = getattr(cache_module, "CacheUrl", None)
    get_cache_url = getattr(cache_url_cls, "get_cache_url", None)
    if not callable(get_cache_url):
        return None
    url = get_cache_url(cache_dir)
    value = getattr(url, "url", None)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return url.strip() if isinstance(url, str) and url.strip() else None


def _libneuronxla_compiler_version(modules: list[object]) -> str | None:
    """The compiler version libneuronxla itself reports, through whichever helper this SDK release has."""
    for module in modules:
        for name in ("get_neuronxcc_version", "get_compiler_version", "neuronxcc_version", "compiler_version"):
            value = getattr(module, name, None)
            try:
                value = value() if callable(value) else value
            except Exception:
                continue
            version = _valid_version(value)
            if version:
                return version
    return None


@dataclass(frozen=True)
class _Libneuronxla:
    """The installed libneuronxla, imported once per process."""

    version: str | None
    cache_module: object | None
    compiler_version: str | None
    compiler_version_source: str | None
    problem: str | None


@lru_cache(maxsize=1)
def _libneuronxla() -> _Libneuronxla | None:
    try:
        package = importlib.import_module("libneuronxla")
    except Exception:  # absent, or PyPI's placeholder
        return None
    version = getattr(package, "__version__", None)
    problem = None
    try:
        cache_module = importlib.import_module("libneuronxla.neuron_cc_cache")
    except Exception as exc:
        cache_module = None
        problem = f"libneuronxla.neuron_cc_cache does not import ({type(exc).__name__})"
    compiler_version = _libneuronxla_compiler_version([m for m in (cache_module, package) if m is not None])
    source = "libneuronxla" if compiler_version else None
    if compiler_version is None and sdk_info().neuronx_cc:
        compiler_version, source = _valid_version(sdk_info().neuronx_cc), "neuronxcc"
    return _Libneuronxla(str(version) if version else None, cache_module, compiler_version, source, problem)


def libneuronxla_cache_root(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(the cache root libneuronxla resolves for NEURON_CC_FLAGS' `--cache_dir`, what went wrong): (None, None)
    when libneuronxla is absent. Read at each call: the flags and NEURON_COMPILE_CACHE_URL may change."""
    lib = _libneuronxla()
    if lib is None:
        return None, None
    if lib.cache_module is None:
        return None, lib.problem
    env = os.environ if environ is None else environ
    cache_dir = cache_dir_from_flags(split_flags(env.get(ENV_CC_FLAGS, "")))
    try:
        url = _libneuronxla_cache_url(lib.cache_module, cache_dir)
    except Exception as exc:  # an SDK that changed its API costs a line in `status`, never a run
        return None, f"CacheUrl.get_cache_url() failed ({type(exc).__name__}: {exc})"
    return url, None if url else "this libneuronxla has no CacheUrl.get_cache_url()"


def libneuronxla_info(environ: Mapping[str, str] | None = None) -> LibneuronxlaInfo | None:
    """libneuronxla's view of the cache, or None when it is absent (or PyPI's placeholder)."""
    lib = _libneuronxla()
    if lib is None:
        return None
    cache_url, problem = libneuronxla_cache_root(environ)
    return LibneuronxlaInfo(
        version=lib.version, cache_url=cache_url, compiler_version=lib.compiler_version,
        compiler_version_source=lib.compiler_version_source, problem=problem,
    )


def neuronx_cc_version() -> str | None:
    """`neuronxcc.__version__` alone (cheap: does not import torch-neuronx, unlike `sdk_info()`)."""
    return _valid_version(_module_version("neuronxcc"))


def parse_compiler_version_output(text: str) -> str | None:
    """The version in what `neuronx-cc --version` prints, or None."""
    match = _VERSION_IN_TEXT_RE.search(text)
    return _valid_version(match.group(1)) if match else None


def probe_compiler_version(executable: str, timeout: float = 60.0) -> str | None:
    """Run `<executable> --version` and read the version it prints (None on any failure)."""
    import subprocess

    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_compiler_version_output(done.stdout + "\n" + done.stderr)


def sdk_summary(cache_root: str | None = None) -> dict[str, object]:
    """Everything `neuron-cache status` reports about the SDK, JSON-able.

    `cache_root` is the root this package resolved; when libneuronxla resolves another one, `root_mismatch`
    says so (the two must agree, or fetched entries land where the compiler never looks).
    """
    info = sdk_info()
    lib = libneuronxla_info()
    summary: dict[str, object] = {
        "neuronx_cc": info.neuronx_cc, "libneuronxla": info.libneuronxla, "torch_neuronx": info.torch_neuronx,
        "libneuronxla_cache_url": lib.cache_url if lib else None,
        "libneuronxla_compiler_version": lib.compiler_version if lib else None,
        "libneuronxla_problem": lib.problem if lib else None,
        "root_mismatch": False,
    }
    if lib and lib.cache_url and cache_root is not None:
        theirs = lib.cache_url[len("file://"):] if lib.cache_url.startswith("file://") else lib.cache_url
        if "://" in theirs:
            summary["root_mismatch"] = True
        else:
            summary["root_mismatch"] = os.path.abspath(os.path.expanduser(theirs)) != os.path.abspath(cache_root)
    return summary


def format_sdk_summary(summary: dict[str, object], cache_root: str | None = None) -> list[str]:
    """Human lines for `neuron-cache status`."""
    lines = ["neuron sdk: " + ", ".join(f"{label} {summary.get(key) or 'not installed'}" for label, key in
                                         (("neuronx-cc", "neuronx_cc"), ("libneuronxla", "libneuronxla"), ("torch-neuronx", "torch_neuronx")))]
    if summary.get("libneuronxla"):
        url = summary.get("libneuronxla_cache_url") or "unknown"
        version = summary.get("libneuronxla_compiler_version") or "unknown"
        line = f"libneuronxla: cache {url}, compiler {version}"
        if summary.get("root_mismatch"):
            line += f" (differs from the cache dir used here, {cache_root}: pass cache_dir= or set NEURON_COMPILE_CACHE_URL)"
        lines.append(line)
        if summary.get("libneuronxla_problem"):
            lines.append(f"libneuronxla: {summary['libneuronxla_problem']}")
    return lines


# -------------------------------------------------------------------------------------- compile target
#
# From compiler 2.16 on, libneuronxla puts `--target=<t>` in the flags it hashes into the MODULE name
# (`e30acd3a` is md5 of the JSON list ["--target=trn1"]; aws-neuron/optimum-neuron-cache holds one 2.16 graph
# as `+613edded` for trn1 and `+7ac4dbae` for trn2, the same flags but the target): entries of trn1, trn2 and
# inf2 never collide there. Up to 2.15 the target libneuronxla adds is not hashed (an empty flags file,
# `+d41d8cd9`, beside a `--target=trn1` command line), so one MODULE name may hold a NEFF of either target
# unless the user pins the target in NEURON_CC_FLAGS. docs/integrations.md cites the sources.

ENV_TARGET_OVERRIDE = "NEURON_PLATFORM_TARGET_OVERRIDE"
#: The EC2 instance type, readable without the instance metadata service (no network: only the bucket
#: server talks to the network): on EC2 the DMI product name is e.g. `trn1.32xlarge`.
DMI_PRODUCT_NAME = Path("/sys/devices/virtual/dmi/id/product_name")
#: The last version whose MODULE names do not cover the target.
LAST_VERSION_WITHOUT_TARGET_IN_KEY = (2, 15)

_TARGET_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")
#: An EC2 Neuron instance type; group 1 is its chip's target (trn1n and trn2u instances carry trn1 and trn2 chips).
_NEURON_INSTANCE_RE = re.compile(r"^((?:trn|inf)[0-9]{1,3})[a-z]{0,3}\.[0-9a-z-]{1,32}$")


def normalize_target(value: object) -> str | None:
    """A compile target as neuronx-cc's `--target` names it (trn1, trn2, inf2...), from a target or an EC2
    instance type (`trn1.32xlarge` and `trn1n.32xlarge` -> trn1); None for anything else (hostile or unknown
    input)."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    match = _NEURON_INSTANCE_RE.fullmatch(text)
    if match:
        return match.group(1)
    return text if _TARGET_RE.fullmatch(text) else None


def target_from_flags(flags: list[str]) -> str | None:
    """The last `--target=X` or `--target X` of compiler flags, normalized (None when absent or not a target)."""
    found = last_flag_value(flags, "--target")
    return normalize_target(found) if found is not None else None


def instance_type(path: Path = DMI_PRODUCT_NAME) -> str | None:
    """This EC2 instance's type when it is a Neuron one (`trn1.32xlarge`), from the DMI product name; None
    elsewhere (another machine, a container without /sys, anything that does not read as a Neuron type)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(64).decode("ascii", "replace").strip().lower()
    except OSError:
        return None
    return text if _NEURON_INSTANCE_RE.fullmatch(text) else None


@dataclass(frozen=True)
class CompileTarget:
    """The target this machine compiles for, and where that was read."""

    target: str
    source: str


def compile_target(environ: Mapping[str, str] | None = None, export_config: Mapping[str, object] | None = None,
                   *, dmi_path: Path = DMI_PRODUCT_NAME) -> CompileTarget | None:
    """What the compiler targets here: `--target` in NEURON_CC_FLAGS, then NEURON_PLATFORM_TARGET_OVERRIDE,
    then the instance type (DMI), then the export config's `target` / `instance_type`; None when none says."""
    from .config_fields import value_of

    env = os.environ if environ is None else environ
    from_flags = target_from_flags(split_flags(env.get(ENV_CC_FLAGS, "")))
    if from_flags:
        return CompileTarget(from_flags, f"--target in {ENV_CC_FLAGS}")
    override = normalize_target(env.get(ENV_TARGET_OVERRIDE))
    if override:
        return CompileTarget(override, ENV_TARGET_OVERRIDE)
    instance = instance_type(dmi_path)
    if instance:
        return CompileTarget(normalize_target(instance) or instance, f"instance type {instance}")
    configured = normalize_target(value_of(export_config or {}, "target"))
    if configured:
        return CompileTarget(configured, "the export config")
    return None


def target_in_module_key(compiler_version: str) -> bool:
    """Whether this compiler's MODULE names cover the target (2.16 and newer)."""
    return version_tuple(compiler_version)[:2] > LAST_VERSION_WITHOUT_TARGET_IN_KEY


_unpinned_warned: set[tuple[str, str]] = set()


def unpinned_target_warning(compiler_version: str, bucket: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The one line to warn, once per process and bucket, when a compiler up to 2.15 (whose MODULE names do not
    cover the target) shares a bucket without `--target` in NEURON_CC_FLAGS; None otherwise."""
    env = os.environ if environ is None else environ
    if target_in_module_key(compiler_version) or target_from_flags(split_flags(env.get(ENV_CC_FLAGS, ""))):
        return None
    key = (bucket, compiler_version)
    if key in _unpinned_warned:
        return None
    _unpinned_warned.add(key)
    return (f"neuronx-cc {compiler_version} does not put the compile target in its cache keys: in a bucket shared "
            f"by trn1, trn2 and inf2 hosts, an entry may hold a NEFF built for another target; add --target=<trn1|trn2|inf2> "
            f"to {ENV_CC_FLAGS} (or keep one bucket per instance family)")
