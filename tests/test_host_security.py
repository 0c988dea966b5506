"""Nobody else on the host gets the token or the server (issue 16, section 3).

Each test plays the local attacker with what it controls: a runtime directory swapped for a symlink, a
directory open to others, a planted log symlink, a server of another uid, a full listen backlog. Everything
runs for real: the real bucket server over its real socket, real SO_PEERCRED, real signals to pause it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucket_server import PROTOCOL_VERSION
from bucket_server.protocol import read_frame, write_frame
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, _Connection
from optimum_neuron_cache.errors import ServerStartError
from optimum_neuron_cache.server_launcher import (
    ENV_RUNTIME_DIR,
    check_peer_uid,
    connect_server,
    ensure_server,
    server_address,
)
from bucket_server.private_dir import peer_uid

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_host_security_secret_token"
_SERVE = (
    "import sys\n"
    "from bucket_server.server import BucketServer\n"
    "BucketServer(sys.argv[1], 'http://127.0.0.1:9', 60, backlog=int(sys.argv[2])).serve_forever()\n"
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (Unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="onc-sec-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def _wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _dir_client(tmp_path: Path) -> BucketClient:
    bucket = tmp_path / "bucket"
    bucket.mkdir(exist_ok=True)
    return BucketClient(BucketRef("dir", str(bucket)))


# ---------------------------------------------------------------------------------------------- runtime dir
def test_a_runtime_dir_that_is_a_symlink_is_refused_even_to_a_dir_of_ours(tmp_path, short_dir, monkeypatch):
    target = short_dir / "ours"
    target.mkdir(mode=0o700)
    link = short_dir / "rt"
    link.symlink_to(target)
    with monkeypatch.context() as patch:
        patch.setenv(ENV_RUNTIME_DIR, str(link))
        with pytest.raises(ServerStartError) as caught:
            server_address()
        text = _one_line(caught.value)
        assert str(link) in text and "symlink" in text and ENV_RUNTIME_DIR in text
        with pytest.raises(ServerStartError, match="symlink"):
            _dir_client(tmp_path).list("")
    assert list(target.iterdir()) == []  # no socket, lock or log was made through the link


def test_a_runtime_dir_open_to_others_is_refused(tmp_path, short_dir, monkeypatch):
    runtime = short_dir / "rt"
    runtime.mkdir()
    os.chmod(runtime, 0o755)
    with monkeypatch.context() as patch:
        patch.setenv(ENV_RUNTIME_DIR, str(runtime))
        with pytest.raises(ServerStartError) as caught:
            _dir_client(tmp_path).list("")
        text = _one_line(caught.value)
        assert str(runtime) in text and "0o755" in text and "mode 0700" in text and ENV_RUNTIME_DIR in text
    assert list(runtime.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_a_runtime_dir_of_another_user_is_refused(tmp_path, short_dir, monkeypatch):
    runtime = short_dir / "rt"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    with monkeypatch.context() as patch:
        patch.setenv(ENV_RUNTIME_DIR, str(runtime))
        with pytest.raises(ServerStartError) as caught:
            _dir_client(tmp_path).list("")
        assert "uid 65534" in _one_line(caught.value)


def test_the_tmp_fallback_refuses_a_symlink_planted_at_its_name(tmp_path, short_dir, monkeypatch):
    """The attack of the issue: in /tmp, with fs.protected_symlinks=0, a local user plants
    /tmp/optimum-neuron-cache-<uid> as a symlink (to a dir of ours first, to pass a check that follows it)."""
    ours = short_dir / "ours"
    ours.mkdir(mode=0o700)
    (short_dir / f"optimum-neuron-cache-{os.getuid()}").symlink_to(ours)
    with monkeypatch.context() as patch:
        patch.delenv(ENV_RUNTIME_DIR)
        patch.delenv("XDG_RUNTIME_DIR", raising=False)
        patch.setattr(tempfile, "tempdir", str(short_dir))
        with pytest.raises(ServerStartError) as caught:
            _dir_client(tmp_path).list("")
        assert f"optimum-neuron-cache-{os.getuid()} is a symlink" in _one_line(caught.value)
    assert list(ours.iterdir()) == []


# ------------------------------------------------------------------------- a real server we can pause
class PausedServer:
    """The real bucket server in its own process, with a listen backlog of `backlog`, paused (SIGSTOP) with its
    backlog full: every connect gets EAGAIN until `resume()`."""

    def __init__(self, socket_path: Path, backlog: int = 1) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.socket_path = socket_path
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE, str(socket_path), str(backlog)], env=env)
        self.fillers: list[socket.socket] = []
        _wait_for(self._answers, what="the server to listen")
        os.kill(self.process.pid, signal.SIGSTOP)
        _wait_for(self._stopped, what="the server to stop")
        for _ in range(backlog + 8):
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect(str(socket_path))
            except BlockingIOError:
                filler.close()
                break
            self.fillers.append(filler)
        else:
            raise AssertionError("the paused server's backlog never filled")

    def _answers(self) -> bool:
        assert self.process.poll() is None, "the test server exited"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _stopped(self) -> bool:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] == "T"

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def paused_server() -> Iterator[PausedServer]:
    server = PausedServer(server_address().socket_path)
    yield server
    server.close()


def _hello(sock: socket.socket) -> dict:
    write_frame(sock, {"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION, "client_version": "test"}})
    return read_frame(sock)


def test_many_connects_at_once_to_a_full_backlog_all_succeed(paused_server):
    """64 ranks connect while the server's backlog (1 here) is full: each one meets EAGAIN, backs off, and
    gets through once the server accepts again."""
    count = int(os.environ.get("NEURON_CACHE_TEST_CONNECTS", "64"))
    address = server_address()
    busy: set[int] = set()
    busy_changed = threading.Condition()
    replies: list[dict] = []
    errors: list[BaseException] = []

    def on_busy() -> None:
        with busy_changed:
            busy.add(threading.get_ident())
            busy_changed.notify_all()

    def rank() -> None:
        try:
            sock = connect_server(address, 60, on_busy=on_busy)
            with sock:
                replies.append(_hello(sock))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(count)]
    for thread in threads:
        thread.start()
    with busy_changed:
        assert busy_changed.wait_for(lambda: len(busy) == count or errors, timeout=60), "not every rank met a full backlog"
    assert not errors
    paused_server.resume()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[:3]
    assert len(replies) == count and all(reply["ok"] and reply["result"]["pid"] == paused_server.process.pid for reply in replies)


def test_a_busy_server_is_not_taken_for_dead(paused_server):
    """A full backlog is a live server: ensure_server must not unlink its socket and start a second one."""
    address = server_address()
    inode = address.socket_path.stat().st_ino
    ensure_server(address)
    assert address.socket_path.stat().st_ino == inode
    paused_server.resume()
    with connect_server(address, 30) as sock:
        assert _hello(sock)["result"]["pid"] == paused_server.process.pid


class Recorder:
    """A listening socket that records every byte it receives and answers `hello` (so a client that did not
    check its peer would go on to send a request, token included)."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.listener.settimeout(0.05)
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.handlers: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                if self.stop.is_set():
                    break
                continue
            handler = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.handlers.append(handler)
            handler.start()
        self.listener.setblocking(False)  # what was queued before stop() is accepted too
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        data = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
                if b'"hello"' in chunk:
                    write_frame(conn, {"id": 1, "ok": True, "result": {"protocol": PROTOCOL_VERSION, "pid": 0}})
        self.received.append(data)

    def finish(self) -> list[bytes]:
        self.stop.set()
        self.thread.join(timeout=30)
        for handler in self.handlers:
            handler.join(timeout=30)
        self.listener.close()
        return self.received


def test_a_runtime_dir_swapped_for_a_symlink_mid_connect_cannot_redirect_it(paused_server, short_dir):
    """The race of the issue, made deterministic: the client has checked the runtime dir and is connecting
    (the server is busy: EAGAIN), when the attacker renames the dir away and puts a symlink to theirs, where a
    fake server waits. The connect still reaches our server, through the descriptor that was checked."""
    address = server_address()
    runtime = address.socket_path.parent
    moved = runtime.with_name(runtime.name + ".moved")
    attacker = short_dir / "attacker"
    attacker.mkdir(mode=0o700)
    fake = Recorder(attacker / address.socket_path.name)
    swapped: list[bool] = []

    def swap_then_resume() -> None:
        if not swapped:
            os.rename(runtime, moved)
            os.symlink(attacker, runtime)
            swapped.append(True)
            paused_server.resume()

    try:
        with connect_server(address, 60, on_busy=swap_then_resume) as sock:
            reply = _hello(sock)
        assert swapped and reply["ok"] and reply["result"]["pid"] == paused_server.process.pid
        with pytest.raises(ServerStartError, match="is a symlink"):  # and the next connect refuses the name
            connect_server(address, 5)
    finally:
        received = fake.finish()
        if runtime.is_symlink():
            runtime.unlink()
            os.rename(moved, runtime)
    assert received == []  # the fake server was never even connected to


# --------------------------------------------------------------------------------------- peer uid
def test_the_peer_uid_check_reads_the_real_credentials():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_uid(left) == os.getuid()
        check_peer_uid(left, os.getuid(), Path("/run/x.sock"))  # ours: accepted
        with pytest.raises(ServerStartError) as caught:
            check_peer_uid(left, os.getuid() + 1, Path("/run/x.sock"))
        text = _one_line(caught.value)
        assert f"runs as uid {os.getuid()}, not {os.getuid() + 1}" in text and "/run/x.sock" in text


def test_the_client_refuses_a_server_of_another_uid_before_sending_anything(tmp_path, monkeypatch):
    """A server whose uid is not the one expected gets nothing: no hello, and above all no request carrying
    the token. (Tests run as one uid, so the client is told to expect another.)"""
    monkeypatch.setenv("NEURON_CACHE_REQUEST_TIMEOUT", "5")  # a client that did not check fails fast, not in 60 s
    address = server_address()
    fake = Recorder(address.socket_path)
    connection = _Connection(address, dict(os.environ))
    connection.expected_uid = os.getuid() + 1
    message = {"op": "list", "args": {"prefix": ""}, "bucket": BucketRef("hf", "org/name").to_wire(), "auth": {"token": TOKEN}}
    try:
        with pytest.raises(ServerStartError) as caught:
            connection.request(message)
        assert "nothing was sent" in _one_line(caught.value)
    finally:
        connection.close()
        received = fake.finish()
    assert received and all(data == b"" for data in received)  # connected to, and sent not one byte


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a server as another user")
def test_a_server_run_by_another_user_never_gets_the_token(tmp_path, monkeypatch):
    """End to end, with a real foreign server: a process of uid 65534 listening on our socket path."""
    address = server_address()
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s.listen(8); print('ready', flush=True); s.settimeout(30)\n"
        "got = b''\n"
        "while not sys.stdin.readline().startswith('done'):\n"
        "    c, _ = s.accept(); c.settimeout(5)\n"
        "    while (chunk := c.recv(65536)): got += chunk\n"
        "    print('conn', flush=True)\n"
        "print(repr(got), flush=True)\n"
    )
    foreign = subprocess.Popen([sys.executable, "-c", code, str(address.socket_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert foreign.stdout.readline().strip() == "ready"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NEURON_CACHE_REQUEST_TIMEOUT", "5")
    client = BucketClient(BucketRef("hf", "org/name"))
    with pytest.raises(ServerStartError, match="runs as uid 65534"):
        client.list("")
    out, _ = foreign.communicate("done\n", timeout=60)
    assert out.splitlines()[-1] == "b''" and TOKEN not in out


# --------------------------------------------------------------------------------------------- the log
def test_a_planted_log_symlink_is_never_written_through(tmp_path):
    address = server_address()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    address.log_path.symlink_to(victim)
    with pytest.raises(ServerStartError) as caught:
        _dir_client(tmp_path).list("")
    text = _one_line(caught.value)
    assert str(address.log_path) in text and "symlink" in text and "remove it" in text
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not address.socket_path.exists()  # no server was started


def test_a_log_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path):
    address = server_address()
    os.mkfifo(address.log_path, 0o600)  # opening a FIFO for writing with no reader would block for ever
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(_raises(lambda: _dir_client(tmp_path).list(""))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert isinstance(outcome[0], ServerStartError) and "cannot be opened" in _one_line(outcome[0])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the log to another user")
def test_a_log_of_another_user_is_refused(tmp_path):
    address = server_address()
    address.log_path.write_text("")
    os.chown(address.log_path, 65534, 65534)
    with pytest.raises(ServerStartError, match="not a regular file of uid"):
        _dir_client(tmp_path).list("")


def test_the_log_is_a_private_regular_file(tmp_path):
    address = server_address()
    address.log_path.write_text("an earlier run\n")
    os.chmod(address.log_path, 0o644)
    assert _dir_client(tmp_path).list("") == []
    info = address.log_path.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert address.log_path.read_text().startswith("an earlier run\n")  # appended to, never truncated


def _raises(call) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


# ------------------------------------------------------------------------------------ the server's side
@pytest.mark.parametrize("kind", ["open to others", "symlink"])
def test_the_server_will_not_bind_in_an_unsafe_directory(short_dir, kind):
    real = short_dir / "real"
    real.mkdir(mode=0o700)
    if kind == "open to others":
        os.chmod(real, 0o755)
        where = real
    else:
        where = short_dir / "link"
        where.symlink_to(real)
    boot = REPO / "bucket_server" / "boot.py"
    result = subprocess.run([sys.executable, "-s", str(boot), "--socket", str(where / "s.sock"), "--endpoint", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "runtime directory" in line]
    assert len(lines) == 1 and str(where) in lines[0] and "will not bind" in lines[0], result.stderr
    assert list(real.iterdir()) == []
