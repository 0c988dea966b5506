"""The write-ahead journal: what a run compiled reaches the bucket whatever instant it died at, and only there.

The per-phase kills are in test_reliability.py; here, what surrounds them: SIGTERM keeps its previous meaning,
a dead run is never credited with what others compiled after its death, a long-lived process publishes what
its own earlier run could not, and journal files are hostile input like any other.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.journal import Journal
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs, module_name

from stress.scenarios import _env


def _committed(bucket: BucketRef) -> set[str]:
    return {item["path"] for item in BucketClient(bucket).list("", recursive=True) if item["path"].endswith("model.done")}


CHAINED = """
import os, signal, sys, json
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
spec = json.loads(sys.argv[1])
def framework_handler(signum, frame):  # what a training framework installs: save and exit cleanly
    open(spec["marker"], "w").write("saved")
    sys.exit(3)
signal.signal(signal.SIGTERM, framework_handler)
with hub_neuronx_cache("org/m", compiler_version=spec["version"], bucket=spec["bucket"], cache_dir=spec["cache"]):
    for graph in make_graphs(2, seed="chained"):
        compile_graph(spec["cache"], spec["version"], graph)
    os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_journals_then_runs_the_handler_that_was_there_before(tmp_path, version):
    bucket = tmp_path / "bucket"
    BucketClient(BucketRef("dir", str(bucket))).create()
    spec = {"version": version, "bucket": str(bucket), "cache": str(tmp_path / "A"), "marker": str(tmp_path / "saved")}
    done = subprocess.run([sys.executable, "-c", CHAINED, json.dumps(spec)], env=_env(), capture_output=True, text=True)
    # The framework's handler ran and decided the exit (the signal was not swallowed); the context's exit then
    # published on the way out, as it does for any exception leaving the block.
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "saved").read_text() == "saved"
    modules = {module_name(version, graph) for graph in make_graphs(2, seed="chained")}
    assert {f"neuronxcc-{version}/{m}/model.done" for m in modules} <= _committed(BucketRef("dir", str(bucket)))


KILLED_IN_BODY = """
import os, signal, sys, json
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
spec = json.loads(sys.argv[1])
with hub_neuronx_cache(spec["model"], compiler_version=spec["version"], bucket=spec["bucket"], cache_dir=spec["cache"]):
    for graph in make_graphs(2, seed=spec["seed"]):
        compile_graph(spec["cache"], spec["version"], graph)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_dead_run_is_never_credited_with_what_later_runs_compiled(tmp_path, version):
    """X is killed after compiling; Y then compiles and publishes its own graphs; the next run of X publishes
    X's graphs to X's area, and none of Y's."""
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    cache = tmp_path / "cache"
    spec = {"model": "org/x", "version": version, "bucket": ref.location, "cache": str(cache), "seed": "x"}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_BODY, json.dumps(spec)], env=_env())
    assert killed.returncode == -signal.SIGKILL
    with hub_neuronx_cache("org/y", compiler_version=version, bucket=ref, cache_dir=cache) as y:
        for graph in make_graphs(2, seed="y"):
            compile_graph(cache, version, graph)
    assert len(y.synced) == 2 and y.recovered == []  # Y's run is not X's: X's entries are not Y's to publish
    with hub_neuronx_cache("org/x", compiler_version=version, bucket=ref, cache_dir=cache) as x:
        pass
    x_modules = {module_name(version, graph) for graph in make_graphs(2, seed="x")}
    y_modules = {module_name(version, graph) for graph in make_graphs(2, seed="y")}
    assert {key.rsplit("/", 1)[1] for key in x.recovered} == x_modules
    area = f"neuronxcc-{version}/models/org--x/default"
    in_x_area = {path.split("/")[-2] for path in _committed(ref) if path.startswith(area + "/")}
    assert in_x_area == x_modules and not in_x_area & y_modules


def test_a_long_lived_process_publishes_what_its_own_earlier_run_could_not(tmp_path, version):
    """The bucket is missing during the first run (a directory not yet mounted): the run warns, and its entries
    stay journaled; the next run in the same process publishes them once the bucket is there."""
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    cache = tmp_path / "cache"
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=ref, cache_dir=cache) as first:
        for graph in make_graphs(2, seed="later"):
            compile_graph(cache, version, graph)
    assert first.synced == [] and len(first.warnings) == 1
    BucketClient(ref).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=ref, cache_dir=cache) as second:
        pass
    assert len(second.recovered) == 2 and len(second.synced) == 2
    assert list(Journal(cache).folder.iterdir()) == []


def test_a_foreign_or_malformed_journal_file_is_skipped(tmp_path, version, caplog):
    from optimum_neuron_cache.journal import JournalKey, _host_digest

    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    cache = tmp_path / "cache"
    journal = Journal(cache).folder
    journal.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    digest = JournalKey(str(ref), version, "org--m", "default").digest
    (journal / f"{digest}-{_host_digest()}-{dead_pid}-0-aaaa.json").write_text("{not json")  # ours, dead, garbage
    (journal / "garbage.json").write_text(json.dumps({"key": "not a key"}))  # nobody's
    (journal / f"{digest}-{_host_digest()}-{dead_pid}-0-bbbb.json").symlink_to(tmp_path / "elsewhere.json")
    with caplog.at_level("WARNING", logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=ref, cache_dir=cache) as run:
            compile_graph(cache, version, make_graphs(1, seed="foreign")[0])
    assert run.warnings == [] and len(run.synced) == 1
    assert any("malformed journal record" in record.getMessage() for record in caplog.records)
    assert len(scan_entries(cache, version)) == 1


def test_neuron_cache_fetch_of_the_model_publishes_what_a_killed_run_left(tmp_path, version):
    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli

    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    cache = tmp_path / "cache"
    spec = {"model": "org/x", "version": version, "bucket": ref.location, "cache": str(cache), "seed": "cli"}
    assert subprocess.run([sys.executable, "-c", KILLED_IN_BODY, json.dumps(spec)], env=_env()).returncode == -signal.SIGKILL
    done = CliRunner().invoke(cli, ["fetch", "org/x", "--bucket", ref.location, "--cache-dir", str(cache),
                                    "--compiler-version", version])
    assert done.exit_code == 0, done.output
    assert "published 2 entries that earlier runs of org--x left unpublished" in done.output
    modules = {module_name(version, graph) for graph in make_graphs(2, seed="cli")}
    area = f"neuronxcc-{version}/models/org--x/default"
    assert {f"{area}/{m}/model.done" for m in modules} <= _committed(ref)
    assert list(Journal(cache).folder.iterdir()) == []


def test_neuron_cache_sync_publishes_each_entry_once_with_a_killed_runs_leftovers(tmp_path, version):
    """An explicit sync covers what a killed run left (the same entries): each is published once, and the
    killed run's record goes."""
    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli

    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    cache = tmp_path / "cache"
    spec = {"model": "org/x", "version": version, "bucket": ref.location, "cache": str(cache), "seed": "sync"}
    assert subprocess.run([sys.executable, "-c", KILLED_IN_BODY, json.dumps(spec)], env=_env()).returncode == -signal.SIGKILL
    done = CliRunner().invoke(cli, ["sync", "--bucket", ref.location, "--cache-dir", str(cache), "--to-model", "org/x"])
    assert done.exit_code == 0, done.output
    assert done.output.count("published neuronxcc-") == 2 and "published 2 entries" in done.output
    assert list(Journal(cache).folder.iterdir()) == []


LIVE_RUN = """
import json, sys
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
spec = json.loads(sys.argv[1])
with hub_neuronx_cache("org/m", compiler_version=spec["version"], bucket=spec["bucket"], cache_dir=spec["cache"]) as run:
    print("in the body", flush=True)
    sys.stdin.readline()
    compile_graph(spec["cache"], spec["version"], make_graphs(1, seed="live")[0])
print(json.dumps(run.warnings), flush=True)
sys.stdin.readline()  # alive after its block, its record closed
"""


def test_a_live_runs_record_is_a_leftover_only_once_it_is_closed(tmp_path, version):
    """Another process of the host inside its block: its record is its own business (an enter leaves it alone,
    and reads none of it: the name says open); once that run has closed its record with an entry it could not
    publish (no bucket), it is anyone's while the process lives on."""
    from optimum_neuron_cache.journal import JournalKey

    ref = BucketRef("dir", str(tmp_path / "missing-bucket"))
    cache = tmp_path / "cache"
    spec = {"version": version, "bucket": ref.location, "cache": str(cache)}
    live = subprocess.Popen([sys.executable, "-c", LIVE_RUN, json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert live.stdout.readline().strip() == "in the body"
        key = JournalKey(str(ref), version, "org--m", "default")
        journal = Journal(cache)
        assert journal.leftovers(key) == []
        live.stdin.write("\n")
        live.stdin.flush()
        assert len(json.loads(live.stdout.readline())) == 1  # the bucket is missing: one warning
        left = journal.leftovers(key)
        assert [record.entries for record in left] == [(module_name(version, make_graphs(1, seed="live")[0]),)]
        assert live.poll() is None and not left[0].open
    finally:
        live.stdin.close()
        live.wait(timeout=60)


def test_names_another_publisher_journaled_are_seen_open_or_closed(tmp_path, version):
    """A publisher that finds an entry's publish lock taken asks whether another record lists it (that process
    wrote the name before its first byte): open records of live runs count here, and closed ones too."""
    from optimum_neuron_cache.journal import JournalKey, RunRecord

    journal, now = Journal(tmp_path / "cache"), time.time()
    key = JournalKey("dir:///bucket", version, "org--m", "default")
    mine = journal.begin(RunRecord(key=key, started=now, entries=("MODULE_1+a", "MODULE_2+a")))
    journal.begin(RunRecord(key=key, started=now, entries=("MODULE_2+a", "MODULE_3+a")))  # a live run, open
    closed = journal.begin(RunRecord(key=key, started=now, entries=("MODULE_4+a",)))
    journal.update(closed, open=False)
    journal.begin(RunRecord(key=JournalKey("dir:///other", version, "org--m", "default"), started=now,
                            entries=("MODULE_1+a",)))  # another key's
    names = ["MODULE_1+a", "MODULE_2+a", "MODULE_4+a", "MODULE_5+a"]
    assert journal.listed_elsewhere(key, names, mine) == {"MODULE_2+a", "MODULE_4+a"}
