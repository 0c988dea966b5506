"""Buckets hold whatever someone put there, and local caches hold whatever crashed: nothing bad is ever
written, followed, or uploaded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


from optimum_neuron_cache import hub_neuronx_cache
from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

REPO = Path(__file__).resolve().parent.parent
BUCKET = "test/hostile"


def test_hostile_remote_paths_are_never_written(tmp_path, hub, version):
    """Paths in a listing that escape the cache root, are not MODULE entries, or are not allow-listed."""
    client = BucketClient(BucketRef("hf", BUCKET))
    client.create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "A") as run:
        compile_graph(tmp_path / "A", version, make_graphs(1)[0])
    area = f"neuronxcc-{version}/models/org--m/default"
    good = next(path for path in hub._buckets[BUCKET].files if path.startswith(area) and path.endswith("model.neff"))
    stored = hub._buckets[BUCKET].files[good]
    with hub._lock:
        for evil in (f"{area}/MODULE_1+a/../../../../escaped", f"{area}/../../../../etc/x", f"{area}/MODULE_2+b/model.neff/../../x",
                     f"{area}/MODULE_3+c\\..\\x/model.neff", f"{area}/MODULE_4/model.neff", f"{area}/notamodule/model.neff",
                     f"{area}/MODULE_5+e/model.log", f"{area}/MODULE_6+f/evil.sh", f"{area}/MODULE_7+g/model.done"):
            hub._buckets[BUCKET].files[evil] = dict(stored)
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "B") as fetched:
        pass
    assert [key.rsplit("/", 1)[1] for key in fetched.fetched] == [Path(run.synced[0]).name]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "hub" not in p.parts)
    assert not any("escaped" in p or "evil" in p or p.endswith("/x") for p in written), written
    assert [e.name for e in scan_entries(tmp_path / "B", version)] == [Path(run.synced[0]).name]


def test_local_symlinks_are_never_followed_nor_uploaded(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_do_not_leak")
    graph = make_graphs(1)[0]
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
        entry = compile_graph(tmp_path / "A", version, graph).path
        (entry / "wrapped_neff.hlo").symlink_to(secret)  # allow-listed name, but a symlink
    published = [p for p in Path(bucket.location).rglob("*") if p.is_file()]
    assert published and not any(p.name == "wrapped_neff.hlo" for p in published)
    assert all("hf_do_not_leak" not in p.read_text(errors="ignore") for p in published)


def test_non_utf8_names_in_the_cache_are_tolerated(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A") as run:
        entry = compile_graph(tmp_path / "A", version, make_graphs(1)[0]).path
        os.mkdir(os.path.join(os.fsencode(entry.parent), b"MODULE_\xff\xfe+zz"))
        open(os.path.join(os.fsencode(entry), b"caf\xe9.log"), "wb").close()
    assert len(run.synced) == 1 and run.warnings == []
    names = {p.name for p in Path(bucket.location).rglob("*")}
    assert not any("caf" in name or "\udcff" in name for name in names)


def test_a_remote_file_far_larger_than_its_listing_is_not_installed(tmp_path, version):
    bucket = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(bucket).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "A"):
        compile_graph(tmp_path / "A", version, make_graphs(1)[0])
    from optimum_neuron_cache import fetch as fetch_module

    real_list = fetch_module.BucketClient.list

    def listing_then_growth(self, prefix, recursive=True):
        items = real_list(self, prefix, recursive=recursive)
        for item in items:  # after the listing, someone appends 50 MB to the NEFF
            if item["path"].endswith("model.neff") and "/models/" in item["path"]:
                with open(Path(bucket.location) / item["path"], "ab") as handle:
                    handle.write(b"\0" * 50_000_000)
        return items

    fetch_module.BucketClient.list = listing_then_growth
    try:
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=bucket, cache_dir=tmp_path / "B") as fetched:
            pass
    finally:
        fetch_module.BucketClient.list = real_list
    assert fetched.fetched == [] and len(fetched.warnings) == 1 and "larger than the" in fetched.warnings[0]
    assert scan_entries(tmp_path / "B", version) == []


def test_the_token_never_appears_in_logs_errors_records_processes_or_files(tmp_path, hub, version, monkeypatch):
    token = "hf_SECRETsecretSECRETsecret0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("NEURON_CACHE_SERVER_LOG_LEVEL", "DEBUG")
    BucketClient(BucketRef("hf", BUCKET)).create()
    with hub_neuronx_cache("org/m", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=BUCKET,
                           cache_dir=tmp_path / "A") as run:
        compile_graph(tmp_path / "A", version, make_graphs(1)[0])
    hub.add_fault("GET", r"/tree", 401, times=None)  # an error path too
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "B") as failed:
        pass
    assert failed.warnings and all(token not in w for w in failed.warnings)
    from optimum_neuron_cache.client import running_server

    server = running_server()
    proc = Path("/proc") / str(server["pid"])
    assert token.encode() not in (proc / "cmdline").read_bytes()
    assert token.encode() not in (proc / "environ").read_bytes()
    ps = subprocess.run(["ps", "auxww"], capture_output=True, text=True).stdout
    assert token not in ps
    leaks = [p for root in (tmp_path, Path(os.environ["NEURON_CACHE_RUNTIME_DIR"])) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink() and "hub" not in p.relative_to(root).parts[:1]
             and token.encode() in p.read_bytes()]
    assert leaks == []
    out = tmp_path / "record.json"
    BucketClient(BucketRef("hf", BUCKET)).download([{"path": run.record, "local_path": str(out)}])
    assert token not in out.read_text()


def test_hostile_sizes_in_a_listing_are_skipped_by_ls(tmp_path, hub, version, caplog):
    """Sizes are bucket data: infinite, negative, boolean, textual or absurd sizes never reach a sum or the JSON."""
    import json

    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli

    BucketClient(BucketRef("hf", BUCKET)).create()
    with hub_neuronx_cache("org/m", compiler_version=version, bucket=BUCKET, cache_dir=tmp_path / "A"):
        for graph in make_graphs(6, seed="sizes"):
            compile_graph(tmp_path / "A", version, graph)
    files = hub._buckets[BUCKET].files
    flat_neffs = sorted(p for p in files if p.endswith("/model.neff") and "/models/" not in p)
    hostile = [float("inf"), -5, True, "12", 2**41]
    with hub._lock:
        for path, size in zip(flat_neffs, hostile):
            files[path]["size"] = size
    result = CliRunner().invoke(cli, ["ls", "--json", "--bucket", BUCKET])
    assert result.exit_code == 0, result.output
    areas = {row["area"]: row for row in json.loads(result.stdout, parse_constant=lambda name: pytest.fail(name))}
    assert (areas[""]["entries"], areas[""]["incomplete"]) == (1, 5)  # the entries with a bad size do not count
    assert areas["org--m/default"]["entries"] == 6
    assert 0 < areas[""]["bytes"] < areas["org--m/default"]["bytes"]
    assert [r.getMessage() for r in caplog.records if "not a valid number of bytes" in r.getMessage()]


def test_hostile_sizes_in_a_model_area_cost_only_their_own_files(tmp_path, hub, version):
    """A record listed with an infinite size and a NEFF listed with a boolean one: the fetch goes on without them."""
    BucketClient(BucketRef("hf", BUCKET)).create()
    with hub_neuronx_cache("org/m", None, {"batch_size": 1}, compiler_version=version, bucket=BUCKET,
                           cache_dir=tmp_path / "A") as run:
        for graph in make_graphs(3, seed="area-sizes"):
            compile_graph(tmp_path / "A", version, graph)
    files = hub._buckets[BUCKET].files
    area_neffs = sorted(p for p in files if p.endswith("/model.neff") and "/models/org--m/" in p)
    with hub._lock:
        files[run.record]["size"] = float("inf")
        files[area_neffs[0]]["size"] = True
    with hub_neuronx_cache("org/m", None, {"batch_size": 1}, compiler_version=version, bucket=BUCKET,
                           cache_dir=tmp_path / "B") as fetched:
        pass
    assert fetched.warnings == [] and fetched.stats.remote_errors == 0
    assert sorted(key.rsplit("/", 1)[1] for key in fetched.fetched) == sorted(p.split("/")[-2] for p in area_neffs[1:])


def test_a_cache_dir_that_is_a_file_is_refused_before_the_body(tmp_path, version):
    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.errors import ConfigurationError

    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file")
    ran = []
    with pytest.raises(ConfigurationError, match="is not a directory"):
        with hub_neuronx_cache("org/m", compiler_version=version, bucket=str(tmp_path / "b"), cache_dir=not_a_dir):
            ran.append(True)
    assert ran == [] and not_a_dir.read_text() == "a file"


@pytest.mark.parametrize("option", ["explain", "export-config"])
def test_deeply_nested_or_huge_json_options_are_one_usage_line(tmp_path, option):
    """`explain --config` and `parallel-compile run --export-config` with JSON nested past the decoder's bound, nested
    deeper than any export config, or holding a 5,000-digit integer: one usage line (exit 2), never a traceback."""
    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli

    marker = tmp_path / "ran"
    for value in ("[" * 100_000 + "]" * 100_000, '{"a": ' + "[" * 200 + "]" * 200 + "}",
                  '{"batch_size": ' + "9" * 5000 + "}"):
        args = (["explain", "org/m", "--config", value, "--bucket", str(tmp_path / "b")] if option == "explain" else
                ["parallel-compile", "run", "--export-config", value, "--", "touch", str(marker)])
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1].startswith("error: Invalid value")
        assert "4,300 digits" in result.output or "deeper than" in result.output
    assert not marker.exists()
