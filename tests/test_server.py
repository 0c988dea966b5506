"""The bucket server over its real Unix socket: start once, handshake, survive bad frames, idle exit, restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bucket_server import PROTOCOL_VERSION
from bucket_server.protocol import read_frame, write_frame
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server, stop_server
from optimum_neuron_cache.errors import BucketNotFoundError, RemoteInvalidDataError
from optimum_neuron_cache.server_launcher import server_address

REPO = Path(__file__).resolve().parent.parent


def _dir_client(tmp_path: Path) -> BucketClient:
    bucket = tmp_path / "bucket"
    bucket.mkdir(exist_ok=True)
    return BucketClient(BucketRef("dir", str(bucket)))


def _raw(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_handshake_status_and_private_socket_dir(tmp_path):
    client = _dir_client(tmp_path)
    assert client.list("") == []
    status = client.server_status()
    address = server_address()
    assert status["protocol"] == PROTOCOL_VERSION and status["pid"] > 0 and status["socket"] == str(address.socket_path)
    mode = stat.S_IMODE(address.socket_path.parent.stat().st_mode)
    assert mode == 0o700
    assert running_server()["pid"] == status["pid"]


def test_dir_backend_operations_through_the_server(tmp_path):
    client = _dir_client(tmp_path)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(70_000))
    client.batch(add=[{"dest": "a/b/file.bin", "local_path": str(src)}, {"dest": "a/marker", "content": ""}])
    client.batch(copy=[{"src": "a/b/file.bin", "dest": "c/file.bin"}])
    assert {item["path"]: item["size"] for item in client.list("", recursive=True)} == {
        "a/b/file.bin": 70_000, "a/marker": 0, "c/file.bin": 70_000,
    }
    assert [item["path"] for item in client.list("a", recursive=False)] == ["a/b", "a/marker"]
    assert [item["path"] for item in client.paths_info(["a/marker", "missing/x"])] == ["a/marker"]
    out = tmp_path / "out" / "file.bin"
    out.parent.mkdir()
    client.download([{"path": "c/file.bin", "local_path": str(out), "size": 70_000}])
    assert out.read_bytes() == src.read_bytes()
    client.batch(delete=["c/file.bin"])
    assert client.paths_info(["c/file.bin"]) == []
    assert not (tmp_path / "bucket" / ".incoming").exists() or not any((tmp_path / "bucket" / ".incoming").iterdir())


def test_unsafe_paths_and_symlinks_are_refused(tmp_path):
    client = _dir_client(tmp_path)
    for bad in ("../escape", "/abs/path", "a\\b", "a//b", "a/./b"):
        with pytest.raises(RemoteInvalidDataError):
            client.batch(add=[{"dest": bad, "content": "x"}])
    secret = tmp_path / "secret"
    secret.write_text("do not upload")
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(RemoteInvalidDataError):
        client.batch(add=[{"dest": "x/link", "local_path": str(link)}])
    assert client.list("", recursive=True) == []


def test_missing_directory_bucket_is_a_typed_error(tmp_path):
    client = BucketClient(BucketRef("dir", str(tmp_path / "nope")))
    with pytest.raises(BucketNotFoundError, match="neuron-cache create"):
        client.list("")


def test_bad_frames_do_not_crash_the_server(tmp_path):
    client = _dir_client(tmp_path)
    pid = client.server_status()["pid"]
    path = server_address().socket_path
    # Not JSON.
    sock = _raw(path)
    sock.sendall(struct.pack(">I", 5) + b"hello")
    reply = read_frame(sock)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    sock.close()
    # An absurd length.
    sock = _raw(path)
    sock.sendall(struct.pack(">I", 0xFFFFFFFF))
    assert read_frame(sock)["error"]["code"] == "bad_request"
    sock.close()
    # Hanging up mid-frame.
    sock = _raw(path)
    sock.sendall(struct.pack(">I", 100) + b'{"op":')
    sock.close()
    # An unknown operation, then a good one on the same connection.
    sock = _raw(path)
    write_frame(sock, {"id": 7, "op": "format_disk", "args": {}})
    assert read_frame(sock) == {"id": 7, "ok": False, "error": {"code": "bad_request", "message": "unknown operation 'format_disk'", "retryable": False}}
    write_frame(sock, {"id": 8, "op": "status", "args": {}})
    assert read_frame(sock)["result"]["pid"] == pid
    sock.close()
    assert client.server_status()["pid"] == pid


_START = """
import sys
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.buckets import BucketRef
print(BucketClient(BucketRef("dir", sys.argv[1])).server_status()["pid"])
"""


def test_many_processes_starting_at_once_get_one_server(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _START, str(bucket)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(int(os.environ.get("NEURON_CACHE_TEST_STARTERS", "12")))]
    pids = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(pids) == 1
    servers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_server_of(p, server_address().socket_path)]
    assert [p.name for p in servers] == list(pids)


def _is_server_of(proc: Path, socket_path: Path) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"boot.py") for arg in cmdline) and str(socket_path).encode() in cmdline


def test_killed_server_is_restarted_and_the_request_retried(tmp_path):
    client = _dir_client(tmp_path)
    first = client.server_status()["pid"]
    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    assert client.list("") == []  # the stale socket is replaced, the idempotent request retried
    assert client.server_status()["pid"] != first


def test_stale_socket_file_is_replaced(tmp_path):
    path = server_address().socket_path
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on: what a killed server leaves
    assert _dir_client(tmp_path).list("") == []


def test_idle_server_exits_but_never_while_a_client_is_connected(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_SERVER_IDLE_TIMEOUT", "1")
    client = _dir_client(tmp_path)
    pid = client.server_status()["pid"]
    # Kept as a sleep: nothing is meant to happen, so the test must leave the server alone (any request would
    # reset its idle clock) for longer than its idle timeout, then look. The status says the window was long enough.
    time.sleep(2.0)
    status = client.server_status()
    assert status["idle_for"] > status["idle_timeout"]  # no bucket operation for longer than the timeout...
    assert status["pid"] == pid and status["connections"] >= 1  # ...and the open connection kept it alive
    stop_server_connections_only = server_address().socket_path
    from optimum_neuron_cache import client as client_module

    for key in [k for k in client_module._connections if k[0] == stop_server_connections_only]:
        client_module._connections.pop(key).close()
    assert _wait_gone(pid, timeout=10)
    assert not server_address().socket_path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_cannot_talk_to_the_server(tmp_path):
    client = _dir_client(tmp_path)
    client.server_status()
    path = server_address().socket_path
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('denied'); sys.exit(0)\n"
        "print('connected')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30).stdout
    assert out.strip() == "denied"
    # Even with the directory opened up, the server checks the peer's uid and hangs up.
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o777)
    try:
        code2 = (
            "import os, socket, struct, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
            "body = b'{\"id\":1,\"op\":\"status\",\"args\":{}}'\n"
            "try:\n    s.sendall(struct.pack('>I', len(body)) + body)\n    data = s.recv(4)\n"
            "except (BrokenPipeError, ConnectionResetError):\n    data = b''\n"
            "print('reply' if data else 'hung up')\n"
        )
        out = subprocess.run([sys.executable, "-c", code2, str(path)], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "hung up", out.stderr
    finally:
        os.chmod(path.parent, 0o700)
    assert client.server_status()["pid"] > 0


def test_stop_server(tmp_path):
    client = _dir_client(tmp_path)
    pid = client.server_status()["pid"]
    assert stop_server() is True
    assert _wait_gone(pid)
    assert running_server() is None
    assert stop_server() is False


def _fake_server(path: Path, answer) -> tuple[socket.socket, threading.Thread]:
    """A stand-in on the server's socket: `answer(request)` returns a reply dict, or None to stay silent."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                while (request := read_frame(conn)) is not None:
                    reply = answer(request)
                    if reply is not None:
                        write_frame(conn, reply)
                    if request.get("op") == "shutdown":
                        listener.close()
                        path.unlink(missing_ok=True)
                        return
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_server_of_another_protocol_is_replaced(tmp_path):
    path = server_address().socket_path

    def old_server(request):
        if request.get("op") == "shutdown":
            return {"id": request.get("id"), "ok": True, "result": {"stopping": True}}
        return {"id": request.get("id"), "ok": False, "error": {"code": "protocol_mismatch", "message": "server speaks protocol 0"}}

    _, thread = _fake_server(path, old_server)
    client = _dir_client(tmp_path)
    assert client.list("") == []  # the old server was asked to stop, and ours started
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert client.server_status()["protocol"] == PROTOCOL_VERSION


def test_a_hung_server_does_not_hang_the_client(tmp_path, monkeypatch):
    from optimum_neuron_cache.errors import ServerError

    monkeypatch.setenv("NEURON_CACHE_REQUEST_TIMEOUT", "1")
    listener, _ = _fake_server(server_address().socket_path, lambda request: None)  # reads, never answers
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_call_and_catch(tmp_path, ServerError)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    listener.close()
    assert not worker.is_alive() and outcome == ["ServerError"]


def _call_and_catch(tmp_path: Path, error: type[Exception]) -> str:
    try:
        _dir_client(tmp_path).list("")
    except error as exc:
        return type(exc).__name__
    return "no error"


def test_one_thread_beats_for_every_running_request_until_it_ends():
    """A client tells a long request from a hung server by the heartbeats: each running request gets them, from
    one thread for the whole server (not a thread per request), and none once it has ended."""
    from bucket_server.server import Heartbeats

    beats = Heartbeats(interval=0.05)
    (a_server, a_client), (b_server, b_client) = socket.socketpair(), socket.socketpair()
    a_client.settimeout(10), b_client.settimeout(10)
    with beats.running(a_server, "a", threading.Lock()), beats.running(b_server, "b", threading.Lock()):
        for _ in range(2):
            assert read_frame(a_client) == {"id": "a", "heartbeat": True}
            assert read_frame(b_client) == {"id": "b", "heartbeat": True}
        assert [t.name for t in threading.enumerate()].count("heartbeats") == 1
    assert beats._running == {}  # ended: nothing left to beat for
    for sock in (a_server, a_client, b_server, b_client):
        sock.close()


def test_an_abandoned_download_leaves_nothing_of_its_own_and_never_touches_the_shared_temp_folder(tmp_path):
    """A client killed mid-download never collects its files: the server removes them and the folders it
    emptied, up to the client's own temp folder, and never the folder that holds every client's temp folder
    (records and manifests sit directly in the client's temp folder, entries one level down)."""
    from bucket_server.messages import DownloadFile, DownloadRequest
    from bucket_server.server import _remove_uncollected

    shared = tmp_path / "cache" / ".optimum-neuron-cache" / "tmp"
    dead, alive = shared / "tmp-dead", shared / "tmp-alive"
    files = [dead / "MODULE_1+a" / "model.neff", dead / "MODULE_2+b" / "model.neff", dead / "record-0.json"]
    for path in files + [alive / "MODULE_3+c" / "model.neff"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    _remove_uncollected(DownloadRequest(tuple(DownloadFile(f"p{i}", str(path)) for i, path in enumerate(files))))
    assert not dead.exists() and (alive / "MODULE_3+c" / "model.neff").exists()
    (alive / "MODULE_3+c" / "model.neff").unlink()
    (alive / "MODULE_3+c").rmdir()
    alive.rmdir()
    # A request of one file removes its folder only: the shared folder stays, empty.
    (dead / "record-0.json").parent.mkdir()
    (dead / "record-0.json").write_bytes(b"x")
    _remove_uncollected(DownloadRequest((DownloadFile("p", str(dead / "record-0.json")),)))
    assert not dead.exists() and shared.is_dir()


def test_frames_nested_too_deeply_or_with_huge_integers_get_bad_request(tmp_path):
    """A frame the JSON decoder cannot read (nesting past its bound, an integer over Python's 4,300-digit limit) or
    whose id cannot be echoed gets a bad_request reply, never a crash; the server serves the next client."""
    client = _dir_client(tmp_path)
    pid = client.server_status()["pid"]
    path = server_address().socket_path
    deep = b'{"id": 1, "op": "status", "args": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    huge = b'{"id": 1, "op": "list", "args": {"prefix": "", "recursive": ' + b"9" * 5000 + b"}}"
    for payload in (deep, huge):
        sock = _raw(path)
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        reply = read_frame(sock)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        sock.close()
    sock = _raw(path)
    nested_id = b'{"id": ' + b"[" * 900 + b"]" * 900 + b', "op": "status", "args": {}}'
    sock.sendall(struct.pack(">I", len(nested_id)) + nested_id)
    assert read_frame(sock)["error"]["code"] == "bad_request"
    write_frame(sock, {"id": 2, "op": "status", "args": {}})  # the stream is still in step
    assert read_frame(sock)["result"]["pid"] == pid
    sock.close()
    assert client.server_status()["pid"] == pid
    log = server_address().log_path.read_text()
    assert "crashed" not in log and "Traceback" not in log


def test_the_client_reads_a_hostile_reply_as_one_error(tmp_path):
    """The client decodes a reply the same way: a frame nested too deeply or with a huge integer is a FrameError
    (then one ServerError line), never a RecursionError or ValueError from deep in the decoder."""
    from bucket_server.protocol import FrameError

    left, right = socket.socketpair()
    with left, right:
        for payload in (b"[" * 100_000 + b"]" * 100_000, b'{"id": ' + b"7" * 5000 + b"}"):
            right.sendall(struct.pack(">I", len(payload)) + payload)
            with pytest.raises(FrameError):
                read_frame(left)
        # Progress figures that are no counts (1e999 reads as inf, text, a bool) are left out, never raised.
        from optimum_neuron_cache.client import _Connection

        connection = _Connection(server_address(), dict(os.environ))
        connection.sock = left
        for figures in ({"done": 1e999, "total": 5}, {"done": "x", "total": 5}, {"done": True, "total": [1]}):
            right.sendall(struct.pack(">I", len(body := json.dumps({"id": 3, "progress": figures}).encode())) + body)
        right.sendall(struct.pack(">I", len(body := b'{"id": 3, "progress": {"done": 1, "total": 5}}')) + body)
        write_frame(right, {"id": 3, "ok": True, "result": {}})
        seen = []
        assert connection._await(3, lambda done, total: seen.append((done, total)))["ok"] is True
        assert seen == [(1, 5)]
        connection.sock = None
