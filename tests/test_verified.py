"""Verified bytes: a fetched file becomes visible only after its content matches what the bucket says it is
(the Xet hash a Hub bucket lists; the BLAKE3 digest a directory bucket recorded at publish time)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.testing.invariants import local_violations, reference_entries


def _publish(tmp_path: Path, bucket, version: str, graphs: int = 2, neff_size: int = 300_000) -> list[str]:
    with hub_neuronx_cache("org/v", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        for graph in make_graphs(graphs, seed="verified", neff_size=neff_size):
            compile_graph(tmp_path / "A", version, graph)
    return [key.rsplit("/", 1)[1] for key in run.synced]


def _flip_byte_keeping_size_and_mtime(path: Path, offset: int) -> None:
    info = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_directory_buckets_record_digests_and_a_flipped_byte_never_reaches_the_cache(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    modules = _publish(tmp_path, bucket, version)
    listing = BucketClient(bucket).list(f"neuronxcc-{version}", recursive=True)
    assert listing and all(str(item["digest"]).startswith("blake3:") for item in listing)  # published with digests
    bad = Path(bucket.location) / f"neuronxcc-{version}/models/org--v/default/{modules[0]}/model.neff"
    _flip_byte_keeping_size_and_mtime(bad, 1000)  # bit rot, or a tampered share: same size, same mtime
    with hub_neuronx_cache("org/v", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        hit = [compile_graph(tmp_path / "B", version, graph).hit for graph in make_graphs(2, seed="verified", neff_size=300_000)]
    assert [key.rsplit("/", 1)[1] for key in run.fetched] == [modules[1]]
    assert len(run.warnings) == 1 and modules[0] in run.warnings[0] and "model.neff" in run.warnings[0]
    assert "BLAKE3" in run.warnings[0]
    assert sorted(hit) == [False, True]  # the corrupt entry compiled as a miss, the other a hit
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []


@pytest.mark.parametrize("where", ["second block", "last byte"])
def test_a_directory_download_checks_every_block_of_the_files_it_copies_together(tmp_path, version, where):
    """A directory download copies several files at once, hashing each block between its read and its write:
    a byte flipped past the first block of one large file, or in its last byte, fails that entry alone; the
    entries copied beside it land whole."""
    from bucket_server.backends.dir import CHECKED_BLOCK

    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    size = 2 * CHECKED_BLOCK + CHECKED_BLOCK // 2
    modules = _publish(tmp_path, bucket, version, graphs=4, neff_size=size)
    bad = Path(bucket.location) / f"neuronxcc-{version}/models/org--v/default/{modules[2]}/model.neff"
    _flip_byte_keeping_size_and_mtime(bad, CHECKED_BLOCK + 10 if where == "second block" else bad.stat().st_size - 1)
    with hub_neuronx_cache("org/v", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert sorted(key.rsplit("/", 1)[1] for key in run.fetched) == sorted(modules[:2] + modules[3:])
    assert len(run.warnings) == 1 and modules[2] in run.warnings[0] and "BLAKE3" in run.warnings[0]
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []
    assert not any(entry.name == modules[2] for entry in scan_entries(tmp_path / "B", version))


def _xorbs(cas: Path) -> list[Path]:
    return [p for p in cas.rglob("*") if p.is_file() and "xorb" in str(p.relative_to(cas)).lower() and p.stat().st_size > 100_000]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_hub_buckets_verify_the_xet_hash_of_what_landed(tmp_path, hub, version, damage, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_XET_RETRY_DURATION", "1s")  # damaged storage: retrying cannot help
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "2")
    BucketClient(BucketRef("hf", "test/verified")).create()
    modules = _publish(tmp_path, "test/verified", version)
    stop_server()  # a fresh server: no chunk cached in memory from the upload
    xorbs = _xorbs(hub.cas_dir)
    assert xorbs, sorted(str(p) for p in hub.cas_dir.rglob("*"))
    for xorb in xorbs:  # damage what the storage serves
        if damage == "flip":  # inside the first chunk's data (past its 8-byte header): wrong bytes, valid framing
            _flip_byte_keeping_size_and_mtime(xorb, 200)
        else:
            with open(xorb, "r+b") as handle:
                handle.truncate(xorb.stat().st_size // 2)
    with hub_neuronx_cache("org/v", compiler_version=version, bucket="test/verified", cache_dir=tmp_path / "B") as run:
        pass
    # Every damaged file is caught (by our Xet hash check, or by hf_xet failing the transfer); only intact
    # entries are installed, and the user is told in one line per problem.
    assert len(run.fetched) < len(modules) and run.warnings
    assert all(len(w.splitlines()) == 1 for w in run.warnings)
    if damage == "flip":
        assert any("does not match its Xet hash" in w for w in run.warnings)
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []
    assert {e.name for e in scan_entries(tmp_path / "B", version)} == {k.rsplit("/", 1)[1] for k in run.fetched}


def test_sidecars_from_before_blake3_still_verify(tmp_path, version):
    """Directory buckets published before BLAKE3 hold bare sha256 sidecars: still checked, both ways."""
    import hashlib

    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    modules = _publish(tmp_path, bucket, version)
    root = Path(bucket.location)
    area = f"neuronxcc-{version}/models/org--v/default"
    for module in modules:  # rewrite every sidecar of the model area in the old format
        for data in (root / area / module).iterdir():
            sidecar = root / ".digests" / area / module / data.name
            _, size, mtime_ns = sidecar.read_text().split()
            sidecar.write_text(f"{hashlib.sha256(data.read_bytes()).hexdigest()} {size} {mtime_ns}\n")
    listing = BucketClient(bucket).list(area, recursive=True)
    assert listing and all(str(item["digest"]).startswith("sha256:") for item in listing
                           if not item["path"].endswith("/.stamp.json"))  # the area's stamp: not an entry's file
    _flip_byte_keeping_size_and_mtime(root / area / modules[0] / "model.neff", 1000)
    with hub_neuronx_cache("org/v", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert [key.rsplit("/", 1)[1] for key in run.fetched] == [modules[1]]
    assert len(run.warnings) == 1 and modules[0] in run.warnings[0] and "sha256" in run.warnings[0]


def test_verification_can_be_turned_off_for_measuring(tmp_path, version, monkeypatch):
    """NEURON_CACHE_VERIFY=0 (what the benchmark compares against) sends no digest: sizes alone are checked,
    so a flipped byte goes through. Everyday runs never set it."""
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    modules = _publish(tmp_path, bucket, version)
    bad = Path(bucket.location) / f"neuronxcc-{version}/models/org--v/default/{modules[0]}/model.neff"
    _flip_byte_keeping_size_and_mtime(bad, 1000)
    monkeypatch.setenv("NEURON_CACHE_VERIFY", "0")
    with hub_neuronx_cache("org/v", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert sorted(key.rsplit("/", 1)[1] for key in run.fetched) == sorted(modules) and run.warnings == []
