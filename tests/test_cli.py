"""`neuron-cache`, every command, through the real bucket server, on the emulator (hf) and a directory bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bucket_server import PROTOCOL_VERSION
from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef, read_saved_bucket
from optimum_neuron_cache.cli import cli
from optimum_neuron_cache.client import BucketClient, running_server
from optimum_neuron_cache.compile_locks import running_compilers
from optimum_neuron_cache.local_cache import EntryState, scan_entries
from optimum_neuron_cache.lookup import clear_lookup_cache
from optimum_neuron_cache.maintenance import execute_cleanup, plan_cleanup
from optimum_neuron_cache.stats import Stats, record_run
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, compile_graph, make_graphs
from tests.polling import wait_until
from tests.terminal import on_terminal

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, (result.output, result.stderr if hasattr(result, "stderr") else "")
    return result.output


@pytest.fixture(params=["hf", "dir"])
def bucket(request, tmp_path) -> str:
    clear_lookup_cache()
    if request.param == "hf":
        request.getfixturevalue("hub")
        return "hf://buckets/test-org/cli-cache"
    return str(tmp_path / "dir-bucket")


def test_create_and_set(bucket):
    out = run("create", bucket)
    assert out.startswith("created: ") and "default bucket:" in out
    assert read_saved_bucket() is not None
    assert run("create", bucket).startswith("exists: ")  # exists-ok
    assert "default bucket unset" in run("set", "--unset")
    assert read_saved_bucket() is None
    run("set", bucket)
    assert read_saved_bucket() is not None
    run("set", code=2)  # neither a bucket nor --unset


def test_sync_fetch_ls_and_status(tmp_path, bucket, version):
    run("create", bucket)
    a, b = tmp_path / "A", tmp_path / "B"
    for graph in make_graphs(3, seed="cli"):
        compile_graph(a, version, graph)
    with pytest.raises(CompileFailed):
        compile_graph(a, version, make_graphs(1, seed="bad")[0], outcome="failed")
    out = run("sync", "--cache-dir", str(a), "--to-model", "Org/CLI-Model", "--task", "text-generation", "--dry-run")
    assert out.count("would publish neuronxcc-") == 3 and "-> flat + Org--CLI-Model/text-generation" in out
    # sync's --model attributed entries (a filter elsewhere): --to-model now; the old name works and says so.
    assert run("sync", "--cache-dir", str(a), "--model", "Org/CLI-Model", "--task", "text-generation",
               "--dry-run") == "note: --model is now --to-model (the old name still works)\n" + out
    run("sync", "--cache-dir", str(a), "--model", "org/x", "--to-model", "org/y", "--dry-run", code=2)
    assert BucketClient(_ref(bucket)).list("", recursive=True) == []  # a dry run changes nothing
    out = run("sync", "--cache-dir", str(a), "--to-model", "Org/CLI-Model", "--task", "text-generation")
    assert "published 3 entries" in out
    assert "nothing to publish" in run("sync", "--cache-dir", str(a))

    out = run("ls")
    assert f"{version}  (flat)" in out and "Org--CLI-Model/text-generation  3" in out
    listing = json.loads(run("ls", "--json", "--model", "org/cli-model"))
    assert [(row["area"], row["entries"]) for row in listing] == [("Org--CLI-Model/text-generation", 3)]

    compile_graph(b, version, make_graphs(3, seed="cli")[0])  # one entry already here
    out = run("fetch", "org/cli-model", "--task", "text-generation", "--cache-dir", str(b), "--compiler-version", version,
              "--dry-run")
    assert out.count("install  neuronxcc-") == 2 and out.count("present  neuronxcc-") == 1
    assert "missing here" in out and "would fetch 2 entries" in out
    assert len(scan_entries(b, version)) == 1  # a dry run changes nothing
    out = run("fetch", "org/cli-model", "--task", "text-generation", "--cache-dir", str(b), "--compiler-version", version)
    assert out.startswith("fetched 2 entries") and "1 already present" in out
    assert [e.state for e in scan_entries(b, version)] == [EntryState.SUCCESS] * 3
    assert "fetched 0 entries" in run("fetch", "org/cli-model", "--task", "text-generation", "--cache-dir", str(b), "--compiler-version", version)
    assert "nothing to fetch" in run("fetch", "org/other", "--cache-dir", str(b), "--compiler-version", version)

    status = json.loads(run("status", "--cache-dir", str(a), "--json"))
    assert status["versions"] == [{"compiler_version": version, "states": {"success": 3, "failed": 1}, "bytes": status["versions"][0]["bytes"]}]
    assert "neuronx-cc not installed" in run("status", "--cache-dir", str(a))


def _ref(bucket: str) -> BucketRef:
    from optimum_neuron_cache.buckets import parse_bucket

    return parse_bucket(bucket)


def test_lookup_lists_records_and_filters(tmp_path, bucket, version, monkeypatch):
    run("create", bucket)
    monkeypatch.setenv("NEURON_CC_FLAGS", "--model-type=transformer --cache_dir=/x")
    for batch in (1, 4):
        config = {"batch_size": batch, "sequence_length": 2048, "tensor_parallel_size": 2, "auto_cast_type": "bf16", "target": "trn1"}
        with hub_neuronx_cache("Org/Look", "text-generation", config, compiler_version=version, cache_dir=tmp_path / "A"):
            compile_graph(tmp_path / "A", version, make_graphs(1, seed=f"look-{batch}")[0])
    records = json.loads(run("lookup", "org/look", "--compiler-version", version, "--json"))
    assert sorted(r["export_config"]["batch_size"] for r in records) == [1, 4]
    assert all(r["compile_flags"] == ["--model-type=transformer"] and r["model_id"] == "Org/Look" for r in records)
    clear_lookup_cache()
    only = json.loads(run("lookup", "org/look", "--all-versions", "--batch-size", "4", "--dtype", "BF16", "--target", "trn1", "--json"))
    assert [r["export_config"]["batch_size"] for r in only] == [4]
    assert json.loads(run("lookup", "org/look", "--compiler-version", version, "--sequence-length", "4096", "--json")) == []
    out = run("lookup", "Org/Look", "--task", "text-generation", "--compiler-version", version)
    assert "batch_size=1" in out and "flags: --model-type=transformer" in out
    assert "no cached configuration" in run("lookup", "org/absent", "--compiler-version", version)


def test_lookup_costs_an_exports_listing_and_one_download_and_is_memoized(tmp_path, version):
    from optimum_neuron_cache.lookup import lookup_cache

    bucket = BucketRef("dir", str(tmp_path / "b"))
    BucketClient(bucket).create()
    with hub_neuronx_cache("org/m", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
        compile_graph(tmp_path / "A", version, make_graphs(1)[0])
    for other in range(20):  # a bigger bucket does not cost lookup more
        with hub_neuronx_cache(f"org/other-{other}", None, {"batch_size": 1}, compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
            pass
    clear_lookup_cache()
    client = BucketClient(bucket)
    assert len(lookup_cache("org/m", "text-generation", compiler_version=version, client=client)) == 1
    assert client.requests == 2
    assert len(lookup_cache("org/m", "text-generation", compiler_version=version, client=client, batch_size=1)) == 1
    assert client.requests == 2  # memoized


def test_malformed_records_are_ignored_with_a_warning(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "b"))
    BucketClient(bucket).create()
    exports = Path(bucket.location) / f"neuronxcc-{version}/models/org--m/default/exports"
    exports.mkdir(parents=True)
    (exports / "0123456789abcdef.json").write_text("{not json")
    (exports / "fedcba9876543210.json").write_text(json.dumps({"model_id": "org/m", "task": "default", "compiler_version": version,
                                                                "export_config": {}, "compile_flags": "oops"}))
    result = CliRunner().invoke(cli, ["lookup", "org/m", "--bucket", bucket.location, "--compiler-version", version])
    assert result.exit_code == 0 and "no cached configuration" in result.output


def test_cleanup_removes_failures_and_stale_locks_but_not_while_a_compiler_runs(tmp_path, version):
    """The plan, given which compilers run (the CLI passes the host's): no test depends on the host's processes."""
    root = tmp_path / "cache"
    ok, bad, crashed = make_graphs(3, seed="cleanup")
    compile_graph(root, version, ok)
    with pytest.raises(CompileFailed):
        compile_graph(root, version, bad, outcome="failed")
    compile_graph(root, version, crashed, outcome="crash")
    compile_graph(root, "2.19.1.0+abc", ok)
    states = lambda: {e.state for e in scan_entries(root, version)}  # noqa: E731
    plan = plan_cleanup(root, failed=True, locks=True, old_versions=False, keep_version=None, compilers=[])
    assert sorted(removal.reason for removal in plan.removals) == ["failed compile (cached failure)", "stale lock"]
    assert states() == {EntryState.SUCCESS, EntryState.FAILED, EntryState.LOCKED}  # a plan removes nothing
    # A running neuronx-cc: its lock may be live, so locks are left alone, failures still go.
    running = plan_cleanup(root, failed=True, locks=True, old_versions=False, keep_version=None, compilers=[4242])
    assert [removal.reason for removal in running.removals] == ["failed compile (cached failure)"]
    assert running.refused == ["stale locks left alone: neuronx-cc is running on this host (pid 4242)"]
    execute_cleanup(running)
    assert states() == {EntryState.SUCCESS, EntryState.LOCKED}
    execute_cleanup(plan_cleanup(root, failed=False, locks=True, old_versions=False, keep_version=None, compilers=[]))
    assert states() == {EntryState.SUCCESS, EntryState.TODO}
    run("cleanup", "--cache-dir", str(root), "--old-versions", "--compiler-version", version, "--yes")
    assert [v.name for v in root.iterdir() if v.name.startswith("neuronxcc-")] == [f"neuronxcc-{version}"]


def test_cleanup_leaves_locks_alone_while_neuronx_cc_runs_and_a_preview_exits_0(tmp_path, version):
    """A neuronx-cc running on the host (a fake one here, certain to run whatever else the host runs): the lock
    stays, the run says why and exits 1; a preview says the same and exits 0 (it did what was asked)."""
    root = tmp_path / "cache"
    compile_graph(root, version, make_graphs(1, seed="live-lock")[0], outcome="crash")
    fake = tmp_path / "bin" / "neuronx-cc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nsleep 600\n")  # killed below; alive however slowly the cleanup runs
    fake.chmod(0o755)
    proc = subprocess.Popen([str(fake)])
    try:
        wait_until(lambda: proc.pid in running_compilers(), "the fake neuronx-cc to show in /proc")
        preview = CliRunner().invoke(cli, ["cleanup", "--cache-dir", str(root), "--dry-run"])
        assert preview.exit_code == 0 and "neuronx-cc is running" in preview.output, preview.output
        result = CliRunner().invoke(cli, ["cleanup", "--cache-dir", str(root), "--yes"])
        assert result.exit_code == 1 and "neuronx-cc is running" in result.output
    finally:
        proc.kill()
        proc.wait()
    assert {e.state for e in scan_entries(root, version)} == {EntryState.LOCKED}


def test_server_status_and_stop(tmp_path):
    assert "no bucket server is running" in run("server", "status")
    run("create", str(tmp_path / "b"))
    out = run("server", "status")
    assert "pid: " in out and "socket: " in out and f"protocol {PROTOCOL_VERSION}" in out and "idle: " in out
    assert run("server", "stop").strip() == "stopped the bucket server"
    assert running_server() is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fetch", "not a/model/id", "--compiler-version", "2.21.33363.0"], "is not a Hub model id"),
        (["fetch", "org/m"], "cannot tell the neuronx-cc version"),
        (["fetch", "org/m", "--compiler-version", "latest"], "not a neuronx-cc version"),
        (["create", "s3://nope/x"], "unsupported scheme"),
        (["lookup", "org/m", "--bucket", "just-a-name"], "is not a Hub bucket id"),
        (["sync", "--task", "x"], "--task goes with --to-model"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_remote_failure_is_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(cli, ["ls", "--bucket", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.startswith("error: directory bucket") and result.output.count("\n") == 1
    result = CliRunner().invoke(cli, ["--debug", "ls", "--bucket", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.exception is not None  # --debug lets the traceback through


def _cli_process(args: list[str], **kwargs) -> list[str]:
    return [sys.executable, "-m", "optimum_neuron_cache", *args]


def test_progress_bars_on_a_terminal_and_plain_output_otherwise(tmp_path, version):
    bucket = tmp_path / "b"
    run("create", str(bucket))
    graph = make_graphs(1, seed="big", neff_size=64 * 1024 * 1024)[0]
    compile_graph(tmp_path / "A", version, graph)
    run("sync", "--cache-dir", str(tmp_path / "A"), "--to-model", "org/big")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    code, text = on_terminal(_cli_process(["fetch", "org/big", "--cache-dir", str(tmp_path / "B"),
                                           "--compiler-version", version]), env)
    assert code == 0, text
    assert "fetched 1 entry " in text
    assert "B/s" in text  # a tqdm bar with a rate was drawn
    # Not a terminal: plain lines only.
    plain = subprocess.run(_cli_process(["fetch", "org/big", "--cache-dir", str(tmp_path / "C"), "--compiler-version", version]),
                           env=env, capture_output=True, text=True, check=True)
    assert plain.stderr == "" and plain.stdout.startswith("fetched 1 entry ")
    quiet = subprocess.run(_cli_process(["-q", "fetch", "org/big", "--cache-dir", str(tmp_path / "D"), "--compiler-version", version]),
                           env=env, capture_output=True, text=True, check=True)
    assert quiet.stdout == ""


def test_ctrl_c_during_fetch_leaves_no_partial_entry(tmp_path, hub, version):
    run("create", "test/ctrlc")
    for graph in make_graphs(2, seed="ctrl-c"):
        compile_graph(tmp_path / "A", version, graph)
    run("sync", "--bucket", "test/ctrlc", "--cache-dir", str(tmp_path / "A"), "--to-model", "org/m")
    hub.add_fault("HEAD", r"/resolve/", 0, delay=5.0, times=None)  # the transfer hangs: the user presses Ctrl-C
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli_process(["fetch", "org/m", "--bucket", "test/ctrlc", "--cache-dir", str(tmp_path / "B"),
                                          "--compiler-version", version]), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: hub.requests.count("HEAD", r"/resolve/") > 0, "the fetch's download to reach the Hub")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert scan_entries(tmp_path / "B", version) == []
    hub.clear_faults()
    # The next run heals: leftovers of the interrupted one are cleaned, the entries fetched.
    assert run("fetch", "org/m", "--bucket", "test/ctrlc", "--cache-dir", str(tmp_path / "B"), "--compiler-version", version).startswith("fetched 2 entries")
    # The interrupted run's download may still be running in the server (its requests were held 5 s): once it
    # ends, nothing of it is left either.
    wait_until(lambda: (running_server() or {}).get("requests", 0) == 0, "the server to end the interrupted download")
    assert not any((tmp_path / "B" / ".optimum-neuron-cache" / "tmp").iterdir())


def test_missing_bucket_and_read_only_token_are_one_line_errors(tmp_path, monkeypatch, version):
    from optimum_neuron_cache.client import stop_server
    from hub_emulator import HubEmulator, TokenInfo

    emulator = HubEmulator(tmp_path / "hub", tokens={"hf_writer": TokenInfo("team"), "hf_reader": TokenInfo("team", write=False)})
    emulator.start()
    monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
    try:
        monkeypatch.setenv("HF_TOKEN", "hf_writer")
        run("create", "team/cache")
        result = CliRunner().invoke(cli, ["ls", "--bucket", "team/absent"])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and "bucket not found" in result.output
        compile_graph(tmp_path / "A", version, make_graphs(1)[0])
        monkeypatch.setenv("HF_TOKEN", "hf_reader")
        result = CliRunner().invoke(cli, ["sync", "--bucket", "team/cache", "--cache-dir", str(tmp_path / "A")])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "403 Forbidden" in result.output and "hf_reader" not in result.output, result.output  # never the token
    finally:
        stop_server()
        emulator.stop()


# ------------------------------------------------------------------- bad input: one line, exit 2 (issue 16, section 6)


def _refused(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run the real CLI; it must exit 2 with exactly one `error:` line on stderr and no traceback."""
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


VERSION_COMMANDS = [["fetch", "org/m"], ["lookup", "org/m"], ["ls"], ["explain", "org/m"], ["sync"], ["cleanup"],
                    ["prune", "--drop-model", "org/m"]]


def test_compiler_version_latest_is_refused_the_same_way_by_every_command_that_takes_it():
    messages = {_refused([*command, "--compiler-version", "latest"]) for command in VERSION_COMMANDS}
    assert messages == {"error: compiler version 'latest' from --compiler-version is not a neuronx-cc version "
                        "(expected e.g. 2.21.33363.0+82129205, as printed by `neuronx-cc --version`)"}


def test_a_cache_dir_that_is_a_file_or_cannot_be_created(tmp_path, version):
    bucket = str(tmp_path / "bucket")
    run("create", bucket)
    afile = tmp_path / "a-file"
    afile.write_text("not a cache")
    fetch = ["fetch", "org/m", "--bucket", bucket, "--compiler-version", version, "--cache-dir"]
    assert _refused([*fetch, str(afile)]) == f"error: the compile cache dir {afile} (from --cache-dir) is not a directory: pass a directory"
    assert _refused([*fetch, "/proc/x"]).startswith("error: cannot create the compile cache dir /proc/x (from --cache-dir): ")
    assert _refused([*fetch, str(afile / "under")]).startswith("error: cannot create the compile cache dir ")  # under a file
    assert "is not a directory" in _refused(["status", "--cache-dir", str(afile)])
    assert "is not a directory" in _refused(["sync", "--bucket", bucket, "--cache-dir", str(afile)])
    assert "is not a directory" in _refused(["cleanup", "--cache-dir", str(afile)])
    assert afile.read_text() == "not a cache"


def test_a_cache_dir_from_the_environment_is_named_by_its_source(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("")
    line = _refused(["status"], env={"NEURON_COMPILE_CACHE_URL": str(afile)})
    assert line == f"error: the compile cache dir {afile} (from NEURON_COMPILE_CACHE_URL) is not a directory: pass a directory"


def test_a_bucket_path_that_is_a_file_is_not_a_directory(tmp_path):
    afile = tmp_path / "bucket-file"
    afile.write_text("")
    for args in (["ls", "--bucket", str(afile)], ["create", str(afile)], ["lookup", "org/m", "--bucket", str(afile)]):
        line = _refused(args)
        assert line.startswith(f"error: bucket {afile} is not a directory") and "does not exist" not in line, line
    assert running_server() is None  # refused before any request


@pytest.mark.parametrize("variable", ["NEURON_CACHE_LOCK_TIMEOUT", "NEURON_CACHE_REQUEST_TIMEOUT",
                                      "NEURON_CACHE_SERVER_START_TIMEOUT", "NEURON_CACHE_RETRY_BUDGET"])
def test_a_bad_duration_in_the_environment_is_one_line(tmp_path, version, variable):
    bucket = str(tmp_path / "bucket")
    line = _refused(["fetch", "org/m", "--bucket", bucket, "--compiler-version", version, "--cache-dir", str(tmp_path / "c")],
                    env={variable: "abc"})
    assert line.startswith(f"error: {variable}='abc' is not a duration") and "set it to e.g." in line


def test_bad_input_through_the_installed_entry_point(tmp_path):
    """The same, from a real process: exit code 2 and one line on stderr, nothing on stdout."""
    afile = tmp_path / "a-file"
    afile.write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEURON_CACHE_LOCK_TIMEOUT": "abc"}
    for args, expected in ((["fetch", "org/m", "--compiler-version", "2.21.33363.0+82129205", "--cache-dir", str(afile)], "is not a directory"),
                           (["fetch", "org/m", "--compiler-version", "2.21.33363.0+82129205", "--cache-dir", str(tmp_path / "c"),
                             "--bucket", str(tmp_path / "b")], "NEURON_CACHE_LOCK_TIMEOUT='abc'")):
        proc = subprocess.run(_cli_process(args), env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert len(proc.stderr.splitlines()) == 1 and expected in proc.stderr, proc.stderr


def test_a_refusing_disk_is_one_line_and_exit_1(tmp_path):
    home = tmp_path / "hf-home-is-a-file"
    home.write_text("")
    result = CliRunner().invoke(cli, ["set", str(tmp_path / "bucket")], env={"HF_HOME": str(home)})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_create_makes_a_private_bucket_and_saves_the_id_the_hub_gave(hub):
    """`create` is private unless --public (as optimum-cli's), and saves the bucket under the id the Hub returned:
    `me/x` is created in the caller's namespace, and later commands must find it there."""
    out = run("create", "me/private-one")
    assert "the Hub names hf://buckets/me/private-one hf://buckets/" in out
    saved = read_saved_bucket()
    assert saved is not None and saved.endswith("/private-one") and not saved.startswith("me/"), saved
    assert BucketClient(_ref(saved)).info()["private"] is True
    run("ls")  # the saved id is one the Hub knows
    run("create", "me/public-one", "--public")
    public = read_saved_bucket()
    assert public is not None and BucketClient(_ref(public)).info()["private"] is False
    run("create", "me/x", "--public", "--private", code=2)


def test_status_says_what_the_cache_will_do_and_where_each_value_came_from(tmp_path, monkeypatch, version):
    """`status` is the `hf env` / `ccache -p` of the cache: the bucket, cache dir, compiler and target in force,
    each with its source, every variable that is set (a token never printed), and the host's hit rate."""
    monkeypatch.delenv("NEURON_PLATFORM_TARGET_OVERRIDE", raising=False)
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    monkeypatch.setenv("NEURON_CACHE_LOCK_TIMEOUT", "30")
    monkeypatch.setenv("HF_TOKEN", "hf_never_printed")
    cache = tmp_path / "cache"
    cache.mkdir()
    out = run("status", "--cache-dir", str(cache))
    assert "(embedded default)" in out.splitlines()[0]
    assert f"cache dir: {cache} (argument)" in out
    assert f"compiler: {version} (NEURON_CC_VERSION)" in out
    assert "target: unknown (not a Neuron instance" in out
    assert "NEURON_CACHE_LOCK_TIMEOUT: 30 (environment)" in out
    assert "HF_TOKEN: (set, not shown)" in out and "hf_never_printed" not in out
    run("set", str(tmp_path / "team-bucket"))
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")
    record_run(Stats(hits=3, misses=1))
    data = json.loads(run("status", "--cache-dir", str(cache), "--json"))
    rows = {row["name"]: row for row in data["configuration"]}
    assert rows["bucket"]["value"] == str(tmp_path / "team-bucket") and rows["bucket"]["source"].startswith("saved in ")
    assert rows["target"] == {"name": "target", "value": "trn2", "source": "NEURON_PLATFORM_TARGET_OVERRIDE"}
    assert data["hit_rate"] == 0.75 and "hf_never_printed" not in json.dumps(data)


def test_errors_have_one_style_and_quiet_goes_anywhere(tmp_path, version):
    """click's own errors read like the project's (`error: ...`, no usage block), and `-q` is accepted after the
    subcommand as before it."""
    for args, wanted in ((["lookup"], "error: Missing argument 'MODEL_ID' (see `neuron-cache lookup --help`)"),
                         (["nosuch"], "error: No such command 'nosuch' (see `neuron-cache --help`)"),
                         (["lookup", "org/m", "--batch-size", "x"], "error: Invalid value for '--batch-size'")):
        result = CliRunner().invoke(cli, args, prog_name="neuron-cache")
        assert result.exit_code == 2 and result.output.startswith(wanted), result.output
        assert "Usage:" not in result.output and "Error:" not in result.output
    root = tmp_path / "cache"
    compile_graph(root, version, make_graphs(1, seed="quiet")[0])
    bucket = str(tmp_path / "b")
    run("create", bucket)
    assert run("sync", "--cache-dir", str(root), "--bucket", bucket, "--compiler-version", version, "-q") == ""
    assert run("-q", "fetch", "org/m", "--cache-dir", str(root), "--bucket", bucket, "--compiler-version", version) == ""


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, version):
    """`neuron-cache ... | head -1`: the reader stops reading; no `[Errno 32] Broken pipe`, no traceback."""
    root = tmp_path / "cache" / f"neuronxcc-{version}"
    for index in range(1500):  # far more output than a pipe holds
        entry = root / f"MODULE_{index}+e30acd3a"
        entry.mkdir(parents=True)
        (entry / "model.log").write_text("failed")
    env = {**os.environ, "NEURON_CC_VERSION": version}
    command = [sys.executable, "-m", "optimum_neuron_cache", "cleanup", "--cache-dir", str(tmp_path / "cache"),
               "--dry-run"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"would remove ")
    proc.stdout.close()  # as `head -1` does
    _, err = proc.communicate(timeout=60)
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"error" not in err, err


def _on_a_terminal(args: list[str], answer: bytes) -> tuple[int, str]:
    """Run the CLI on a terminal, answer its question, and return (exit code, output)."""
    return on_terminal(_cli_process(args), {**os.environ, "PYTHONPATH": str(REPO)}, answer=answer, timeout=60)


def test_commands_that_remove_show_the_plan_then_ask_on_a_terminal_and_only_show_it_elsewhere(tmp_path, version):
    """One rule for cleanup, prune and scrub --repair: the plan first; on a terminal a question (no by default);
    --yes acts without asking; with no terminal and no --yes, the plan is only shown and the exit code is 0."""
    root = tmp_path / "cache"
    for seed in ("one", "two"):
        with pytest.raises(CompileFailed):
            compile_graph(root, version, make_graphs(1, seed=seed)[0], outcome="failed")
    failed = lambda: sum(e.state is EntryState.FAILED for e in scan_entries(root, version))  # noqa: E731
    out = run("cleanup", "--cache-dir", str(root), "--failed")  # no terminal here: a preview, exit 0
    assert "would remove" in out and "run again with --yes to remove them" in out and failed() == 2
    code, text = _on_a_terminal(["cleanup", "--cache-dir", str(root), "--failed"], b"n\n")
    assert code == 0 and "remove them (" in text and failed() == 2, text
    code, text = _on_a_terminal(["cleanup", "--cache-dir", str(root), "--failed"], b"y\n")
    assert code == 0 and "freed " in text and failed() == 0, text
    bucket = tmp_path / "b"
    run("create", str(bucket))
    compile_graph(tmp_path / "A", "2.19.1.0+abc", make_graphs(1, seed="old")[0])
    run("sync", "--cache-dir", str(tmp_path / "A"), "--compiler-version", "2.19.1.0+abc", "--bucket", str(bucket))
    compile_graph(tmp_path / "A", version, make_graphs(1, seed="new")[0])
    run("sync", "--cache-dir", str(tmp_path / "A"), "--compiler-version", version, "--bucket", str(bucket))
    prune = ["prune", "--keep-versions", "1", "--bucket", str(bucket)]
    assert "run again with --yes" in run(*prune)
    code, text = _on_a_terminal(prune, b"y\n")
    assert code == 0 and "removed 1 entry" in text, text
    assert "nothing to prune" in run(*prune)


def test_every_command_that_prints_a_result_has_json(tmp_path, version, monkeypatch):
    """sync, explain and cleanup answer in JSON as lookup, ls and status do (import's is in test_import.py)."""
    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)
    root, bucket = tmp_path / "cache", str(tmp_path / "b")
    run("create", bucket)
    compile_graph(root, version, make_graphs(1, seed="json")[0])
    planned = json.loads(run("sync", "--cache-dir", str(root), "--compiler-version", version, "--dry-run", "--json"))
    assert planned["dry_run"] is True and [item["to_flat"] for item in planned["entries"]] == [True]
    done = json.loads(run("sync", "--cache-dir", str(root), "--compiler-version", version, "--to-model", "org/j",
                          "--task", "text-generation", "--json"))
    assert done["entries"][0]["to_model"] == "org--j/text-generation" and done["bytes"] > 0
    with hub_neuronx_cache("org/j", "text-generation", {"batch_size": 2}, compiler_version=version,
                           cache_dir=tmp_path / "other"):
        compile_graph(tmp_path / "other", version, make_graphs(1, seed="json-2")[0])
    explained = json.loads(run("explain", "org/j", "--compiler-version", version, "--batch-size", "4", "--json"))
    assert explained["here"]["compiler_version"] == version
    assert explained["nearest"][0]["differences"] == ["batch_size: bucket 2, here 4"]
    with pytest.raises(CompileFailed):
        compile_graph(root, version, make_graphs(1, seed="json-failed")[0], outcome="failed")
    preview = json.loads(run("cleanup", "--cache-dir", str(root), "--failed", "--json"))  # --json never asks
    assert preview["executed"] is False and [r["reason"] for r in preview["removals"]] == ["failed compile (cached failure)"]
    acted = json.loads(run("cleanup", "--cache-dir", str(root), "--failed", "--json", "--yes"))
    assert acted["executed"] is True and acted["freed"] > 0


def test_ages_are_written_one_way_in_every_command(tmp_path):
    """prune took `30d` and refused `86400`, `leases --older-than` the reverse: both take both now."""
    bucket = str(tmp_path / "b")
    run("create", bucket)
    for age in ("86400", "1d", "24h"):
        assert "nothing to prune" in run("prune", "--incomplete-older-than", age, "--bucket", bucket)
        assert "holds no compile leases" in run("leases", "--sweep", "--older-than", age, "--bucket", bucket, "--yes")
    result = CliRunner().invoke(cli, ["prune", "--incomplete-older-than", "soon", "--bucket", bucket])
    assert result.exit_code == 2 and "--incomplete-older-than 'soon' is not an age" in result.output


def test_fetch_answers_in_json_too(tmp_path, version):
    """`fetch --json`: the plan per task, each entry's action and reason, and what was fetched; nothing else on
    stdout."""
    bucket = str(tmp_path / "b")
    run("create", bucket)
    with hub_neuronx_cache("org/f", "text-generation", {"batch_size": 1}, compiler_version=version,
                           cache_dir=tmp_path / "A", bucket=bucket):
        compile_graph(tmp_path / "A", version, make_graphs(1, seed="fetch-json")[0])
    args = ["fetch", "org/f", "--cache-dir", str(tmp_path / "B"), "--compiler-version", version, "--bucket", bucket]
    planned = json.loads(run(*args, "--dry-run", "--json"))
    assert planned["executed"] is False and [op["action"] for op in planned["tasks"]["text-generation"]] == ["install"]
    done = json.loads(run(*args, "--json"))
    assert done["executed"] is True and len(done["fetched"]) == 1 and done["bytes"] > 0 and done["failed"] == []
