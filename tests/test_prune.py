"""`neuron-cache prune`: plans that say what goes and why, executed records first, then commit files, then
content; never a half entry, even with a publisher of the same entries running at the same time in another
process. On the emulator (hf) and a directory bucket."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.errors import NeuronCacheError
from optimum_neuron_cache.journal import Journal, JournalKey
from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache
from optimum_neuron_cache.prune import PrunePolicy, execute_prune, plan_prune
from optimum_neuron_cache.survey import survey_bucket
from optimum_neuron_cache.sync import sync_cache
from optimum_neuron_cache.testing.invariants import bucket_violations, reference_sizes
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
from tests.lifecycle_helpers import run, uri

OLD = "2.20.1.0+aaaa"


def publish_model(root: Path, ref: BucketRef, version: str, model: str, seed: str, count: int,
                  task: str = "text-generation", config: dict[str, Any] | None = None) -> list[str]:
    """Compile `count` graphs under a hub_neuronx_cache run: flat area, model area and an export record."""
    with hub_neuronx_cache(model, task=task, export_config=config or {"batch_size": 1}, compiler_version=version,
                           bucket=ref, cache_dir=root) as run_:
        for graph in make_graphs(count, seed=seed):
            compile_graph(root, version, graph)
    assert not run_.warnings, run_.warnings
    return sorted(key.rsplit("/", 1)[1] for key in run_.synced)


def complete_modules(ref: BucketRef, version: str, area: str = "") -> set[str]:
    survey = survey_bucket(BucketClient(ref), compiler_version=version)
    found = survey.versions.get(version)
    return found.complete_in(area) if found else set()


def test_keep_versions_plans_then_removes_older_versions_whole(tmp_path, bucket, version):
    publish_model(tmp_path / "old", bucket, OLD, "org/m", "p", 2)
    publish_model(tmp_path / "new", bucket, version, "org/m", "p", 2)
    client = BucketClient(bucket)
    before = client.list("", recursive=True)

    plan = json.loads(run("prune", "--bucket", uri(bucket), "--keep-versions", "1", "--json"))
    assert plan["executed"] is False and plan["result"] is None
    assert {e["compiler_version"] for e in plan["plan"]["entries"]} == {OLD}
    assert len(plan["plan"]["entries"]) == 4 and len(plan["plan"]["records"]) == 1  # flat + area copies, one record
    assert all("newest 1 compiler versions" in e["reason"] for e in plan["plan"]["entries"])
    assert plan["plan"]["complete_before"] == 8 and plan["plan"]["complete_after"] == 4
    assert client.list("", recursive=True) == before  # showing the plan changes nothing

    out = run("prune", "--bucket", uri(bucket), "--keep-versions", "1", "--yes")
    assert "removed 4 entries, 1 export record" in out and "export records" not in out
    assert client.list(f"neuronxcc-{OLD}", recursive=True) == []
    assert len(complete_modules(bucket, version, "org--m/text-generation")) == 2
    clear_lookup_cache()
    assert lookup_cache("org/m", "text-generation", compiler_version=OLD, bucket=bucket) == []
    assert len(lookup_cache("org/m", "text-generation", compiler_version=version, bucket=bucket)) == 1
    assert "nothing to prune" in run("prune", "--bucket", uri(bucket), "--keep-versions", "1")


def test_a_named_model_goes_with_its_records_and_the_flat_entries_only_it_used(tmp_path, bucket, version):
    a = publish_model(tmp_path / "a", bucket, version, "org/a", "shared", 3)
    b = publish_model(tmp_path / "b", bucket, version, "org/b", "shared", 1)  # b's one graph is also a's
    assert b[0] in a
    out = run("prune", "--bucket", uri(bucket), "--drop-model", "ORG/A", "--unreferenced-older-than", "0s", "--yes")
    assert "removed 5 entries, 1 export record" in out and "export records" not in out  # a's 3 area copies, a's 2 flat entries b does not use
    assert complete_modules(bucket, version, "org--a/text-generation") == set()
    assert complete_modules(bucket, version, "") == set(b)  # the shared one stays: b's area references it
    assert complete_modules(bucket, version, "org--b/text-generation") == set(b)
    clear_lookup_cache()
    assert lookup_cache("org/a", "text-generation", compiler_version=version, bucket=bucket) == []
    assert bucket_violations(BucketClient(bucket).list("", recursive=True), version,
                             reference_sizes(tmp_path / "a", version)) == []


def test_drop_model_and_its_compiler_version_and_the_old_spellings_that_still_work(tmp_path, bucket, version):
    """One meaning per flag: `--model` filters elsewhere, so prune and du remove with `--drop-model` (as
    `--drop-version`), scoped by `--compiler-version`; `--model` and `--model-version` still work, each saying
    its new name in one line on stderr."""
    publish_model(tmp_path / "old", bucket, OLD, "org/a", "v", 1)
    publish_model(tmp_path / "new", bucket, version, "org/a", "v", 1)
    publish_model(tmp_path / "b", bucket, version, "org/b", "b", 1)

    def invoke(*args: str) -> tuple[dict[str, Any], str]:
        result = CliRunner().invoke(cli, ["prune", "--bucket", uri(bucket), "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), result.stderr

    plan, said = invoke("--drop-model", "org/a", "--compiler-version", OLD)
    assert said == ""
    assert {(e["compiler_version"], e["area"]) for e in plan["plan"]["entries"]} == {(OLD, "org--a/text-generation")}
    assert [r["path"].split("/")[0] for r in plan["plan"]["records"]] == [f"neuronxcc-{OLD}"]
    old_plan, said = invoke("--model", "org/a", "--model-version", OLD)
    assert old_plan["plan"] == plan["plan"]
    assert said.splitlines() == ["note: --model is now --drop-model (the old name still works)",
                                 "note: --model-version is now --compiler-version (the old name still works)"]
    every_version, _ = invoke("--drop-model", "org/a")
    assert {e["compiler_version"] for e in every_version["plan"]["entries"]} == {OLD, version}
    run("prune", "--bucket", uri(bucket), "--compiler-version", OLD, code=2)  # scopes --drop-model only
    run("prune", "--bucket", uri(bucket), "--drop-model", "org/a", "--compiler-version", "latest", code=2)
    du = CliRunner().invoke(cli, ["du", "--bucket", uri(bucket), "--json", "--model", "org/a"])
    assert du.exit_code == 0 and du.stderr == "note: --model is now --drop-model (the old name still works)\n"
    assert json.loads(du.stdout)["prune"] == json.loads(run("du", "--bucket", uri(bucket), "--json",
                                                            "--drop-model", "org/a"))["prune"]
    assert json.loads(du.stdout)["prune"]["entries"] == 2
    assert "--model" not in CliRunner().invoke(cli, ["prune", "--help"]).output.replace("--drop-model", "")


def test_unreferenced_flat_entries_go_only_once_old_enough(tmp_path, bucket, version):
    publish_model(tmp_path / "m", bucket, version, "org/m", "m", 1)
    for graph in make_graphs(2, seed="flat-only"):
        compile_graph(tmp_path / "flat", version, graph)
    sync_cache(BucketClient(bucket), tmp_path / "flat")  # flat area only: no model area, no record names them
    survey = survey_bucket(BucketClient(bucket), with_records=True)
    policy = PrunePolicy(unreferenced_older_than=86400.0)
    assert plan_prune(survey, policy).empty  # just written
    plan = plan_prune(survey, policy, now=time.time() + 2 * 86400)
    flat_only = {graph_entry.module for graph_entry in plan.entries}
    assert len(flat_only) == 2 and all(e.area == "" and "references it" in e.reason for e in plan.entries)
    assert "last written 2d ago" in plan.entries[0].reason
    # A listing that does not say when a file landed is never judged old.
    for found in survey.versions.values():
        for entry in found.entries.values():
            entry.files = {name: type(f)(f.path, f.size, f.xet_hash, f.digest, None) for name, f in entry.files.items()}
    assert plan_prune(survey, policy, now=time.time() + 2 * 86400).empty


def test_a_plan_that_removes_everything_is_refused_unless_told(tmp_path, bucket, version):
    publish_model(tmp_path / "m", bucket, version, "org/m", "all", 2)
    result = CliRunner().invoke(cli, ["prune", "--bucket", uri(bucket), "--keep-versions", "0", "--yes"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "would remove all 4 complete entries" in result.output
    assert len(complete_modules(bucket, version)) == 2  # nothing touched
    run("prune", "--bucket", uri(bucket), "--keep-versions", "0", "--all", "--yes")
    assert BucketClient(bucket).list("", recursive=True) == []
    run("prune", "--bucket", uri(bucket), code=2)  # no policy: say what to remove
    run("prune", "--bucket", uri(bucket), "--unreferenced-older-than", "30 days", code=2)
    run("prune", "--bucket", uri(bucket), "--task", "x", code=2)  # --task goes with --drop-model
    run("prune", "--bucket", uri(bucket), "--drop-version", "latest", code=2)


def test_records_whose_entries_are_gone_are_removed_after_a_grace(tmp_path, bucket, version):
    modules = publish_model(tmp_path / "m", bucket, version, "org/m", "dangle", 2)
    publish_model(tmp_path / "n", bucket, version, "org/m", "other", 1, config={"batch_size": 4})
    client = BucketClient(bucket)
    client.batch(delete=[f"neuronxcc-{version}/models/org--m/text-generation/{modules[0]}/model.done"])
    survey = survey_bucket(client, with_records=True)
    policy = PrunePolicy(dangling_records=True)
    assert plan_prune(survey, policy).empty  # a record this young may be landing with its entries
    plan = plan_prune(survey, policy, now=time.time() + 7200)
    assert len(plan.records) == 1 and not plan.entries
    assert "1 of its 2 entries are gone" in plan.records[0].reason
    execute_prune(client, plan)
    clear_lookup_cache()
    records = lookup_cache("org/m", "text-generation", compiler_version=version, bucket=bucket)
    assert [r.export_config for r in records] == [{"batch_size": 4}]


class RecordingClient(BucketClient):
    """A real client that remembers what each batch deleted."""

    def __init__(self, ref: BucketRef) -> None:
        super().__init__(ref)
        self.deleted: list[list[str]] = []

    def batch(self, *, add=None, copy=None, delete=None, progress=None):
        self.deleted.append(list(delete or []))
        return super().batch(add=add, copy=copy, delete=delete, progress=progress)


def test_records_then_commit_files_then_content_in_batches(tmp_path, bucket, version):
    publish_model(tmp_path / "m", bucket, version, "org/m", "order", 3)
    client = RecordingClient(bucket)
    plan = plan_prune(survey_bucket(client), PrunePolicy(models=("org--m",)))
    progress: list[tuple[int, int]] = []
    result = execute_prune(client, plan, batch=2, progress=lambda done, total: progress.append((done, total)))
    sent = [path for batch in client.deleted for path in batch]
    assert all(len(batch) <= 2 for batch in client.deleted) and len(sent) == plan.files == result.files_deleted
    kinds = ["stamp" if p.endswith("/.stamp.json") else "record" if "/exports/" in p
             else "commit" if p.endswith("/model.done") else "content" for p in sent]
    # The area's stamp (hosts list the area again), records, then commits, then content.
    assert kinds == sorted(kinds, key=["stamp", "record", "commit", "content"].index) and kinds[0] == "stamp"
    assert progress[-1] == (plan.files, plan.files) and [d for d, _ in progress] == sorted(d for d, _ in progress)


# ------------------------------------------------------------------------ a publisher racing a prune

class PausingClient(BucketClient):
    """A real client that stops after its n-th batch, or a commit's n-th phase, until told to go on (events,
    never sleeps)."""

    def __init__(self, ref: BucketRef, pause_after: int | None, reached: Any, resume: Any) -> None:
        super().__init__(ref)
        self.pause_after, self.reached, self.resume, self.batches = pause_after, reached, resume, 0

    def batch(self, **kwargs: Any) -> Any:
        reply = super().batch(**kwargs)
        self._landed()
        return reply

    def commit(self, stage: str, phases: Any, **kwargs: Any) -> Any:
        """Phase by phase, each its own commit (the first with the stage): the server applies a commit's phases
        back to back, and a pause between them is the widest window a concurrent prune can find."""
        done = []
        for index, phase in enumerate(phases):
            done += super().commit(stage if index == 0 else "", [phase], **kwargs)["phases"]
            self._landed()
        return {"phases": done}

    def _landed(self) -> None:
        self.batches += 1
        if self.batches == self.pause_after:
            self.reached.set()
            assert self.resume.wait(120), "never told to go on"


def publisher_process(kind: str, location: str, root: str, to_model: bool, pause_after: int | None, reached: Any,
                      resume: Any, results: Any) -> None:
    """Another process publishing the same entries (sync to the flat area, and the model's area with to_model)."""
    client = PausingClient(BucketRef(kind, location), pause_after, reached, resume)
    try:
        report = sync_cache(client, Path(root), model_folder="org--race" if to_model else None, task="text-generation")
    except NeuronCacheError as exc:  # its copies into the model's area find no source: the batch fails whole
        results.put({"published": [], "unconfirmed": [], "error": str(exc)})
        return
    result = report[0].result
    results.put({"published": result.published, "unconfirmed": result.unconfirmed, "error": None})


@pytest.mark.parametrize("race", [
    # prune removed the commit files; the publisher uploads content, then the prune removes it and checks
    # (nothing committed yet), then the publisher commits: its own check finds its content gone.
    "publisher-commits-after-the-prune",
    # the publisher publishes whole between the prune's commit and content batches: the prune's last check
    # finds commit files over removed content and removes them again.
    "publisher-between-the-prune-batches",
    # the publisher publishes whole after the prune removed everything, before its last check: left whole.
    "publisher-before-the-prune-check",
])
@pytest.mark.parametrize("to_model", [False, True], ids=["flat", "flat+model"])
def test_a_prune_racing_a_publisher_of_the_same_entries_leaves_no_half_entry(tmp_path, bucket, version, race, to_model):
    root = tmp_path / "cache"
    for graph in make_graphs(2, seed="race", neff_size=50_000):
        compile_graph(root, version, graph)
    assert sync_cache(BucketClient(bucket), root, model_folder="org--race", task="text-generation")[0].result.published
    ctx = multiprocessing.get_context("spawn")
    p_reached, p_resume, results = ctx.Event(), ctx.Event(), ctx.Queue()
    r_reached, r_resume = threading.Event(), threading.Event()
    prune_pause = {"publisher-commits-after-the-prune": 1, "publisher-between-the-prune-batches": 1,
                   "publisher-before-the-prune-check": 2}[race]
    publisher_pause = 1 if race == "publisher-commits-after-the-prune" else None
    client = PausingClient(bucket, prune_pause, r_reached, r_resume)
    policy = PrunePolicy(models=("org--race",), unreferenced_older_than=0.0)
    plan = plan_prune(survey_bucket(client, with_records=True), policy, now=time.time() + 1, allow_all=True)
    assert len(plan.entries) == 4
    pruned: dict[str, Any] = {}
    pruner = threading.Thread(target=lambda: pruned.setdefault("result", execute_prune(client, plan)))
    pruner.start()
    assert r_reached.wait(120)
    publisher = ctx.Process(target=publisher_process, args=(bucket.kind, bucket.location, str(root), to_model, publisher_pause,
                                                            p_reached, p_resume, results))
    publisher.start()
    try:
        if publisher_pause:
            assert p_reached.wait(120), "the publisher never uploaded its content"
        else:
            publisher.join(120)
        r_resume.set()
        pruner.join(120)
        p_resume.set()
        publisher.join(120)
        published = results.get(timeout=60)
    finally:
        r_resume.set()
        p_resume.set()
        publisher.join(10)
        if publisher.is_alive():
            publisher.kill()
    assert publisher.exitcode == 0 and not pruner.is_alive()
    result = pruned["result"]
    listing = BucketClient(bucket).list("", recursive=True)
    assert bucket_violations(listing, version, reference_sizes(root, version)) == []
    names = {e.name for e in _entries(root, version)}
    areas = ["", "org--race/text-generation"] if to_model else [""]
    committed = {area: complete_modules(bucket, version, area) for area in ["", "org--race/text-generation"]}
    if race == "publisher-commits-after-the-prune":
        # Its content (in both areas) landed, the prune removed it, its commit files landed: its check found its
        # content gone and took its commit files back.
        assert set(published["unconfirmed"]) == names and not published["published"] and not published["error"]
        assert committed == {"": set(), "org--race/text-generation": set()} and not result.rewritten_removed
        key = JournalKey(str(BucketClient(bucket).bucket), version, "org--race" if to_model else None, "text-generation")
        assert {name for record in Journal(root).leftovers(key) for name in record.entries} == names  # queued
    elif race == "publisher-between-the-prune-batches":
        assert set(published["published"]) == names
        assert committed == {"": set(), "org--race/text-generation": set()}
        assert len(result.rewritten_removed) == 2 * len(areas)  # the commit files it wrote over removed content
    else:
        assert set(published["published"]) == names and len(result.republished) == 2 * len(areas)
        assert all(committed[area] == names for area in areas)  # whole again, and left so


def _entries(root: Path, version: str) -> list[Any]:
    from optimum_neuron_cache.local_cache import scan_entries

    return [e for e in scan_entries(root, version) if e.state.publishable]


def test_keep_versions_counts_only_versions_with_entries_or_records(tmp_path, bucket, version):
    """A version-named folder holding only a stray file (or content that never got its commit file) is no
    compiler version: it pushes no real version out of the newest K, and `--keep-versions` leaves it to scrub."""
    publish_model(tmp_path / "old", bucket, OLD, "org/m", "p", 1)
    publish_model(tmp_path / "new", bucket, version, "org/m", "p", 1)
    client = BucketClient(bucket)
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk")
    stray = "neuronxcc-2.99.0.0+ffff/notes.txt"  # newer than both real versions
    uncommitted = "neuronxcc-2.98.0.0+eeee/MODULE_1+2/model.hlo_module.pb"
    client.batch(add=[{"dest": stray, "local_path": str(junk)}, {"dest": uncommitted, "local_path": str(junk)}])
    scrubbed = CliRunner().invoke(cli, ["scrub", "--bucket", uri(bucket), "--json"])
    assert ("bad-name", stray) in [(f["problem"], f["path"]) for f in json.loads(scrubbed.output)["findings"]]

    assert json.loads(run("du", "--bucket", uri(bucket), "--keep-versions", "2", "--json"))["prune"]["entries"] == 0
    assert "nothing to prune" in run("prune", "--bucket", uri(bucket), "--keep-versions", "2", "--yes")
    assert len(complete_modules(bucket, OLD)) == 1 and len(complete_modules(bucket, version)) == 1

    out = run("prune", "--bucket", uri(bucket), "--keep-versions", "1", "--yes")
    assert "removed 2 entries, 1 export record" in out and "export records" not in out and "2.99.0.0" not in out and "2.98.0.0" not in out
    assert complete_modules(bucket, OLD) == set() and len(complete_modules(bucket, version)) == 1
    assert sorted(item["path"] for item in client.paths_info([stray, uncommitted])) == [uncommitted, stray]
