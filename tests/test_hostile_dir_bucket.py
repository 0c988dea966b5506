"""A directory bucket is a tree that anyone on the team can write: every path in it is hostile input.

No symlink below the root is followed, for reading or writing (not even one swapped in mid-operation); names
that are not UTF-8 or not safe remote paths are skipped; `.incoming/` keeps no debris; a file changed after
it was published is never installed. See docs/reliability.md, "A hostile directory bucket".
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.remote_layout import AREA_STAMP
from optimum_neuron_cache.server_launcher import server_address
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs, module_name
from optimum_neuron_cache.testing.invariants import local_violations, reference_entries


def _graphs(count: int = 2):
    return make_graphs(count, seed="hostile", neff_size=40_000)


def _bucket(tmp_path: Path, name: str = "bucket") -> BucketRef:
    bucket = BucketRef("dir", str(tmp_path / name))
    BucketClient(bucket).create()
    return bucket


def _publish(cache: Path, bucket: BucketRef, version: str, graphs=None, model: str = "org/v"):
    with hub_neuronx_cache(model, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in graphs or _graphs():
            compile_graph(cache, version, graph)
    return run


def _fetch(cache: Path, bucket: BucketRef, version: str, model: str = "org/v"):
    with hub_neuronx_cache(model, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        pass
    return run


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if not path.is_dir())


def _area(version: str, model: str = "org--v") -> str:
    return f"neuronxcc-{version}/models/{model}/default"


#: Each folder of a per-model entry's path, from the version down to the entry itself.
LEVELS = ["version", "models", "model", "task", "entry"]


def _level_path(version: str, level: str) -> str:
    entry = module_name(version, _graphs()[0])
    return "/".join([f"neuronxcc-{version}", "models", "org--v", "default", entry][: LEVELS.index(level) + 1])


# ------------------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("link", [".digests", ".digests/version"])
def test_a_digests_symlink_into_the_publishers_cache_never_overwrites_it(tmp_path, version, link):
    """The attack of the issue: `.digests` (or a folder in it) pointing into the publisher's compile cache
    made a publish overwrite its model.neff and model.done with digest lines. Now the publish is refused."""
    bucket = _bucket(tmp_path)
    root = Path(bucket.location)
    for graph in _graphs():  # what the cache must still hold afterwards
        compile_graph(tmp_path / "R", version, graph)
    (tmp_path / "A" / f"neuronxcc-{version}").mkdir(parents=True)
    if link == ".digests":
        (root / ".digests").symlink_to(tmp_path / "A")
    else:
        (root / ".digests").mkdir()
        (root / ".digests" / f"neuronxcc-{version}").symlink_to(tmp_path / "A" / f"neuronxcc-{version}")
    run = _publish(tmp_path / "A", bucket, version)
    assert run.synced == [] and len(run.warnings) == 1 and ".digests" in run.warnings[0]
    assert reference_entries(tmp_path / "A", version) == reference_entries(tmp_path / "R", version)
    assert local_violations(tmp_path / "A", version, reference_entries(tmp_path / "R", version)) == []


@pytest.mark.parametrize("level", LEVELS + [".incoming"])
def test_a_folder_symlinked_outside_the_bucket_receives_nothing(tmp_path, version, level):
    """The second attack of the issue: a model folder (or any folder on the way) that is a symlink to a
    directory outside the bucket made publish write the NEFFs and the record there."""
    bucket = _bucket(tmp_path)
    root = Path(bucket.location)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = root / (".incoming" if level == ".incoming" else _level_path(version, level))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    run = _publish(tmp_path / "A", bucket, version)
    assert _files(outside) == []
    assert run.warnings and "symlink" in run.warnings[0]
    assert link.is_symlink()  # left as it was: reported, not "repaired"


@pytest.mark.parametrize("level", LEVELS + ["file"])
def test_a_fetch_never_installs_a_file_from_outside_the_bucket(tmp_path, version, level):
    """Complete entries outside the bucket, reached through a symlink at any level of a model's area (or a
    NEFF that is a symlink), are neither listed nor installed."""
    outside = _bucket(tmp_path, "outside")  # a real tree of published entries, outside the bucket
    modules = [module.rsplit("/", 1)[1] for module in _publish(tmp_path / "A", outside, version).synced]
    bucket = _bucket(tmp_path)
    root = Path(bucket.location)
    if level == "file":  # a genuine entry folder, its NEFF a symlink to the outside one
        entry = _level_path(version, "entry")
        shutil.copytree(Path(outside.location) / entry, root / entry)
        (root / entry / "model.neff").unlink()
        (root / entry / "model.neff").symlink_to(Path(outside.location) / entry / "model.neff")
    else:
        path = _level_path(version, level)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).symlink_to(Path(outside.location) / path)
    assert BucketClient(bucket).list(_area(version), recursive=True) == [] or level in ("entry", "file")
    run = _fetch(tmp_path / "B", bucket, version)
    assert run.fetched == [] and scan_entries(tmp_path / "B", version) == []
    assert all(module not in str(path) for path in _files(tmp_path / "B") for module in modules)


def test_a_symlink_swapped_in_mid_operation_redirects_nothing(tmp_path):
    """A folder flipped between a real folder and a symlink to the outside while writes and listings run:
    every component is opened from its parent's descriptor with O_NOFOLLOW, so no write lands outside and
    no listing shows what is outside (checking a path, then opening it by name, would lose this race).
    `python -m stress --only flips` runs the same with thousands of operations."""
    from stress.hostile import symlink_flips

    figures = symlink_flips(tmp_path, int(os.environ.get("NEURON_CACHE_TEST_FLIPS", "300")))
    assert figures.failures == 0, figures.notes


# ------------------------------------------------------------------------------------- names


def test_names_that_are_not_utf8_or_not_safe_are_skipped_with_one_warning(tmp_path, version):
    """One such name in a model's area used to make the server drop the connection on every listing (the
    JSON frame could not be encoded): fetch and publish of that model were off for everyone."""
    bucket = _bucket(tmp_path)
    modules = [module.rsplit("/", 1)[1] for module in _publish(tmp_path / "A", bucket, version).synced]
    area = Path(bucket.location) / _area(version)
    open(os.path.join(os.fsencode(area / modules[0]), b"caf\xe9.neff"), "wb").close()
    os.mkdir(os.path.join(os.fsencode(area), b"MODULE_\xff\xfe+00"))
    open(os.path.join(os.fsencode(area), b"MODULE_\xff\xfe+00", b"model.neff"), "wb").close()
    (area / modules[0] / "back\\slash").write_text("x")
    (area / modules[0] / "new\nline").write_text("x")
    client = BucketClient(bucket)
    listing = client.list(_area(version), recursive=True)
    assert sorted(item["path"].rsplit("/", 1)[1] for item in listing if modules[0] in item["path"]) == sorted(
        path.name for path in (area / modules[0]).iterdir() if path.name.isprintable() and "\\" not in path.name)
    assert all(item["path"].isprintable() and item["path"].encode("utf-8") for item in listing)
    top = [item["path"] for item in client.list(_area(version), recursive=False)]
    assert [path for path in top if not path.endswith(f"/{AREA_STAMP}")] == [f"{_area(version)}/{m}" for m in sorted(modules)]
    run = _fetch(tmp_path / "B", bucket, version)  # fetch works...
    assert sorted(module.rsplit("/", 1)[1] for module in run.fetched) == sorted(modules) and run.warnings == []
    more = _publish(tmp_path / "B", bucket, version, graphs=make_graphs(1, seed="hostile-more"))  # ...and publish
    assert len(more.synced) == 1 and more.warnings == []
    log_text = server_address().log_path.read_text(errors="replace")
    assert "not valid UTF-8 or not safe bucket paths" in log_text and "caf\\udce9.neff" in log_text


# ------------------------------------------------------------------------------------- .incoming


def test_copies_onto_the_same_file_leave_nothing_in_incoming(tmp_path):
    """A copy hard-links its source into `.incoming/`, then renames it over the destination; when that is
    already a hard link of the same file, rename(2) does nothing and used to leave the link behind."""
    bucket = _bucket(tmp_path)
    client = BucketClient(bucket)
    client.batch(add=[{"dest": "a/f", "content": "x" * 100}])
    for _ in range(3):
        client.batch(copy=[{"src": "a/f", "dest": "b/f"}], add=[{"dest": "a/marker", "content": ""}])
    assert os.listdir(Path(bucket.location) / ".incoming") == []
    assert os.path.samefile(Path(bucket.location) / "a/f", Path(bucket.location) / "b/f")
    assert {item["path"]: str(item["digest"])[:7] for item in client.list("", recursive=True)} == {
        "a/f": "blake3:", "a/marker": "blake3:", "b/f": "blake3:"}


def test_incoming_files_of_dead_writers_are_swept(tmp_path):
    bucket = _bucket(tmp_path)
    incoming = Path(bucket.location) / ".incoming"
    incoming.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname()
    two_days_ago = time.time() - 2 * 86400
    files = {
        f"{host}.{dead.pid}.aa": False,  # this host, its writer died: swept
        f"{host}.{os.getpid()}.bb": True,  # this host, writer alive: kept
        f"other-host.{dead.pid}.cc": True,  # another host's, recent: its writer may be alive, kept
        "other-host.12.dd": False,  # another host's, two days old: swept
        "1234-0123abcd": False,  # the naming of earlier versions, two days old: swept
    }
    for name in files:
        (incoming / name).write_text("partial")
    for name in ("other-host.12.dd", "1234-0123abcd"):
        os.utime(incoming / name, (two_days_ago, two_days_ago))
    (incoming / "a-folder").mkdir()  # never ours: never removed
    os.utime(incoming / "a-folder", (two_days_ago, two_days_ago))
    BucketClient(bucket).batch(add=[{"dest": "x/y", "content": "z"}])
    assert sorted(os.listdir(incoming)) == sorted([name for name, kept in files.items() if kept] + ["a-folder"])


# ------------------------------------------------------------------------------------- stale sidecars


def _changed_after_publishing(tmp_path: Path, version: str) -> tuple[BucketRef, list[str], Path]:
    bucket = _bucket(tmp_path)
    modules = [module.rsplit("/", 1)[1] for module in _publish(tmp_path / "A", bucket, version).synced]
    neff = Path(bucket.location) / _area(version) / modules[0] / "model.neff"
    return bucket, modules, neff


def test_a_file_changed_after_it_was_published_is_never_installed(tmp_path, version):
    """Truncated after publishing: its sidecar describes other bytes. It used to be installed on its size."""
    bucket, modules, neff = _changed_after_publishing(tmp_path, version)
    with open(neff, "r+b") as handle:
        handle.truncate(neff.stat().st_size // 2)
    listing = {item["path"]: item for item in BucketClient(bucket).list(_area(version), recursive=True)}
    assert listing[f"{_area(version)}/{modules[0]}/model.neff"]["digest"] == "stale"
    run = _fetch(tmp_path / "B", bucket, version)
    assert [module.rsplit("/", 1)[1] for module in run.fetched] == [modules[1]]
    assert len(run.warnings) == 1 and modules[0] in run.warnings[0] and "model.neff changed after it was published" in run.warnings[0]
    assert local_violations(tmp_path / "B", version, reference_entries(tmp_path / "A", version)) == []
    # Nor does a copy within the bucket make it trusted: the copy is as stale as its source.
    client = BucketClient(bucket)
    client.batch(copy=[{"src": f"{_area(version)}/{modules[0]}/model.neff", "dest": "elsewhere/model.neff"}])
    assert client.paths_info(["elsewhere/model.neff"])[0]["digest"] == "stale"


def test_a_sidecar_that_is_a_symlink_is_not_read(tmp_path, version):
    """A tampered NEFF whose sidecar was replaced by a symlink to one vouching for the new bytes."""
    bucket, modules, neff = _changed_after_publishing(tmp_path, version)
    neff.write_bytes(b"NEFF" + b"\0" * 100)
    info = neff.stat()
    forged = tmp_path / "forged"
    import hashlib

    forged.write_text(f"sha256:{hashlib.sha256(neff.read_bytes()).hexdigest()} {info.st_size} {info.st_mtime_ns}\n")
    sidecar = Path(bucket.location) / ".digests" / _area(version) / modules[0] / "model.neff"
    sidecar.unlink()
    sidecar.symlink_to(forged)
    run = _fetch(tmp_path / "B", bucket, version)
    assert [module.rsplit("/", 1)[1] for module in run.fetched] == [modules[1]] and len(run.warnings) == 1


def test_a_file_without_a_sidecar_is_checked_by_size_only(tmp_path, version):
    """Files another tool copied in have no sidecar: installed on their size, as before."""
    bucket, modules, neff = _changed_after_publishing(tmp_path, version)
    for module in modules:
        shutil.rmtree(Path(bucket.location) / ".digests" / _area(version) / module)
    listing = BucketClient(bucket).list(_area(version), recursive=True)
    assert listing and all(item["digest"] is None for item in listing
                           if "/exports/" not in item["path"] and not item["path"].endswith(f"/{AREA_STAMP}"))
    run = _fetch(tmp_path / "B", bucket, version)
    assert sorted(module.rsplit("/", 1)[1] for module in run.fetched) == sorted(modules) and run.warnings == []


def test_republishing_a_file_keeps_a_sidecar_line_for_what_a_reader_sees(tmp_path):
    """A file published again (other bytes) gets its sidecar before the rename; the sidecar keeps the old
    file's line until the rename is done, so no reader, and no kill in between, ever finds it stale."""
    bucket = _bucket(tmp_path)
    client = BucketClient(bucket)
    client.batch(add=[{"dest": "e/model.neff", "content": "first"}])
    first = client.paths_info(["e/model.neff"])[0]["digest"]
    client.batch(add=[{"dest": "e/model.neff", "content": "second!"}])
    second = client.paths_info(["e/model.neff"])[0]["digest"]
    assert first.startswith("blake3:") and second.startswith("blake3:") and first != second
    sidecar = Path(bucket.location) / ".digests" / "e" / "model.neff"
    assert len(sidecar.read_text().splitlines()) == 1  # the old line goes once the rename is done


def test_a_fifo_where_a_file_should_be_never_blocks_the_server(tmp_path, version):
    """Opening a FIFO for reading blocks until a writer comes: files are opened non-blocking, then refused
    unless regular. A listing leaves the FIFO out, so its entry is incomplete and not fetched."""
    bucket, modules, neff = _changed_after_publishing(tmp_path, version)
    neff.unlink()
    os.mkfifo(neff)
    run = _fetch(tmp_path / "B", bucket, version)
    assert [module.rsplit("/", 1)[1] for module in run.fetched] == [modules[1]] and run.warnings == []
    path = f"{_area(version)}/{modules[0]}/model.neff"
    reply = BucketClient(bucket).download([{"path": path, "local_path": str(tmp_path / "out.neff"), "size": 1}])
    assert reply["failed"] == [{"path": path, "reason": "is not a regular file: refused", "kind": "transfer"}]
    assert not (tmp_path / "out.neff").exists()
