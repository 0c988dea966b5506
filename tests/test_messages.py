"""The typed messages of the protocol (bucket_server/messages.py): the same JSON as ever on the wire, hostile
values refused at the server's edge, and a listing's untrusted items costing only themselves at the client's."""

from __future__ import annotations

import json
import logging
import math
import socket
from pathlib import Path

import pytest

from bucket_server import PROTOCOL_VERSION, messages
from bucket_server.messages import (
    OPS, AddFile, BatchRequest, BatchResult, CopyFile, CreateRequest, CreateResult, Described, DownloadFile,
    DownloadRequest, DownloadResult, Failure, FileItem, FolderItem, HelloRequest, InfoRequest, InfoResult,
    ListRequest, ListResult, MessageError, PathsInfoRequest, PathsInfoResult, ShutdownRequest, ShutdownResult,
    StatusRequest, StatusResult, op_of, parse_request, parse_result,
)
from bucket_server.protocol import read_frame, write_frame
from bucket_server.server import BucketServer
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import IDEMPOTENT, BucketClient
from optimum_neuron_cache.errors import RemoteInvalidDataError
from optimum_neuron_cache.server_launcher import server_address

DIGEST = "blake3:" + "ab" * 32
XET = "cd" * 32

#: op -> (args on the wire, result on the wire), as the protocol has always sent them.
WIRE = {
    "hello": ({"protocol": 1, "client_version": "0.1.0"},
              {"protocol": 1, "pid": 42, "server_version": "0.1.0", "socket": "/run/s.sock", "endpoint": "http://h",
               "python": "/usr/bin/python3", "huggingface_hub": "1.5.0", "uptime": 3.5, "idle_timeout": 300.0,
               "connections": 2, "requests": 0, "idle_for": 1.25}),
    "status": ({}, {"protocol": 1, "pid": 42, "server_version": "0.1.0", "socket": "/run/s.sock", "endpoint": "http://h",
                    "python": "/usr/bin/python3", "huggingface_hub": None, "uptime": 3.5, "idle_timeout": 300.0,
                    "connections": 1, "requests": 0, "idle_for": 0.0}),
    "shutdown": ({}, {"stopping": True}),
    "info": ({}, {"id": "org/bucket", "private": True, "size": 1234, "total_files": 3}),
    "create": ({"private": None}, {"created": False, "url": "http://h/buckets/org/bucket", "bucket_id": "org/bucket"}),
    "list": ({"prefix": "neuronxcc-2.21/models", "recursive": False},
             [{"type": "directory", "path": "neuronxcc-2.21/models/org--m"},
              {"type": "file", "path": "neuronxcc-2.21/models/x.json", "size": 12, "xet_hash": XET, "mtime": 1.5e9,
               "digest": f"xet:{XET}", "uploaded": 1.6e9}]),
    "paths_info": ({"paths": ["a/b", "c"]},
                   [{"type": "file", "path": "a/b", "size": 0, "xet_hash": None, "mtime": None, "digest": "stale",
                     "uploaded": None}]),
    "download": ({"files": [{"path": "a/model.neff", "local_path": "/tmp/x/model.neff", "size": 10, "xet_hash": XET,
                             "digest": DIGEST},
                            {"path": "a/exports/r.json", "local_path": "/tmp/x/r.json", "manifest": True},
                            {"path": "a/b", "local_path": "/tmp/x/b"}]},
                 {"files": 3, "bytes": 10, "failed": [{"path": "a/b", "reason": "changed after it was published"}]}),
    "batch": ({"add": [{"dest": "a/model.neff", "local_path": "/tmp/e/model.neff", "describe": True},
                       {"dest": "a/marker", "content": ""}],
               "copy": [{"src": "a/model.neff", "dest": "b/model.neff", "xet_hash": XET}, {"src": "a/x", "dest": "b/x"}],
               "delete": ["c/old"]},
              {"added": 2, "copied": 2, "deleted": 1, "described": {"a/model.neff": {"xet_hash": None, "digest": DIGEST}}}),
    "stage": ({"add": [{"dest": "a/model.neff", "local_path": "/tmp/e/model.neff", "describe": True},
                       {"dest": "a/model.done", "local_path": "/tmp/e/model.done"}]},
              {"stage": "0123abcd", "described": {"a/model.neff": {"xet_hash": XET, "digest": DIGEST}}}),
    "commit": ({"stage": "0123abcd",
                "phases": [{"add": [{"dest": "a/model.neff", "local_path": "/tmp/e/model.neff"}],
                            "copy": [{"src": "a/x", "dest": "b/x"}], "delete": []},
                           {"add": [{"dest": "a/model.done", "local_path": "/tmp/e/model.done"},
                                    {"dest": "a/.stamp.json", "content": "{}"}], "copy": [], "delete": []}]},
               {"phases": [{"added": 1, "copied": 1, "deleted": 0}, {"added": 2, "copied": 0, "deleted": 0}]}),
    "repo_info": ({}, {"id": "aws-neuron/optimum-neuron-cache", "sha": "0123456789abcdef0123456789abcdef01234567",
                       "private": False}),
    "repo_list": ({"prefix": "neuronxcc-2.15.128.0+56dc5a86", "recursive": True},
                  [{"type": "file", "path": "neuronxcc-2.15.128.0+56dc5a86/MODULE_1+2/model.neff", "size": 10,
                    "xet_hash": XET, "mtime": None, "digest": f"xet:{XET}", "uploaded": None, "blob_id": "ab" * 20}]),
    "repo_paths_info": ({"paths": ["a/model.done"]},
                        [{"type": "file", "path": "a/model.done", "size": 0, "xet_hash": None, "mtime": None,
                          "digest": None, "uploaded": None, "blob_id": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"}]),
    "repo_download": ({"files": [{"path": "a/model.done", "local_path": "/tmp/x/model.done", "size": 0,
                                  "blob_id": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"}]},
                      {"files": 1, "bytes": 0, "failed": []}),
    "repo_copy": ({"copies": [{"xet_hash": XET, "dest": "neuronxcc-2.15/MODULE_1+2/model.neff"}]}, {"copied": 1}),
    "lease": ({"path": "leases/neuronxcc-2.15/MODULE_1+2.lease", "mode": "replace", "content": "b", "expect": "a"},
              {"ok": True, "content": "b"}),
}


def test_every_op_has_types_a_server_handler_and_a_sample():
    """One registry: the server handles exactly the registered ops, the client's retry set comes from it."""
    server = BucketServer("/nonexistent/s.sock", "http://h", 1.0)
    assert set(server._handlers) == set(OPS) == set(WIRE)
    assert IDEMPOTENT == {name for name, op in OPS.items() if op.idempotent} and "shutdown" not in IDEMPOTENT
    for op in OPS.values():
        assert op_of(op.request.from_wire(WIRE[op.name][0])) is op


@pytest.mark.parametrize("op", sorted(WIRE))
def test_the_wire_form_is_unchanged_and_round_trips(op):
    args, result = WIRE[op]
    typed_args, typed_result = parse_request(op, args), parse_result(op, result)
    assert json.loads(json.dumps(typed_args.to_wire())) == args
    assert json.loads(json.dumps(typed_result.to_wire())) == result
    assert parse_request(op, typed_args.to_wire()) == typed_args
    assert parse_result(op, typed_result.to_wire()) == typed_result


def test_typed_values_read_as_their_fields():
    request = parse_request("download", WIRE["download"][0])
    assert request.files[0] == DownloadFile("a/model.neff", "/tmp/x/model.neff", 10, XET, DIGEST)
    assert request.files[1].manifest and request.files[1].size is None
    batch = parse_request("batch", WIRE["batch"][0])
    assert batch.add == (AddFile("a/model.neff", "/tmp/e/model.neff", describe=True), AddFile("a/marker", content=""))
    assert batch.copy[1] == CopyFile("a/x", "b/x") and batch.delete == ("c/old",)
    assert parse_result("batch", WIRE["batch"][1]).described == {"a/model.neff": Described(None, DIGEST)}
    assert parse_result("download", WIRE["download"][1]).failed == (Failure("a/b", "changed after it was published"),)
    listing = parse_result("list", WIRE["list"][1])
    assert [type(item) for item in listing.items] == [FolderItem, FileItem] and listing.items[1].size == 12
    # Defaults the server has always applied: a list is recursive from the root, a batch's lists may be absent.
    assert parse_request("list", {}) == ListRequest("", True)
    assert parse_request("list", {"prefix": "a/b/"}).prefix == "a/b"
    assert parse_request("batch", {"delete": ["x"]}) == BatchRequest(delete=("x",))
    assert parse_request("status", None) == StatusRequest() and parse_request("info", {"extra": 1}) == InfoRequest()
    assert BatchResult(1, 0, 0).to_wire() == {"added": 1, "copied": 0, "deleted": 0}  # no "described" when none


UNSAFE_PATHS = ["", "../escape", "a/../../b", "/abs/path", "a\\b", "a//b", "a/./b", "a/", "a\x00b", "x" * 1025, 7, None,
                ["a"]]
BAD_SIZES = [-1, True, "12", 1.0, math.inf, math.nan, 2**41, [1]]


@pytest.mark.parametrize("path", UNSAFE_PATHS, ids=repr)
def test_unsafe_remote_paths_are_refused_in_every_request(path):
    for op, args in [
        ("paths_info", {"paths": ["ok", path]}),
        ("download", {"files": [{"path": path, "local_path": "/tmp/x"}]}),
        ("batch", {"add": [{"dest": path, "content": "x"}]}),
        ("batch", {"copy": [{"src": path, "dest": "ok"}]}),
        ("batch", {"copy": [{"src": "ok", "dest": path}]}),
        ("batch", {"delete": [path]}),
    ]:
        with pytest.raises(MessageError):
            parse_request(op, args)
    if path not in ("", "a/"):  # the root, and a folder with its trailing '/': both fine as a prefix
        with pytest.raises(MessageError):
            parse_request("list", {"prefix": path})


@pytest.mark.parametrize("args", [
    {"files": [{"path": "a", "local_path": "relative/x"}]},
    {"files": [{"path": "a", "local_path": "/tmp/a\x00b"}]},
    {"files": [{"path": "a", "local_path": 5}]},
    {"files": [{"path": "a"}]},
    {"files": [{"path": "a", "local_path": "/tmp/x", "manifest": "yes"}]},
    {"files": [{"path": "a", "local_path": "/tmp/x", "digest": 5}]},
    {"files": [{"path": "a", "local_path": "/tmp/x", "xet_hash": "h" * 5000}]},
    {"files": {"path": "a", "local_path": "/tmp/x"}},
    {"files": ["a"]},
    {},
], ids=repr)
def test_bad_download_requests_are_refused(args):
    with pytest.raises(MessageError):
        parse_request("download", args)


@pytest.mark.parametrize("size", BAD_SIZES, ids=repr)
def test_sizes_must_be_whole_bytes_in_bounds(size):
    with pytest.raises(MessageError, match="not a valid number of bytes"):
        parse_request("download", {"files": [{"path": "a", "local_path": "/tmp/x", "size": size}]})
    with pytest.raises(MessageError, match="not a valid number of bytes"):
        FileItem.from_wire({"type": "file", "path": "a", "size": size})
    assert FileItem.from_wire({"type": "file", "path": "a", "size": messages.MAX_FILE_BYTES}).size == messages.MAX_FILE_BYTES


@pytest.mark.parametrize("op,args", [
    ("batch", {"add": [{"dest": "a", "content": 5}]}),
    ("batch", {"add": [{"dest": "a", "local_path": "rel"}]}),
    ("batch", {"add": [{"dest": "a", "local_path": "/tmp/x", "describe": 1}]}),
    ("batch", {"add": {"dest": "a"}}),
    ("batch", {"copy": [{"src": "a", "dest": "b", "xet_hash": 3}]}),
    ("batch", []),
    ("create", {"private": "no"}),
    ("list", {"recursive": "false"}),
    ("list", {"prefix": None}),
    ("hello", "1"),
    ("paths_info", {"paths": "a/b"}),
    ("status", "x"),
    ("format_disk", {}),
], ids=repr)
def test_other_bad_requests_are_refused(op, args):
    with pytest.raises(MessageError):
        parse_request(op, args)


def test_a_listing_costs_only_its_untrusted_items():
    """Bucket data: bad paths, sizes, hashes and types are left out and named; the rest is kept."""
    good = {"type": "file", "path": "v/MODULE_1+a/model.neff", "size": 5, "xet_hash": XET, "mtime": 1.0, "digest": None,
            "uploaded": 2.0}
    hostile = [
        {"type": "file", "path": "v/../../etc/passwd", "size": 5},
        {"type": "file", "path": "/abs", "size": 5},
        {"type": "file", "path": "v/x", "size": math.inf},
        {"type": "file", "path": "v/y", "size": -1},
        {"type": "file", "path": "v/z", "size": True},
        {"type": "file", "path": "v/w", "size": "12"},
        {"type": "file", "path": "v/h", "size": 1, "xet_hash": 12},
        {"type": "file", "path": "v/d", "size": 1, "digest": ["x"]},
        {"type": "symlink", "path": "v/l"},
        {"type": "directory", "path": "v/.."},
        "not an object",
        None,
    ]
    listing = ListResult.from_wire([good, *hostile, {"type": "directory", "path": "v/folder"}])
    assert listing.to_wire() == [good, {"type": "directory", "path": "v/folder"}]
    assert len(listing.skipped) == len(hostile)
    assert "not a valid number of bytes" in listing.skipped[2]
    # A bad time stamp is dropped, not the file (an unknown upload time is never judged old by prune or scrub).
    assert FileItem.from_wire({**good, "mtime": math.nan}).mtime is None
    assert FileItem.from_wire({**good, "mtime": 10**400}).mtime is None
    assert FileItem.from_wire({**good, "uploaded": math.inf}).uploaded is None
    assert FileItem.from_wire({**good, "uploaded": 1.7e9}).uploaded == 1.7e9
    assert PathsInfoResult.from_wire([good, hostile[0]]).files == (FileItem.from_wire(good),)
    with pytest.raises(MessageError):
        ListResult.from_wire({"items": []})  # not a listing at all: the whole reply is refused


@pytest.mark.parametrize("op,result", [
    ("download", {"files": 1, "bytes": 1, "failed": [{"path": "a"}]}),  # a failure the client would miss
    ("download", {"files": 1, "bytes": -1, "failed": []}),
    ("download", {"files": 1, "bytes": math.inf, "failed": []}),
    ("batch", {"added": 1, "copied": 0, "deleted": 0, "described": {"../x": {"xet_hash": None, "digest": DIGEST}}}),
    ("batch", {"added": "1"}),
    ("create", {"created": "yes", "url": "u"}),
    ("status", {"protocol": 1}),
    ("info", {"id": 5}),
    ("shutdown", []),
], ids=repr)
def test_other_untrusted_results_are_refused_whole(op, result):
    with pytest.raises(MessageError):
        parse_result(op, result)


def test_a_hello_of_another_protocol_is_a_mismatch_not_a_bad_request():
    """Whatever a client of another protocol sends as its version, it must be told to replace the server."""
    server = BucketServer("/nonexistent/s.sock", "http://h", 1.0)
    for args in ({"protocol": PROTOCOL_VERSION + 1}, {"protocol": str(PROTOCOL_VERSION)}, {"protocol": True}, {},
                 {"client_version": 5}):
        reply = server.handle({"id": 1, "op": "hello", "args": args})
        assert reply["ok"] is False and reply["error"]["code"] == "protocol_mismatch", (args, reply)
    assert server.handle({"id": 2, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}})["ok"] is True


def test_bucket_figures_that_are_only_shown_read_as_none():
    info = InfoResult.from_wire({"id": "org/b", "private": "yes", "size": math.inf, "total_files": -3})
    assert info == InfoResult("org/b", None, None, None)
    status = StatusResult.from_wire({"protocol": 1, "pid": 3, "uptime": math.nan, "connections": True})
    assert (status.uptime, status.connections, status.socket) == (None, None, None)


def _dir_client(tmp_path: Path) -> BucketClient:
    bucket = tmp_path / "bucket"
    bucket.mkdir(exist_ok=True)
    return BucketClient(BucketRef("dir", str(bucket)))


def test_the_server_refuses_hostile_args_at_its_edge(tmp_path):
    """Raw frames, as a buggy or hostile client would send them: bad_request, nothing written, server alive."""
    client = _dir_client(tmp_path)
    pid = client.server_status()["pid"]
    bucket = {"kind": "dir", "location": str(tmp_path / "bucket")}
    (tmp_path / "out").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server_address().socket_path))
    try:
        for index, (op, args) in enumerate([
            ("download", {"files": [{"path": "a", "local_path": "out/relative"}]}),
            ("download", {"files": [{"path": "a", "local_path": str(tmp_path / "out" / "x"), "size": -1}]}),
            ("batch", {"add": [{"dest": "../escape", "content": "x"}]}),
            ("batch", {"add": [{"dest": "a", "content": {"not": "text"}}]}),
            ("batch", {"delete": "a"}),
            ("list", {"prefix": "/etc"}),
            ("list", {"prefix": "a", "recursive": "yes"}),
            ("paths_info", {"paths": ["a", "a/../../b"]}),
            ("create", "args"),
        ]):
            write_frame(sock, {"id": index, "op": op, "args": args, "bucket": bucket})
            reply = read_frame(sock)
            while "ok" not in reply:  # a heartbeat
                reply = read_frame(sock)
            assert reply["id"] == index and reply["ok"] is False, (op, args, reply)
            assert reply["error"]["code"] == "bad_request" and f"bad arguments for {op}" in reply["error"]["message"]
    finally:
        sock.close()
    assert client.list("", recursive=True) == []
    assert not (tmp_path / "escape").exists() and list((tmp_path / "out").iterdir()) == []
    assert client.server_status()["pid"] == pid


def test_the_client_refuses_bad_request_items_before_sending(tmp_path):
    client = _dir_client(tmp_path)
    for call in (lambda: client.download([{"path": "../x", "local_path": str(tmp_path / "x")}]),
                 lambda: client.download([{"path": "a", "local_path": "relative"}]),
                 lambda: client.batch(copy=[{"src": "a", "dest": "/abs"}])):
        with pytest.raises(RemoteInvalidDataError, match="bad (download|batch) request"):
            call()
    assert client.requests == 0


def test_typed_requests_through_a_real_server(tmp_path):
    """BucketClient.send takes a request object and gives its typed result; the dict methods are its wire form."""
    client = _dir_client(tmp_path)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    added = client.send(BatchRequest(add=(AddFile("a/b/f.bin", str(src), describe=True), AddFile("a/m", content="hi"))))
    assert isinstance(added, BatchResult) and added.added == 2 and added.described["a/b/f.bin"].digest.startswith("blake3:")
    assert isinstance(client.send(CreateRequest()), CreateResult)
    listing = client.send(ListRequest("a", recursive=False))
    assert [(type(item), item.path) for item in listing.items] == [(FolderItem, "a/b"), (FileItem, "a/m")]
    found = client.send(PathsInfoRequest(("a/b/f.bin", "missing")))
    assert [(f.path, f.size) for f in found.files] == [("a/b/f.bin", 1000)]
    (tmp_path / "out").mkdir()
    got = client.send(DownloadRequest((DownloadFile("a/b/f.bin", str(tmp_path / "out" / "f.bin"), 1000,
                                                    digest=found.files[0].digest),)))
    assert got == DownloadResult(1, 1000) and (tmp_path / "out" / "f.bin").read_bytes() == src.read_bytes()
    assert client.download([DownloadFile("a/m", str(tmp_path / "out" / "m"))]) == {"files": 1, "bytes": 2, "failed": []}
    assert client.batch(copy=[CopyFile("a/m", "c/m")], delete=["a/m"]) == {"added": 0, "copied": 1, "deleted": 1}
    assert isinstance(client.send(HelloRequest(PROTOCOL_VERSION, "test")), StatusResult)
    assert isinstance(client.send(InfoRequest()), InfoResult)
    assert isinstance(ShutdownResult.from_wire({"stopping": True}), ShutdownResult) and op_of(ShutdownRequest()).name == "shutdown"


def test_a_hostile_hub_listing_costs_only_its_bad_items(hub, caplog):
    """Through the hf backend and the real server: items the Hub lists with unsafe paths or absurd sizes are
    left out at the client's edge, with one warning for the reply; the good files are still listed."""
    ref = BucketRef("hf", "test/messages")
    client = BucketClient(ref)
    client.create()
    client.batch(add=[{"dest": "v/good.bin", "content": "hello"}, {"dest": "v/other.bin", "content": "bye"}])
    files = hub._buckets["test/messages"].files
    with hub._lock:
        stored = dict(files["v/good.bin"])
        files["v/../escape.bin"] = dict(stored)
        files["v/inf.bin"] = {**stored, "size": math.inf}
        files["v/neg.bin"] = {**stored, "size": -5}
        files["v/other.bin"]["size"] = "3"
    caplog.set_level(logging.WARNING, logger="optimum_neuron_cache")
    assert [item["path"] for item in client.list("v", recursive=True)] == ["v/good.bin"]
    warnings = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 4 listed item(s)" in warnings[0]
    assert [item["path"] for item in client.paths_info(["v/good.bin", "v/inf.bin"])] == ["v/good.bin"]
