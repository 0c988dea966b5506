"""A warm run sends its one request before reading its local cache (`BucketClient.connect_ahead`): the request
is answered once and counted once, any other request still gets its own reply, nothing starts a server early,
and a server that dies or speaks another protocol meanwhile costs only what it cost before. The server hands
connections to waiting threads and serves many at once."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from bucket_server.messages import PathsInfoRequest
from bucket_server.protocol import read_frame, write_frame
from optimum_neuron_cache import client as client_module
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, running_server
from optimum_neuron_cache.server_launcher import server_address
from tests.polling import wait_until
from tests.test_server import _fake_server, _wait_gone


def _bucket(tmp_path: Path) -> BucketRef:
    root = tmp_path / "bucket"
    (root / "area").mkdir(parents=True, exist_ok=True)
    (root / "area" / "a.json").write_text("{}")
    (root / "area" / "b.json").write_text("[]")
    return BucketRef("dir", str(root))


def _new_process_connection() -> None:
    """Forget this process's connections (the server keeps running): the next client connects as a new process."""
    with client_module._connections_lock:
        for conn in client_module._connections.values():
            conn.close()
        client_module._connections.clear()


def _served(op: str) -> int:
    """How many `op` requests the server has answered (its log says each one)."""
    try:
        text = server_address().log_path.read_text()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if f" {op} ok in " in line or f" {op} failed in " in line)


def test_a_request_sent_ahead_is_answered_once_and_counted_once(tmp_path):
    ref = _bucket(tmp_path)
    BucketClient(ref).server_status()  # a running server
    for reuse in (False, True):  # a new connection (behind the handshake), then the one already open
        if not reuse:
            _new_process_connection()
        before = _served("paths_info")
        client = BucketClient(ref)
        client.connect_ahead(PathsInfoRequest(("area/a.json", "area/missing")))
        assert client.requests == 1
        wait_until(lambda: _served("paths_info") == before + 1, "the server answers the request sent ahead")
        assert [item["path"] for item in client.paths_info(["area/a.json", "area/missing"])] == ["area/a.json"]
        assert client.requests == 1 and _served("paths_info") == before + 1
        assert sorted(item["path"] for item in client.list("area")) == ["area/a.json", "area/b.json"]  # in step
        assert client.requests == 2


def test_another_request_gets_its_own_reply_and_the_one_sent_ahead_is_dropped(tmp_path):
    ref = _bucket(tmp_path)
    BucketClient(ref).server_status()
    _new_process_connection()
    client = BucketClient(ref)
    client.connect_ahead(PathsInfoRequest(("area/a.json",)))
    assert sorted(item["path"] for item in client.list("area")) == ["area/a.json", "area/b.json"]
    assert [item["path"] for item in client.paths_info(["area/b.json"])] == ["area/b.json"]
    assert client.requests == 3  # the one sent ahead was sent, so it counts


def test_connecting_ahead_starts_no_server(tmp_path):
    ref = _bucket(tmp_path)
    assert running_server() is None
    client = BucketClient(ref)
    client.connect_ahead(PathsInfoRequest(("area/a.json",)))
    assert running_server() is None and client.requests == 0
    assert [item["path"] for item in client.paths_info(["area/a.json"])] == ["area/a.json"]  # the request starts it
    assert client.requests == 1


def test_a_server_killed_after_a_request_was_sent_ahead_is_restarted(tmp_path):
    ref = _bucket(tmp_path)
    first = BucketClient(ref).server_status()["pid"]
    _new_process_connection()
    client = BucketClient(ref)
    client.connect_ahead(PathsInfoRequest(("area/a.json",)))
    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    assert [item["path"] for item in client.paths_info(["area/a.json"])] == ["area/a.json"]
    assert client.server_status()["pid"] != first


def test_a_server_of_another_protocol_behind_an_early_handshake_is_replaced(tmp_path):
    def old_server(request):
        if request.get("op") == "shutdown":
            return {"id": request.get("id"), "ok": True, "result": {"stopping": True}}
        return {"id": request.get("id"), "ok": False, "error": {"code": "protocol_mismatch", "message": "server speaks protocol 0"}}

    ref = _bucket(tmp_path)
    _, thread = _fake_server(server_address().socket_path, old_server)
    client = BucketClient(ref)
    client.connect_ahead(PathsInfoRequest(("area/a.json",)))
    assert [item["path"] for item in client.paths_info(["area/a.json"])] == ["area/a.json"]  # ours started
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_connections_are_served_at_once_and_few_threads_wait_after():
    """A burst of clients (ranks of one host) is served at once, one thread each; once they hang up, at most
    `keep` threads wait for the next, which is served by one of them."""
    from bucket_server.server import ConnectionThreads

    burst, keep = 6, 2
    arrived = threading.Barrier(burst + 1)
    served_by: list[int] = []

    def serve(conn: socket.socket) -> None:
        request = read_frame(conn)
        if request == {"op": "wait"}:
            arrived.wait(timeout=30)  # every connection of the burst is being served at this instant
        served_by.append(threading.get_ident())
        write_frame(conn, {"ok": True})
        conn.close()

    threads = ConnectionThreads(serve, keep=keep)
    threads.start()
    clients = []
    for _ in range(burst):
        ours, theirs = socket.socketpair()
        ours.settimeout(30)
        threads.serve(theirs)
        write_frame(ours, {"op": "wait"})
        clients.append(ours)
    arrived.wait(timeout=30)
    assert all(read_frame(sock) == {"ok": True} for sock in clients)
    wait_until(lambda: threads._waiting == keep, "the threads of the burst go back to waiting, up to keep")
    burst_threads = set(served_by)
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    threads.serve(theirs)
    write_frame(ours, {"op": "once"})
    assert read_frame(ours) == {"ok": True}
    assert served_by[-1] in burst_threads
    for sock in clients + [ours]:
        sock.close()
