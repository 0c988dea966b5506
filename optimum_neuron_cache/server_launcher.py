"""Where the bucket server lives and how it is started: one per user, host and endpoint.

The socket sits in a per-user directory that only the user can open (0700). Starting is serialized by a file
lock beside it, so 64 processes starting at once get exactly one server. The server runs in an environment
made by `uv` with a bucket-capable `huggingface_hub` (the caller's own, maybe pinned to 0.x, never matters),
or directly on this interpreter when it already has one (air-gapped hosts).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import settings
from .errors import ServerStartError

ENV_RUNTIME_DIR = settings.RUNTIME_DIR
HUB_REQUIREMENT = "huggingface_hub>=1.5,<3"
#: The server's environment: a bucket-capable huggingface_hub, hf_xet for its transfers (1.2 and newer chunk
#: as the Hub does, so the Xet hashes of what it uploads can be recomputed from the bytes), tenacity for
#: retries, blake3 for the digests of directory buckets.
SERVER_REQUIREMENTS = (HUB_REQUIREMENT, "hf_xet>=1.2", "tenacity>=8.2", "blake3>=1.0")
DEFAULT_ENDPOINT = "https://huggingface.co"
#: Never handed to the server's environment: the token travels per request (never in argv or environ of a
#: long-lived process), PYTHONPATH could put the caller's old huggingface_hub in front of the isolated one, and
#: our server settings reach it only as validated arguments (a bad value in the client that started it would
#: otherwise stick for every later client, for the server's whole life).
_SCRUBBED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                 *settings.SERVER_VARIABLES)


def hub_endpoint(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user directory of sockets, start locks and server logs, created 0700 and checked."""
    env = os.environ if environ is None else environ
    chosen = settings.runtime_dir(env)
    if chosen:
        path = Path(chosen)
    elif env.get("XDG_RUNTIME_DIR") and os.path.isdir(env["XDG_RUNTIME_DIR"]):
        path = Path(env["XDG_RUNTIME_DIR"]) / "optimum-neuron-cache"
    else:
        path = Path(tempfile.gettempdir()) / f"optimum-neuron-cache-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServerStartError(
            f"{path} must belong to uid {os.getuid()} with mode 0700 (it has uid {info.st_uid}, mode "
            f"{oct(info.st_mode & 0o777)}): fix it or set {ENV_RUNTIME_DIR} to a private directory"
        )
    return path


@dataclass(frozen=True)
class ServerAddress:
    endpoint: str
    socket_path: Path
    lock_path: Path
    log_path: Path


def server_address(environ: Mapping[str, str] | None = None) -> ServerAddress:
    endpoint = hub_endpoint(environ)
    base = runtime_dir(environ)
    key = hashlib.sha256(f"{endpoint}\0{socket.gethostname()}".encode()).hexdigest()[:16]
    socket_path = base / f"server-{key}.sock"
    if len(os.fsencode(socket_path)) > 100:  # sun_path holds 108 bytes
        raise ServerStartError(f"socket path {socket_path} is too long for a Unix socket: set {ENV_RUNTIME_DIR} to a short path")
    return ServerAddress(endpoint, socket_path, base / f"server-{key}.lock", base / f"server-{key}.log")


def _current_has_bucket_client() -> bool:
    """Whether this interpreter can run the server itself: huggingface_hub>=1.5 and hf_xet, read from
    metadata (importing them here could load the very version we must stay away from)."""
    try:
        version = importlib.metadata.version("huggingface_hub")
        for name in SERVER_REQUIREMENTS[1:]:
            importlib.metadata.version(name.split(">")[0].split("=")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (1, 5) <= (major, minor) < (3, 0)


def server_commands(address: ServerAddress, environ: Mapping[str, str] | None = None) -> list[list[str]]:
    """The commands to try, in order. Through uv: first `--offline` (uv's cache already has the environment
    after the first start, and asking PyPI again costs about 0.4 s each start), then online."""
    command = server_command(address, environ)
    if "--isolated" not in command:
        return [command]
    offline = command[:2] + ["--offline"] + command[2:]
    return [offline, command]


def server_command(address: ServerAddress, environ: Mapping[str, str] | None = None) -> list[str]:
    """The server's command line. Our settings travel in it, validated here (ConfigurationError otherwise),
    and only those the user set: the server's own defaults stay the defaults."""
    env = os.environ if environ is None else environ
    mode = settings.server_mode(env)
    boot = str(Path(__file__).resolve().parent.parent / "bucket_server" / "boot.py")
    idle = repr(settings.server_idle_timeout(env))
    args = [boot, "--socket", str(address.socket_path), "--endpoint", address.endpoint, "--idle-timeout", idle,
            *settings.server_arguments(env)]
    if mode == "current" or (mode == "auto" and _current_has_bucket_client()):
        return [sys.executable, "-s", *args]
    try:
        from uv import find_uv_bin

        uv = find_uv_bin()
    except Exception as exc:
        raise ServerStartError(f"cannot find the uv binary to start the bucket server ({exc}): pip install uv") from None
    # --python: reuse this interpreter as the base (no Python download); --isolated/--no-project: ignore any
    # project or user environment around us.
    withs = [arg for requirement in SERVER_REQUIREMENTS for arg in ("--with", requirement)]
    return [uv, "run", "--isolated", "--no-project", "--quiet", "--python", sys.executable, *withs, "python", "-s", *args]


def can_connect(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def ensure_server(address: ServerAddress, environ: Mapping[str, str] | None = None) -> None:
    """Start the server unless one answers on the socket. Safe when many processes call it at once."""
    if can_connect(address.socket_path):
        return
    env = dict(os.environ if environ is None else environ)
    start_timeout = settings.server_start_timeout(env)
    try:
        with FileLock(address.lock_path, timeout=start_timeout):
            if can_connect(address.socket_path):
                return  # another process started it while we waited for the lock
            address.socket_path.unlink(missing_ok=True)  # stale: its server is gone
            _spawn(address, env, start_timeout)
    except Timeout:
        raise ServerStartError(f"timed out after {start_timeout:.0f}s waiting for another process to start the bucket server") from None


def _spawn(address: ServerAddress, env: dict[str, str], start_timeout: float) -> None:
    commands = server_commands(address, env)
    for index, command in enumerate(commands):
        try:
            _spawn_one(address, env, command, start_timeout)
            return
        except ServerStartError:
            if index + 1 == len(commands):
                raise


def _spawn_one(address: ServerAddress, env: dict[str, str], command: list[str], start_timeout: float) -> None:
    child_env = {key: value for key, value in env.items() if key not in _SCRUBBED_ENV}
    with open(address.log_path, "ab") as log:
        os.chmod(address.log_path, 0o600)
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env,
            start_new_session=True, close_fds=True, cwd="/",
        )
    # Reap the server when it exits (idle timeout) so it never lingers as a zombie of a long-lived caller.
    threading.Thread(target=process.wait, name="bucket-server-reaper", daemon=True).start()
    deadline = time.monotonic() + start_timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if address.socket_path.exists() and can_connect(address.socket_path):
            return
        code = process.returncode
        if code is not None:
            raise ServerStartError(f"the bucket server exited with code {code} at start: {_log_tail(address.log_path)} (log: {address.log_path})")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    process.kill()
    raise ServerStartError(f"the bucket server did not start within {start_timeout:.0f}s (log: {address.log_path})")
