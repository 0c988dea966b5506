"""Every `NEURON_CACHE_*` setting the client side reads, parsed and validated in one place.

Why one module: a setting read in many places gets many parsers and many error messages, and a bad value
surfaced as a traceback deep in a fetch. Here each setting is one small typed function that reads the
environment at each call (tests and long-lived processes change it; parsing a string is cheap), and a bad
value raises `ConfigurationError` with one line naming the variable, the value and what is accepted.

The bucket server never reads these from its environment: the launcher validates the ones it needs
(`server_arguments`) and passes them as arguments, so a bad value in one client cannot stick in the server
that every later client shares. `NEURON_CC_FLAGS`, `NEURON_COMPILE_CACHE_URL`, `NEURON_CC_VERSION` and `HF_*`
belong to other tools and are read where they are used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from .errors import ConfigurationError

Environ = Mapping[str, str] | None

BUCKET = "NEURON_CACHE_BUCKET"
UPSTREAM = "NEURON_CACHE_UPSTREAM"
RUNTIME_DIR = "NEURON_CACHE_RUNTIME_DIR"
SERVER_MODE = "NEURON_CACHE_SERVER_MODE"
SERVER_IDLE_TIMEOUT = "NEURON_CACHE_SERVER_IDLE_TIMEOUT"
SERVER_START_TIMEOUT = "NEURON_CACHE_SERVER_START_TIMEOUT"
REQUEST_TIMEOUT = "NEURON_CACHE_REQUEST_TIMEOUT"
LOCK_TIMEOUT = "NEURON_CACHE_LOCK_TIMEOUT"
VERIFY = "NEURON_CACHE_VERIFY"
PUBLISH_LEGACY = "NEURON_CACHE_PUBLISH_LEGACY"
# Passed to the bucket server as arguments, never through its environment.
RETRY_BUDGET = "NEURON_CACHE_RETRY_BUDGET"
RETRY_ATTEMPTS = "NEURON_CACHE_RETRY_ATTEMPTS"
HTTP_TIMEOUT = "NEURON_CACHE_HTTP_TIMEOUT"
METADATA_TIMEOUT = "NEURON_CACHE_METADATA_TIMEOUT"
XET_RETRY_DURATION = "NEURON_CACHE_XET_RETRY_DURATION"
SERVER_LOG_LEVEL = "NEURON_CACHE_SERVER_LOG_LEVEL"
# Read by the neuronx-cc shim only.
SHIM = "NEURON_CACHE_SHIM"
SHIM_PUBLISH = "NEURON_CACHE_SHIM_PUBLISH"
SHIM_BACKOFF = "NEURON_CACHE_SHIM_BACKOFF"
SHIM_INSIDE = "NEURON_CACHE_SHIM_INSIDE"
#: Set by `parallel-compile run` for its command: where the shim notes each graph it served without a compile.
SHIM_REPORT = "NEURON_CACHE_SHIM_REPORT"
REAL_COMPILER = "NEURON_CACHE_REAL_COMPILER"
# Compile leases (compile_leases.py): the shim and the parallel-compile flow.
LEASES = "NEURON_CACHE_LEASES"
LEASE_HEARTBEAT = "NEURON_CACHE_LEASE_HEARTBEAT"
LEASE_STALE = "NEURON_CACHE_LEASE_STALE"
LEASE_MAX_WAIT = "NEURON_CACHE_LEASE_MAX_WAIT"
LEASE_POLL = "NEURON_CACHE_LEASE_POLL"

#: Every variable above: `neuron-cache status` shows the ones set.
VARIABLES = tuple(value for name, value in list(globals().items())
                  if name.isupper() and isinstance(value, str) and value.startswith("NEURON_CACHE_"))
#: Other tools' variables that change what the cache does (read where they are used).
FOREIGN_VARIABLES = ("NEURON_CC_FLAGS", "NEURON_COMPILE_CACHE_URL", "NEURON_CC_VERSION",
                     "NEURON_PLATFORM_TARGET_OVERRIDE", "HF_ENDPOINT", "HF_HOME", "HF_TOKEN")
#: Variables whose value is never printed.
SECRET_VARIABLES = ("HF_TOKEN",)

SERVER_MODES = ("auto", "uv", "current")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: No duration we read means more than this: a larger value is a typo (and overflows socket timeouts).
MAX_SECONDS = 30 * 24 * 3600.0
MAX_RETRY_ATTEMPTS = 100
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _raw(name: str, environ: Environ) -> str | None:
    """The variable's value, stripped; None when unset or blank (blank means "use the default")."""
    value = (os.environ if environ is None else environ).get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


#: A duration's suffixes: `90` and `90s` are seconds; `15m`, `12h`, `30d`, `2w`.
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def duration(text: str) -> float | None:
    """Seconds from `90`, `90s`, `15m`, `12h`, `30d` or `2w`: the one format of every age and timeout a user
    gives, in a variable or on the command line; None when the text is not one (or negative, or not finite)."""
    text = text.strip().lower()
    factor = DURATION_UNITS.get(text[-1:])
    try:
        value = float(text[:-1] if factor else text) * (factor or 1.0)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _parse_seconds(name: str, text: str, example: str, *, zero_ok: bool = False) -> float:
    value = duration(text)
    if value is None or not (value >= 0 if zero_ok else value > 0) or value > MAX_SECONDS:
        lowest = "0 or more" if zero_ok else "more than 0"
        raise ConfigurationError(
            f"{name}={text!r} is not a duration ({lowest}, at most 30d: seconds, or a number followed by s, m, h, d "
            f"or w); set it to e.g. {example}")
    return value


def _seconds(name: str, default: float, environ: Environ, *, zero_ok: bool = False) -> float:
    text = _raw(name, environ)
    return default if text is None else _parse_seconds(name, text, f"{default:g}", zero_ok=zero_ok)


def _optional_seconds(name: str, example: str, environ: Environ) -> float | None:
    text = _raw(name, environ)
    return None if text is None else _parse_seconds(name, text, example)


def _flag(name: str, default: bool, environ: Environ) -> bool:
    text = _raw(name, environ)
    if text is None:
        return default
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ConfigurationError(f"{name}={text!r} is not a yes/no value; set it to 1 or 0")


def _choice(name: str, choices: tuple[str, ...], default: str, environ: Environ, *, upper: bool = False) -> str:
    text = _raw(name, environ)
    if text is None:
        return default
    value = text.upper() if upper else text.lower()
    if value not in choices:
        raise ConfigurationError(f"{name}={text!r} is not one of {', '.join(choices)}; set it to e.g. {default}")
    return value


# ------------------------------------------------------------------------------------ client


def bucket(environ: Environ = None) -> str | None:
    """The default bucket's name, unparsed (buckets.parse_bucket judges it)."""
    return _raw(BUCKET, environ)


def upstream(environ: Environ = None) -> tuple[str, ...] | None:
    """The read-only upstream sources, in order (comma- or space-separated); None when unset (then the saved
    setting of `neuron-cache set --upstream` applies). Each is parsed by `upstreams.parse_upstream`."""
    text = _raw(UPSTREAM, environ)
    if text is None:
        return None
    specs = tuple(part for part in text.replace(",", " ").split() if part)
    for spec in specs:
        if any(ord(char) < 32 for char in spec) or len(spec) > 512:
            raise ConfigurationError(f"{UPSTREAM}={text!r} holds a name that is not a model repo, bucket or directory; "
                                     "set it to e.g. aws-neuron/optimum-neuron-cache")
    return specs


def runtime_dir(environ: Environ = None) -> str | None:
    """The private directory of the server's socket, lock and log, when the user chose one."""
    return _raw(RUNTIME_DIR, environ)


def server_mode(environ: Environ = None) -> str:
    """How the bucket server is started: auto, uv or current."""
    return _choice(SERVER_MODE, SERVER_MODES, "auto", environ)


def server_idle_timeout(environ: Environ = None) -> float:
    """Seconds the server waits with no client before it exits."""
    return _seconds(SERVER_IDLE_TIMEOUT, 300.0, environ)


def server_start_timeout(environ: Environ = None) -> float:
    """Seconds to wait for the server to start (the first uv start installs its environment)."""
    return _seconds(SERVER_START_TIMEOUT, 120.0, environ)


def request_timeout(environ: Environ = None) -> float:
    """Seconds of silence after which the server counts as hung (it sends a heartbeat every 5 s)."""
    return _seconds(REQUEST_TIMEOUT, 60.0, environ)


def lock_timeout(environ: Environ = None) -> float:
    """Seconds to wait for another process of the host that holds an entry's lock (or fetches for a rank)."""
    return _seconds(LOCK_TIMEOUT, 600.0, environ)


def verify(environ: Environ = None) -> bool:
    """Whether downloads are checked against their digests (off only to measure what the check costs)."""
    return _flag(VERIFY, True, environ)


def publish_legacy(environ: Environ = None) -> bool:
    """Whether entries of compilers up to 2.14 that hold a NEFF and nothing else are published (off by
    default: those compilers cached failures as a NEFF too, so such an entry may be a failure)."""
    return _flag(PUBLISH_LEGACY, False, environ)


# ------------------------------------------------------------------------------------ server


def retry_budget(environ: Environ = None) -> float | None:
    """Seconds all retries of one Hub operation may take; None: the server's default."""
    return _optional_seconds(RETRY_BUDGET, "10", environ)


def retry_attempts(environ: Environ = None) -> int | None:
    """Attempts of one Hub operation; None: the server's default."""
    text = _raw(RETRY_ATTEMPTS, environ)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_RETRY_ATTEMPTS:
        raise ConfigurationError(f"{RETRY_ATTEMPTS}={text!r} is not a whole number from 1 to {MAX_RETRY_ATTEMPTS}; set it to e.g. 4")
    return value


def http_timeout(environ: Environ = None) -> float | None:
    """The timeout of each Hub HTTP request; None: the server's default."""
    return _optional_seconds(HTTP_TIMEOUT, "15", environ)


def metadata_timeout(environ: Environ = None) -> float | None:
    """The timeout of Hub metadata requests (listings, paths-info); None: the server's default."""
    return _optional_seconds(METADATA_TIMEOUT, "5", environ)


def xet_retry_duration(environ: Environ = None) -> float | None:
    """Bound on hf_xet's own retries, in seconds (`10` or `10s`); None: the server's default."""
    return _optional_seconds(XET_RETRY_DURATION, "10", environ)


def server_log_level(environ: Environ = None) -> str | None:
    """The server's log level; None: the server's default."""
    return None if _raw(SERVER_LOG_LEVEL, environ) is None else _choice(SERVER_LOG_LEVEL, LOG_LEVELS, "INFO", environ, upper=True)


#: The settings handed to the server as `--flag value`, and nothing else of ours: see `server_arguments`.
SERVER_FLAGS = (
    (RETRY_BUDGET, "--retry-budget", retry_budget),
    (RETRY_ATTEMPTS, "--retry-attempts", retry_attempts),
    (HTTP_TIMEOUT, "--http-timeout", http_timeout),
    (METADATA_TIMEOUT, "--metadata-timeout", metadata_timeout),
    (XET_RETRY_DURATION, "--xet-retry-duration", xet_retry_duration),
    (SERVER_LOG_LEVEL, "--log-level", server_log_level),
)
#: Variables the server child must not inherit: it gets their validated values as arguments instead.
SERVER_VARIABLES = tuple(name for name, _, _ in SERVER_FLAGS)


def server_arguments(environ: Environ = None) -> list[str]:
    """`--flag value` for each server setting the user set, validated here first (a bad one raises)."""
    arguments: list[str] = []
    for _name, flag, read in SERVER_FLAGS:
        value = read(environ)
        if value is not None:
            arguments += [flag, repr(value) if isinstance(value, float) else str(value)]
    return arguments


def check_client(environ: Environ = None) -> None:
    """Validate every setting a client process reads, so bad input fails before any work (and before the
    body of a `hub_neuronx_cache` block), with the one-line error of the first bad variable."""
    for read in (server_mode, server_idle_timeout, server_start_timeout, request_timeout, lock_timeout, verify,
                 publish_legacy, leases_enabled, lease_heartbeat, lease_stale, lease_max_wait, lease_poll):
        read(environ)
    server_arguments(environ)


# -------------------------------------------------------------------------------------- shim


def shim_enabled(environ: Environ = None) -> bool:
    """NEURON_CACHE_SHIM=0 makes the neuronx-cc shim a pure pass-through."""
    return _flag(SHIM, True, environ)


def shim_publish(environ: Environ = None) -> bool:
    """NEURON_CACHE_SHIM_PUBLISH=0 stops the shim from publishing what it compiled."""
    return _flag(SHIM_PUBLISH, True, environ)


def shim_backoff(environ: Environ = None) -> float:
    """Seconds the shim skips a bucket after a remote failure (0: never skip)."""
    return _seconds(SHIM_BACKOFF, 300.0, environ, zero_ok=True)


def shim_inside(environ: Environ = None) -> bool:
    """Set by the shim in the real compiler's environment: a nested call passes through."""
    return _raw(SHIM_INSIDE, environ) is not None


def real_compiler(environ: Environ = None) -> str | None:
    """The real neuronx-cc the shim runs, when the user named it."""
    return _raw(REAL_COMPILER, environ)


# ------------------------------------------------------------------------------------ leases


def leases_enabled(environ: Environ = None) -> bool:
    """NEURON_CACHE_LEASES=0: compile every missing graph here, without asking other hosts."""
    return _flag(LEASES, True, environ)


def lease_heartbeat(environ: Environ = None) -> float:
    """Seconds between two renewals of a held compile lease."""
    return _seconds(LEASE_HEARTBEAT, 10.0, environ)


def lease_stale(environ: Environ = None) -> float:
    """Seconds without a renewal after which another host takes a compile lease over."""
    return _seconds(LEASE_STALE, 60.0, environ)


def lease_max_wait(environ: Environ = None) -> float:
    """Seconds a run waits at most on other hosts' compiles, its graphs together, before compiling itself."""
    return _seconds(LEASE_MAX_WAIT, 7200.0, environ, zero_ok=True)


def lease_poll(environ: Environ = None) -> float:
    """Seconds between two looks at the bucket while waiting on another host's lease."""
    return _seconds(LEASE_POLL, 2.0, environ)
