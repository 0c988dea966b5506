"""A publish is a stage (every byte uploaded, nothing added) and a commit (phases applied in order): what
readers may see at each step, what a lost connection leaves, and what it costs the Hub."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bucket_server import PROTOCOL_VERSION
from bucket_server.protocol import read_frame, write_frame
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.errors import RemoteError
from optimum_neuron_cache.server_launcher import connect_server, server_address
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

HF = BucketRef("hf", "test-org/neuron-cache")


def _files(tmp_path: Path, count: int = 3, size: int = 300_000) -> list[Path]:
    folder = tmp_path / "src"
    folder.mkdir()
    paths = []
    for index in range(count):
        path = folder / f"f{index}.bin"
        path.write_bytes(bytes([index + 1]) * size + str(index).encode())
        paths.append(path)
    return paths


def _present(client: BucketClient, paths: list[str]) -> set[str]:
    return {item["path"] for item in client.paths_info(paths)}


def test_a_stage_adds_nothing_and_its_commit_adds_each_phase_with_the_staged_bytes(hub, tmp_path):
    client = BucketClient(HF)
    client.create()
    files = _files(tmp_path)
    dests = [f"flat/{path.name}" for path in files]
    staged = client.stage([{"dest": dest, "local_path": str(path), "describe": True} for dest, path in zip(dests, files)])
    assert staged["stage"] and set(staged["described"]) == set(dests)
    assert _present(client, dests) == set()  # uploaded, but nowhere in the bucket yet

    hub.requests.clear()
    client.commit(staged["stage"], [
        {"add": [{"dest": dest, "local_path": str(path)} for dest, path in zip(dests, files)]
         + [{"dest": f"area/{path.name}", "local_path": str(path)} for path in files]},
        {"add": [{"dest": "flat/done", "content": "committed"}]},
    ])
    listed = {item["path"]: item for item in client.list("", recursive=True)}
    assert set(listed) == {*dests, *(f"area/{path.name}" for path in files), "flat/done"}
    for dest, path in zip(dests, files):
        # What the stage described is what the bucket now lists, at both paths, and the bytes are the file's.
        assert listed[dest]["xet_hash"] == staged["described"][dest]["xet_hash"] == listed[f"area/{path.name}"]["xet_hash"]
        assert listed[dest]["size"] == path.stat().st_size
    # The commit sent no byte of the staged files again: one write session (the small "done" file's
    # bytes joined the stage's), and one batch request per phase.
    assert [path for _, path in hub.requests.snapshot() if path.endswith("/batch")] == ["/api/buckets/test-org/neuron-cache/batch"] * 2
    assert not [path for _, path in hub.requests.snapshot() if "xet-write-token" in path]
    out = tmp_path / "out"
    out.mkdir()
    assert client.download([{"path": "area/f1.bin", "local_path": str(out / "f1.bin"), "digest": staged["described"]["flat/f1.bin"]["digest"]}])["failed"] == []
    assert (out / "f1.bin").read_bytes() == files[1].read_bytes()


def test_a_phase_that_fails_stops_the_commit_there(bucket, tmp_path):
    """Phases land in order: when one fails (a copy whose source is not in the bucket), the phases before it
    have landed and the ones after it are not applied (no commit file vouches for missing content)."""
    client = BucketClient(bucket)
    files = _files(tmp_path, count=1)
    staged = client.stage([{"dest": "a/f0.bin", "local_path": str(files[0])}])
    with pytest.raises(RemoteError):
        client.commit(staged["stage"], [
            {"add": [{"dest": "a/f0.bin", "local_path": str(files[0])}]},
            {"copy": [{"src": "nowhere/x.bin", "dest": "b/x.bin"}]},
            {"add": [{"dest": "a/done", "content": "committed"}]},
        ])
    assert _present(client, ["a/f0.bin", "b/x.bin", "a/done"]) == {"a/f0.bin"}


def _raw(address) -> socket.socket:
    sock = connect_server(address, 30)
    write_frame(sock, {"id": 1, "op": "hello", "args": {"protocol": PROTOCOL_VERSION, "client_version": "test"}})
    assert read_frame(sock)["ok"]
    return sock


def _send(sock: socket.socket, request_id: int, op: str, args: dict) -> dict:
    write_frame(sock, {"id": request_id, "op": op, "args": args, "bucket": HF.to_wire()})
    while True:
        reply = read_frame(sock)
        if "ok" in reply:
            return reply


def test_a_stage_lives_and_dies_with_its_connection(hub, tmp_path):
    """A client killed after staging leaves nothing in the bucket; its stage cannot be committed from
    another connection (nor twice from its own)."""
    client = BucketClient(HF)
    client.create()
    files = _files(tmp_path, count=1)
    address = server_address()
    first = _raw(address)
    staged = _send(first, 2, "stage", {"add": [{"dest": "a/f0.bin", "local_path": str(files[0])}]})
    assert staged["ok"], staged
    name = staged["result"]["stage"]
    other = _raw(address)
    reply = _send(other, 2, "commit", {"stage": name, "phases": [{"add": [{"dest": "a/f0.bin", "local_path": str(files[0])}]}]})
    assert not reply["ok"] and reply["error"]["code"] == "not_found" and "stage again" in reply["error"]["message"]
    first.close()  # the staging client goes away
    assert _present(client, ["a/f0.bin"]) == set()
    again = _raw(address)
    staged = _send(again, 2, "stage", {"add": [{"dest": "a/f0.bin", "local_path": str(files[0])}]})["result"]["stage"]
    phases = [{"add": [{"dest": "a/f0.bin", "local_path": str(files[0])}]}]
    assert _send(again, 3, "commit", {"stage": staged, "phases": phases})["ok"]
    assert not _send(again, 4, "commit", {"stage": staged, "phases": phases})["ok"]  # committed: gone
    assert _present(client, ["a/f0.bin"]) == {"a/f0.bin"}
    other.close()
    again.close()


def test_progress_of_a_stage_and_its_commit_reaches_each_request_and_the_connection_stays_usable(hub, tmp_path):
    client = BucketClient(HF)
    client.create()
    files = _files(tmp_path, count=2, size=2_000_000)
    total = sum(path.stat().st_size for path in files)
    seen: dict[str, list[tuple[int, int]]] = {"stage": [], "commit": []}
    staged = client.stage([{"dest": f"a/{path.name}", "local_path": str(path)} for path in files],
                          progress=lambda done, of: seen["stage"].append((done, of)))
    client.commit(staged["stage"], [{"add": [{"dest": f"a/{path.name}", "local_path": str(path)} for path in files]}],
                  progress=lambda done, of: seen["commit"].append((done, of)))
    assert seen["commit"] and seen["commit"][-1][0] == seen["commit"][-1][1] >= total
    assert all(done <= of for done, of in seen["stage"] + seen["commit"])
    assert {item["path"] for item in client.list("a")} == {f"a/{path.name}" for path in files}


def test_an_exit_publishes_through_one_upload_session(hub, tmp_path, version):
    """A compiling block's exit uploads every byte it publishes (content, commit files, manifests, record,
    stamp) in one Xet write session, and applies them in two batch requests."""
    cache = tmp_path / "cache"
    BucketClient(HF).create()
    with hub_neuronx_cache("org/model", task="text-generation", compiler_version=version, bucket=HF,
                           cache_dir=cache, export_config={"batch_size": 1}) as run:
        hub.requests.clear()
        for graph in make_graphs(3, seed="staged"):
            compile_graph(cache, version, graph)
    assert not run.warnings, run.warnings
    paths = [path for _, path in hub.requests.snapshot()]
    assert len([path for path in paths if "xet-write-token" in path]) == 1
    assert len([path for path in paths if path.endswith("/batch")]) == 2
    assert len(run.synced) == 3 and run.record is not None
    listed = {item["path"] for item in BucketClient(HF).list("", recursive=True)}
    area = layout.model_area_prefix(version, "org--model", "text-generation")
    for key in run.synced:
        name = key.rsplit("/", 1)[-1]
        assert layout.flat_file_path(version, name, "model.done") in listed
        assert layout.area_file_path(area, name, "model.done") in listed
    assert run.record in listed and layout.area_stamp_path(area) in listed


def test_a_connection_keeps_its_four_latest_stages(hub, tmp_path):
    """A client that stages without committing cannot pile up open upload sessions in the server: its
    oldest stage goes when a fifth is made."""
    client = BucketClient(HF)
    client.create()
    path = _files(tmp_path, count=1)[0]
    add = [{"dest": "a/f0.bin", "local_path": str(path)}]
    names = [client.stage(add)["stage"] for _ in range(5)]
    with pytest.raises(RemoteError, match="stage again"):
        client.commit(names[0], [{"add": add}])
    assert _present(client, ["a/f0.bin"]) == set()
    client.commit(names[4], [{"add": add}])
    assert _present(client, ["a/f0.bin"]) == {"a/f0.bin"}


def test_a_directory_bucket_writes_each_published_file_once(tmp_path, version):
    """A directory bucket stages nothing: the commit writes each local file once (to the flat area) and links
    it into the model's area, as its copies always did, instead of copying the bytes again."""
    from optimum_neuron_cache.sync import sync_cache

    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    root = tmp_path / "cache"
    for graph in make_graphs(2, seed="once"):
        compile_graph(root, version, graph)
    report = sync_cache(BucketClient(ref), root, model_folder="org--once", task="text-generation")
    published = report[0].result.published
    assert len(published) == 2
    area = layout.model_area_prefix(version, "org--once", "text-generation")
    for name in published:
        for file in ("model.neff", "model.done"):
            flat = Path(ref.location) / layout.flat_file_path(version, name, file)
            there = Path(ref.location) / layout.area_file_path(area, name, file)
            assert flat.read_bytes() == there.read_bytes() and flat.stat().st_ino == there.stat().st_ino
