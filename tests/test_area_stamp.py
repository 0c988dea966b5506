"""A warm run asks for the model area's stamp instead of listing the area: every publication to the area writes
a new stamp, a prune removes it, and a host whose last listing saw the same stamp (and that has every entry
it found) skips the listing. Whatever changed the area since, a later run still gets it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimum_neuron_cache import fetch, hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.fetch import FetchNote, memo_applies
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from tests.lifecycle_helpers import run as cli, uri

MODEL, TASK = "org/stamped", "text-generation"


def _run(cache: Path, bucket: BucketRef, version: str, graphs=()):
    with hub_neuronx_cache(MODEL, task=TASK, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in graphs:
            compile_graph(cache, version, graph)
    assert not run.warnings, run.warnings
    return run


def _area(version: str) -> str:
    return layout.model_area_prefix(version, "org--stamped", TASK)


def _reads(hub) -> list[str]:
    """The bucket reads the Hub saw since the log was cleared: 'tree' (a listing) or 'paths-info'."""
    return ["tree" if "/tree" in path else "paths-info" for method, path in hub.requests.snapshot()
            if "/api/buckets/" in path and ("/tree" in path or path.endswith("/paths-info"))]


def test_every_publication_to_an_area_writes_a_new_stamp(tmp_path, bucket, version):
    client = BucketClient(bucket)
    stamps = []
    for i in range(2):
        _run(tmp_path / f"pub{i}", bucket, version, make_graphs(1, seed=f"pub{i}"))
        info = client.paths_info([layout.area_stamp_path(_area(version))])
        assert len(info) == 1 and layout.stamp_token(info[0]) is not None
        stamps.append(layout.stamp_token(info[0]))
    assert stamps[0] != stamps[1]


def test_a_warm_run_reads_the_stamp_and_a_new_publication_still_reaches_it(tmp_path, bucket, version, request):
    hub = request.getfixturevalue("hub") if bucket.kind == "hf" else None
    first = _run(tmp_path / "publisher", bucket, version, make_graphs(2, seed="first"))
    mine = tmp_path / "mine"
    assert sorted(_run(mine, bucket, version).fetched) == sorted(first.synced)  # cold: listed and fetched

    if hub is not None:
        hub.requests.clear()
    warm = _run(mine, bucket, version)
    assert warm.fetched == [] and warm.synced == [] and warm.requests == 1
    if hub is not None:
        assert _reads(hub) == ["paths-info"]  # the stamp, not a listing of the area

    second = _run(tmp_path / "publisher2", bucket, version, make_graphs(1, seed="second"))  # another host publishes
    if hub is not None:
        hub.requests.clear()
    after = _run(mine, bucket, version)
    assert after.fetched == second.synced and len(after.fetched) == 1
    if hub is not None:
        assert _reads(hub)[:2] == ["paths-info", "tree"]  # the stamp changed: listed again
    assert {e.name for e in scan_entries(mine, version) if e.state.publishable} == \
        {layout.module_of(key) for key in first.synced + second.synced}


def test_an_entry_removed_here_is_fetched_again(tmp_path, bucket, version):
    published = _run(tmp_path / "publisher", bucket, version, make_graphs(2, seed="gone"))
    mine = tmp_path / "mine"
    _run(mine, bucket, version)
    victim = mine / layout.flat_entry_prefix(version, layout.module_of(published.synced[0]))
    for child in victim.iterdir():
        child.unlink()
    victim.rmdir()
    again = _run(mine, bucket, version)
    assert again.fetched == [published.synced[0]]


def test_what_a_writer_without_stamps_adds_is_seen_within_the_memo_time(tmp_path, bucket, version, monkeypatch):
    """Earlier versions of this package publish no stamp: a warm run trusts an unchanged stamp for at most
    fetch.MEMO_SECONDS, then lists the area again."""
    _run(tmp_path / "publisher", bucket, version, make_graphs(1, seed="stamped"))
    mine = tmp_path / "mine"
    _run(mine, bucket, version)
    old_writer = tmp_path / "old-writer"
    graph = make_graphs(1, seed="unstamped")[0]
    compile_graph(old_writer, version, graph)
    entry = scan_entries(old_writer, version)[0]
    files = sorted(entry.files, key=lambda name: name == "model.done")  # content first, commit file last
    for name in files:
        BucketClient(bucket).batch(add=[{"dest": layout.area_file_path(_area(version), entry.name, name),
                                         "local_path": str(entry.path / name)}])
    assert _run(mine, bucket, version).fetched == []  # the stamp is unchanged, and trusted for now
    monkeypatch.setattr(fetch, "MEMO_SECONDS", 0.0)
    assert _run(mine, bucket, version).fetched == [layout.flat_entry_prefix(version, entry.name)]


def test_a_prune_of_the_area_removes_its_stamp_and_hosts_list_again(tmp_path, bucket, version, request):
    hub = request.getfixturevalue("hub") if bucket.kind == "hf" else None
    _run(tmp_path / "publisher", bucket, version, make_graphs(2, seed="pruned"))
    mine = tmp_path / "mine"
    _run(mine, bucket, version)
    out = cli("prune", "--bucket", uri(bucket), "--drop-model", MODEL, "--yes")
    assert layout.AREA_STAMP in out
    assert BucketClient(bucket).paths_info([layout.area_stamp_path(_area(version))]) == []
    if hub is not None:
        hub.requests.clear()
    after = _run(mine, bucket, version)
    assert after.fetched == [] and not after.warnings
    if hub is not None:
        assert "tree" in _reads(hub)
    republished = _run(tmp_path / "publisher2", bucket, version, make_graphs(1, seed="back"))
    assert _run(mine, bucket, version).fetched == republished.synced


def test_a_symlinked_stamp_is_never_read_through(tmp_path, version):
    """A directory bucket is hostile input: a stamp replaced by a symlink is never read through, and the run
    lists the area as it would without a stamp (so what was published meanwhile still arrives)."""
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    _run(tmp_path / "publisher", ref, version, make_graphs(1, seed="hostile"))
    mine = tmp_path / "mine"
    _run(mine, ref, version)
    stamp = Path(ref.location) / layout.area_stamp_path(_area(version))
    target = tmp_path / "elsewhere.json"
    target.write_bytes(stamp.read_bytes())  # the very bytes of the stamp this host saw
    stamp.unlink()
    os.symlink(target, stamp)
    assert BucketClient(ref).paths_info([layout.area_stamp_path(_area(version))]) == []
    old_writer = tmp_path / "old-writer"
    compile_graph(old_writer, version, make_graphs(1, seed="behind-the-link")[0])
    entry = scan_entries(old_writer, version)[0]
    for name in sorted(entry.files, key=lambda name: name == "model.done"):
        BucketClient(ref).batch(add=[{"dest": layout.area_file_path(_area(version), entry.name, name),
                                      "local_path": str(entry.path / name)}])
    assert _run(mine, ref, version).fetched == [layout.flat_entry_prefix(version, entry.name)]


@pytest.mark.parametrize("change, applies", [
    ({}, True),
    ({"ok": False}, False),
    ({"stamp": None}, False),
    ({"listed_at": -fetch.MEMO_SECONDS}, False),
    ({"listed_at": 3600.0}, False),  # listed "in the future": a clock that went back
    ({"area": "neuronxcc-2.0.0.0+aaaaaaaa/models/org--stamped/text-generation"}, False),  # another version's
    ({"remote_modules": ("MODULE_1+abcdef12", "MODULE_9+abcdef12")}, False),  # one entry is not here
])
def test_when_the_last_listing_may_stand_in(tmp_path, version, change, applies):
    graph = make_graphs(1, seed="memo")[0]
    compile_graph(tmp_path, version, graph)
    local = {entry.name: entry for entry in scan_entries(tmp_path, version)}
    now = 1_000_000.0
    fields = {"key": "k", "finished_at": now, "ok": True, "area": _area(version), "remote_modules": tuple(local),
              "record_names": (), "stamp": "80:abc:", "listed_at": now - 1.0}
    for name, value in change.items():
        fields[name] = now + value if name == "listed_at" else value
    assert memo_applies(FetchNote(**fields), version, local, now) is applies
