"""Where the bucket server lives and how it is started: one per user, host and endpoint.

The socket sits in a per-user directory that only the user can open (0700). That directory is opened without
following a symlink and checked on the open descriptor; everything inside it (socket, start lock, log) is then
reached through that descriptor, so a name swapped after the check redirects nothing. Before anything is sent,
the peer of the socket must be our own uid. Starting is serialized by a file lock beside the socket, so 64
processes starting at once get exactly one server. The server runs in an environment
made by `uv` with a bucket-capable `huggingface_hub` (the caller's own, maybe pinned to 0.x, never matters),
or directly on this interpreter when it already has one (air-gapped hosts).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from bucket_server import private_dir

from . import settings
from .errors import ServerError, ServerStartError

ENV_RUNTIME_DIR = settings.RUNTIME_DIR
HUB_REQUIREMENT = "huggingface_hub>=1.5,<3"
#: The server's environment: a bucket-capable huggingface_hub, hf_xet for its transfers (1.6 and newer have
#: the upload sessions a publish stages its bytes in, `XetSession.new_upload_commit`, which huggingface_hub 2
#: uploads through too), tenacity for retries, blake3 for the digests.
SERVER_REQUIREMENTS = (HUB_REQUIREMENT, "hf_xet>=1.6", "tenacity>=8.2", "blake3>=1.0")
#: The oldest hf_xet the server runs with (SERVER_REQUIREMENTS).
MIN_HF_XET = (1, 6)
DEFAULT_ENDPOINT = "https://huggingface.co"
#: Never handed to the server's environment: the token travels per request (never in argv or environ of a
#: long-lived process), PYTHONPATH could put the caller's old huggingface_hub in front of the isolated one, and
#: our server settings reach it only as validated arguments (a bad value in the client that started it would
#: otherwise stick for every later client, for the server's whole life).
_SCRUBBED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                 *settings.SERVER_VARIABLES)


def hub_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The Hub endpoint (HF_ENDPOINT, else huggingface.co): one server per endpoint."""
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
    path = path.absolute()  # the server runs in /: a relative name would be another place for it
    os.close(open_private_dir(path))  # fail early, with one line, on a directory that is not ours alone
    return path


#: Linux names an open descriptor's directory /proc/self/fd/<fd>: a path through the descriptor itself (short
#: enough for sun_path), not through the name that was checked.
_PROC_FD = "/proc/self/fd"
_HAS_PROC_FD = os.path.isdir(_PROC_FD)


def open_private_dir(path: Path) -> int:
    """Create `path` (0700) if missing and open it without following a symlink; owner and mode are checked on
    the descriptor, so what was checked is what is used, whatever happens to the name afterwards."""
    fix = f"remove it, or set {ENV_RUNTIME_DIR} to a private directory of yours"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ServerStartError(f"cannot create the runtime directory {path} ({exc.strerror}): set {ENV_RUNTIME_DIR} to a private directory of yours") from None
    try:
        return private_dir.open_private_dir(path)
    except private_dir.UnsafeRuntimeDir as exc:
        raise ServerStartError(f"{exc}: {fix}") from None


class RuntimeDir:
    """The runtime directory, held by a verified descriptor: every name inside is reached through it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_private_dir(path)

    def entry(self, name: str) -> str:
        """A path to `name` that resolves through the descriptor (on Linux), never through `self.path`."""
        if _HAS_PROC_FD:
            return f"{_PROC_FD}/{self.fd}/{name}"
        return str(self.path / name)  # no /proc: the name, whose directory was checked a moment ago

    def exists(self, name: str) -> bool:
        """Whether `name` exists in the directory (not following a symlink)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def unlink(self, name: str) -> None:
        """Remove `name` from the directory, if there."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Close the directory's descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RuntimeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ServerAddress:
    """Where the server of this user, host and endpoint lives: its socket, start lock and log."""
    endpoint: str
    socket_path: Path
    lock_path: Path
    log_path: Path

    def open_dir(self) -> RuntimeDir:
        """The runtime directory, opened and checked again (owner, mode, no symlink)."""
        return RuntimeDir(self.socket_path.parent)


def server_address(environ: Mapping[str, str] | None = None) -> ServerAddress:
    """The server address for this user, host and endpoint."""
    endpoint = hub_endpoint(environ)
    base = runtime_dir(environ)
    key = hashlib.sha256(f"{endpoint}\0{socket.gethostname()}".encode()).hexdigest()[:16]
    socket_path = base / f"server-{key}.sock"
    if len(os.fsencode(socket_path)) > 100:  # sun_path holds 108 bytes
        raise ServerStartError(f"socket path {socket_path} is too long for a Unix socket: set {ENV_RUNTIME_DIR} to a short path")
    return ServerAddress(endpoint, socket_path, base / f"server-{key}.lock", base / f"server-{key}.log")


def _current_has_bucket_client() -> bool:
    """Whether this interpreter can run the server itself: huggingface_hub>=1.5,<3 and hf_xet>=1.6, read from
    metadata (importing them here could load the very version we must stay away from). importlib.metadata is
    imported here, when a server is to be started: it costs about 15 ms of every process's start otherwise."""
    import importlib.metadata

    try:
        versions = {name: importlib.metadata.version(name.split(">")[0].split("=")[0]) for name in SERVER_REQUIREMENTS}
    except importlib.metadata.PackageNotFoundError:
        return False
    hub, xet = _release(versions[HUB_REQUIREMENT]), _release(versions[SERVER_REQUIREMENTS[1]])
    return hub is not None and xet is not None and (1, 5) <= hub < (3, 0) and xet >= MIN_HF_XET


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string, None when it does not start with two numbers."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


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
    # project or user environment around us; --compile-bytecode: the environment is compiled once, when uv
    # installs it, so that no start compiles huggingface_hub from source (about 300 ms of each start where
    # PYTHONDONTWRITEBYTECODE is set, as in AWS's Neuron container examples: docs/performance.md).
    withs = [arg for requirement in SERVER_REQUIREMENTS for arg in ("--with", requirement)]
    return [uv, "run", "--isolated", "--no-project", "--quiet", "--compile-bytecode", "--python", sys.executable, *withs,
            "python", "-s", *args]


def check_peer_uid(sock: socket.socket, expected_uid: int, where: Path) -> None:
    """Refuse a server run by another user before anything (a token, above all) is written to it."""
    uid = private_dir.peer_uid(sock)
    if uid is not None and uid != expected_uid:
        raise ServerStartError(
            f"the bucket server at {where} runs as uid {uid}, not {expected_uid}: nothing was sent to it; "
            f"remove {where}, or set {ENV_RUNTIME_DIR} to a private directory of yours"
        )


def _connect_busy_aware(target: str, timeout: float, deadline: float, on_busy: Callable[[], None] | None) -> socket.socket:
    """Connect, retrying EAGAIN (the listen backlog is full: many ranks connecting at once) with a bounded,
    jittered backoff. Other errors (ECONNREFUSED, a missing socket) are for the caller: it may have to start
    the server."""
    delay = 0.002
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
            return sock
        except BlockingIOError as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            if time.monotonic() + delay > deadline:
                raise ServerError(f"the bucket server stayed too busy to accept a connection for {timeout:.0f}s") from None
            if on_busy is not None:
                on_busy()
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)
        except BaseException:
            sock.close()
            raise


def connect_server(address: ServerAddress, timeout: float, *, expected_uid: int | None = None,
                   on_busy: Callable[[], None] | None = None) -> socket.socket:
    """A socket connected to the server through the verified runtime directory, whose peer is `expected_uid`
    (ours by default). `on_busy` is called at each full-backlog retry (tests wait on it)."""
    uid = os.getuid() if expected_uid is None else expected_uid
    with address.open_dir() as rundir:
        sock = _connect_busy_aware(rundir.entry(address.socket_path.name), timeout, time.monotonic() + timeout, on_busy)
    try:
        check_peer_uid(sock, uid, address.socket_path)
    except BaseException:
        sock.close()
        raise
    return sock


def _answers(rundir: RuntimeDir, name: str) -> bool:
    """Whether a server listens on the socket. A full backlog (EAGAIN) is a live server, only a busy one:
    taking it for dead would unlink its socket and start a second server."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(rundir.entry(name))
        return True
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        probe.close()


def can_connect(address: ServerAddress) -> bool:
    """Whether a server answers on the socket (a full backlog counts as one)."""
    with address.open_dir() as rundir:
        return _answers(rundir, address.socket_path.name)


def open_log(rundir: RuntimeDir, name: str) -> int:
    """The server's log, opened for appending through the verified directory and never through a symlink;
    only a regular file of ours is accepted (a planted link or FIFO would have us write, or hang, elsewhere)."""
    where = rundir.path / name
    try:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=rundir.fd)
    except OSError as exc:
        what = "is a symlink" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        raise ServerStartError(f"the bucket server log {where} {what}: remove it") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise ServerStartError(f"the bucket server log {where} is not a regular file of uid {os.getuid()}: remove it")
    os.set_blocking(fd, True)
    os.fchmod(fd, 0o600)
    return fd


def _log_tail(rundir: RuntimeDir, name: str, lines: int = 3) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=rundir.fd)
    except OSError:
        return ""
    with open(fd, "rb") as log:
        text = log.read().decode(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def ensure_server(address: ServerAddress, environ: Mapping[str, str] | None = None) -> None:
    """Start the server unless one answers on the socket. Safe when many processes call it at once."""
    if can_connect(address):
        return
    env = dict(os.environ if environ is None else environ)
    start_timeout = settings.server_start_timeout(env)
    try:
        with address.open_dir() as rundir, FileLock(rundir.entry(address.lock_path.name), timeout=start_timeout):
            if _answers(rundir, address.socket_path.name):
                return  # another process started it while we waited for the lock
            rundir.unlink(address.socket_path.name)  # stale: its server is gone
            _spawn(address, rundir, env, start_timeout)
    except Timeout:
        raise ServerStartError(f"timed out after {start_timeout:.0f}s waiting for another process to start the bucket server") from None


def _spawn(address: ServerAddress, rundir: RuntimeDir, env: dict[str, str], start_timeout: float) -> None:
    commands = server_commands(address, env)
    for index, command in enumerate(commands):
        try:
            _spawn_one(address, rundir, env, command, start_timeout)
            return
        except ServerStartError:
            if index + 1 == len(commands):
                raise


def _spawn_one(address: ServerAddress, rundir: RuntimeDir, env: dict[str, str], command: list[str], start_timeout: float) -> None:
    child_env = {key: value for key, value in env.items() if key not in _SCRUBBED_ENV}
    log = open_log(rundir, address.log_path.name)
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env,
            start_new_session=True, close_fds=True, cwd="/",
        )
    finally:
        os.close(log)
    # Reap the server when it exits (idle timeout) so it never lingers as a zombie of a long-lived caller.
    threading.Thread(target=process.wait, name="bucket-server-reaper", daemon=True).start()
    deadline = time.monotonic() + start_timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if rundir.exists(address.socket_path.name) and _answers(rundir, address.socket_path.name):
            return
        code = process.returncode
        if code is not None:
            raise ServerStartError(f"the bucket server exited with code {code} at start: {_log_tail(rundir, address.log_path.name)} (log: {address.log_path})")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    process.kill()
    raise ServerStartError(f"the bucket server did not start within {start_timeout:.0f}s (log: {address.log_path})")
