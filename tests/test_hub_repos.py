"""Model repos through the bucket server (optimum-neuron's Git cache repos): the real huggingface_hub and hf_xet
against the Hub emulator's model-repo endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.errors import BucketNotFoundError, ConfigurationError, RemoteInvalidDataError
from optimum_neuron_cache.hub_repos import RepoClient, RepoRef, parse_repo

NEFF = b"\x01NEFF" + bytes(range(256)) * 300


def xet_file(hub, data: bytes, name: str = "blob") -> dict:
    """Put bytes in the emulator's Xet store (through a bucket upload, as the Hub dedups by hash) -> {xetHash, size}."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    api = HfApi(endpoint=hub.endpoint)
    api.create_bucket("staging/xet", exist_ok=True)
    api.batch_bucket_files("staging/xet", add=[(data, name)])
    return hub.bucket_file("staging/xet", name)


@pytest.fixture
def cache_repo(hub):
    files = {
        "neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/model.neff": xet_file(hub, NEFF),
        "neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/model.done": b"",
        "neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/compile_flags.json": b'["--target=trn1"]',
        "README.md": b"cache",
    }
    sha = hub.create_model_repo("aws-neuron/optimum-neuron-cache", files)
    return sha


def test_parse_repo():
    assert parse_repo("aws-neuron/optimum-neuron-cache") == RepoRef("aws-neuron/optimum-neuron-cache")
    assert parse_repo("hf://models/org/name@v1") == RepoRef("org/name", "v1")
    for bad in ("org", "org/../x", "a/b/c", "org/na me", "org/name@..", "org/name@-x"):
        with pytest.raises(ConfigurationError):
            parse_repo(bad)


def test_list_paths_info_and_download_verified(hub, cache_repo, tmp_path: Path):
    client = RepoClient(RepoRef("aws-neuron/optimum-neuron-cache")).pinned()
    assert client.repo.revision == cache_repo
    listing = {item["path"]: item for item in client.list("neuronxcc-2.21.33363.0+82129205", recursive=True)}
    neff = listing["neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/model.neff"]
    assert neff["size"] == len(NEFF) and neff["digest"] == f"xet:{neff['xet_hash']}"
    flags = listing["neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/compile_flags.json"]
    assert flags["xet_hash"] is None and len(flags["blob_id"]) == 40
    assert client.folders("") == ["neuronxcc-2.21.33363.0+82129205"]
    info = client.paths_info([neff["path"], "neuronxcc-2.21.33363.0+82129205/MODULE_9+ab/model.neff"])
    assert [item["path"] for item in info] == [neff["path"]]

    reply = client.download([{**neff, "local_path": str(tmp_path / "model.neff")},
                             {**flags, "local_path": str(tmp_path / "flags.json")}])
    assert reply["failed"] == []
    assert (tmp_path / "model.neff").read_bytes() == NEFF
    assert (tmp_path / "flags.json").read_bytes() == b'["--target=trn1"]'


def test_download_that_does_not_match_is_removed_and_reported(hub, cache_repo, tmp_path: Path):
    client = RepoClient(RepoRef("aws-neuron/optimum-neuron-cache"))
    path = "neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/compile_flags.json"
    [item] = client.paths_info([path])
    other_neff = {**client.paths_info(["neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/model.neff"])[0]}
    lying = {**item, "blob_id": "0" * 40, "local_path": str(tmp_path / "flags.json")}
    wrong_hash = {**other_neff, "digest": "xet:" + "1" * 64, "local_path": str(tmp_path / "model.neff")}
    reply = client.download([lying, wrong_hash])
    assert {failure["path"] for failure in reply["failed"]} == {path, other_neff["path"]}
    assert not (tmp_path / "flags.json").exists() and not (tmp_path / "model.neff").exists()


def test_missing_repo_and_revision(hub, cache_repo):
    with pytest.raises(BucketNotFoundError, match="model repo or revision not found"):
        RepoClient(RepoRef("nobody/nothing")).resolve()
    with pytest.raises(BucketNotFoundError):
        RepoClient(RepoRef("aws-neuron/optimum-neuron-cache", "no-such-branch")).list("")


def test_revisions_are_read_as_pinned(hub, cache_repo):
    hub.create_model_repo("aws-neuron/optimum-neuron-cache", {"other.txt": b"x"})  # main moves on
    old = RepoClient(RepoRef("aws-neuron/optimum-neuron-cache", cache_repo))
    assert "README.md" in {item["path"] for item in old.list("")}
    assert {item["path"] for item in RepoClient(RepoRef("aws-neuron/optimum-neuron-cache")).list("")} == {"other.txt"}


def test_copy_by_hash_into_a_hub_bucket(hub, cache_repo):
    bucket = BucketRef("hf", "test-org/neuron-cache")
    BucketClient(bucket).create()
    repo = RepoClient(RepoRef("aws-neuron/optimum-neuron-cache"))
    [neff] = repo.paths_info(["neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/model.neff"])
    hub.reset_counts()
    assert repo.copy_into(bucket, [{"xet_hash": neff["xet_hash"], "dest": "neuronxcc-x/MODULE_1+ab/model.neff"}]) == {"copied": 1}
    assert hub.requests.bytes_in("POST", "/v1/xorbs/") == 0 and hub.requests.count("GET", "/resolve/") == 0
    [copied] = BucketClient(bucket).paths_info(["neuronxcc-x/MODULE_1+ab/model.neff"])
    assert copied["xet_hash"] == neff["xet_hash"] and copied["size"] == len(NEFF)
    with pytest.raises(RemoteInvalidDataError, match="Hub bucket"):
        repo.copy_into(BucketRef("dir", "/tmp/x"), [{"xet_hash": neff["xet_hash"], "dest": "a/b"}])


def test_hostile_listing_items_are_left_out():
    from types import SimpleNamespace

    from bucket_server.backends.repo import file_item

    good = dict(path="neuronxcc-1/MODULE_1+a/model.neff", size=3, blob_id="a" * 40, xet_hash="b" * 64, lfs=None)
    assert file_item(SimpleNamespace(**good))["digest"] == "xet:" + "b" * 64
    for bad in ({"path": "../etc/passwd"}, {"path": "/abs"}, {"size": -1}, {"size": 2**41}, {"size": True},
                {"xet_hash": "zz"}, {"blob_id": "nope"}, {"path": "a\\b"}):
        assert file_item(SimpleNamespace(**{**good, **bad})) is None


def test_the_emulator_serves_model_repos_to_the_real_huggingface_hub(tmp_path):
    """Paginated trees, paths-info, revisions, private repos and downloads, as huggingface_hub 2.x calls them."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from hub_emulator import HubEmulator, TokenInfo

    with HubEmulator(tmp_path / "hub", page_size=3, tokens={"owner": TokenInfo("team", write=True)}) as hub:
        api = HfApi(endpoint=hub.endpoint)
        first = hub.create_model_repo("team/cache", {f"neuronxcc-1.0.0.0/MODULE_{i}+ab/model.done": b"" for i in range(5)},
                                      private=True)
        assert len(list(api.list_repo_tree("team/cache", recursive=True, token="owner"))) == 11  # 5 files, 6 folders
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("team/cache", token=False)
        second = hub.create_model_repo("team/cache", {"a/b.txt": b"hello"})
        assert api.model_info("team/cache", token="owner").sha == second
        assert api.model_info("team/cache", revision=first, token="owner").sha == first
        with pytest.raises(RevisionNotFoundError):
            api.model_info("team/cache", revision="nope", token="owner")
        [info] = api.get_paths_info("team/cache", ["a/b.txt", "a/missing"], token="owner")
        assert info.size == 5 and info.xet_hash is None
        assert [entry.path for entry in api.list_repo_tree("team/cache", "a", token="owner")] == ["a/b.txt"]
        with pytest.raises(EntryNotFoundError):
            list(api.list_repo_tree("team/cache", "zzz", token="owner"))
        path = hf_hub_download("team/cache", "a/b.txt", revision=second, token="owner", cache_dir=tmp_path / "hf",
                               endpoint=hub.endpoint)
        assert Path(path).read_bytes() == b"hello"


def test_an_lfs_file_not_in_xet_is_verified_by_its_lfs_sha256(hub, tmp_path: Path):
    """An LFS file outside Xet: the listing's Git oid is its pointer's, so only its LFS sha256 can check its bytes."""
    import hashlib

    path = "neuronxcc-2.21.33363.0+82129205/MODULE_1+ab/model.neff"
    hub.create_model_repo("aws-neuron/optimum-neuron-cache", {path: {"lfs": NEFF}})
    client = RepoClient(RepoRef("aws-neuron/optimum-neuron-cache"))
    [item] = client.paths_info([path])
    assert item["xet_hash"] is None and item["size"] == len(NEFF)
    assert item["digest"] == f"sha256:{hashlib.sha256(NEFF).hexdigest()}"
    reply = client.download([{**item, "local_path": str(tmp_path / "model.neff")},
                             {"path": path, "local_path": str(tmp_path / "looked-up.neff")}])  # the server looks it up
    assert reply["failed"] == []
    assert (tmp_path / "model.neff").read_bytes() == NEFF == (tmp_path / "looked-up.neff").read_bytes()
    lying = client.download([{**item, "digest": "sha256:" + "1" * 64, "local_path": str(tmp_path / "lying.neff")}])
    assert [failure["path"] for failure in lying["failed"]] == [path] and not (tmp_path / "lying.neff").exists()
