"""Digest manifests: export records bind Xet hashes to BLAKE3 digests recorded at publish time, and the
bucket server checks a download against the cheaper digest, the Xet hash still deciding on a mismatch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import hf_xet

from bucket_server.digests import Verifier, read_manifest
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.testing.invariants import local_violations, reference_entries
from tests.test_verified import _flip_byte_keeping_size_and_mtime, _xorbs


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[str, str, str]:
    """A file, with its Xet hash and its BLAKE3 digest."""
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), hf_xet.hash_files([str(path)])[0].hash, f"blake3:{blake3.blake3(data).hexdigest()}"


def _manifest(tmp_path: Path, name: str, digests: dict[str, str]) -> tuple[str, str]:
    path = tmp_path / name
    path.write_text(json.dumps({"model_id": "org/m", "digests": digests}))
    return str(path), f"xet:{hf_xet.hash_files([str(path)])[0].hash}"


def _verify(manifests: list[tuple[str, str]], files: list[tuple[str, str]]) -> tuple[dict[str, str], int]:
    verifier = Verifier(manifests=[path for path, _ in manifests])
    for path, digest in files + manifests:  # the files land first: their checks wait for the manifests
        verifier.submit(path, digest)
    problems = verifier.finish()
    return problems, verifier.by_manifest


def test_a_bound_file_is_checked_by_its_blake3_digest(tmp_path):
    path, xet, b3 = _file(tmp_path, "model.neff", os.urandom(300_000))
    manifest = _manifest(tmp_path, "record.json", {xet: b3})
    assert read_manifest(manifest[0]) == {xet: b3}
    assert _verify([manifest], [(path, f"xet:{xet}")]) == ({}, 1)


def test_a_flipped_byte_fails_both_digests(tmp_path):
    path, xet, b3 = _file(tmp_path, "model.neff", os.urandom(300_000))
    manifest = _manifest(tmp_path, "record.json", {xet: b3})
    _flip_byte_keeping_size_and_mtime(Path(path), 1000)
    problems, by_manifest = _verify([manifest], [(path, f"xet:{xet}")])
    assert by_manifest == 1
    assert "does not match its Xet hash" in problems[path] and "digest recorded when it was published" in problems[path]


def test_a_wrong_manifest_costs_time_never_a_good_file(tmp_path):
    path, xet, _ = _file(tmp_path, "model.neff", os.urandom(300_000))
    manifest = _manifest(tmp_path, "record.json", {xet: f"blake3:{'0' * 64}"})
    assert _verify([manifest], [(path, f"xet:{xet}")]) == ({}, 1)  # BLAKE3 failed, the Xet hash matched


def test_a_corrupt_manifest_is_reported_and_not_used(tmp_path):
    path, xet, b3 = _file(tmp_path, "model.neff", os.urandom(300_000))
    manifest_path, manifest_digest = _manifest(tmp_path, "record.json", {xet: b3})
    Path(manifest_path).write_text(Path(manifest_path).read_text().replace('"org/m"', '"org/x"'))
    problems, by_manifest = _verify([(manifest_path, manifest_digest)], [(path, f"xet:{xet}")])
    assert list(problems) == [manifest_path] and by_manifest == 0


def test_disagreeing_manifests_and_malformed_bindings_leave_the_xet_hash(tmp_path):
    path, xet, b3 = _file(tmp_path, "model.neff", os.urandom(300_000))
    other, other_xet, _ = _file(tmp_path, "model.hlo_module.pb", os.urandom(50_000))
    first = _manifest(tmp_path, "a.json", {xet: b3, other_xet: "md5:1234"})
    second = _manifest(tmp_path, "b.json", {xet: f"blake3:{'1' * 64}", "not-a-hash": b3})
    assert read_manifest(second[0]) == {xet: f"blake3:{'1' * 64}"}
    assert _verify([first, second], [(path, f"xet:{xet}"), (other, f"xet:{other_xet}")]) == ({}, 0)


def _publish_with_record(tmp_path: Path, bucket: str | BucketRef, version: str) -> tuple[list[str], str]:
    with hub_neuronx_cache("org/v", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=bucket,
                           cache_dir=tmp_path / "A") as run:
        for graph in make_graphs(2, seed="manifest", neff_size=300_000):
            compile_graph(tmp_path / "A", version, graph)
    assert run.record
    return [key.rsplit("/", 1)[1] for key in run.synced], run.record


def _read(client: BucketClient, remote: str, local: Path) -> dict:
    client.download([{"path": remote, "local_path": str(local)}])
    return json.loads(local.read_text())


def test_hub_records_bind_what_was_uploaded_and_fetches_use_them(tmp_path, hub, version):
    bucket = BucketRef("hf", "test/manifests")
    client = BucketClient(bucket)
    client.create()
    modules, record_path = _publish_with_record(tmp_path, "test/manifests", version)
    record = _read(client, record_path, tmp_path / "record.json")
    area = f"neuronxcc-{version}/models/org--v/text-generation"
    listing = [item for item in client.list(area, recursive=True) if "/exports/" not in item["path"]]
    content = [item for item in listing if not item["path"].endswith("/model.done")]
    # Every uploaded content file, and only those (two files of the same content share one binding).
    assert content and set(record["digests"]) == {item["xet_hash"] for item in content}
    for item in content:
        module, name = item["path"].split("/")[-2:]
        local = (tmp_path / "A" / f"neuronxcc-{version}" / module / name).read_bytes()
        assert record["digests"][item["xet_hash"]] == f"blake3:{blake3.blake3(local).hexdigest()}"

    stop_server()  # a fresh server: no chunk cached in memory from the upload
    for xorb in _xorbs(hub.cas_dir):  # damage what the storage serves
        _flip_byte_keeping_size_and_mtime(xorb, 200)
    with hub_neuronx_cache("org/v", "text-generation", {"batch_size": 1}, compiler_version=version,
                           bucket="test/manifests", cache_dir=tmp_path / "B") as run:
        pass
    assert len(run.fetched) < len(modules) and run.warnings
    # The check that caught it was the record's BLAKE3 digest, confirmed by the Xet hash.
    assert any("digest recorded when it was published" in w for w in run.warnings)
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []


def test_hub_fetch_with_records_installs_intact_entries(tmp_path, hub, version):
    BucketClient(BucketRef("hf", "test/manifests")).create()
    modules, _ = _publish_with_record(tmp_path, "test/manifests", version)
    with hub_neuronx_cache("org/v", "text-generation", {"batch_size": 1}, compiler_version=version,
                           bucket="test/manifests", cache_dir=tmp_path / "B") as run:
        pass
    assert sorted(key.rsplit("/", 1)[1] for key in run.fetched) == sorted(modules) and run.warnings == []
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []


def test_small_files_get_the_xet_hash_hf_xet_computes(tmp_path):
    """Commit files and records are one Xet chunk: their hash is computed without hf_xet, and must agree
    with it exactly (sizes around the 8 KiB chunk minimum, random and constant bytes, the empty file)."""
    from bucket_server.digests import XET_ONE_CHUNK, xet_hash_of_one_chunk, xet_hashes

    cases = []
    for size in (0, 1, 7, 8, 64, 1000, 4096, XET_ONE_CHUNK - 1, XET_ONE_CHUNK):
        for kind, data in (("random", os.urandom(size)), ("zeros", bytes(size))):
            path = tmp_path / f"{kind}-{size}"
            path.write_bytes(data)
            cases.append((str(path), data))
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * XET_ONE_CHUNK + 5))  # past one chunk: hf_xet's own hash
    paths = [path for path, _ in cases] + [str(big)]
    expected = [info.hash for info in hf_xet.hash_files(paths)]
    assert [xet_hash_of_one_chunk(data) for _, data in cases] == expected[:-1]
    assert xet_hashes(paths) == expected


def test_a_flipped_byte_in_a_small_file_is_caught(tmp_path):
    from bucket_server.digests import mismatches

    path, xet, _ = _file(tmp_path, "model.done", b"compiled\n")
    assert mismatches([(path, f"xet:{xet}")]) == {}
    _flip_byte_keeping_size_and_mtime(Path(path), 3)
    assert "does not match its Xet hash" in mismatches([(path, f"xet:{xet}")])[path]


def test_a_rewritten_record_keeps_the_digests_of_the_one_it_replaces(tmp_path, hub, version):
    client = BucketClient(BucketRef("hf", "test/manifests"))
    client.create()
    _, record_path = _publish_with_record(tmp_path, "test/manifests", version)
    first = _read(client, record_path, tmp_path / "first.json")["digests"]
    # Another machine, the same configuration: it fetches both entries, then compiles one graph more.
    with hub_neuronx_cache("org/v", "text-generation", {"batch_size": 1}, compiler_version=version,
                           bucket="test/manifests", cache_dir=tmp_path / "C") as run:
        compile_graph(tmp_path / "C", version, make_graphs(1, seed="manifest-more", neff_size=200_000)[0])
    assert len(run.fetched) == 2 and len(run.synced) == 1 and run.record == record_path
    second = _read(client, record_path, tmp_path / "second.json")
    assert len(second["modules"]) == 1  # the record names what this run compiled...
    assert set(first) < set(second["digests"])  # ...and keeps every digest, the new files' added
    assert all(second["digests"][key] == value for key, value in first.items())
