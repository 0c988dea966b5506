"""End-to-end tests of the Hub bucket emulator with the REAL huggingface_hub and the REAL hf_xet.

Each test gets its own emulator and data dir; the generic tests run in both Xet modes (``local``: hf_xet keeps
its data in a local:// directory; ``http``: the emulator serves the Xet CAS API). Only HTTP mode takes transfers
from several processes at the same instant (local:// fails with "Database already open"), so the multi-process
tests use it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
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

from hub_emulator import HubEmulator, TokenInfo  # noqa: E402
from hub_emulator.xet_shards import EMPTY_FILE_HASH, hash_to_hex  # noqa: E402
from tests.polling import wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(params=["local", "http"])
def xet_mode(request):
    return request.param


@pytest.fixture
def emulator(tmp_path, xet_mode):
    with HubEmulator(tmp_path / "hub", page_size=2, xet=xet_mode) as emu:
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
    assert emulator.requests.count(path_regex="^/cas/") == 0
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


def test_restart_on_same_data_dir_keeps_state(tmp_path, xet_mode):
    data = tmp_path / "hub"
    with HubEmulator(data, xet=xet_mode) as first:
        api = HfApi(endpoint=first.endpoint, token="t")
        bucket = api.create_bucket("me/persist", private=True).bucket_id
        api.batch_bucket_files(bucket, add=[(b"kept bytes", "k/v")])
    with HubEmulator(data, xet=xet_mode) as second:
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
    def emulator(self, tmp_path, xet_mode):
        with HubEmulator(tmp_path / "hub", tokens=self.TOKENS, xet=xet_mode) as emu:
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
        with pytest.raises((ConnectionError, RuntimeError)):  # refused xet-write-token: raised from inside hf_xet
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
    assert time.monotonic() - start >= 0.3  # the delay is the emulator's simulated slowness (a lower bound)
    assert [r.status for r in emulator.requests.records("GET", r"/tree")] == [200]  # then answered normally

    emulator.add_fault("GET", rf"^/api/buckets/{bucket}$", 503, times=None)
    emulator.clear_faults()
    assert api.bucket_info(bucket).id == bucket


def test_command_line(tmp_path, xet_mode):
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub_emulator", "--data", str(tmp_path / "hub"), "--page-size", "1", "--xet", xet_mode],
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
        cas_url = _get_json(f"{endpoint}/api/buckets/{USER}/cli/xet-read-token")["casUrl"]
        assert cas_url.startswith(f"{endpoint}/cas/" if xet_mode == "http" else "local://")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert (tmp_path / "hub" / "hub_state.json").exists()


def test_hash_text_form():
    raw = bytes(range(32))
    assert hash_to_hex(raw) == "0706050403020100" "0f0e0d0c0b0a0908" "1716151413121110" "1f1e1d1c1b1a1918"


def test_stop_closes_keepalive_connections_and_restart_keeps_port(tmp_path, xet_mode):
    emu = HubEmulator(tmp_path / "hub", xet=xet_mode).start()
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
        api.batch_bucket_files(bucket, add=[(b"after restart", "r")])  # transfers work again too
        api.download_bucket_files(bucket, [("r", tmp_path / "r")])
        assert (tmp_path / "r").read_bytes() == b"after restart"
    finally:
        emu.stop()


def test_default_mode_is_local_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("HUB_EMULATOR_XET", raising=False)
    assert HubEmulator(tmp_path / "a").xet == "local"
    monkeypatch.setenv("HUB_EMULATOR_XET", "http")
    assert HubEmulator(tmp_path / "b").xet == "http"
    with pytest.raises(ValueError):
        HubEmulator(tmp_path / "c", xet="s3")


# ------------------------------------------------------------------------------------------------ HTTP Xet CAS

XORB_POST = r"^/cas/[^/]+/v1/xorbs/"
XORB_GET = r"^/cas/[^/]+/transfer/xorb/"


def _http(method, url, *, headers=None, data=None):
    """(status, headers, body) of a raw request, errors included."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _get_json(url, headers=None):
    status, _, body = _http("GET", url, headers=headers)
    assert status == 200, (status, body)
    return json.loads(body)


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def http_emulator(tmp_path):
    with HubEmulator(tmp_path / "hub", xet="http") as emu:
        yield emu
    assert not emu.errors, emu.errors


@pytest.fixture
def http_api(http_emulator):
    return HfApi(endpoint=http_emulator.endpoint, token="anything")


def test_http_token_points_at_the_emulator_cas(http_emulator, http_api, tmp_path):
    emu, endpoint = http_emulator, http_emulator.endpoint
    bucket = http_api.create_bucket("me/b").bucket_id
    write = _get_json(f"{endpoint}/api/buckets/{bucket}/xet-write-token")
    read = _get_json(f"{endpoint}/api/buckets/{bucket}/xet-read-token")
    cas = write["casUrl"]
    assert cas == read["casUrl"] == emu.cas_url and cas.startswith(f"{endpoint}/cas/")
    assert write["exp"] > time.time() + 60

    some_hash = "ab" * 32
    xorb_url = f"{cas}/v1/xorbs/default/{some_hash}"
    assert _http("POST", xorb_url, data=b"x")[0] == 401  # no token
    assert _http("POST", xorb_url, data=b"x", headers=_bearer("xet_write_99999999999_forged"))[0] == 401
    assert _http("POST", xorb_url, data=b"x", headers=_bearer(read["accessToken"]))[0] == 403  # read scope
    assert _http("POST", xorb_url, data=b"not a xorb", headers=_bearer(write["accessToken"]))[0] == 400
    assert _http("POST", f"{cas}/v1/xorbs/default/XYZ", data=b"x", headers=_bearer(write["accessToken"]))[0] == 400
    assert _http("POST", f"{cas}/v1/shards", data=b"not a shard", headers=_bearer(write["accessToken"]))[0] == 400
    assert _http("GET", f"{cas}/v2/reconstructions/{some_hash}", headers=_bearer(read["accessToken"]))[0] == 404
    assert _http("GET", f"{cas}/v1/chunks/default/{some_hash}", headers=_bearer(read["accessToken"]))[0] == 404
    assert _http("GET", f"{endpoint}/cas/0000000000000000/v1/reconstructions/{some_hash}")[0] == 404  # other store

    # A shard whose file points into a xorb that was never uploaded is refused.
    http_api.batch_bucket_files(bucket, add=[(b"real", "real")])
    (real_shard,) = (emu.cas_dir / "shards").iterdir()
    entry = bytes.fromhex(some_hash) + struct.pack("<IIII", 0, 4, 0, 1)
    file_info = b"\x07" * 32 + struct.pack("<II", 0, 1) + bytes(8) + entry
    bookend = b"\xff" * 32 + bytes(16)
    shard = real_shard.read_bytes()[:32] + struct.pack("<QQ", 2, 0) + file_info + bookend + bookend
    status, _, body = _http("POST", f"{cas}/v1/shards", data=shard, headers=_bearer(write["accessToken"]))
    assert status == 400 and b"unknown xorb" in body
    assert emu.shards.size_of("07" * 32) is None and len(list((emu.cas_dir / "shards").iterdir())) == 1


def test_http_sizes_roundtrip_and_xorb_layout(http_emulator, http_api, tmp_path):
    emu, api = http_emulator, http_api
    bucket = api.create_bucket("me/sizes").bucket_id
    payloads = {"zero": b"", "one": b"\x01", "three": os.urandom(3 * 1024 * 1024), "seventy": os.urandom(70_000_000)}
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(data)
    api.batch_bucket_files(bucket, add=[(tmp_path / name, f"s/{name}") for name in payloads])
    xorb_posts = emu.requests.records("POST", XORB_POST)
    assert len(xorb_posts) >= 2 and all(r.status == 200 for r in xorb_posts)  # 70 MB cannot fit in one xorb
    assert sum(r.bytes_in for r in xorb_posts) >= sum(map(len, payloads.values()))  # random bytes: no savings
    stored = sorted(p.name for p in (emu.cas_dir / "xorbs").iterdir())
    assert len(stored) == len(xorb_posts)
    assert {i.path: i.size for i in api.get_bucket_paths_info(bucket, [f"s/{n}" for n in payloads])} == {
        f"s/{n}": len(d) for n, d in payloads.items()
    }

    emu.reset_counts()
    out = tmp_path / "out"
    api.download_bucket_files(bucket, [(f"s/{n}", out / n) for n in payloads], raise_on_missing_files=True)
    for name, data in payloads.items():
        assert (out / name).read_bytes() == data, name
    assert emu.requests.count("GET", r"/v2/reconstructions/") >= 3  # hf_xet 1.8 asks for V2 first
    assert len({r.path for r in emu.requests.records("GET", XORB_GET)}) >= 2
    assert emu.requests.bytes_out("GET", XORB_GET) >= len(payloads["seventy"])


def _read_chunks(data):
    """Decode a run of serialized chunks (only uncompressed ones: random test data never compresses)."""
    chunks, pos = [], 0
    while pos < len(data):
        version, scheme = data[pos], data[pos + 4]
        size = int.from_bytes(data[pos + 1 : pos + 4], "little")
        assert version == 0 and scheme == 0, "test data expected to be stored uncompressed"
        chunks.append(data[pos + 8 : pos + 8 + size])
        pos += 8 + size
    return chunks


def _reassemble(cas, token, file_hash, rng, version):
    """Rebuild a byte range of a file with our own client: reconstruction API + presigned xorb fetches."""
    headers = _bearer(token)
    if rng is not None:
        headers["Range"] = rng
    status, _, body = _http("GET", f"{cas}/v{version}/reconstructions/{file_hash}", headers=headers)
    if status != 200:
        return status, None
    rec = json.loads(body)
    fetched = {}  # (xorb, chunk index) -> bytes
    if version == 1:
        for xorb, infos in rec["fetch_info"].items():
            for info in infos:
                r = info["url_range"]
                status, _, data = _http("GET", info["url"], headers={"Range": f"bytes={r['start']}-{r['end']}"})
                assert status == 206
                for i, chunk in enumerate(_read_chunks(data)):
                    fetched[(xorb, info["range"]["start"] + i)] = chunk
    else:
        for xorb, entries in rec["xorbs"].items():
            for entry in entries:
                spans = entry["ranges"]
                header = "bytes=" + ",".join(f"{s['bytes']['start']}-{s['bytes']['end']}" for s in spans)
                status, resp_headers, data = _http("GET", entry["url"], headers={"Range": header})
                assert status == 206
                if len(spans) == 1:
                    parts = [data]
                else:  # multipart/byteranges
                    boundary = resp_headers["Content-Type"].split("boundary=")[1].encode()
                    parts = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in data.split(b"--" + boundary)[1:-1]]
                for span, part in zip(spans, parts):
                    for i, chunk in enumerate(_read_chunks(part)):
                        fetched[(xorb, span["chunks"]["start"] + i)] = chunk
    out = b""
    for term in rec["terms"]:
        piece = b"".join(fetched[(term["hash"], i)] for i in range(term["range"]["start"], term["range"]["end"]))
        assert len(piece) == term["unpacked_length"]
        out += piece
    return 200, out[rec["offset_into_first_range"] :]


@pytest.mark.parametrize("version", [1, 2])
def test_http_reconstruction_ranges_with_our_own_client(http_emulator, http_api, version):
    emu, api = http_emulator, http_api
    bucket = api.create_bucket("me/ranges").bucket_id
    data = os.urandom(3 * 1024 * 1024 + 12345)
    api.batch_bucket_files(bucket, add=[(data, "f")])
    (info,) = api.get_bucket_paths_info(bucket, ["f"])
    token = _get_json(f"{emu.endpoint}/api/buckets/{bucket}/xet-read-token")["accessToken"]
    n = len(data)
    for rng, expected in [
        (None, data),
        ("bytes=0-0", data[:1]),
        ("bytes=1-100", data[1:101]),
        ("bytes=65000-300000", data[65000:300001]),
        ("bytes=1000000-", data[1000000:]),
        ("bytes=-5000", data[-5000:]),
        (f"bytes={n - 1}-{n + 100}", data[-1:]),
    ]:
        status, got = _reassemble(emu.cas_url, token, info.xet_hash, rng, version)
        assert status == 200, rng
        assert got[: len(expected)] == expected, rng  # whole chunks come back: the client trims the tail
        assert len(got) - len(expected) < 128 * 1024, rng  # ... of less than one chunk
    assert _reassemble(emu.cas_url, token, info.xet_hash, f"bytes={n}-{n + 10}", version)[0] == 416

    # Several ranges of one xorb in one request: multipart/byteranges, as the V2 contract allows.
    rec = _get_json(f"{emu.cas_url}/v2/reconstructions/{info.xet_hash}", _bearer(token))
    ((xorb, [entry]),) = rec["xorbs"].items()
    status, headers, body = _http("GET", entry["url"], headers={"Range": "bytes=0-9,20-29"})
    assert status == 206 and headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    assert body.count(b"Content-Range: bytes ") == 2
    # The fetch URL is presigned: without its signature it is refused.
    assert _http("GET", entry["url"].split("?")[0], headers={"Range": "bytes=0-9"})[0] == 403


def test_http_dedup_second_upload_sends_far_fewer_bytes(http_emulator, http_api, tmp_path):
    emu, api = http_emulator, http_api
    bucket = api.create_bucket("me/dedup").bucket_id
    (tmp_path / "f").write_bytes(os.urandom(3 * 1024 * 1024))
    api.batch_bucket_files(bucket, add=[(tmp_path / "f", "first")])
    first = emu.requests.bytes_in("POST", XORB_POST)
    emu.reset_counts()
    api.batch_bucket_files(bucket, add=[(tmp_path / "f", "second")])
    second = emu.requests.bytes_in("POST", XORB_POST)
    assert first >= 3 * 1024 * 1024
    assert second < first / 20, (first, second)
    infos = {i.path: i for i in api.get_bucket_paths_info(bucket, ["first", "second"])}
    assert infos["first"].xet_hash == infos["second"].xet_hash


def test_http_spliced_file_dedups_and_downloads(http_emulator, http_api, tmp_path):
    """A file made of non-contiguous pieces of an uploaded one references two chunk ranges of one xorb: only the
    new bytes go up, and it comes back whole, through single-range GETs (hf_xet's default) or one multi-range GET
    (multipart/byteranges) when hf_xet is told to use them (config is read once per process: a subprocess)."""
    emu, api = http_emulator, http_api
    bucket = api.create_bucket("me/splice").bucket_id
    base = os.urandom(4_000_000)
    api.batch_bucket_files(bucket, add=[(base, "base")])
    spliced = base[2_000_000:3_000_000] + os.urandom(300_000) + base[:1_000_000]
    emu.reset_counts()
    api.batch_bucket_files(bucket, add=[(spliced, "spliced")])
    assert emu.requests.bytes_in("POST", XORB_POST) < 1_000_000

    emu.reset_counts()
    api.download_bucket_files(bucket, [("spliced", tmp_path / "single")])
    assert (tmp_path / "single").read_bytes() == spliced
    assert not [r for r in emu.requests.records("GET", XORB_GET) if "," in (r.range or "")]

    emu.reset_counts()
    spec = [[("spliced", str(tmp_path / "multi"))]]
    env = {"HF_XET_CLIENT_ENABLE_MULTIRANGE_FETCHING": "true"}
    _run_at_once(tmp_path, emu.endpoint, bucket, "download", spec, [tmp_path / "home-multi"], env=env)
    assert (tmp_path / "multi").read_bytes() == spliced
    assert [r for r in emu.requests.records("GET", XORB_GET) if "," in (r.range or "")]


def test_http_faults_on_cas_endpoints_are_retried(http_emulator, http_api, tmp_path):
    emu, api = http_emulator, http_api
    bucket = api.create_bucket("me/faults").bucket_id
    data = os.urandom(1_000_000)

    emu.add_fault("POST", XORB_POST, 500)
    api.batch_bucket_files(bucket, add=[(data, "f")])
    assert [r.status for r in emu.requests.records("POST", XORB_POST)] == [500, 200]

    emu.reset_counts()
    emu.add_fault("GET", XORB_GET, 500)
    api.download_bucket_files(bucket, [("f", tmp_path / "a")])
    assert (tmp_path / "a").read_bytes() == data
    assert [r.status for r in emu.requests.records("GET", XORB_GET)] == [500, 206]

    emu.reset_counts()
    emu.add_fault("GET", XORB_GET, 0, truncate=1000)  # headers announce the full body, 1000 bytes arrive
    api.download_bucket_files(bucket, [("f", tmp_path / "b")])
    assert (tmp_path / "b").read_bytes() == data
    gets = emu.requests.records("GET", XORB_GET)
    assert [r.bytes_out for r in gets][0] == 1000 and len(gets) == 2 and gets[1].bytes_out > len(data)

    emu.reset_counts()
    emu.add_fault("GET", XORB_GET, 0, delay=0.3, bandwidth=4_000_000)  # slow start, then ~4 MB/s
    start = time.monotonic()
    api.download_bucket_files(bucket, [("f", tmp_path / "c")])
    assert (tmp_path / "c").read_bytes() == data
    assert time.monotonic() - start >= 0.3 + 0.2


WORKER = r"""
import json, os, sys, time
from huggingface_hub import HfApi
from huggingface_hub.utils import disable_progress_bars

disable_progress_bars()
endpoint, bucket, mode, go, spec, ready = sys.argv[1:7]
open(ready, "w").close()  # imported: waiting at the start line
deadline = time.monotonic() + 120
while not os.path.exists(go):  # start line: every process transfers at the same instant
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.005)
api = HfApi(endpoint=endpoint, token="t")
pairs = [tuple(p) for p in json.loads(spec)]
if mode == "upload":
    api.batch_bucket_files(bucket, add=pairs)
else:
    api.download_bucket_files(bucket, pairs, raise_on_missing_files=True)
"""


def _run_at_once(tmp_path, endpoint, bucket, mode, specs, homes, env=None):
    """Run one worker process per spec, released together; every one must succeed."""
    extra_env = env or {}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / f"go-{mode}-{time.monotonic_ns()}"
    procs, ready = [], []
    for i, (spec, home) in enumerate(zip(specs, homes)):
        proc_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")}
        proc_env.update(HF_HOME=str(home), HF_XET_CACHE=str(home / "xet"), HF_HUB_DISABLE_TELEMETRY="1", **extra_env)
        ready.append(go.with_name(f"{go.name}.ready-{i}"))
        args = [sys.executable, str(script), endpoint, bucket, mode, str(go), json.dumps(spec), str(ready[-1])]
        procs.append(subprocess.Popen(args, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Every worker has imported and reached the start line (or died: its error is reported below).
    wait_until(lambda: all(r.exists() or p.poll() is not None for r, p in zip(ready, procs)), "the workers' start line",
               timeout=120)
    go.touch()
    failures = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        if proc.returncode:
            failures.append(err[-3000:])
    assert not failures, failures


def test_http_many_processes_upload_and_download_at_once(http_emulator, tmp_path):
    """Ranks on one host (a shared HF_HOME) and other hosts (their own) hit one emulator at the same instant:
    different files, and the same file, up then down, all byte-identical."""
    emu = http_emulator
    api = HfApi(endpoint=emu.endpoint, token="t")
    bucket = api.create_bucket("me/crowd").bucket_id
    n = 8
    homes = [tmp_path / ("host-shared" if i < n // 2 else f"host-{i}") for i in range(n)]
    shared = os.urandom(2 * 1024 * 1024 + 7)
    (tmp_path / "shared").write_bytes(shared)
    own = {}
    for i in range(n):
        own[i] = os.urandom(300_000 + 1000 * i)
        (tmp_path / f"own{i}").write_bytes(own[i])
    uploads = [[(str(tmp_path / f"own{i}"), f"r{i}/own"), (str(tmp_path / "shared"), f"r{i}/shared")] for i in range(n)]
    _run_at_once(tmp_path, emu.endpoint, bucket, "upload", uploads, homes)

    files = {i.path: i for i in api.list_bucket_tree(bucket, recursive=True)}
    assert len(files) == 2 * n
    assert len({files[f"r{i}/shared"].xet_hash for i in range(n)}) == 1
    assert all(files[f"r{i}/own"].size == len(own[i]) for i in range(n))

    emu.reset_counts()
    downloads = [
        [(f"r{j}/{kind}", str(tmp_path / f"out{i}" / f"r{j}" / kind)) for j in range(n) for kind in ("own", "shared")]
        for i in range(n)
    ]
    _run_at_once(tmp_path, emu.endpoint, bucket, "download", downloads, homes)
    for i in range(n):
        for j in range(n):
            assert (tmp_path / f"out{i}" / f"r{j}" / "own").read_bytes() == own[j]
            assert (tmp_path / f"out{i}" / f"r{j}" / "shared").read_bytes() == shared
    assert emu.requests.count("GET", XORB_GET) >= n
