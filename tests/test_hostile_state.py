"""The local journal and state folder are hostile input (issue 26, item 6).

Whatever sits in `<root>/.optimum-neuron-cache/` (a FIFO named like a record or a memo, a record whose times are
not times, thousands of leftovers of models that never run again) costs one line at most: never a hang, never
another model's entries, never a slow enter. Runs that could hang are run in a child with a time bound (a hang
guard, not a duration that is asserted); a reader left blocked on a FIFO is released by opening its writer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.host_state import HostState
from optimum_neuron_cache.journal import REFUSED_SUFFIX, Journal, JournalKey, RunRecord, _host_digest
from optimum_neuron_cache.local_cache import STATE_DIR_NAME
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs, module_name

from stress.scenarios import _env

#: How long a child may take before it is taken for hung (the runs below take a second or two).
HANG_GUARD_S = 120


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def _release(fifos: list[Path]) -> None:
    """Open each FIFO's writing end once: a reader blocked on it (the code before the fix) gets EOF and goes on."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def _bounded(script: str, spec: dict, fifos: list[Path],
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", script, json.dumps(spec)], env=env or _env(), capture_output=True,
                              text=True, timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on a FIFO in the state folder")
    finally:
        _release(fifos)


def _dir_bucket(tmp_path: Path) -> BucketRef:
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    return ref


def _committed(ref: BucketRef) -> set[str]:
    return {item["path"] for item in BucketClient(ref).list("", recursive=True) if item["path"].endswith("model.done")}


ENTER = """
import json, sys
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
spec = json.loads(sys.argv[1])
with hub_neuronx_cache(spec["model"], compiler_version=spec["version"], bucket=spec["bucket"],
                       cache_dir=spec["cache"]) as run:
    compile_graph(spec["cache"], spec["version"], make_graphs(1, seed="fifo")[0])
print(json.dumps({"synced": run.synced, "warnings": run.warnings}))
"""


def test_a_fifo_named_like_a_journal_record_never_blocks_an_enter(tmp_path, version):
    """A FIFO named like a dead run's open record (another model's), and one named like a closed record of the
    run's own model: the enter reads neither (one line each), renames them aside, and the run publishes."""
    ref = _dir_bucket(tmp_path)
    cache = tmp_path / "cache"
    folder = Journal(cache).folder
    folder.mkdir(parents=True)
    dead, host = _dead_pid(), _host_digest()
    other = JournalKey(str(ref), version, "org--other", "default").digest
    own = JournalKey(str(ref), version, "org--m", "default").digest
    fifos = [folder / f"{other}-{host}-{dead}-0-aaaaaaaa.json", folder / f"{own}-{host}-{dead}-0-bbbbbbbb.closed.json"]
    for fifo in fifos:
        os.mkfifo(fifo)
    done = _bounded(ENTER, {"model": "org/m", "version": version, "bucket": ref.location, "cache": str(cache)}, fifos)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert len(run["synced"]) == 1 and run["warnings"] == []
    refused = [line for line in done.stderr.splitlines() if "journal record" in line]
    assert len(refused) == 2 and all("a FIFO" in line and REFUSED_SUFFIX in line for line in refused), done.stderr
    assert sorted(path.name for path in folder.iterdir()) == sorted(fifo.name + REFUSED_SUFFIX for fifo in fifos)


SHIM_COMPILE = """
import json, sys
from optimum_neuron_cache.testing.simulated_neuronx_cc import jit_compile
from optimum_neuron_cache.testing.simulated_compiler import make_graphs
spec = json.loads(sys.argv[1])
print(json.dumps({"compiled": jit_compile(spec["cache"], spec["version"], make_graphs(1, seed="memo")[0]).compiled}))
"""


def test_a_fifo_at_the_shims_memo_never_blocks_a_compile(tmp_path):
    """The shim memoizes `neuronx-cc --version` in its state folder: a FIFO there is refused with one line, the
    version is probed, the compile goes on, and the memo is written anew."""
    from optimum_neuron_cache.integrations.compiler_shim import install_compiler_shim
    from optimum_neuron_cache.testing.simulated_neuronx_cc import DEFAULT_VERSION, install_simulated_compiler

    real_bin, shim_bin, cache = tmp_path / "sdk-bin", tmp_path / "shim-bin", tmp_path / "cache"
    install_simulated_compiler(real_bin)
    install_compiler_shim(shim_bin)
    memo = cache / STATE_DIR_NAME / "shim" / "compiler-versions.json"
    memo.parent.mkdir(parents=True)
    # The entry in two version folders: the shim cannot tell its version from the folder, and probes the compiler.
    module = module_name(DEFAULT_VERSION, make_graphs(1, seed="memo")[0])
    (cache / "neuronxcc-2.14.227.0+2d4f85be" / module).mkdir(parents=True)
    os.mkfifo(memo)
    env = _env({"PATH": os.pathsep.join([str(shim_bin), str(real_bin), os.environ["PATH"]]),
                "NEURON_CACHE_BUCKET": _dir_bucket(tmp_path).location, "NEURON_COMPILE_CACHE_URL": str(cache),
                "SIMULATED_NEURONX_CC_LOG": str(tmp_path / "compiles.log")})
    env.pop("NEURON_CC_VERSION", None)  # the shim probes the compiler's version: it reads its memo
    done = _bounded(SHIM_COMPILE, {"cache": str(cache), "version": DEFAULT_VERSION}, [memo], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"compiled": True}
    assert (tmp_path / "compiles.log").read_text().split() != []
    assert memo.is_file() and DEFAULT_VERSION in memo.read_text()  # replaced by a regular memo


RECORD_RUN = """
import json, sys
from pathlib import Path
from optimum_neuron_cache.stats import Stats, read_stats, record_run
spec = json.loads(sys.argv[1])
record_run(Stats(hits=2), Path(spec["stats"]))
last, total = read_stats(Path(spec["stats"]))
print(json.dumps({"hits": total.hits}))
"""


def test_a_fifo_at_the_stats_log_never_blocks_a_runs_exit(tmp_path):
    """Every run's exit appends its figures to the stats log: a FIFO there is removed with one line, and the
    figures go to a new log."""
    stats = tmp_path / "stats" / "stats.json"
    stats.parent.mkdir()
    log = stats.with_name("stats.log")
    os.mkfifo(log)
    done = _bounded(RECORD_RUN, {"stats": str(stats)}, [log])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"hits": 2}
    assert log.is_file() and "a FIFO" in done.stderr


def test_a_publication_marker_is_never_followed(tmp_path):
    """`published/` markers are replaced, never written through: a dangling symlink there creates nothing where
    it points, and a symlink to a fresh file never says "published"."""
    state = HostState(tmp_path / "cache")
    outside = tmp_path / "outside"
    marker = state._published_marker("dir:///b", "neuronxcc-1/MODULE_1+a")
    marker.parent.mkdir(parents=True)
    marker.symlink_to(outside)
    state.mark_published("dir:///b", ["neuronxcc-1/MODULE_1+a"])
    assert not outside.exists() and marker.is_file() and not marker.is_symlink()
    fresh = tmp_path / "fresh"
    fresh.write_text("")
    other = state._published_marker("dir:///b", "neuronxcc-1/MODULE_2+a")
    other.symlink_to(fresh)
    assert not state.published_since("dir:///b", "neuronxcc-1/MODULE_2+a", time.time() - 60)


def _closed_record(folder: Path, key: JournalKey, dead: int, tag: str, **fields) -> Path:
    data = json.loads(RunRecord(key=key, started=time.time() - 3600, window=True, open=False,
                                export_config={"poisoned": tag}).to_json())
    data.update(fields)
    path = folder / f"{key.digest}-{_host_digest()}-{dead}-0-{tag}.closed.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("times", [{"started": "-inf"}, {"started": 0}, {"started": "nan"},
                                   {"started": float("-inf")}, {"sealed": 1e300}],
                         ids=["started=-inf", "started=0", "started=nan", "started=-Infinity", "sealed=1e300"])
def test_a_record_whose_times_are_not_within_the_caches_lifetime_is_refused(tmp_path, version, caplog, times):
    """A closed record with a window from the beginning of time (or to its end) would make the next run of its
    model publish every entry of the host, other models' included, into its area, with the record's config."""
    ref = _dir_bucket(tmp_path)
    cache = tmp_path / "cache"
    folder = Journal(cache).folder
    folder.mkdir(parents=True)
    for graph in make_graphs(2, seed="someone-else"):  # other models' entries, compiled on this host
        compile_graph(cache, version, graph)
    path = _closed_record(folder, JournalKey(str(ref), version, "org--x", "default"), _dead_pid(), "poison", **times)
    with caplog.at_level("WARNING", logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/x", compiler_version=version, bucket=ref, cache_dir=cache,
                               export_config={"batch_size": 1}) as run:
            pass
    assert run.recovered == [] and run.synced == []
    # Nothing in the model's area: no other model's entry, no export record of the poisoned record's config.
    listed = [item["path"] for item in BucketClient(ref).list("", recursive=True)]
    assert [path for path in listed if "/models/org--x/" in path] == []
    refused = [r.getMessage() for r in caplog.records if "journal record" in r.getMessage()]
    assert len(refused) == 1 and "lifetime" in refused[0]
    assert path.with_name(path.name + REFUSED_SUFFIX).exists() and not path.exists()


def test_leftovers_of_other_models_cost_an_enter_their_names_only(tmp_path, version, caplog):
    """Closed records of models that never run again are read by no other model's enter (they are filled with
    garbage here: a read would say so); a dead run's open record is read, sealed and renamed closed once, and
    the next run of its own model still publishes its entries into its area."""
    ref = _dir_bucket(tmp_path)
    cache = tmp_path / "cache"
    folder = Journal(cache).folder
    folder.mkdir(parents=True)
    dead, host = _dead_pid(), _host_digest()
    for i in range(50):
        digest = JournalKey(str(ref), version, f"org--gone{i}", "default").digest
        (folder / f"{digest}-{host}-{dead}-0-{i:08x}.closed.json").write_text("{not a record")
    graphs = make_graphs(2, seed="killed")
    for graph in graphs:
        compile_graph(cache, version, graph)
    x = JournalKey(str(ref), version, "org--x", "default")
    killed = folder / f"{x.digest}-{host}-{dead}-0-cccccccc.json"
    killed.write_text(RunRecord(key=x, started=time.time() - 60, model_id="org/x", window=True, open=True).to_json())
    with caplog.at_level("WARNING", logger="optimum_neuron_cache"):
        with hub_neuronx_cache("org/y", compiler_version=version, bucket=ref, cache_dir=cache) as y:
            pass
    assert [r.getMessage() for r in caplog.records if "journal" in r.getMessage()] == []
    assert y.recovered == [] and not killed.exists()
    sealed = killed.with_name(killed.name[:-len(".json")] + ".closed.json")
    record = json.loads(sealed.read_text())
    assert record["open"] is False and record["sealed"] is not None
    with hub_neuronx_cache("org/x", compiler_version=version, bucket=ref, cache_dir=cache) as run:
        pass
    modules = {module_name(version, graph) for graph in graphs}
    assert {key.rsplit("/", 1)[1] for key in run.recovered} == modules
    area = f"neuronxcc-{version}/models/org--x/default"
    assert {f"{area}/{m}/model.done" for m in modules} <= _committed(ref)
    assert not sealed.exists() and len(list(folder.iterdir())) == 50  # the leftovers of other models stay theirs


NOBODY = 65534

SHARED_ENTER = """
import json, os, sys
from optimum_neuron_cache import hub_neuronx_cache
spec = json.loads(sys.argv[1])
os.setgid(spec["uid"])
os.setuid(spec["uid"])
with hub_neuronx_cache("org/m", compiler_version=spec["version"], bucket=spec["bucket"],
                       cache_dir=spec["cache"]) as run:
    pass
print(json.dumps({"enabled": run.enabled, "warnings": run.warnings, "fetched": run.fetched}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="playing another user needs root (os.setuid)")
@pytest.mark.parametrize("state", ["made by its first user", "not made yet"])
def test_another_users_cache_root_turns_sync_off_with_a_line_that_says_what_to_do(tmp_path, version, state):
    """A compile cache root made 0755 by its first user: another user's run cannot write its state there. It says
    so in one line that is true (nothing it compiles is published by a later run of its own) and says what to do,
    instead of failing at each step and promising a later run will publish; the body runs."""
    ref = _dir_bucket(tmp_path)
    shared = Path(tempfile.mkdtemp(prefix="onc-shared-root-", dir="/tmp"))  # tmp_path's parents are root's, 0700
    try:
        shared.chmod(0o755)
        _another_users_run(shared / "cache", ref, version, state)
    finally:
        shutil.rmtree(shared)


def _another_users_run(cache: Path, ref: BucketRef, version: str, state: str) -> None:
    cache.mkdir(mode=0o755)
    if state == "made by its first user":
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=ref, cache_dir=cache) as first:
            compile_graph(cache, version, make_graphs(1, seed="first user")[0])
        assert len(first.synced) == 1 and (cache / STATE_DIR_NAME).stat().st_mode & 0o777 == 0o755
    spec = {"uid": NOBODY, "version": version, "bucket": ref.location, "cache": str(cache)}
    done = subprocess.run([sys.executable, "-c", SHARED_ENTER, json.dumps(spec)], env=_env(), capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    [line] = run["warnings"]
    assert run["enabled"] is False and line.startswith("bucket sync is off: ")
    assert "another user's" in line and f"uid {NOBODY}" in line and "uid 0" in line
    assert "neither fetches nor publishes" in line and f"neuron-cache sync --cache-dir {cache}" in line
    assert "NEURON_COMPILE_CACHE_URL" in line and "later run" not in line
    if state == "made by its first user":  # nothing of the other user's was written into the first one's state
        assert {path.stat().st_uid for path in (cache / STATE_DIR_NAME).rglob("*")} == {0}


SHARED_SESSION = """
import json, os, sys
from optimum_neuron_cache.integrations.ranks import RankInfo
from optimum_neuron_cache.integrations.session import TrainingCacheSession
spec = json.loads(sys.argv[1])
os.setgid(spec["uid"])
os.setuid(spec["uid"])
kwargs = dict(bucket=spec["bucket"], cache_dir=spec["cache"], compiler_version=spec["version"], wait_timeout=30)
rank0 = TrainingCacheSession("org/m", ranks=RankInfo(local_rank=0, world_size=2, local_world_size=2), **kwargs)
rank0.begin()
rank1 = TrainingCacheSession("org/m", ranks=RankInfo(rank=1, local_rank=1, world_size=2, local_world_size=2), **kwargs)
one = rank1.begin()
print(json.dumps({"zero": rank0.run.warnings, "one": one.warnings, "waited": one.wait_outcome}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="playing another user needs root (os.setuid)")
def test_a_training_session_on_another_users_cache_root_neither_fails_nor_waits(tmp_path, version):
    """Local rank 0 of a training session on another user's root goes on with the same line (it raised on the
    state folder before), and the other ranks do not wait for a fetch that cannot happen."""
    ref = _dir_bucket(tmp_path)
    shared = Path(tempfile.mkdtemp(prefix="onc-shared-root-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        cache = shared / "cache"
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=ref, cache_dir=cache):
            compile_graph(cache, version, make_graphs(1, seed="first user")[0])
        spec = {"uid": NOBODY, "version": version, "bucket": ref.location, "cache": str(cache)}
        done = subprocess.run([sys.executable, "-c", SHARED_SESSION, json.dumps(spec)], env=_env(),
                              capture_output=True, text=True, timeout=HANG_GUARD_S)
    finally:
        shutil.rmtree(shared)
    assert done.returncode == 0, done.stderr
    ranks = json.loads(done.stdout)
    assert ranks["waited"] is None
    for warnings in (ranks["zero"], ranks["one"]):
        [line] = warnings
        assert line.startswith("bucket sync is off: ") and "another user's" in line

def test_a_cache_root_of_ones_own_is_never_taken_for_another_users(tmp_path, version):
    from optimum_neuron_cache.host_state import foreign_state

    cache = tmp_path / "cache"
    assert foreign_state(cache) is None  # not made yet: this run makes it
    cache.mkdir()
    assert foreign_state(cache) is None
    (cache / STATE_DIR_NAME).mkdir()
    assert foreign_state(cache) is None
