"""What a cold fetch asks of the bucket before its transfers, and what it still checks when it asks less."""

from __future__ import annotations

import os
from pathlib import Path


from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.invariants import local_violations, reference_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

CONNECTION = r"/resolve/|/xet-read-token"  # a file's metadata (for the token route), then a read token


def _publish(cache: Path, bucket: str | BucketRef, version: str, model: str = "org/cold") -> list[str]:
    with hub_neuronx_cache(model, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in make_graphs(2, seed=model, neff_size=200_000):
            compile_graph(cache, version, graph)
    return sorted(key.rsplit("/", 1)[1] for key in run.synced)


def _fetch(cache: Path, bucket: str | BucketRef, version: str, model: str = "org/cold"):
    with hub_neuronx_cache(model, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        pass
    return run


def test_later_fetches_reuse_the_buckets_xet_connection_and_a_failure_drops_it(tmp_path, http_hub, version, monkeypatch):
    hub = http_hub
    monkeypatch.setenv("NEURON_CACHE_XET_RETRY_DURATION", "1s")  # the failing storage below: retrying cannot help
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "2")
    BucketClient(BucketRef("hf", "test/cold")).create()
    modules = _publish(tmp_path / "A", "test/cold", version)
    before = len(hub.requests)
    assert sorted(key.rsplit("/", 1)[1] for key in _fetch(tmp_path / "B", "test/cold", version).fetched) == modules
    first = [path for _, path in hub.requests.snapshot()[before:]]
    assert sum("/resolve/" in path for path in first) == 1 and sum("/xet-read-token" in path for path in first) == 1

    # The server's next download of the bucket starts its transfers at once: no metadata, no token request.
    asked = hub.requests.count(None, CONNECTION)
    assert len(_fetch(tmp_path / "C", "test/cold", version).fetched) == len(modules)
    assert hub.requests.count(None, CONNECTION) == asked

    # A download that fails forgets the connection (it may be what failed): the next one asks again. (Other
    # bytes: hf_xet may serve the ones it fetched already from its own cache.)
    others = _publish(tmp_path / "E", "test/cold", version, "org/other")
    hub.add_fault("GET", r"/reconstructions?/", 500, times=None)
    failed = _fetch(tmp_path / "D", "test/cold", version, "org/other")
    assert failed.fetched == [] and len(failed.warnings) == 1
    hub.clear_faults()
    asked = hub.requests.count(None, CONNECTION)
    assert sorted(key.rsplit("/", 1)[1] for key in _fetch(tmp_path / "D", "test/cold", version, "org/other").fetched) == others
    assert hub.requests.count(None, CONNECTION) == asked + 2
    assert local_violations(tmp_path / "D", version, reference_entries(tmp_path / "E", version)) == []


def test_a_directory_file_changed_between_listing_and_download_is_never_installed(tmp_path, version):
    """The download checks the bytes against the listing's digest and does not read the sidecar again: a file
    rewritten after the listing (its sidecar now stale) fails that check."""
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    modules = _publish(tmp_path / "A", bucket, version)
    client = BucketClient(bucket)
    area = f"neuronxcc-{version}/models/org--cold/default"
    neff = f"{area}/{modules[0]}/model.neff"
    listed = {item["path"]: item for item in client.list(area, recursive=True)}
    assert str(listed[neff]["digest"]).startswith("blake3:")
    on_disk = Path(bucket.location) / neff
    data = bytearray(on_disk.read_bytes())
    data[100] ^= 0xFF
    on_disk.write_bytes(bytes(data))  # same size, new mtime: its sidecar no longer describes it
    out = tmp_path / "out"
    out.mkdir()
    reply = client.download([{"path": path, "local_path": str(out / f"{index}"), "size": item["size"],
                              "digest": item["digest"]} for index, (path, item) in enumerate(sorted(listed.items()))])
    index = sorted(listed).index(neff)
    failed = {item["path"]: item["reason"] for item in reply["failed"]}
    assert list(failed) == [neff] and "does not match its BLAKE3 digest" in failed[neff]
    assert not (out / str(index)).exists()
    assert sorted(os.listdir(out)) == sorted(str(i) for i in range(len(listed)) if i != index)
    # And a fetch, which lists again, refuses it without copying it (stale), installing the other entry.
    run = _fetch(tmp_path / "B", bucket, version)
    assert [key.rsplit("/", 1)[1] for key in run.fetched] == [modules[1]]
    assert len(run.warnings) == 1 and "changed after it was published" in run.warnings[0]
    assert {entry.name for entry in scan_entries(tmp_path / "B", version)} == {modules[1]}
