"""`neuron-cache scrub`: what went bad in a bucket is found (from the listing, or by reading the bytes back),
reported one line each with a non-zero exit, and `--repair` un-commits the bad entries so that the next
compile publishes them again. On the emulator (hf) and a directory bucket."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from click.testing import CliRunner

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient, stop_server
from optimum_neuron_cache.scrub import Problem, check_listing
from optimum_neuron_cache.survey import survey_bucket
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from tests.lifecycle_helpers import run, uri


def publish(root: Path, ref: BucketRef, version: str, count: int = 3, seed: str = "scrub",
            model: str = "org/s") -> list[str]:
    with hub_neuronx_cache(model, task="text-generation", export_config={"batch_size": 1}, compiler_version=version,
                           bucket=ref, cache_dir=root) as run_:
        for graph in make_graphs(count, seed=seed, neff_size=40_000):
            compile_graph(root, version, graph)
    return sorted(key.rsplit("/", 1)[1] for key in run_.synced)


def findings(out: str) -> list[tuple[str, str]]:
    return sorted((f["problem"], f["path"]) for f in json.loads(out)["findings"])


def test_a_healthy_bucket_scrubs_clean_from_the_listing_and_by_reading(tmp_path, bucket, version):
    publish(tmp_path / "a", bucket, version)
    out = run("scrub", "--bucket", uri(bucket))
    assert out.endswith("no problem\n") and "checked 6 entries (24 files) and 1 export records" in out
    report = json.loads(run("scrub", "--bucket", uri(bucket), "--read", "--json"))
    assert report["ok"] and report["read_files"] == 24 and report["unverifiable"] == 0 and report["findings"] == []


def test_missing_and_short_files_are_found_and_repair_uncommits_them(tmp_path, bucket, version):
    modules = publish(tmp_path / "a", bucket, version)
    client = BucketClient(bucket)
    flat = f"neuronxcc-{version}"
    area = f"{flat}/models/org--s/text-generation"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    client.batch(delete=[f"{flat}/{modules[0]}/model.neff"],  # a commit file over missing content
                 add=[{"dest": f"{area}/{modules[1]}/model.neff", "local_path": str(empty)}])  # a short copy
    result = CliRunner().invoke(cli, ["scrub", "--bucket", uri(bucket), "--json"])
    assert result.exit_code == 1
    assert findings(result.output) == [("missing", f"{flat}/{modules[0]}"), ("short", f"{area}/{modules[1]}")]
    # One rule for every command that removes: without a terminal and without --yes, the repair is only shown.
    out = CliRunner().invoke(cli, ["scrub", "--bucket", uri(bucket), "--repair"]).output
    assert f"would remove {flat}/{modules[0]}/model.done (the commit file of a bad entry)" in out
    assert "would remove 2 commit files of bad entries; run again with --repair --yes to remove them" in out
    assert len(client.paths_info([f"{flat}/{modules[0]}/model.done", f"{area}/{modules[1]}/model.done"])) == 2
    out = CliRunner().invoke(cli, ["scrub", "--bucket", uri(bucket), "--repair", "--yes"]).output
    assert f"missing         {flat}/{modules[0]}: model.done is there but model.neff is missing" in out
    assert f"short           {area}/{modules[1]}: model.neff is empty" in out
    assert "removed 2 commit files of bad entries" in out
    assert client.paths_info([f"{flat}/{modules[0]}/model.done", f"{area}/{modules[1]}/model.done"]) == []
    assert run("scrub", "--bucket", uri(bucket)).endswith("no problem\n")  # uncommitted, and too young to report
    # A publisher asks for commit files only: the next one that has them publishes them again, whole.
    out = run("sync", "--bucket", uri(bucket), "--cache-dir", str(tmp_path / "a"), "--to-model", "org/s", "--task", "text-generation")
    assert f"published neuronxcc-{version}/{modules[0]} -> flat\n" in out
    assert f"published neuronxcc-{version}/{modules[1]} -> org--s/text-generation\n" in out
    assert run("scrub", "--bucket", uri(bucket), "--read").endswith("no problem\n")


def test_copies_that_disagree_are_corrupt(tmp_path, bucket, version):
    modules = publish(tmp_path / "a", bucket, version)
    other = tmp_path / "other.pb"
    original = next(p for p in (tmp_path / "a").rglob(f"{modules[2]}/model.hlo_module.pb"))
    other.write_bytes(bytes(b ^ 1 for b in original.read_bytes()))  # same size, other bytes
    area = f"neuronxcc-{version}/models/org--s/text-generation"
    BucketClient(bucket).batch(add=[{"dest": f"{area}/{modules[2]}/model.hlo_module.pb", "local_path": str(other)}])
    result = CliRunner().invoke(cli, ["scrub", "--bucket", uri(bucket), "--json"])
    assert result.exit_code == 1
    assert findings(result.output) == [("corrupt", f"neuronxcc-{version}/{modules[2]}"), ("corrupt", f"{area}/{modules[2]}")]


def test_bit_rot_in_a_directory_bucket_is_found_by_reading(tmp_path, version):
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    modules = publish(tmp_path / "a", ref, version, count=2)
    neff = Path(ref.location) / f"neuronxcc-{version}/{modules[1]}/model.neff"
    info = neff.stat()
    data = bytearray(neff.read_bytes())
    data[1000] ^= 0xFF
    neff.write_bytes(bytes(data))
    os.utime(neff, ns=(info.st_atime_ns, info.st_mtime_ns))  # same size, same time: the listing cannot tell
    assert run("scrub", "--bucket", ref.location).endswith("no problem\n")
    result = CliRunner().invoke(cli, ["scrub", "--bucket", ref.location, "--read"])
    assert result.exit_code == 1
    assert f"corrupt         neuronxcc-{version}/{modules[1]}: model.neff: content does not match its BLAKE3" in result.output
    # A change that moved the file's time is seen from the listing alone (its digest record is stale).
    neff.write_bytes(b"x" * info.st_size)
    result = CliRunner().invoke(cli, ["scrub", "--bucket", ref.location])
    assert result.exit_code == 1 and "model.neff changed after it was published" in result.output


def test_hub_storage_damage_is_found_by_reading(tmp_path, hub, version, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_XET_RETRY_DURATION", "1s")
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "2")
    ref = BucketRef("hf", "test-org/rot")
    BucketClient(ref).create()
    publish(tmp_path / "a", ref, version, count=2)

    stop_server()  # no chunk cached by the server from the upload
    xorbs = [p for p in hub.cas_dir.rglob("*") if p.is_file() and "xorb" in str(p.relative_to(hub.cas_dir)).lower()
             and p.stat().st_size > 30_000]
    assert xorbs
    for xorb in xorbs:
        info = xorb.stat()
        with open(xorb, "r+b") as handle:
            handle.seek(200)
            byte = handle.read(1)
            handle.seek(200)
            handle.write(bytes([byte[0] ^ 0xFF]))
        os.utime(xorb, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert run("scrub", "--bucket", uri(ref)).endswith("no problem\n")  # the listing is intact
    result = CliRunner().invoke(cli, ["scrub", "--bucket", uri(ref), "--read", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["findings"] and {f["problem"] for f in report["findings"]} == {"corrupt"}


def test_uncommitted_content_bad_names_and_dangling_records(tmp_path, bucket, version):
    modules = publish(tmp_path / "a", bucket, version, count=2)
    client = BucketClient(bucket)
    flat = f"neuronxcc-{version}"
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk")
    client.batch(add=[{"dest": f"{flat}/MODULE_1+2/model.hlo_module.pb", "local_path": str(junk)},  # never committed
                      {"dest": f"{flat}/notes.txt", "local_path": str(junk)},
                      {"dest": "README.md", "local_path": str(junk)}],
                 delete=[f"{flat}/models/org--s/text-generation/{modules[0]}/model.done"])
    result = CliRunner().invoke(cli, ["scrub", "--bucket", uri(bucket), "--stale-after", "0s", "--json"])
    assert result.exit_code == 1
    assert findings(result.output) == [("bad-name", "README.md"), ("bad-name", f"{flat}/notes.txt"),
                                       ("uncommitted", f"{flat}/MODULE_1+2"),
                                       ("uncommitted", f"{flat}/models/org--s/text-generation/{modules[0]}")]
    # The record naming the uncommitted entry dangles, once it is past the grace a landing record gets.
    report = check_listing(survey_bucket(client, with_records=True), now=time.time() + 7200)
    assert [f.problem for f in report.findings].count(Problem.DANGLING_RECORD) == 1
    run("scrub", "--bucket", uri(bucket), "--stale-after", "soon", code=2)


def test_a_file_that_does_not_transfer_is_retried_then_unreadable_and_never_repaired(tmp_path, http_hub, version,
                                                                                      monkeypatch):
    """A transient HTTP 500 on one file's download says nothing of its content: the good entry keeps its commit
    files (flat copy and model copy), and once the fault clears a fetch installs it."""
    monkeypatch.setenv("NEURON_CACHE_XET_RETRY_DURATION", "1s")
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "2")
    ref = BucketRef("hf", "test-org/flaky")
    client = BucketClient(ref)
    client.create()
    modules = publish(tmp_path / "a", ref, version, count=2)
    flat = f"neuronxcc-{version}"
    area = f"{flat}/models/org--s/text-generation"
    before = {item["path"]: item for item in client.list("", recursive=True)}
    neff = before[f"{flat}/{modules[0]}/model.neff"]["xet_hash"]
    tokens = http_hub.requests.count(None, r"/xet-read-token")
    http_hub.add_fault("GET", rf"/reconstructions?/{neff}", 500, times=None)  # this one file does not transfer

    result = CliRunner().invoke(cli, ["scrub", "--bucket", uri(ref), "--read", "--repair", "--yes", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert findings(result.output) == [("unreadable", f"{flat}/{modules[0]}"), ("unreadable", f"{area}/{modules[0]}")]
    assert all("model.neff" in f["detail"] and "nothing repaired" in f["detail"] and f["repair_paths"] == []
               for f in report["findings"])
    assert report["repaired"] == [] and report["read_files"] == report["files"] - 2  # all but the 2 copies of the NEFF
    assert http_hub.requests.count(None, r"/xet-read-token") - tokens >= 2  # asked for again, on a new connection

    http_hub.clear_faults()
    assert {item["path"]: item for item in client.list("", recursive=True)} == before  # nothing removed
    with hub_neuronx_cache("org/s", task="text-generation", export_config={"batch_size": 1}, compiler_version=version,
                           bucket=ref, cache_dir=tmp_path / "b") as fetched:
        pass
    assert sorted(key.rsplit("/", 1)[1] for key in fetched.fetched) == modules
    assert run("scrub", "--bucket", uri(ref), "--read").endswith("no problem\n")


def test_an_export_record_that_does_not_transfer_is_unreadable_not_bad(tmp_path, http_hub, version, monkeypatch):
    """The survey's records too: one that never came is reported unreadable (not a bad record), and a prune that
    needs what records name refuses to plan without it (an entry only it references would go)."""
    monkeypatch.setenv("NEURON_CACHE_XET_RETRY_DURATION", "1s")
    monkeypatch.setenv("NEURON_CACHE_RETRY_BUDGET", "2")
    ref = BucketRef("hf", "test-org/flaky-records")
    client = BucketClient(ref)
    client.create()
    [module] = publish(tmp_path / "a", ref, version, count=1)
    publish(tmp_path / "b", ref, version, count=1, seed="other", model="org/t")
    area = f"neuronxcc-{version}/models/org--s/text-generation"
    client.batch(delete=[item["path"] for item in client.list(f"{area}/{module}", recursive=True)])
    before = {item["path"]: item for item in client.list("", recursive=True)}
    record = next(path for path in before if path.startswith(f"{area}/exports/"))  # now the only one naming module
    http_hub.add_fault("GET", rf"/reconstructions?/{before[record]['xet_hash']}", 500, times=None)

    result = CliRunner().invoke(cli, ["prune", "--bucket", uri(ref), "--unreferenced-older-than", "0s", "--yes"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "did not transfer" in result.output
    assert {item["path"]: item for item in client.list("", recursive=True)} == before  # the flat entry stays
    result = CliRunner().invoke(cli, ["scrub", "--bucket", uri(ref), "--json"])
    assert result.exit_code == 1 and findings(result.output) == [("unreadable", record)]

    http_hub.clear_faults()
    assert "nothing to prune" in run("prune", "--bucket", uri(ref), "--unreferenced-older-than", "0s", "--yes")
