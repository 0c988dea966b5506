"""The compile target in export records (issue 18.1) and conservative publishing for old compilers (18.3).

From compiler 2.16 the target is in the MODULE name, so trn1, trn2 and inf2 entries share a bucket without
colliding; the export record must then say which target it describes, or a trn1 and a trn2 record of one
configuration overwrite each other. Up to 2.14 a NEFF alone may be a cached failure: never published by default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.errors import ConfigurationError
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.neuron_sdk import compile_target, instance_type, normalize_target, target_from_flags
from optimum_neuron_cache.records import ExportRecord, make_record, parse_record, record_id_for
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, compile_graph, make_graphs

CONFIG = {"batch_size": 1, "sequence_length": 1024, "auto_cast_type": "bf16"}
OLD = "2.14.227.0+2d4f85be"
MID = "2.15.141.0+d3cfc8ca"


@pytest.fixture(autouse=True)
def no_target_from_the_host(monkeypatch):
    for name in ("NEURON_PLATFORM_TARGET_OVERRIDE", "NEURON_CACHE_PUBLISH_LEGACY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(dir_bucket) -> BucketRef:
    return dir_bucket


def publish(tmp_path: Path, bucket: BucketRef, version: str, *, name: str, model: str = "org/m", seed: str = "t",
            graphs: int = 2, flags: tuple[str, ...] = ("--target=trn1",)):
    cache = tmp_path / name
    with hub_neuronx_cache(model, None, CONFIG, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in make_graphs(graphs, seed=seed, flags=flags):
            compile_graph(cache, version, graph)
    clear_lookup_cache()
    return run


# ----------------------------------------------------------------------------------------- the target

def test_targets_are_read_from_flags_override_instance_type_then_config(tmp_path):
    assert normalize_target(" TRN2 ") == "trn2" and normalize_target("trn1.32xlarge") == "trn1"
    assert normalize_target("inf2.xlarge") == "inf2" and normalize_target("trn1n.32xlarge") == "trn1"
    for bad in ("trn1/../x", "", "t", "trn1 trn2", "a" * 30, 3, None, "trn1.32xlarge\n.x"):
        assert normalize_target(bad) is None
    assert target_from_flags(["-O1", "--target", "trn2", "--target=inf2"]) == "inf2"
    dmi = tmp_path / "product_name"
    dmi.write_text("trn2.48xlarge\n")
    assert instance_type(dmi) == "trn2.48xlarge"
    environ = {"NEURON_CC_FLAGS": "-O1 --target=trn1", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn3"}
    assert compile_target(environ, {"target": "inf2"}, dmi_path=dmi).source == "--target in NEURON_CC_FLAGS"
    found = compile_target({"NEURON_PLATFORM_TARGET_OVERRIDE": "trn3"}, {"target": "inf2"}, dmi_path=dmi)
    assert (found.target, found.source) == ("trn3", "NEURON_PLATFORM_TARGET_OVERRIDE")
    found = compile_target({}, {"instance_type": "inf2.xlarge"}, dmi_path=dmi)
    assert (found.target, found.source) == ("trn2", "instance type trn2.48xlarge")
    dmi.write_text("Standard PC (i440FX + PIIX, 1996)\n")  # not a Neuron instance: ignored
    found = compile_target({}, {"instance_type": "inf2.xlarge"}, dmi_path=dmi)
    assert (found.target, found.source) == ("inf2", "the export config")
    assert compile_target({}, {}, dmi_path=tmp_path / "absent") is None


def test_one_configuration_has_one_record_per_target():
    trn1 = make_record("gpt2", "default", "2.21.0.0", CONFIG, [], {"NEURON_PLATFORM_TARGET_OVERRIDE": "trn1"})
    trn2 = make_record("gpt2", "default", "2.21.0.0", CONFIG, [], {"NEURON_PLATFORM_TARGET_OVERRIDE": "trn2"})
    assert (trn1.target, trn2.target) == ("trn1", "trn2") and trn1.record_id != trn2.record_id
    assert trn1.compile_flags == trn2.compile_flags == []
    # A record without a target keeps the id records had before targets were recorded.
    import hashlib
    untargeted = ExportRecord("gpt2", "default", "2.21.0.0", CONFIG, [])
    old_key = json.dumps({"export_config": CONFIG, "compile_flags": []}, sort_keys=True)
    assert untargeted.record_id == hashlib.sha256(old_key.encode()).hexdigest()[:16]
    # What an exit asks (is this configuration's record in the bucket?) is the id of the record it would write.
    for env in ({"NEURON_PLATFORM_TARGET_OVERRIDE": "trn2"}, {"NEURON_CC_FLAGS": "--target=inf2 -O1 --cache_dir=/x"}, {}):
        for config in (CONFIG, {"batch_size": 1, "nested": {"b": [1, 2], "a": 1.5}}):
            assert record_id_for(config, env) == make_record("gpt2", "default", "2.21.0.0", config, [], env).record_id


def test_old_records_stay_readable_and_hostile_targets_are_refused(caplog):
    old = {"model_id": "org/m", "task": "default", "compiler_version": "2.19.0.0", "export_config": {"target": "trn1.32xlarge"},
           "compile_flags": [], "modules": ["MODULE_1+a"]}
    record = parse_record(json.dumps(old), "old.json")
    assert record is not None and record.target is None and record.effective_target == "trn1"
    assert record.matches({"target": "trn1"}) and not record.matches({"target": "trn2"})
    with caplog.at_level(logging.WARNING, logger="optimum_neuron_cache"):
        for bad in ("../trn1", "TRN1", 7, "trn1.32xlarge"):
            assert parse_record(json.dumps({**old, "target": bad}), "bad.json") is None
    assert sum("ignoring malformed export record bad.json" in r.getMessage() for r in caplog.records) == 4


def test_trn1_and_trn2_records_of_one_config_share_a_bucket(tmp_path, bucket, monkeypatch):
    version = "2.21.33363.0+82129205"
    monkeypatch.setenv("NEURON_CC_FLAGS", "--target=trn1")
    first = publish(tmp_path, bucket, version, name="trn1", flags=("--target=trn1",))
    monkeypatch.setenv("NEURON_CC_FLAGS", "--target=trn2")
    second = publish(tmp_path, bucket, version, name="trn2", flags=("--target=trn2",))
    monkeypatch.delenv("NEURON_CC_FLAGS")
    assert first.record and second.record and first.record != second.record  # 2.16+: distinct MODULE names too
    assert not set(first.synced) & set(second.synced)
    records = lookup_cache("org/m", compiler_version=version, bucket=bucket)
    assert sorted(r.target for r in records) == ["trn1", "trn2"]
    assert [r.target for r in lookup_cache("org/m", compiler_version=version, bucket=bucket, target="trn2.48xlarge")] == ["trn2"]
    runner = CliRunner()
    out = runner.invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--compiler-version", version, "--target", "trn1"]).output
    assert "target=trn1" in out and "target=trn2" not in out
    data = json.loads(runner.invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--compiler-version", version, "--json"]).output)
    assert sorted(item["target"] for item in data) == ["trn1", "trn2"]
    out = runner.invoke(cli, ["ls", "--bucket", bucket.location]).output
    assert "TARGETS" in out and "trn1,trn2" in out
    assert "holds no entries" in runner.invoke(cli, ["ls", "--bucket", bucket.location, "--target", "inf2"]).output
    listed = json.loads(runner.invoke(cli, ["ls", "--bucket", bucket.location, "--target", "trn2", "--json"]).output)
    assert [area["targets"] for area in listed] == [["trn1", "trn2"]] and "record_paths" not in listed[0]
    bad = runner.invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--target", "../x"])
    assert bad.exit_code == 2 and "not a compile target" in bad.output
    # explain compares the target here (flags, override, instance type or --target) with each record's
    monkeypatch.setenv("NEURON_CC_FLAGS", "--target=trn2")
    out = runner.invoke(cli, ["explain", "org/m", "--bucket", bucket.location, "--compiler-version", version]).output
    lines = out.splitlines()
    assert lines[0] == f"here: compiler {version}; target trn2; flags --target=trn2"
    assert lines[1].startswith(f"match: neuronxcc-{version} default target=trn2")
    assert "    target: bucket trn1, here trn2" in lines


def test_compilers_up_to_2_15_warn_once_when_the_target_is_not_pinned(tmp_path, bucket, monkeypatch):
    warning = "does not put the compile target in its cache keys"
    first = publish(tmp_path, bucket, MID, name="a", flags=())
    again = publish(tmp_path, bucket, MID, name="b", flags=())
    assert sum(warning in w for w in first.warnings) == 1 and not any(warning in w for w in again.warnings)
    newer = publish(tmp_path, bucket, "2.16.372.0+4a9b2326", name="c", flags=())
    assert not any(warning in w for w in newer.warnings)
    other = BucketRef("dir", str(tmp_path / "pinned"))
    BucketClient(other).create()
    monkeypatch.setenv("NEURON_CC_FLAGS", "--target=trn1")
    pinned = publish(tmp_path, other, MID, name="d", flags=())
    assert not any(warning in w for w in pinned.warnings)


# ----------------------------------------------------------------------------- legacy NEFF-only entries

def test_legacy_neff_only_entries_are_not_published_by_default(tmp_path, bucket):
    ok, failed = make_graphs(2, seed="legacy")
    cache = tmp_path / "A"
    with hub_neuronx_cache("org/old", compiler_version=OLD, bucket=bucket, cache_dir=cache) as run:
        compile_graph(cache, OLD, ok)
        with pytest.raises(CompileFailed):
            compile_graph(cache, OLD, failed, outcome="failed_neff")  # a failure, cached as a NEFF alone
    states = [entry.state for entry in scan_entries(cache, OLD)]
    assert states == [EntryState.LEGACY_SUCCESS] * 2  # indistinguishable on disk: hence the default
    assert run.synced == [] and run.record is None
    assert BucketClient(bucket).list("", recursive=True) == []
    out = CliRunner().invoke(cli, ["sync", "--bucket", bucket.location, "--cache-dir", str(cache), "--compiler-version", OLD])
    assert out.exit_code == 0 and BucketClient(bucket).list("", recursive=True) == []


def test_legacy_entries_published_on_opt_in_are_fetched_by_anyone(tmp_path, bucket, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_PUBLISH_LEGACY", "1")
    cache = tmp_path / "A"
    with hub_neuronx_cache("org/old", compiler_version=OLD, bucket=bucket, cache_dir=cache) as run_a:
        for graph in make_graphs(2, seed="opt-in"):
            compile_graph(cache, OLD, graph)
    assert len(run_a.synced) == 2
    monkeypatch.delenv("NEURON_CACHE_PUBLISH_LEGACY")  # fetching needs no opt-in
    with hub_neuronx_cache("org/old", compiler_version=OLD, bucket=bucket, cache_dir=tmp_path / "B") as run_b:
        pass
    assert sorted(run_b.fetched) == sorted(run_a.synced)


def test_a_bad_opt_in_value_is_bad_input(tmp_path, bucket, monkeypatch):
    monkeypatch.setenv("NEURON_CACHE_PUBLISH_LEGACY", "maybe")
    with pytest.raises(ConfigurationError, match="NEURON_CACHE_PUBLISH_LEGACY='maybe' is not a yes/no value"):
        hub_neuronx_cache("org/old", compiler_version=OLD, bucket=bucket, cache_dir=tmp_path / "A")


# --------------------------------------------------------------- flags hashes of either kind, end to end

@pytest.mark.parametrize("style", ["json", "text"])
def test_entries_of_either_flags_hash_round_trip_at_every_version(tmp_path, bucket, monkeypatch, style):
    """MODULE names are opaque: whichever way a compiler hashed its flags, at whichever version, its entries
    are published, listed and fetched the same way."""
    from optimum_neuron_cache.testing.simulated_compiler import module_name

    monkeypatch.setenv("NEURON_CACHE_PUBLISH_LEGACY", "1")  # 2.12 and 2.14 entries are NEFF-only
    for version in ("2.12.68.0", "2.14.227.0+2d4f85be", "2.15.128.0+56dc5a86", "2.15.141.0+d3cfc8ca", "2.21.33363.0+82129205"):
        graphs = make_graphs(2, seed=f"{style}-{version}", flags=("--model-type=transformer", "-O1"))
        names = sorted(module_name(version, graph, style) for graph in graphs)
        a, b = tmp_path / f"a-{version}", tmp_path / f"b-{version}"
        with hub_neuronx_cache("org/styles", compiler_version=version, bucket=bucket, cache_dir=a) as published:
            for graph in graphs:
                compile_graph(a, version, graph, flags_hash_style=style)
        assert sorted(key.rsplit("/", 1)[1] for key in published.synced) == names, version
        with hub_neuronx_cache("org/styles", compiler_version=version, bucket=bucket, cache_dir=b) as fetched:
            for graph in graphs:
                assert compile_graph(b, version, graph, flags_hash_style=style).hit
        assert sorted(key.rsplit("/", 1)[1] for key in fetched.fetched) == names, version


def test_cli_sync_and_fetch_warn_like_a_run_when_the_target_is_not_pinned(tmp_path, monkeypatch):
    """`neuron-cache sync` and `fetch` with a compiler up to 2.15 and a shared bucket: the same one line."""
    warning = "does not put the compile target in its cache keys"
    cache = tmp_path / "cache"
    compile_graph(cache, MID, make_graphs(1, seed="cli-warn")[0])
    runner = CliRunner()
    shared = BucketRef("dir", str(tmp_path / "cli-shared"))
    BucketClient(shared).create()
    synced = runner.invoke(cli, ["sync", "--cache-dir", str(cache), "--bucket", shared.location])
    assert synced.exit_code == 0 and synced.output.count(warning) == 1, synced.output
    pinned = BucketRef("dir", str(tmp_path / "cli-pinned"))
    BucketClient(pinned).create()
    monkeypatch.setenv("NEURON_CC_FLAGS", "--target=trn1")
    for args in (["sync", "--cache-dir", str(cache)], ["fetch", "org/m", "--cache-dir", str(tmp_path / "other"),
                                                         "--compiler-version", MID]):
        result = runner.invoke(cli, [*args, "--bucket", pinned.location])
        assert result.exit_code == 0 and warning not in result.output, result.output
    monkeypatch.delenv("NEURON_CC_FLAGS")
    fresh = BucketRef("dir", str(tmp_path / "cli-fresh"))
    BucketClient(fresh).create()
    fetched = runner.invoke(cli, ["fetch", "org/m", "--cache-dir", str(tmp_path / "other"), "--compiler-version", MID,
                                  "--bucket", fresh.location])
    assert fetched.exit_code == 0 and fetched.output.count(warning) == 1, fetched.output
