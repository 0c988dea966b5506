"""End-to-end tests of the Hub bucket emulator with the REAL huggingface_hub and the REAL hf_xet.

Each test gets its own emulator and data dir. hf_xet refuses transfers from two processes overlapping in time on
one local:// directory ("Database already open"); this pytest process is the only client here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("hf_xet")
huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import HfApi, constants  # noqa: E402
from huggingface_hub.utils import (  # noqa: E402
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from huggingface_hub.errors import (  # noqa: E402
    BucketBatchError,
    BucketNotFoundError,
    EntryNotFoundError,
    HfHubHTTPError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `tests` is a namespace package: make it importable under any runner
    sys.path.insert(0, str(REPO_ROOT))

from tests.emulator import HubEmulator, TokenInfo  # noqa: E402
from tests.emulator.xet_shards import EMPTY_FILE_HASH, hash_to_hex  # noqa: E402

USER = "emulator"  # user of every caller when the emulator has no tokens configured


@pytest.fixture(scope="module", autouse=True)
def _isolated_hf_env(tmp_path_factory):
    """Keep huggingface_hub and hf_xet away from the user's home and from the network."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_XET_CACHE", str(home / "xet"))
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.delenv("HF_TOKEN", raising=False)
        mp.delenv("HF_ENDPOINT", raising=False)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        bars_were_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            yield
        finally:
            if not bars_were_disabled:
                enable_progress_bars()


@pytest.fixture
def emulator(tmp_path):
    with HubEmulator(tmp_path / "hub", page_size=2) as emu:
        yield emu
    assert not emu.errors, emu.errors


@pytest.fixture
def api(emulator):
    return HfApi(endpoint=emulator.endpoint, token="anything")


@pytest.fixture
def bucket(api):
    return api.create_bucket("me/cache").bucket_id


def _paths(items):
    return [(item.type, item.path) for item in items]


def test_create_exist_ok_and_info(api, emulator):
    url = api.create_bucket("me/cache")
    assert url.bucket_id == f"{USER}/cache"
    assert url.url == f"{emulator.endpoint}/buckets/{USER}/cache"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_bucket(f"{USER}/cache")
    assert exc.value.response.status_code == 409
    assert api.create_bucket(f"{USER}/cache", exist_ok=True).bucket_id == f"{USER}/cache"

    info = api.bucket_info(f"{USER}/cache")
    assert (info.id, info.private, info.size, info.total_files) == (f"{USER}/cache", False, 0, 0)
    assert info.created_at is not None
    assert api.create_bucket("org/private-one", private=True).bucket_id == "org/private-one"
    assert api.bucket_info("org/private-one").private is True
    assert [b.id for b in api.list_buckets()] == [f"{USER}/cache"]


def test_upload_list_paginated_and_prefix(api, emulator, bucket, tmp_path):
    src = tmp_path / "model.neff"
    src.write_bytes(os.urandom(1000))
    api.batch_bucket_files(
        bucket,
        add=[
            (src, "neuronxcc-2.1/MODULE_a/model.neff"),
            (b"", "x/model.done"),
            (b"{}", "logs.json"),
            (b"1", "logs/1.txt"),
            (b"2", "logs/sub/2.txt"),
        ],
    )
    emulator.reset_counts()
    files = list(api.list_bucket_tree(bucket, recursive=True))
    assert _paths(files) == [
        ("file", "logs.json"),
        ("file", "logs/1.txt"),
        ("file", "logs/sub/2.txt"),
        ("file", "neuronxcc-2.1/MODULE_a/model.neff"),
        ("file", "x/model.done"),
    ]
    assert emulator.requests.count("GET", r"/tree$") == 3  # 5 items, pages of 2
    by_path = {f.path: f for f in files}
    assert by_path["neuronxcc-2.1/MODULE_a/model.neff"].size == 1000
    assert by_path["x/model.done"].size == 0
    assert by_path["x/model.done"].xet_hash == EMPTY_FILE_HASH
    assert by_path["logs.json"].mtime is not None and by_path["logs.json"].uploaded_at is not None

    # Non-recursive: direct children, folders as "directory".
    assert _paths(api.list_bucket_tree(bucket, recursive=False)) == [
        ("directory", "logs"),
        ("file", "logs.json"),
        ("directory", "neuronxcc-2.1"),
        ("directory", "x"),
    ]
    # Lexical prefix like the real server: "logs" also matches "logs.json"; the prefix is sent as %2F-encoded.
    assert _paths(api.list_bucket_tree(bucket, "logs", recursive=True)) == [
        ("file", "logs.json"),
        ("file", "logs/1.txt"),
        ("file", "logs/sub/2.txt"),
    ]
    assert _paths(api.list_bucket_tree(bucket, "logs/", recursive=True)) == [
        ("file", "logs/1.txt"),
        ("file", "logs/sub/2.txt"),
    ]
    assert _paths(api.list_bucket_tree(bucket, "logs", recursive=False)) == [
        ("file", "logs.json"),
        ("file", "logs/1.txt"),
        ("directory", "logs/sub"),
    ]
    assert _paths(api.list_bucket_tree(bucket, "neuronxcc-2.1/MODULE_a", recursive=True)) == [
        ("file", "neuronxcc-2.1/MODULE_a/model.neff")
    ]
    assert any(path.startswith("/api/buckets/emulator/cache/tree/neuronxcc-2.1%2F") for _, path in emulator.requests)
    assert list(api.list_bucket_tree(bucket, "nothing-here")) == []

    info = api.bucket_info(bucket)
    assert (info.size, info.total_files) == (1000 + 0 + 2 + 1 + 1, 5)


def test_paths_info_leaves_missing_out(api, bucket):
    api.batch_bucket_files(bucket, add=[(b"a", "a.txt"), (b"", "empty")])
    infos = list(api.get_bucket_paths_info(bucket, ["a.txt", "missing.txt", "empty", "dir/missing"]))
    assert [(i.path, i.size) for i in infos] == [("a.txt", 1), ("empty", 0)]


def test_paths_needing_quoting(api, bucket, tmp_path):
    odd = "dir with space/é+%2F#?.txt"
    api.batch_bucket_files(bucket, add=[(b"odd", odd)])
    assert [f.path for f in api.list_bucket_tree(bucket, "dir with space/", recursive=True)] == [odd]
    assert [f.path for f in api.get_bucket_paths_info(bucket, [odd])] == [odd]
    assert api.get_bucket_file_metadata(bucket, odd).size == 3
    with pytest.raises(EntryNotFoundError):
        api.get_bucket_file_metadata(bucket, "dir with space/ñope")
    api.download_bucket_files(bucket, [(odd, tmp_path / "odd")])
    assert (tmp_path / "odd").read_bytes() == b"odd"


def test_download_byte_identical(api, emulator, bucket, tmp_path):
    big = os.urandom(3 * 1024 * 1024)
    small = b"hello neuron cache\n" * 10
    (tmp_path / "big.bin").write_bytes(big)
    api.batch_bucket_files(bucket, add=[(tmp_path / "big.bin", "m/big.bin"), (small, "m/small.txt"), (b"", "m/zero")])

    out = tmp_path / "out"
    api.download_bucket_files(
        bucket,
        [("m/big.bin", out / "big.bin"), ("m/small.txt", out / "small.txt"), ("m/zero", out / "zero")],
        raise_on_missing_files=True,
    )
    assert (out / "big.bin").read_bytes() == big
    assert (out / "small.txt").read_bytes() == small
    assert (out / "zero").exists() and (out / "zero").stat().st_size == 0

    # With BucketFile objects (no metadata request needed but the resolve HEAD for the token route).
    files = [f for f in api.list_bucket_tree(bucket, "m/", recursive=True)]
    api.download_bucket_files(bucket, [(f, out / "again" / f.path) for f in files])
    assert (out / "again" / "m" / "big.bin").read_bytes() == big

    meta = api.get_bucket_file_metadata(bucket, "m/big.bin")
    assert meta.size == len(big)
    assert meta.xet_file_data.refresh_route == f"{emulator.endpoint}/api/buckets/{bucket}/xet-read-token"
    with pytest.raises(EntryNotFoundError):
        api.get_bucket_file_metadata(bucket, "m/nope")
    with pytest.raises(EntryNotFoundError):
        api.download_bucket_files(bucket, [("m/nope", out / "nope")], raise_on_missing_files=True)


def test_copy_by_hash_moves_no_bytes(api, emulator, bucket, tmp_path):
    payload = os.urandom(200_000)
    api.batch_bucket_files(bucket, add=[(payload, "src/blob")])
    (src,) = api.get_bucket_paths_info(bucket, ["src/blob"])
    other = api.create_bucket("me/other").bucket_id

    xorbs_before = sorted(p.name for p in emulator.cas_dir.rglob("*") if p.is_file())
    emulator.reset_counts()
    api.batch_bucket_files(other, copy=[("bucket", bucket, src.xet_hash, "dst/blob")])
    api.batch_bucket_files(bucket, copy=[("bucket", bucket, src.xet_hash, "src/blob-copy")])
    assert emulator.requests.count(path_regex="xet-") == 0  # no Xet transfer at all
    assert sorted(p.name for p in emulator.cas_dir.rglob("*") if p.is_file()) == xorbs_before

    (dst,) = api.get_bucket_paths_info(other, ["dst/blob"])
    assert (dst.size, dst.xet_hash) == (len(payload), src.xet_hash)
    api.download_bucket_files(other, [("dst/blob", tmp_path / "copy")])
    assert (tmp_path / "copy").read_bytes() == payload

    # A hash the source bucket does not hold, or a missing source bucket: reported as failed operations.
    with pytest.raises(BucketBatchError) as exc:
        api.batch_bucket_files(
            other,
            copy=[
                ("bucket", bucket, "ab" * 32, "bad/1"),
                ("bucket", f"{USER}/missing", src.xet_hash, "bad/2"),
                ("bucket", bucket, src.xet_hash, "good"),
            ],
        )
    assert sorted(f["path"] for f in exc.value.failures) == ["bad/1", "bad/2"]
    assert exc.value.response.status_code == 200
    assert [f.path for f in api.get_bucket_paths_info(other, ["bad/1", "bad/2", "good"])] == ["good"]


def test_unknown_hash_in_add_is_a_failure(api, emulator, bucket):
    from huggingface_hub._buckets import _BucketAddFile

    op = _BucketAddFile(source=b"never uploaded", destination="ghost", xet_hash="cd" * 32)
    with pytest.raises(BucketBatchError) as exc:
        api._batch_bucket_files(bucket, add=[op])
    assert exc.value.response.status_code == 422
    assert [f["path"] for f in exc.value.failures] == ["ghost"]


def test_delete_files_and_bucket(api, bucket):
    api.batch_bucket_files(bucket, add=[(b"1", "a/1"), (b"2", "a/2")])
    api.batch_bucket_files(bucket, delete=["a/1", "not-there"])
    assert [f.path for f in api.list_bucket_tree(bucket, recursive=True)] == ["a/2"]
    api.delete_bucket(bucket)
    with pytest.raises(BucketNotFoundError):
        api.bucket_info(bucket)
    api.delete_bucket(bucket, missing_ok=True)


def test_unknown_bucket_is_bucket_not_found(api):
    with pytest.raises(BucketNotFoundError):
        api.bucket_info(f"{USER}/nope")
    with pytest.raises(BucketNotFoundError):
        list(api.list_bucket_tree(f"{USER}/nope"))
    with pytest.raises(BucketNotFoundError):
        list(api.get_bucket_paths_info(f"{USER}/nope", ["x"]))
    with pytest.raises(BucketNotFoundError):
        api.batch_bucket_files(f"{USER}/nope", delete=["x"])


def test_restart_on_same_data_dir_keeps_state(tmp_path):
    data = tmp_path / "hub"
    with HubEmulator(data) as first:
        api = HfApi(endpoint=first.endpoint, token="t")
        bucket = api.create_bucket("me/persist", private=True).bucket_id
        api.batch_bucket_files(bucket, add=[(b"kept bytes", "k/v")])
    with HubEmulator(data) as second:
        api = HfApi(endpoint=second.endpoint, token="t")
        info = api.bucket_info(bucket)
        assert (info.private, info.total_files, info.size) == (True, 1, len(b"kept bytes"))
        api.download_bucket_files(bucket, [("k/v", tmp_path / "v")])
        assert (tmp_path / "v").read_bytes() == b"kept bytes"


class TestAuth:
    TOKENS = {
        "alice-rw": TokenInfo("alice", write=True),
        "alice-ro": TokenInfo("alice", write=False),
        "bob-rw": TokenInfo("bob", write=True),
    }

    @pytest.fixture
    def emulator(self, tmp_path):
        with HubEmulator(tmp_path / "hub", tokens=self.TOKENS) as emu:
            yield emu

    def _api(self, emulator, token):
        return HfApi(endpoint=emulator.endpoint, token=token)

    def test_private_bucket_hidden(self, emulator):
        alice = self._api(emulator, "alice-rw")
        assert alice.create_bucket("me/secret", private=True).bucket_id == "alice/secret"
        alice.create_bucket("alice/open")
        alice.batch_bucket_files("alice/secret", add=[(b"s", "s.txt")])

        for caller in (self._api(emulator, False), self._api(emulator, "unknown"), self._api(emulator, "bob-rw")):
            with pytest.raises(BucketNotFoundError):
                caller.bucket_info("alice/secret")
            with pytest.raises(BucketNotFoundError):
                list(caller.list_bucket_tree("alice/secret"))
            with pytest.raises(BucketNotFoundError):
                list(caller.get_bucket_paths_info("alice/secret", ["s.txt"]))
            assert caller.bucket_info("alice/open").private is False  # public: readable by anyone

        assert self._api(emulator, "alice-ro").bucket_info("alice/secret").private is True
        assert [f.path for f in alice.list_bucket_tree("alice/secret")] == ["s.txt"]

    def test_write_needs_write_token(self, emulator, tmp_path):
        alice = self._api(emulator, "alice-rw")
        alice.create_bucket("alice/b")
        alice.batch_bucket_files("alice/b", add=[(b"x", "x")])

        ro = self._api(emulator, "alice-ro")
        with pytest.raises(HfHubHTTPError) as exc:
            ro.create_bucket("alice/new")
        assert exc.value.response.status_code == 403
        assert ro.create_bucket("alice/b", exist_ok=True).bucket_id == "alice/b"
        with pytest.raises(HfHubHTTPError) as exc:
            ro.batch_bucket_files("alice/b", delete=["x"])
        assert exc.value.response.status_code == 403
        with pytest.raises(Exception):  # refused xet-write-token: raised from inside hf_xet
            ro.batch_bucket_files("alice/b", add=[(b"y", "y")])
        assert emulator.requests.count("GET", r"/xet-write-token$") >= 2

        anonymous = self._api(emulator, False)
        with pytest.raises(HfHubHTTPError) as exc:
            anonymous.batch_bucket_files("alice/b", delete=["x"])
        assert exc.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as exc:
            self._api(emulator, "bob-rw").batch_bucket_files("alice/b", delete=["x"])
        assert exc.value.response.status_code == 403

        # Reads of a public bucket work for a read-only token, downloads included.
        ro.download_bucket_files("alice/b", [("x", tmp_path / "x")])
        assert (tmp_path / "x").read_bytes() == b"x"
        assert [f.path for f in alice.list_bucket_tree("alice/b")] == ["x"]


def test_fault_500_is_retried(api, emulator, bucket):
    api.batch_bucket_files(bucket, add=[(b"1", "one")])
    emulator.reset_counts()
    emulator.add_fault("POST", r"/paths-info$", 500)
    assert [f.path for f in api.get_bucket_paths_info(bucket, ["one"])] == ["one"]
    assert emulator.requests.count("POST", r"/paths-info$") == 2


def test_fault_404_and_delay(api, emulator, bucket):
    emulator.add_fault("GET", rf"^/api/buckets/{bucket}$", 404, headers={"X-Error-Code": "RepoNotFound"})
    with pytest.raises(BucketNotFoundError):
        api.bucket_info(bucket)
    assert api.bucket_info(bucket).id == bucket  # times=1: only the first request fails

    emulator.add_fault(None, r"/tree", 0, delay=0.3)
    start = time.monotonic()
    assert list(api.list_bucket_tree(bucket)) == []
    assert time.monotonic() - start >= 0.3

    emulator.add_fault("GET", rf"^/api/buckets/{bucket}$", 503, times=None)
    emulator.clear_faults()
    assert api.bucket_info(bucket).id == bucket


def test_command_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.emulator", "--data", str(tmp_path / "hub"), "--page-size", "1"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        api = HfApi(endpoint=endpoint, token="t")
        api.create_bucket("me/cli")
        assert api.bucket_info(f"{USER}/cli").total_files == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert (tmp_path / "hub" / "hub_state.json").exists()


def test_hash_text_form():
    raw = bytes(range(32))
    assert hash_to_hex(raw) == "0706050403020100" "0f0e0d0c0b0a0908" "1716151413121110" "1f1e1d1c1b1a1918"


def test_stop_closes_keepalive_connections_and_restart_keeps_port(tmp_path):
    emu = HubEmulator(tmp_path / "hub").start()
    try:
        api = HfApi(endpoint=emu.endpoint, token="t")
        bucket = api.create_bucket("me/down").bucket_id
        endpoint = emu.endpoint
        emu.stop()
        with pytest.raises(Exception):  # the pooled keep-alive connection must not keep being served
            api.bucket_info(bucket)
        emu.start()
        assert emu.endpoint == endpoint
        assert api.bucket_info(bucket).id == bucket
    finally:
        emu.stop()
