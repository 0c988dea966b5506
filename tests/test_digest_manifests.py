"""Digest manifests: every publish binds the Xet hashes of what it uploaded to BLAKE3 digests recorded at
publish time (a manifest beside each flat entry, one per publication in the model's area; export records carry
the same bindings), and the bucket server checks a download against the cheaper digest, the Xet hash still
deciding on a mismatch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import hf_xet
import pytest

from bucket_server.digests import Verifier, read_manifest
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.fetch import complete_flat_entries, download_checked, flat_manifests, flat_probe_paths
from optimum_neuron_cache.integrations.session import TrainingCacheSession
from optimum_neuron_cache.journal import JournalKey
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.publish import publish_leftovers
from optimum_neuron_cache.sync import sync_cache
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
    listing = [item for item in client.list(area, recursive=True)
               if "/exports/" not in item["path"] and "/digests/" not in item["path"] and not item["path"].endswith("/.stamp.json")]
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


# ------------------------------------------------------------------------- every publish leaves manifests

BUCKET = "test/universal"


def _compile(cache: Path, version: str, seed: str, count: int = 2) -> None:
    for graph in make_graphs(count, seed=seed, neff_size=300_000):
        compile_graph(cache, version, graph)


def _publish_as(kind: str, cache: Path, version: str) -> str | None:
    """Publish two freshly compiled entries the way `kind` of user does; returns the model area's folder, if any."""
    if kind == "context-record":
        with hub_neuronx_cache("org/u", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=BUCKET,
                               cache_dir=cache):
            _compile(cache, version, kind)
        return "org--u/text-generation"
    if kind == "context":
        with hub_neuronx_cache("org/u", compiler_version=version, bucket=BUCKET, cache_dir=cache):
            _compile(cache, version, kind)
        return "org--u/default"
    if kind == "session":
        session = TrainingCacheSession("org/u", bucket=BUCKET, cache_dir=cache, compiler_version=version)
        session.begin()
        _compile(cache, version, kind)
        session.end()
        return "org--u/training"
    if kind == "shim":  # what the compiler shim does after each compile: the flat area, through publish_leftovers
        _compile(cache, version, kind)
        client = BucketClient(BucketRef("hf", BUCKET))
        for entry in scan_entries(cache, version):
            publish_leftovers(client, cache, JournalKey(str(client.bucket), version, None, layout.DEFAULT_TASK),
                              area=None, with_entries=[entry])
        return None
    assert kind == "sync"
    _compile(cache, version, kind)
    sync_cache(BucketClient(BucketRef("hf", BUCKET)), cache)
    return None


def _listed(client: BucketClient, prefix: str) -> dict[str, dict]:
    return {item["path"]: item for item in client.list(prefix, recursive=True)}


@pytest.mark.parametrize("kind", ["context-record", "context", "session", "shim", "sync"])
def test_every_publish_leaves_manifests_binding_what_it_uploaded(tmp_path, hub, version, kind):
    client = BucketClient(BucketRef("hf", BUCKET))
    client.create()
    cache = tmp_path / "A"
    area = _publish_as(kind, cache, version)
    listed = _listed(client, f"neuronxcc-{version}")
    entries = scan_entries(cache, version)
    assert len(entries) == 2

    def expected(entry) -> dict[str, str]:  # listed Xet hash -> BLAKE3 of our bytes, for each content file
        return {listed[layout.flat_file_path(version, entry.name, name)]["xet_hash"]:
                f"blake3:{blake3.blake3((entry.path / name).read_bytes()).hexdigest()}"
                for name in entry.files if layout.is_publishable(name) and entry.files[name] > 0}

    for entry in entries:
        path = layout.flat_manifest_path(version, entry.name)
        assert path in listed, f"no manifest for {entry.name}"
        assert read_manifest(_download(client, path, tmp_path / "flat.json")) == expected(entry)
    manifests = [p for p in listed if "/models/" in p and "/digests/" in p]
    if area is None:
        assert manifests == []
    else:  # one manifest for the publication, binding every content file of the area's entries
        assert len(manifests) == 1 and manifests[0].startswith(f"neuronxcc-{version}/models/{area}/digests/")
        bound = read_manifest(_download(client, manifests[0], tmp_path / "area.json"))
        assert bound == {k: v for entry in entries for k, v in expected(entry).items()}
    # Everything is in its place: entries' allow-listed files, records, manifests (none inside an entry).
    assert all(layout.split_version_path(version, path) is not None for path in listed)


def _download(client: BucketClient, remote: str, local: Path) -> Path:
    client.download([{"path": remote, "local_path": str(local)}])
    return local


def _damage_the_store(hub) -> None:
    stop_server()  # a fresh server: no chunk cached in memory from the upload
    for xorb in _xorbs(hub.cas_dir):
        if xorb.suffix != ".redb":  # the data, not hf_xet's dedup index
            for offset in range(200, xorb.stat().st_size, 20_000):  # a byte in every chunk: every file is damaged
                _flip_byte_keeping_size_and_mtime(xorb, offset)


def test_without_a_record_a_fetch_checks_by_manifest_and_never_installs_a_flipped_byte(tmp_path, hub, version):
    BucketClient(BucketRef("hf", BUCKET)).create()
    _publish_as("context", tmp_path / "A", version)  # no export_config: no record
    _damage_the_store(hub)
    with hub_neuronx_cache("org/u", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "B") as run:
        pass
    assert len(run.fetched) < 2 and run.warnings
    assert any("digest recorded when it was published" in w for w in run.warnings)  # the manifest's BLAKE3 caught it
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []
    assert not (tmp_path / "B" / f"neuronxcc-{version}" / "digests").exists()


def test_the_shim_and_todo_fills_check_flat_entries_by_their_manifest(tmp_path, hub, version):
    client = BucketClient(BucketRef("hf", BUCKET))
    client.create()
    _publish_as("shim", tmp_path / "A", version)
    entry = scan_entries(tmp_path / "A", version)[0]
    info = client.paths_info(flat_probe_paths(version, [entry.name]))  # the shim's one paths-info
    files = complete_flat_entries(version, info)[entry.name]
    manifests = flat_manifests(version, info, [entry.name])
    assert [m.path for m in manifests] == [layout.flat_manifest_path(version, entry.name)]
    target = tmp_path / "staging" / "model.neff"
    target.parent.mkdir()
    _damage_the_store(hub)  # (before any download: hf_xet keeps the chunks it fetched)
    problems = download_checked(client, [(files["model.neff"], target)], manifests)
    assert "digest recorded when it was published" in problems[target]  # the manifest's BLAKE3 caught it
    assert list(target.parent.iterdir()) == []  # nothing installed, and the manifest is not left behind


def _plant_manifest(client: BucketClient, area: str, bindings: dict[str, str]) -> None:
    name, text = layout.digest_manifest(bindings)
    client.batch(add=[{"dest": f"{layout.area_manifests_prefix(area)}/{name}", "content": text}])


def test_a_manifest_lying_about_digests_costs_time_never_a_good_file_nor_lets_a_bad_one_in(tmp_path, hub, version):
    client = BucketClient(BucketRef("hf", BUCKET))
    client.create()
    _publish_as("context", tmp_path / "A", version)
    area = f"neuronxcc-{version}/models/org--u/default"
    listed = _listed(client, area)
    hashes = {item["xet_hash"] for path, item in listed.items() if "/MODULE_" in path and item["size"]}
    # A hostile writer adds manifests binding every file to wrong digests, and one to a well-formed digest of
    # other bytes; the genuine manifest is there too, so the bindings disagree and none is trusted.
    _plant_manifest(client, area, {h: f"blake3:{'0' * 64}" for h in hashes})
    _plant_manifest(client, area, {h: f"blake3:{blake3.blake3(b'other').hexdigest()}" for h in hashes})
    with hub_neuronx_cache("org/u", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "B") as run:
        pass
    assert len(run.fetched) == 2 and run.warnings == []  # the Xet hash vouched for every good file
    # A lying manifest alone (the genuine one gone): the BLAKE3 check fails, the Xet hash still decides.
    genuine = [p for p in _listed(client, area) if "/digests/" in p]
    client.batch(delete=genuine)
    _plant_manifest(client, area, {h: f"blake3:{'1' * 64}" for h in hashes})
    with hub_neuronx_cache("org/u", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "C") as run:
        pass
    assert len(run.fetched) == 2 and run.warnings == []
    _damage_the_store(hub)
    with hub_neuronx_cache("org/u", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "D") as run:
        pass
    assert len(run.fetched) < 2 and any("does not match its Xet hash" in w for w in run.warnings)
    assert local_violations(tmp_path / "D", version, reference_entries(tmp_path / "A", version)) == []


def test_a_directory_bucket_never_installs_a_flipped_byte_whatever_a_manifest_says(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    client = BucketClient(bucket)
    client.create()
    with hub_neuronx_cache("org/u", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        _compile(tmp_path / "A", version, "dir")
    modules = [layout.module_of(key) for key in run.synced]
    area = f"neuronxcc-{version}/models/org--u/default"
    listed = _listed(client, f"neuronxcc-{version}")
    assert not any("/digests/" in p for p in listed)  # the sidecars carry BLAKE3 digests already
    neff = Path(bucket.location) / area / modules[0] / "model.neff"
    # A manifest claiming the flipped bytes are right (bound to the digest listed for the file) changes nothing.
    _flip_byte_keeping_size_and_mtime(neff, 1000)
    _plant_manifest(client, area, {"a" * 64: f"blake3:{blake3.blake3(neff.read_bytes()).hexdigest()}"})
    with hub_neuronx_cache("org/u", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert [layout.module_of(key) for key in run.fetched] == [modules[1]]
    assert len(run.warnings) == 1 and modules[0] in run.warnings[0] and "BLAKE3" in run.warnings[0]
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []
    assert sorted(p.name for p in (tmp_path / "B" / f"neuronxcc-{version}").iterdir()) == [modules[1]]


def test_the_fetch_plan_reads_well_named_small_manifests_newest_first():
    from optimum_neuron_cache.fetch import plan_model_area

    area = "neuronxcc-2.21.0.0+abc/models/org--m/default"
    good = [{"path": f"{area}/digests/{i:016x}.json", "size": 100, "mtime": float(i)} for i in range(40)]
    bad = [{"path": f"{area}/digests/../x.json", "size": 100}, {"path": f"{area}/digests/{'f' * 16}.json", "size": 10**9},
           {"path": f"{area}/digests/{'e' * 16}.json", "size": -1}, {"path": f"{area}/digests/short.json", "size": 5}]
    plan = plan_model_area("2.21.0.0+abc", area, good + bad, {})
    assert [m.path for m in plan.manifest_files] == [good[i]["path"] for i in range(39, 39 - layout.MAX_AREA_MANIFESTS, -1)]
    assert plan.ignored == (f"{area}/digests/../x.json", f"{area}/digests/short.json")
