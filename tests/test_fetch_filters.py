"""A fetch for one configuration installs what its export records list; without a task, a fetch reads every task.

On both bucket kinds (hf on the emulator, a directory), through the real bucket server and the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.fetch import (UNLISTED_REASON, Action, FetchNote, FetchOp, FetchPlan, choose_entries,
                                        memo_applies, narrow_plan)
from optimum_neuron_cache.journal import JournalKey
from optimum_neuron_cache.local_cache import EntryState, LocalEntry, scan_entries
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.publish import defer
from optimum_neuron_cache.records import CachedExport, ExportFilter
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

MODEL = "org/filtered"
SMALL = {"batch_size": 1, "sequence_length": 128, "tp_degree": 2, "auto_cast_type": "bf16"}
LARGE = {"batch_size": 4, "sequence_length": 128, "tp_degree": 2, "auto_cast_type": "fp16"}


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def _publish(cache: Path, bucket: BucketRef, version: str, config: dict | None, seed: str, *, task: str | None = None,
             count: int = 2) -> list[str]:
    """Compile `count` graphs of one configuration and publish them with its record; their MODULE names."""
    with hub_neuronx_cache(MODEL, task, config, compiler_version=version, bucket=bucket, cache_dir=cache) as run_:
        for graph in make_graphs(count, seed=seed):
            compile_graph(cache, version, graph)
    assert len(run_.synced) == count
    return sorted(key.rsplit("/", 1)[1] for key in run_.synced)


def _two_configs(tmp_path: Path, bucket: BucketRef, version: str, task: str | None = "text-generation"):
    small = _publish(tmp_path / "small", bucket, version, SMALL, "small", task=task)
    large = _publish(tmp_path / "large", bucket, version, LARGE, "large", task=task)
    clear_lookup_cache()
    return small, large


def _here(cache: Path, version: str) -> list[str]:
    return sorted(entry.name for entry in scan_entries(cache, version) if entry.state.publishable)


def _fetch(cache: Path, bucket: BucketRef, version: str, *args: str) -> str:
    return run("fetch", MODEL, "--bucket", bucket.location,
               "--cache-dir", str(cache), "--compiler-version", version, *args)


def test_fetch_with_filters_installs_only_the_matching_configurations_entries(tmp_path, bucket, version):
    small, large = _two_configs(tmp_path, bucket, version)
    cache = tmp_path / "job"
    preview = _fetch(cache, bucket, version, "--task", "text-generation", "--batch-size", "1", "--dry-run")
    assert preview.count("install  ") == 2 and preview.count("unlisted ") == 2
    assert "not listed by the matching export record" in preview
    out = _fetch(cache, bucket, version, "--task", "text-generation", "--batch-size", "1", "--tp", "2")
    assert _here(cache, version) == small
    assert "fetched 2 entries" in out and "of 1 matching configuration (batch_size=1 tensor_parallel_size=2)" in out
    assert "2 left out" in out
    # --config is matched field by field, by meaning (tensor_parallel_size is what the record calls tp_degree).
    other = tmp_path / "other"
    _fetch(other, bucket, version, "--task", "text-generation", "--config", json.dumps({"tensor_parallel_size": 2,
                                                                                      "batch_size": 4}))
    assert _here(other, version) == large


def test_dtype_bfloat16_matches_a_record_stored_as_bf16(tmp_path, bucket, version):
    small, _ = _two_configs(tmp_path, bucket, version)
    for spelling, cache in (("bfloat16", tmp_path / "a"), ("torch.bfloat16", tmp_path / "b")):
        out = _fetch(cache, bucket, version, "--task", "text-generation", "--dtype", spelling)
        assert _here(cache, version) == small, out
        assert f"1 matching configuration (dtype={spelling})" in out


def test_the_context_fetches_what_the_matching_record_lists_else_the_whole_area(tmp_path, bucket, version):
    small, large = _two_configs(tmp_path, bucket, version)
    same = dict(SMALL, auto_cast_type="bfloat16", tp_degree=2)  # the same configuration, spelt another way
    with hub_neuronx_cache(MODEL, "text-generation", same, compiler_version=version, bucket=bucket,
                           cache_dir=tmp_path / "one") as one:
        pass
    assert sorted(key.rsplit("/", 1)[1] for key in one.fetched) == small == _here(tmp_path / "one", version)
    assert one.record is not None
    records = lookup_cache(MODEL, "text-generation", compiler_version=version, bucket=bucket, dtype="bfloat16")
    assert len(records) == 2 and all(sorted(record.modules) == small for record in records)

    # That run compiled nothing: the record it wrote for its spelling lists what it used, the entries its fetch
    # chose, not the whole area. And a warm run of that configuration pays one request, as an unfiltered warm
    # run: the host's note says which entries the records listed, so the others (not here) do not make it list
    # the area and read the records again.
    for _ in range(2):
        with hub_neuronx_cache(MODEL, "text-generation", same, compiler_version=version, bucket=bucket,
                               cache_dir=tmp_path / "one") as warm:
            pass
        assert warm.fetched == [] and warm.record is None
    assert warm.requests == 1
    assert _here(tmp_path / "one", version) == small

    unknown = dict(SMALL, batch_size=8)  # no record matches: the whole area, as without a filter
    with hub_neuronx_cache(MODEL, "text-generation", unknown, compiler_version=version, bucket=bucket,
                           cache_dir=tmp_path / "all") as every:
        pass
    assert sorted(key.rsplit("/", 1)[1] for key in every.fetched) == sorted(small + large)


def test_a_note_of_another_configuration_does_not_stand_in(version):
    """Pure: a host's note of a fetch for one configuration names the entries it needed; a run asked for another
    (or for none) needs every entry the note found."""
    wanted = ExportFilter.of(SMALL)
    area = f"{layout.models_prefix(version)}/org--filtered/default"
    note = FetchNote("k", 100.0, True, area=area, remote_modules=("MODULE_a", "MODULE_b"), stamp="s", listed_at=100.0,
                     wanted=wanted.key, needed=("MODULE_a",))
    assert FetchNote.parse(note.to_json(), "k") == note
    local = {"MODULE_a": LocalEntry(version, "MODULE_a", Path("/nonexistent"), EntryState.SUCCESS)}
    assert memo_applies(note, version, local, 101.0, wanted)
    assert not memo_applies(note, version, local, 101.0, ExportFilter.of(LARGE))
    assert not memo_applies(note, version, local, 101.0, None)


def test_fetch_without_a_task_installs_every_tasks_entries_and_says_which(tmp_path, bucket, version):
    generation = _publish(tmp_path / "g", bucket, version, None, "gen", task="text-generation")
    features = _publish(tmp_path / "f", bucket, version, None, "feat", task="feature-extraction", count=1)
    # What a killed run without a task (so of `default`) left unpublished here goes up too, as before.
    job = tmp_path / "job"
    leftover = compile_graph(job, version, make_graphs(1, seed="left")[0]).path.name
    defer(job, JournalKey(str(bucket), version, "org--filtered", layout.DEFAULT_TASK), [leftover])
    out = _fetch(job, bucket, version)
    assert _here(job, version) == sorted([*generation, *features, leftover])
    assert "fetched 3 entries" in out and f"of {MODEL} (every task: feature-extraction, text-generation)" in out
    assert "published 1 entry that earlier runs of org--filtered left unpublished" in out
    # lookup and explain read every task too, and say so in their help.
    for command in ("lookup", "explain"):
        assert "default: every task of the model" in " ".join(run(command, "--help").split())
    assert "in any task" in run("lookup", "org/absent", "--bucket", bucket.location, "--compiler-version", version)


def test_an_area_with_a_record_and_no_entries_is_not_called_another_task(tmp_path, bucket, version):
    area = layout.model_area_prefix(version, "org--filtered", "default")
    record = {"model_id": MODEL, "task": "default", "compiler_version": version, "export_config": SMALL,
              "compile_flags": [], "modules": []}
    BucketClient(bucket).batch(add=[{"dest": layout.area_record_path(area, "0123456789abcdef.json"),
                                     "content": json.dumps(record)}])
    for args in (("--task", "default"), ()):
        out = _fetch(tmp_path / "job", bucket, version, *args)
        assert "nothing to fetch" in out and "other tasks" not in out, out
        assert "holds no complete entry" in out or "hold no complete entry" in out, out


def test_the_planner_leaves_out_what_no_matching_record_lists_and_says_why(version):
    """Pure: the records that match choose; a record listing no entries (an optimum-neuron registry import)
    chooses nothing, so the whole area is planned, as when nothing matches."""
    def record(config: dict, modules: list[str], name: str) -> CachedExport:
        return CachedExport(MODEL, "default", version, config, [], modules, path=f"exports/{name}.json")

    small, large = record(SMALL, ["MODULE_a"], "small"), record(LARGE, ["MODULE_b"], "large")
    imported = record({"batch_size": 8, "torch_dtype": "bfloat16"}, [], "imported")
    plan = FetchPlan(version, "area", (FetchOp("MODULE_a", Action.INSTALL, "missing here"),
                                       FetchOp("MODULE_b", Action.INSTALL, "missing here"),
                                       FetchOp("MODULE_c", Action.PRESENT, "complete here")))
    narrowed = narrow_plan(plan, choose_entries([small, large, imported], ExportFilter.of(dtype="bfloat16",
                                                                                        batch_size=1)))
    assert [(op.module, op.action, op.reason) for op in narrowed.ops] == [
        ("MODULE_a", Action.INSTALL, "missing here"), ("MODULE_b", Action.UNLISTED, UNLISTED_REASON),
        ("MODULE_c", Action.PRESENT, "complete here")]
    assert narrowed.choice is not None
    assert narrowed.choice.line() == "1 matching configuration (batch_size=1 dtype=bfloat16)"
    for wanted in (ExportFilter.of(batch_size=8, dtype="bf16"), ExportFilter.of(batch_size=2)):
        whole = narrow_plan(plan, choose_entries([small, large, imported], wanted))
        assert whole.ops == plan.ops and whole.choice is not None and "the whole area" in whole.choice.line()
