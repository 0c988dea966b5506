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
from dataclasses import dataclass
from functools import lru_cache

from .errors import CompilerVersionError

#: neuronx-cc versions look like 2.21.33363.0+82129205 (the +hash part is absent from pip metadata).
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:\.\d+)?(?:\+[0-9a-zA-Z]+)?$")

ENV_COMPILER_VERSION = "NEURON_CC_VERSION"


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
    if not _VERSION_RE.match(version):
        raise CompilerVersionError(
            f"compiler version {version!r} from {source} is not a neuronx-cc version "
            "(expected e.g. 2.21.33363.0+82129205, as printed by `neuronx-cc --version`)"
        )
    return version


def resolve_compiler_version(explicit: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The neuronx-cc version whose cache entries to fetch and publish.

    An explicit argument wins (warming a cache for another fleet is legitimate; a mismatch with the installed
    compiler is warned about); then the installed compiler's `neuronxcc.__version__`; then NEURON_CC_VERSION.
    Never guessed from the cache's folders.
    """
    env = os.environ if environ is None else environ
    installed = sdk_info().neuronx_cc
    if explicit:
        version = validate_compiler_version(explicit, source="the compiler_version argument")
        if installed and version != installed:
            logging.getLogger("optimum_neuron_cache").warning(
                "optimum-neuron-cache: compiler_version %s differs from the installed neuronx-cc %s: its entries "
                "live in neuronxcc-%s, which this compiler does not read", version, installed, version,
            )
        return version
    if installed:
        return validate_compiler_version(installed, source="neuronxcc.__version__")
    from_env = env.get(ENV_COMPILER_VERSION)
    if from_env:
        return validate_compiler_version(from_env, source=ENV_COMPILER_VERSION)
    raise CompilerVersionError(
        "cannot tell the neuronx-cc version: the Neuron SDK is not installed here; "
        f"pass compiler_version=... (CLI: --compiler-version) or set {ENV_COMPILER_VERSION}=2.21.33363.0+82129205"
    )


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 21, 33363, 0) for 2.21.33363.0+82129205: for comparisons such as 'up to 2.14'."""
    return tuple(int(part) for part in version.split("+", 1)[0].split("."))


def writes_done_marker(version: str) -> bool:
    """Compilers 2.15 and newer write `model.done` last; older ones have no marker."""
    return version_tuple(version)[:2] >= (2, 15)
