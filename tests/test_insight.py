"""Explained misses, `neuron-cache explain`, and honest stats that add up across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.lookup import clear_lookup_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from optimum_neuron_cache.stats import Stats, read_stats, record_run

REPO = Path(__file__).resolve().parent.parent
OTHER = "2.19.8089.0+8ab9f450"
CONFIG = {"batch_size": 1, "sequence_length": 1024, "auto_cast_type": "bf16"}


@pytest.fixture(autouse=True)
def no_target_from_the_host(monkeypatch):
    monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE", raising=False)  # the records' target would follow it


@pytest.fixture
def bucket(dir_bucket) -> BucketRef:
    return dir_bucket


def publish(tmp_path, bucket, version, *, model="org/m", task=None, config=CONFIG, graphs=2, seed="insight", seconds=0.0):
    cache = tmp_path / f"pub-{version}-{task}-{seed}"
    with hub_neuronx_cache(model, task, config, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in make_graphs(graphs, seed=seed):
            compile_graph(cache, version, graph, seconds=seconds)
    return run


def compile_one(cache: Path, version: str, seed: str = "missed") -> None:
    compile_graph(cache, version, make_graphs(1, seed=seed)[0])


def test_no_entries_at_all(tmp_path, bucket, version):
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        compile_one(tmp_path / "B", version)
    assert run.miss_reasons == [f"no entries for org/m under compiler {version} in this bucket "
                                "(`neuron-cache explain org/m` compares the other compiler versions)"]


def test_a_run_that_compiles_nothing_explains_nothing_and_costs_no_request_for_it(tmp_path, bucket, version):
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert run.miss_reasons == [] and run.compiled == []


def test_a_miss_in_a_bucket_of_many_versions_and_models_costs_at_most_one_more_request(tmp_path, bucket, version):
    """The run's own miss reason costs at most one request whatever the bucket holds; the comparison across
    compiler versions is `neuron-cache explain`'s (and `fetch`'s) job."""
    for index, other in enumerate(["2.15.128.0+56dc5a86", "2.16.372.0+4a9b2326", "2.19.8089.0+8ab9f450",
                                   "2.20.1.0+aaaa1111", "2.22.1.0+bbbb2222"]):
        publish(tmp_path, bucket, other, model=f"org/other-{index}", graphs=1, seed=f"many-{index}")
    publish(tmp_path, bucket, version, model="org/neighbour", graphs=1, seed="neighbour")
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as cold:
        pass
    assert cold.requests <= 3  # the area's listing, `models/` for the casing; nothing for an explanation
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "C") as run:
        requests_at_enter = run.requests
        compile_one(tmp_path / "C", version)
    assert requests_at_enter == cold.requests  # nothing is explained before the body
    assert len(run.miss_reasons) == 1 and f"under compiler {version}" in run.miss_reasons[0]


def test_entries_only_for_other_compiler_versions(tmp_path, bucket, version):
    from optimum_neuron_cache.explain import why_nothing

    publish(tmp_path, bucket, OTHER)
    # `neuron-cache fetch` (why_nothing) and `neuron-cache explain` look across versions.
    assert why_nothing(BucketClient(bucket), version, "org--m", "default", "org/m") == \
        f"entries for org/m exist only for other compiler versions: {OTHER} (this one is {version})"
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        compile_one(tmp_path / "B", version)
    assert run.miss_reasons == [f"no entries for org/m under compiler {version} in this bucket "
                                "(`neuron-cache explain org/m` compares the other compiler versions)"]


def test_entries_only_for_other_tasks(tmp_path, bucket, version):
    publish(tmp_path, bucket, version, task="feature-extraction")
    with hub_neuronx_cache("Org/M", "text-generation", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        compile_one(tmp_path / "B", version)
    assert run.miss_reasons == ["no entries for Org/M task text-generation; the bucket has it for other tasks: feature-extraction"]


def test_other_export_config_and_flags_are_named(tmp_path, bucket, version, monkeypatch):
    monkeypatch.setenv("NEURON_CC_FLAGS", "-O1")
    publish(tmp_path, bucket, version)
    monkeypatch.setenv("NEURON_CC_FLAGS", "-O2 --cache_dir=/somewhere")  # wrapper flags never count
    cache = tmp_path / "B"
    with hub_neuronx_cache("org/m", None, {**CONFIG, "batch_size": 4}, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in make_graphs(1, seed="batch-4"):
            compile_graph(cache, version, graph)
    assert run.miss_reasons == ["compiled 1 graphs here: no record matches; nearest differs in "
                                "compile flags: bucket only: -O1, here only: -O2; batch_size: bucket 1, here 4"]


def test_a_record_promising_more_entries_than_the_bucket_holds(tmp_path, bucket, version):
    published = publish(tmp_path, bucket, version)
    gone = published.synced[0].rsplit("/", 1)[1]
    BucketClient(bucket).batch(delete=[item["path"] for item in BucketClient(bucket).list("", recursive=True)
                                       if f"/models/org--m/default/{gone}/" in item["path"]])
    cache = tmp_path / "B"
    with hub_neuronx_cache("org/m", None, CONFIG, compiler_version=version, bucket=bucket, cache_dir=cache) as run:
        for graph in make_graphs(2, seed="insight"):
            compile_graph(cache, version, graph)
    assert len(run.fetched) == 1 and len(run.compiled) == 1
    assert run.miss_reasons == ["the record of this configuration lists 2 entries, the bucket held 1; compiled 1 here"]


def test_explain_compares_field_by_field(tmp_path, bucket, version, monkeypatch):
    monkeypatch.setenv("NEURON_CC_FLAGS", "-O1")
    publish(tmp_path, bucket, version)
    publish(tmp_path, bucket, version, config={**CONFIG, "batch_size": 8}, seed="b8")
    monkeypatch.setenv("NEURON_CC_FLAGS", "-O1")
    out = CliRunner().invoke(cli, ["explain", "org/m", "--bucket", bucket.location, "--compiler-version", version,
                                   "--batch-size", "8", "--dtype", "fp16"]).output
    lines = out.splitlines()
    assert lines[0] == f"here: compiler {version}; target (unknown: pass --target); flags -O1"
    assert lines[1].startswith(f"1 difference(s): neuronxcc-{version} default target=? auto_cast_type=bf16 batch_size=8")
    assert lines[2] == "    auto_cast_type: bucket bf16, here fp16"
    out = CliRunner().invoke(cli, ["explain", "org/m", "--bucket", bucket.location, "--compiler-version", OTHER, "--batch-size", "1"]).output
    assert "compiler version: bucket " in out and f"here {OTHER}" in out
    assert "no export records of org/none" in CliRunner().invoke(cli, ["explain", "org/none", "--bucket", bucket.location,
                                                                       "--compiler-version", version]).output


def test_stats_of_a_run_and_the_time_its_hits_saved(tmp_path, bucket, version):
    published = publish(tmp_path, bucket, version, seconds=0.3)
    assert published.stats.misses == 2 and published.stats.publishes == 2
    with hub_neuronx_cache("org/m", None, CONFIG, compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert run.stats.hits == 2 and run.stats.misses == 0 and run.stats.fetches == 1
    # The time saved is the compile time the publisher recorded for the two entries, counted once per hit.
    out = tmp_path / "record.json"
    BucketClient(bucket).download([{"path": published.record, "local_path": str(out)}])
    recorded = json.loads(out.read_text())["compile_seconds"]
    assert len(recorded) == 2 and run.stats.hits_without_duration == 0
    assert run.stats.seconds_saved == pytest.approx(sum(recorded.values()), abs=1e-6)
    # Each compile slept 0.3 s, as read from file times, which the kernel stamps at its clock tick (up to
    # 10 ms): each duration may read a tick short, never much shorter.
    assert all(seconds >= 0.29 for seconds in recorded.values())
    last, total = read_stats()
    assert last.hits == 2 and total.hits == 2 and total.misses == 2 and total.publishes == 2
    assert total.bytes_downloaded == run.bytes_downloaded > 0
    out = CliRunner().invoke(cli, ["stats"]).output
    assert "hits (entries from the bucket)" in out and "compile time saved" in out
    CliRunner().invoke(cli, ["stats", "--zero"])
    assert read_stats()[1] == Stats()


ADD = """
import sys
from optimum_neuron_cache.stats import Stats, record_run
for _ in range(int(sys.argv[1])):
    record_run(Stats(fetches=1, hits=2, misses=1, seconds_saved=0.5, bytes_downloaded=10))
"""


def test_a_run_with_nothing_to_add_leaves_the_last_run_shown(tmp_path):
    """A rank that took another process's fetch and compiled nothing adds no line: `stats` still shows the run
    that did the work as the last one."""
    record_run(Stats(fetches=1, hits=2))
    record_run(Stats())
    assert read_stats() == (Stats(fetches=1, hits=2), Stats(fetches=1, hits=2))


def test_stats_add_up_across_concurrent_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", ADD, "25"], env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(6)]
    assert [proc.wait(timeout=120) for proc in procs] == [0] * 6
    _, total = read_stats()
    assert (total.fetches, total.hits, total.misses, total.bytes_downloaded) == (150, 300, 150, 1500)
    assert total.seconds_saved == pytest.approx(75.0)
    data = json.loads(CliRunner().invoke(cli, ["stats", "--json"]).output)
    assert data["total"]["hits"] == 300


def test_a_run_is_counted_however_many_folds_move_the_log_from_under_it(tmp_path, monkeypatch):
    """Many writers on one host fold the log over and over: each fold moves it aside between a writer's open
    and its write. The writer goes on to the new log until its line is in, rather than giving up after a few
    tries and dropping the run (a fold is simulated five times in a row, at the exact point a real one lands)."""
    import fcntl

    from optimum_neuron_cache import stats

    record_run(Stats(fetches=1, hits=1))
    log = stats._log_path(stats.stats_path())
    moved = []
    flock = fcntl.flock

    def fold_meanwhile(fd: int, operation: int) -> None:
        if len(moved) < 5:  # a fold renames the log after this writer opened it, before its inode check
            aside = log.with_name(f"aside-{len(moved)}")
            os.rename(log, aside)
            moved.append(aside)
        flock(fd, operation)

    monkeypatch.setattr(stats.fcntl, "flock", fold_meanwhile)
    record_run(Stats(fetches=1, hits=2))
    monkeypatch.setattr(stats.fcntl, "flock", flock)
    assert len(moved) == 5
    # The moved logs are what the folds would add up: with them, every run is counted once.
    runs = [line for path in [*moved, log] for line in path.read_text().splitlines() if line.strip()]
    assert len(runs) == 2 and json.loads(runs[-1])["run"]["hits"] == 2


# ------------------------------------------------- numbers from the bucket are validated (issue 16, section 4)


def _replace_record(bucket: BucketRef, path: str, text: str) -> None:
    BucketClient(bucket).batch(add=[{"dest": path, "content": text}])


def test_a_hostile_compile_time_in_a_record_never_reaches_the_stats(tmp_path, bucket, version, caplog):
    published = publish(tmp_path, bucket, version, seconds=0.05)
    record = json.loads((Path(bucket.location) / published.record).read_text())
    assert len(record["compile_seconds"]) == 2
    hostile = json.dumps({**record, "compile_seconds": {name: 123.25 for name in record["compile_seconds"]}})
    hostile = hostile.replace("123.25", "1e309")  # what a hostile teammate writes: json.loads reads it as inf
    assert hostile.count("1e309") == 2
    _replace_record(bucket, published.record, hostile)
    clear_lookup_cache()
    with hub_neuronx_cache("org/m", None, CONFIG, compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as run:
        pass
    assert len(run.fetched) == 2 and run.warnings == []  # the entries are fine: only the record is skipped
    assert run.stats.seconds_saved == 0.0 and run.stats.hits_without_duration == 2
    skipped = [r.getMessage() for r in caplog.records if "ignoring malformed export record" in r.getMessage()]
    assert skipped and "out of range" in skipped[0] and published.record in skipped[0]
    result = CliRunner().invoke(cli, ["stats", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in stats --json"))
    assert data["total"]["hits"] == 2 and data["total"]["seconds_saved"] == 0.0
    assert CliRunner().invoke(cli, ["stats"]).exit_code == 0
    assert CliRunner().invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--compiler-version", version]).output \
        == "no cached configuration of org/m matches in any task\n"


@pytest.mark.parametrize("value", ["1e309", "-1e309", "NaN", "Infinity", "-5", "1e12", "true", '"12"', "[1]"])
def test_a_record_with_a_bad_compile_time_is_skipped_with_one_warning(value, caplog):
    from optimum_neuron_cache.records import parse_record

    good = {"model_id": "org/m", "task": "default", "compiler_version": "2.21.33363.0+82129205",
            "export_config": {"batch_size": 1}, "modules": ["MODULE_1+a"], "compile_seconds": {"MODULE_1+a": 12.5}}
    assert parse_record(json.dumps(good), "r.json").compile_seconds == {"MODULE_1+a": 12.5}
    caplog.clear()
    text = json.dumps(good).replace("12.5", value)
    assert parse_record(text, "r.json") is None
    assert len([r for r in caplog.records if "r.json" in r.getMessage()]) == 1


def test_non_finite_numbers_anywhere_in_a_record_skip_it(caplog):
    from optimum_neuron_cache.records import parse_record

    base = ('{"model_id": "org/m", "task": "default", "compiler_version": "2.21.33363.0+82129205", '
            '"modules": [], "export_config": {"batch_size": %s}}')
    assert parse_record(base % "1", "ok.json") is not None
    for value in ("NaN", "Infinity", "1e400"):
        assert parse_record(base % value, "bad.json") is None  # `lookup --json` would print invalid JSON
    assert parse_record("[" * 100_000 + "]" * 100_000, "deep.json") is None  # nesting: skipped, not a crash


def test_a_poisoned_stats_file_reads_as_zero_with_a_warning(tmp_path, caplog):
    from optimum_neuron_cache.stats import stats_path

    path = stats_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"last_run": {"seconds_saved": Infinity, "hits": 3},'
                    ' "total": {"seconds_saved": 1e309, "hits": -2, "misses": NaN, "bytes_downloaded": "x",'
                    ' "publishes": true, "bytes_uploaded": 1e300, "fetches": 4}}')
    result = CliRunner().invoke(cli, ["stats", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in stats --json"))
    assert data["last_run"]["seconds_saved"] == 0.0 and data["last_run"]["hits"] == 3
    assert data["total"] == {**asdict(Stats()), "fetches": 4}
    warned = [r.getMessage() for r in caplog.records if "read as 0" in r.getMessage()]
    assert len(warned) == 2 and "seconds_saved=inf" in warned[1] and "hits=-2" in warned[1]  # one per part of the file
    table = CliRunner().invoke(cli, ["stats"])
    assert table.exit_code == 0 and "compile time saved" in table.stdout
    record_run(Stats(hits=1, seconds_saved=float("inf")))  # a bad figure of a run never enters the files either
    logged = path.with_name("stats.log").read_text()  # where a run's figures go (folded later into stats.json)
    assert "hits" in logged and not any(word in logged for word in ("Infinity", "NaN", "1e309"))
    _, total = read_stats()
    assert total.hits == 1 and total.seconds_saved == 0.0 and total.fetches == 4


FOLD = """
import sys
from optimum_neuron_cache import stats
stats.FOLD_BYTES = 600  # fold every few runs: folds race with appends
for _ in range(int(sys.argv[1])):
    stats.record_run(stats.Stats(fetches=1, hits=2))
"""


def test_stats_folded_while_other_processes_append_lose_nothing(tmp_path):
    """A run appends one line (no lock, no rename: the warm path's cost); a run that finds the log large folds
    it into stats.json under a lock while others go on appending. Every run counts once."""
    from optimum_neuron_cache.stats import stats_path

    procs = [subprocess.Popen([sys.executable, "-c", FOLD, "40"], env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(4)]
    assert [proc.wait(timeout=120) for proc in procs] == [0] * 4
    last, total = read_stats()
    assert (total.fetches, total.hits) == (160, 320) and last == Stats(fetches=1, hits=2)
    assert json.loads(stats_path().read_text())["total"]["fetches"] > 0  # folds happened


def test_dtypes_and_field_names_match_by_meaning_in_lookup_and_explain(tmp_path, bucket, version, monkeypatch):
    """`bf16`, `bfloat16` and `torch.bfloat16` are one dtype, and `tp_degree` is `tensor_parallel_size`, for lookup,
    explain and optimum-neuron's selection alike: a migrating user's `--dtype bfloat16` is not a false miss."""
    from optimum_neuron_cache.integrations.optimum_neuron import select_hub_cached_entries

    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)
    publish(tmp_path, bucket, version, config={**CONFIG, "tensor_parallel_size": 2})  # auto_cast_type: bf16
    publish(tmp_path, bucket, version, config={"batch_size": 4, "torch_dtype": "bfloat16"}, seed="named")
    for spelling in ("bf16", "bfloat16", "torch.bfloat16", "BFloat16"):
        clear_lookup_cache()
        out = CliRunner().invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--compiler-version", version,
                                       "--dtype", spelling, "--json"]).output
        assert sorted(record["export_config"]["batch_size"] for record in json.loads(out)) == [1, 4], spelling
    clear_lookup_cache()
    out = CliRunner().invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--compiler-version", version,
                                   "--dtype", "float16", "--json"]).output
    assert json.loads(out) == []
    clear_lookup_cache()
    out = CliRunner().invoke(cli, ["explain", "org/m", "--bucket", bucket.location, "--compiler-version", version,
                                   "--batch-size", "1", "--dtype", "bfloat16",
                                   "--config", '{"tp_degree": 2, "sequence_length": 1024}']).output
    assert out.splitlines()[1].startswith(f"match: neuronxcc-{version} default"), out
    selected = select_hub_cached_entries("org/m", bucket_id=bucket, compiler_version=version, torch_dtype="bf16")
    assert sorted(entry["batch_size"] for entry in selected) == [1, 4]


def test_numbers_match_as_numbers_never_truncated():
    """A filter of 0.5 never matches a record of 0.9 (they were compared as integers, 0 = 0)."""
    from optimum_neuron_cache.config_fields import same_value

    assert same_value(4, "4") and same_value("4.0", 4) and same_value(2048, 2048.0)
    assert not same_value(0.9, 0.5) and not same_value("4.5", 4) and not same_value(True, 1)
    assert same_value("BF16", "bfloat16", "auto_cast_type") and not same_value("bf16", "fp16", "dtype")
