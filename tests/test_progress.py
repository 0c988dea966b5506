"""What a run shows while it fetches or publishes: a bar on a terminal for a big transfer, else one line; one
bar per host however many ranks enter. Runs are subprocesses, on a pseudo-terminal where it matters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.progress import BAR_MIN_BYTES
from tests.terminal import on_terminal as run_on_terminal

REPO = Path(__file__).resolve().parent.parent
#: Two entries whose NEFFs together pass the bar's threshold, and two far below it.
BIG = BAR_MIN_BYTES // 2 + 1_000_000
SMALL = 100_000
#: What only a tqdm bar writes: its rate ("?B/s" in its first drawing, before any rate is known).
RATE, FIRST_DRAWING = "B/s", "?B/s]"

RUN = textwrap.dedent(
    """
    import logging, os, sys, time
    from pathlib import Path
    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.integrations.session import TrainingCacheSession
    from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the run's INFO lines, on stderr
    role, cache, bucket, version, size = sys.argv[1:6]
    go = os.environ.get("GO")
    while go and not Path(go).exists():  # every rank started: they enter together
        time.sleep(0.001)
    if role == "session":  # the trainer callback's way: ranks from LOCAL_RANK, local rank 0 fetches
        with TrainingCacheSession("org/big", "training", bucket=bucket, cache_dir=cache, compiler_version=version):
            pass
    else:
        with hub_neuronx_cache("org/big", "training", compiler_version=version, bucket=bucket, cache_dir=cache):
            if role == "compile":
                for graph in make_graphs(2, seed=f"progress-{size}", neff_size=int(size)):
                    compile_graph(cache, version, graph)
    """
)

RANKS = textwrap.dedent(
    """
    import os, subprocess, sys
    from pathlib import Path
    script, count, go, *args = sys.argv[1:]
    n = int(count)
    procs = [subprocess.Popen([sys.executable, script, *args], env={**os.environ, "GO": go, "RANK": str(i),
             "LOCAL_RANK": str(i), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}) for i in range(n)]
    Path(go).touch()
    sys.exit(max(proc.wait() for proc in procs))
    """
)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, str]:
    """The run script and a directory bucket."""
    script = tmp_path / "run.py"
    script.write_text(RUN)
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    return script, str(bucket)


@pytest.fixture(params=["dir", "hf"])
def any_bucket(request, tmp_path: Path, setup: tuple[Path, str]) -> tuple[Path, str]:
    """The run script and a directory bucket, or a Hub bucket on the emulator."""
    if request.param == "dir":
        return setup
    request.getfixturevalue("hub")
    bucket = BucketRef("hf", "test/progress")
    BucketClient(bucket).create()
    return setup[0], str(bucket)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}


def on_terminal(args: list[str]) -> str:
    """Run `args` with stdout and stderr a terminal of 40x120; what the terminal showed."""
    code, text = run_on_terminal([sys.executable, *args], _env())
    assert code == 0, text
    return text


def not_on_terminal(args: list[str]) -> str:
    """Run `args` with stderr a pipe (a job's log file); its stderr."""
    done = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_big_publish_and_fetch_draw_a_bar_on_a_terminal(tmp_path, any_bucket, version):
    script, bucket = any_bucket
    shown = on_terminal([str(script), "compile", str(tmp_path / "A"), bucket, version, str(BIG)])
    assert "neuron-cache publish" in shown and RATE in shown  # a tqdm bar with its rate
    assert "published 2 entries (" in shown  # and the line that stays when it is gone
    shown = on_terminal([str(script), "fetch", str(tmp_path / "B"), bucket, version, str(BIG)])
    assert "neuron-cache fetch" in shown and RATE in shown
    assert "fetched 2 entries (" in shown


def test_a_big_run_writes_one_line_and_no_bar_when_stderr_is_not_a_terminal(tmp_path, setup, version):
    script, bucket = setup
    log = not_on_terminal([str(script), "compile", str(tmp_path / "A"), bucket, version, str(BIG)])
    assert "\r" not in log and RATE not in log and "neuron-cache publish" not in log
    assert log.count("optimum-neuron-cache: published 2 entries (10") == 1 and log.count("published") == 1
    log = not_on_terminal([str(script), "fetch", str(tmp_path / "B"), bucket, version, str(BIG)])
    assert "\r" not in log and RATE not in log and "neuron-cache fetch" not in log
    assert log.count("optimum-neuron-cache: fetched 2 entries (10") == 1 and log.count("fetched") == 1


def test_a_small_run_draws_no_bar_even_on_a_terminal(tmp_path, setup, version):
    script, bucket = setup
    shown = on_terminal([str(script), "compile", str(tmp_path / "A"), bucket, version, str(SMALL)])
    assert RATE not in shown and "neuron-cache publish" not in shown
    assert shown.count("optimum-neuron-cache: published 2 entries (2") == 1  # the line only
    shown = on_terminal([str(script), "fetch", str(tmp_path / "B"), bucket, version, str(SMALL)])
    assert RATE not in shown and "neuron-cache fetch" not in shown
    assert shown.count("optimum-neuron-cache: fetched 2 entries (2") == 1


@pytest.mark.parametrize("role", ["fetch", "session"])
def test_ranks_entering_together_on_one_terminal_draw_one_bar(tmp_path, setup, version, role):
    script, bucket = setup
    not_on_terminal([str(script), "compile", str(tmp_path / "A"), bucket, version, str(BIG)])
    launcher = tmp_path / "ranks.py"
    launcher.write_text(RANKS)
    shown = on_terminal([str(launcher), str(script), "4", str(tmp_path / "go"), role, str(tmp_path / "B"), bucket,
                         version, str(BIG)])
    assert shown.count(FIRST_DRAWING) == 1, shown  # the host's fetcher drew the one bar; the others waited
    assert shown.count("fetched 2 entries (") == 1, shown  # and only it says what it fetched
