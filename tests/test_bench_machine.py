"""The benchmark tells a busy machine from its own work: other processes' CPU is flagged, its own process
tree's (a server orphaned by the worker that spawned it included) is counted as its own.

Each case runs the measurement in a fresh process (it makes itself a subreaper and reaps every child), and
every wait is on a process's end or a pipe's close, not a sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.machine import BUSY_SHARE, machine_busy_s

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(machine_busy_s() is None, reason="needs /proc/stat (Linux)")

#: Burns this much CPU, then exits.
BURN = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"

MEASURE = textwrap.dedent("""
    import json, os, subprocess, sys
    from bench.machine import MachineMark, adopt_orphans, others_share
    assert adopt_orphans()
    mark = MachineMark.now()
    if sys.argv[1] == "orphan":
        # A child that starts a burner and exits at once: the burner is orphaned, and adopted by this process.
        launcher = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True)"
        subprocess.run([sys.executable, "-c", launcher, sys.argv[2]], check=True)
        os.waitpid(-1, 0)  # the adopted burner's end
    else:
        # A burner that is not ours: start it, then wait until it closes the pipe it holds (its end).
        os.write(int(sys.argv[3]), b"go")
        os.read(int(sys.argv[2]), 1)
    share = others_share(mark, os.cpu_count() or 1)  # reaps the adopted burner first
    print(json.dumps({"others_share": share, "own_cpu_s": MachineMark.now().own_s - mark.own_s}))
""")


def _measure(*args: str, pass_fds: tuple[int, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], env=env, pass_fds=pass_fds, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


def test_an_orphaned_descendant_counts_as_the_benchmarks_own():
    # Its 0.6 s of CPU is the benchmark's own, not another process's (whatever else the machine runs meanwhile).
    assert _measure("orphan", BURN)["own_cpu_s"] >= 0.55


def test_a_process_outside_the_benchmark_makes_the_run_busy():
    read_end, write_end = os.pipe()
    go_read, go_write = os.pipe()
    wait_go = f"import os\nos.read({go_read}, 1)\n"
    burner = subprocess.Popen([sys.executable, "-c", wait_go + BURN], pass_fds=(write_end, go_read))
    os.close(write_end)  # the burner holds the only write end: its exit closes the pipe
    os.close(go_read)
    try:
        share = _measure("foreign", str(read_end), str(go_write), pass_fds=(read_end, go_write))["others_share"]
    finally:
        os.close(read_end)
        os.close(go_write)
        burner.wait()
    assert share > BUSY_SHARE


def test_free_page_reporting_is_read_where_the_kernel_has_it_and_counted_where_it_counts(tmp_path):
    """Mainline kernels show only the order; some VMs' kernels count passes and reported KiB beside it; bare
    metal has no such folder. The benchmark reports MB handed to the host only where it is counted."""
    from bench.machine import PageReporting, page_reporting, reported_mb

    assert page_reporting(tmp_path / "absent") is None
    (tmp_path / "page_reporting_order").write_text("9\n")
    mainline = page_reporting(tmp_path)
    assert mainline == PageReporting(9, None, None) and reported_mb(mainline, mainline) is None
    (tmp_path / "passes").write_text("8032\n")
    (tmp_path / "reported_kib").write_text("952885848\n")
    before = page_reporting(tmp_path)
    (tmp_path / "reported_kib").write_text(str(952885848 + 120 * 1024) + "\n")
    assert before == PageReporting(9, 8032, 952885848) and reported_mb(before, page_reporting(tmp_path)) == 120.0
    (tmp_path / "reported_kib").write_text("garbage\n")
    assert page_reporting(tmp_path).reported_kib is None and reported_mb(before, page_reporting(tmp_path)) is None


@pytest.mark.parametrize("setting", ["1", ""])
def test_the_benchmark_says_when_python_writes_no_bytecode(setting, tmp_path):
    """Under PYTHONDONTWRITEBYTECODE (set on the development VM, and in AWS's Neuron container examples) every
    module nobody compiled is compiled again at each start: the cold-start and import figures include it, and
    the report says so."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path)  # whatever it writes stays out of the checkout
    if setting:
        env["PYTHONDONTWRITEBYTECODE"] = setting
    script = ("import json; from bench.__main__ import environment; from bench.report import render; "
              "env = environment(); print(json.dumps([env['writes_bytecode'], "
              "render({'command': 'x', 'environment': env, 'figures': []})]))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    writes, report = json.loads(out.stdout)
    assert writes is (not setting)
    assert ("PYTHONDONTWRITEBYTECODE is set" in report) is bool(setting)
