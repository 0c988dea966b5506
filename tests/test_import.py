"""`neuron-cache import`: an optimum-neuron Git cache repo (its layout as optimum/neuron/cache/hub_cache.py writes it)
on the Hub emulator, imported into Hub and directory buckets with the real huggingface_hub and hf_xet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.hub_repos import RepoClient, RepoRef
from optimum_neuron_cache.import_repo import ImportAction, execute_import, plan_import
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.records import parse_record

from .test_hub_repos import xet_file

VERSION = "2.21.33363.0+82129205"
V = f"neuronxcc-{VERSION}"
REPO = "aws-neuron/optimum-neuron-cache"
NEFFS = {f"MODULE_{i}+ab": bytes([i]) * (4000 + i) for i in (1, 2)}
ENTRY = {"_entry_class": "SingleModelCacheEntry", "_model_id": "meta-llama/Llama-3.1-8B", "_task": "text-generation",
         "model_type": "llama", "hidden_size": 4096,
         "neuron": {"batch_size": 4, "sequence_length": 4096, "tp_degree": 8, "torch_dtype": "bfloat16"}}


@pytest.fixture
def cache_repo(hub):
    files: dict[str, bytes | dict] = {}
    for module, neff in NEFFS.items():
        files[f"{V}/{module}/model.neff"] = xet_file(hub, neff, module)
        files[f"{V}/{module}/model.done"] = b""
        files[f"{V}/{module}/compile_flags.json"] = b'["--target=trn1"]'
        files[f"{V}/{module}/model.log"] = b"compiler log: never imported"
    files[f"{V}/MODULE_3+ab/model.neff"] = b"half an entry"  # no model.done: incomplete, left out
    entry = json.dumps(ENTRY).encode()
    files[f"{V}/0_REGISTRY/0.4.1/llama/meta-llama/Llama-3.1-8B/0123456789abcdef0123.json"] = entry
    files[f"{V}/0_REGISTRY/0.4.1/9f86d081884c7d65/0123456789abcdef0123.json"] = entry  # the same entry by arch digest
    files[f"{V}/0_REGISTRY/0.4.1/llama/evil/x/aaaaaaaaaaaaaaaaaaaa.json"] = json.dumps({**ENTRY, "_model_id": "../../etc"}).encode()
    files["README.md"] = b"the cache"
    return hub.create_model_repo(REPO, files)


@pytest.fixture(params=["hf", "dir"])
def target(request, tmp_path: Path) -> BucketRef:
    ref = BucketRef("hf", "test-org/neuron-cache") if request.param == "hf" else BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    return ref


def bucket_files(ref: BucketRef) -> dict[str, dict]:
    return {item["path"]: item for item in BucketClient(ref).list("", recursive=True)}


def test_plan_then_import_then_nothing_left(hub, cache_repo, target: BucketRef):
    repo, bucket = RepoClient(RepoRef(REPO)), BucketClient(target)
    plan = plan_import(repo, bucket)
    assert plan.repo.revision == cache_repo  # pinned to one commit
    assert [(op.action, op.name) for op in plan.entries] == [
        (ImportAction.STREAM, "MODULE_1+ab"), (ImportAction.STREAM, "MODULE_2+ab")]
    assert {f.filename for f in plan.entries[0].files} == {"model.neff", "model.done", "compile_flags.json"}
    assert plan.incomplete == (f"{V}/MODULE_3+ab",)
    [record_op] = plan.records  # the entry and its alias are one record; the bad model id is skipped
    assert record_op.record.model_id == "meta-llama/Llama-3.1-8B" and record_op.record.task == "text-generation"
    assert record_op.name.startswith(f"{V}/models/meta-llama--Llama-3.1-8B/text-generation/exports/")
    assert bucket_files(target) == {}  # planning wrote nothing

    hub.reset_counts()
    result = execute_import(plan, repo, bucket)
    assert sorted(result.imported) == [f"{V}/MODULE_1+ab", f"{V}/MODULE_2+ab"] and not result.failed
    files = bucket_files(target)
    for module, neff in NEFFS.items():
        assert files[f"{V}/{module}/model.neff"]["size"] == len(neff)
        assert f"{V}/{module}/model.done" in files and f"{V}/{module}/model.log" not in files
    if target.kind == "hf":  # the NEFFs went by a copy by Xet hash: no NEFF byte was uploaded or downloaded
        assert result.bytes_copied == sum(map(len, NEFFS.values()))
        assert hub.requests.bytes_in("POST", "/v1/xorbs/") < 1000
        assert files[f"{V}/MODULE_1+ab/model.neff"]["xet_hash"] == hub.bucket_file("staging/xet", "MODULE_1+ab")["xetHash"]
    else:
        assert (Path(target.location) / V / "MODULE_2+ab" / "model.neff").read_bytes() == NEFFS["MODULE_2+ab"]

    record = parse_record(_read(target, record_op.name), record_op.name)
    assert record is not None and record.export_config["tp_degree"] == 8 and record.modules == []
    # The record changed its model's area: the area got a new stamp with it (hosts that listed it list again).
    assert f"{V}/models/meta-llama--Llama-3.1-8B/text-generation/.stamp.json" in files
    clear_lookup_cache()
    found = lookup_cache("meta-llama/Llama-3.1-8B", "text-generation", compiler_version=VERSION, bucket=target)
    assert [r.export_config["batch_size"] for r in found] == [4]

    again = plan_import(repo, bucket)
    assert not again.entries and not again.records and len(again.skipped) == 3


def _read(ref: BucketRef, path: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "r.json"
        BucketClient(ref).download([{"path": path, "local_path": str(local)}])
        return local.read_text()


def test_an_interrupted_import_leaves_no_partial_entry_and_resumes(hub, cache_repo):
    ref = BucketRef("hf", "test-org/neuron-cache")
    BucketClient(ref).create()
    repo, bucket = RepoClient(RepoRef(REPO)), BucketClient(ref)
    # MODULE_2's commit file cannot be read from the repo: its content goes up, its commit file never does.
    hub.add_fault("GET", r"/resolve/[0-9a-f]{40}/.*MODULE_2%2Bab/model\.done|/resolve/[0-9a-f]{40}/.*MODULE_2\+ab/model\.done", 403, times=None)
    result = execute_import(plan_import(repo, bucket), repo, bucket)
    assert result.imported == [f"{V}/MODULE_1+ab"]
    assert [name for name, _ in result.failed] == [f"{V}/MODULE_2+ab"]
    files = bucket_files(ref)
    assert f"{V}/MODULE_2+ab/model.done" not in files  # never complete without its commit file
    hub.clear_faults()
    plan = plan_import(repo, bucket)
    assert [op.name for op in plan.entries] == ["MODULE_2+ab"]
    assert execute_import(plan, repo, bucket).imported == [f"{V}/MODULE_2+ab"]
    assert f"{V}/MODULE_2+ab/model.done" in bucket_files(ref)


def test_cli_import_dry_run_and_run(hub, cache_repo, tmp_path: Path):
    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli

    bucket_dir = tmp_path / "b"
    BucketClient(BucketRef("dir", str(bucket_dir))).create()
    runner = CliRunner()
    dry = runner.invoke(cli, ["import", REPO, "--bucket", str(bucket_dir), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "2 entries to import" in dry.output and "stream" in dry.output and "MODULE_3+ab" in dry.output
    assert not (bucket_dir / V).exists()
    planned = json.loads(runner.invoke(cli, ["import", REPO, "--bucket", str(bucket_dir), "--dry-run", "--json"]).output)
    assert planned["executed"] is False and {op["action"] for op in planned["plan"]} >= {"stream", "record"}
    run = runner.invoke(cli, ["import", REPO, "--revision", cache_repo, "--bucket", str(bucket_dir)])
    assert run.exit_code == 0, run.output
    assert "imported 2 entries" in run.output and "1 export record " in run.output
    # The dry run says its sizes as the run does (kB, MB...), not in raw bytes.
    sizes = re.compile(r"([\d.]+[kMGT]?B) copied by Xet hash, ([\d.]+[kMGT]?B) streamed")
    assert sizes.search(dry.output).groups() == sizes.search(run.output).groups()
    assert sizes.search(dry.output)[2].endswith("kB") and "bytes" not in dry.output
    again = json.loads(runner.invoke(cli, ["import", REPO, "--bucket", str(bucket_dir), "--json"]).output)
    assert again["executed"] is True and again["imported"] == [] and again["failed"] == []  # it has them all
    bad = runner.invoke(cli, ["import", "not a repo", "--bucket", str(bucket_dir)])
    assert bad.exit_code == 2 and "is not `org/name`" in bad.output
    missing = runner.invoke(cli, ["import", "nobody/nothing", "--bucket", str(bucket_dir)])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_an_entry_stored_in_lfs_not_xet_is_imported(hub, tmp_path: Path):
    """Older repo files sit in LFS outside Xet: streamed, verified by their LFS sha256 (not the pointer's blob id)."""
    neff = b"\x02NEFF" + bytes(range(256)) * 40
    hub.create_model_repo(REPO, {f"{V}/MODULE_7+ab/model.neff": {"lfs": neff}, f"{V}/MODULE_7+ab/model.done": b""})
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    repo, bucket = RepoClient(RepoRef(REPO)), BucketClient(ref)
    plan = plan_import(repo, bucket)
    assert [(op.action, op.name) for op in plan.entries] == [(ImportAction.STREAM, "MODULE_7+ab")]
    result = execute_import(plan, repo, bucket)
    assert result.imported == [f"{V}/MODULE_7+ab"] and not result.failed
    assert (tmp_path / "bucket" / V / "MODULE_7+ab" / "model.neff").read_bytes() == neff
    assert not plan_import(repo, bucket).entries


def _registry(model_id: str, batch_size: int) -> tuple[str, bytes]:
    entry = {**ENTRY, "_model_id": model_id, "neuron": {**ENTRY["neuron"], "batch_size": batch_size}}
    return f"{V}/0_REGISTRY/0.4.1/llama/{model_id}/{batch_size:020d}.json", json.dumps(entry).encode()


def test_registry_entries_of_one_model_in_two_casings_share_one_model_folder(hub, tmp_path: Path):
    """Hub model ids are case-insensitive: `Meta-Llama/X` and `meta-llama/X` are one model, one folder in the
    bucket (the bucket's casing wins; within one import, the first seen), and lookup finds all in either casing."""
    models = f"{V}/models"
    earlier = hub.create_model_repo(REPO, dict([_registry("meta-llama/Llama-3.1-8B", 4)]))
    hub.create_model_repo(REPO, dict([_registry("Meta-Llama/Llama-3.1-8B", 8), _registry("meta-llama/Llama-3.1-8B", 4),
                                      _registry("META-LLAMA/llama-3.1-8b", 16)]))
    fresh, used = BucketRef("dir", str(tmp_path / "fresh")), BucketRef("dir", str(tmp_path / "used"))
    for ref in (fresh, used):
        BucketClient(ref).create()
    execute_import(plan_import(RepoClient(RepoRef(REPO, earlier)), BucketClient(used)), RepoClient(RepoRef(REPO)),
                   BucketClient(used))
    assert BucketClient(used).folders(models) == ["meta-llama--Llama-3.1-8B"]
    for ref, folder in ((fresh, "META-LLAMA--llama-3.1-8b"), (used, "meta-llama--Llama-3.1-8B")):
        repo, bucket = RepoClient(RepoRef(REPO)), BucketClient(ref)
        execute_import(plan_import(repo, bucket), repo, bucket)
        assert bucket.folders(models) == [folder]
        for model_id in ("Meta-Llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "META-LLAMA/llama-3.1-8b"):
            clear_lookup_cache()
            found = lookup_cache(model_id, "text-generation", compiler_version=VERSION, bucket=ref)
            assert sorted(r.export_config["batch_size"] for r in found) == [4, 8, 16], (ref, model_id)
