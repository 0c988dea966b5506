"""Read-through upstreams: an optimum-neuron Git cache repo (or another bucket) consulted, read only, for the graphs
the bucket lacks, by the compiler shim and by the todo-filling flow; what they give is published to the bucket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.errors import ConfigurationError
from optimum_neuron_cache.hub_repos import RepoRef
from optimum_neuron_cache.local_cache import EntryState, read_entry, version_dir_name
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, entry_path, make_graphs
from optimum_neuron_cache.testing.simulated_neuronx_cc import jit_compile
from optimum_neuron_cache.upstreams import configured_upstreams, parse_upstream, save_upstreams

from .test_hub_repos import xet_file
from .test_integrations_shim import compiles, use

REPO = "aws-neuron/optimum-neuron-cache"


def cache_repo_of(hub, origin: Path, version: str, graphs) -> str:
    """An optimum-neuron Git cache repo holding these graphs' entries as compiled in `origin` (NEFFs Xet-backed)."""
    files: dict[str, bytes | dict] = {"README.md": b"cache"}
    for graph in graphs:
        path = entry_path(origin, version, graph)
        for item in sorted(path.iterdir()):
            repo_path = f"{version_dir_name(version)}/{path.name}/{item.name}"
            data = item.read_bytes()
            files[repo_path] = xet_file(hub, data, repo_path) if item.name == "model.neff" else data
    return hub.create_model_repo(REPO, files)


@pytest.fixture
def shim_log(tmp_path, monkeypatch, version) -> Path:
    """The simulated neuronx-cc on PATH behind the shim, as libneuronxla finds them; returns the compile log."""
    from optimum_neuron_cache.integrations.compiler_shim import install_compiler_shim
    from optimum_neuron_cache.testing.simulated_neuronx_cc import install_simulated_compiler

    install_simulated_compiler(tmp_path / "sdk-bin")
    install_compiler_shim(tmp_path / "shim-bin")
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "shim-bin"), str(tmp_path / "sdk-bin"), os.environ["PATH"]]))
    monkeypatch.setenv("NEURON_CC_VERSION", version)
    monkeypatch.setenv("SIMULATED_NEURONX_CC_LOG", str(tmp_path / "compiles.log"))
    return tmp_path / "compiles.log"


@pytest.fixture
def hub_bucket(hub) -> BucketRef:
    ref = BucketRef("hf", "test-org/neuron-cache")
    BucketClient(ref).create()
    return ref


def test_parse_and_save_upstreams(monkeypatch, tmp_path):
    assert parse_upstream("aws-neuron/optimum-neuron-cache") == RepoRef(REPO)
    assert parse_upstream("hf://buckets/team/cache") == BucketRef("hf", "team/cache")
    assert parse_upstream(str(tmp_path)) == BucketRef("dir", str(tmp_path))
    with pytest.raises(ConfigurationError, match="upstream 'a/b/c'"):
        parse_upstream("a/b/c")
    assert configured_upstreams() == ()
    save_upstreams([RepoRef(REPO), BucketRef("hf", "team/cache")])
    assert configured_upstreams() == (RepoRef(REPO), BucketRef("hf", "team/cache"))
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", "org/one@v2, hf://models/org/two")  # the variable wins
    assert configured_upstreams() == (RepoRef("org/one", "v2"), RepoRef("org/two"))
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", "not/a/repo")
    with pytest.raises(ConfigurationError, match="NEURON_CACHE_UPSTREAM|not a model repo"):
        configured_upstreams()


def test_cli_set_upstream(tmp_path):
    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli

    runner = CliRunner()
    done = runner.invoke(cli, ["set", "--upstream", REPO, "--upstream", "hf://buckets/team/cache"])
    assert done.exit_code == 0, done.output
    assert configured_upstreams() == (RepoRef(REPO), BucketRef("hf", "team/cache"))
    assert runner.invoke(cli, ["set", "--upstream", "a/b/c"]).exit_code == 2
    assert runner.invoke(cli, ["set", "--upstream", ""]).exit_code == 0
    assert configured_upstreams() == ()


def test_the_shim_reads_through_a_git_cache_repo_and_publishes_the_hit(tmp_path, hub, hub_bucket, version, shim_log, monkeypatch):
    graphs = make_graphs(2, seed="upstream-graphs")
    for graph in graphs:
        compile_graph(tmp_path / "origin", version, graph)
    cache_repo_of(hub, tmp_path / "origin", version, graphs)
    use(hub_bucket, tmp_path / "B", monkeypatch)
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", REPO)
    for graph in graphs:
        result = jit_compile(tmp_path / "B", version, graph)
        entry = read_entry(result.path, version)
        assert entry.state is EntryState.SUCCESS
        assert (result.path / "model.neff").read_bytes() == (entry_path(tmp_path / "origin", version, graph) / "model.neff").read_bytes()
    assert compiles(shim_log) == []
    # The hits are in the bucket now: another host without the upstream finds them at home.
    flat = {item["path"] for item in BucketClient(hub_bucket).list(version_dir_name(version), recursive=True)}
    for graph in graphs:
        module = entry_path(tmp_path / "origin", version, graph).name
        assert f"{version_dir_name(version)}/{module}/model.done" in flat
    monkeypatch.delenv("NEURON_CACHE_UPSTREAM")
    use(hub_bucket, tmp_path / "C", monkeypatch)
    for graph in graphs:
        jit_compile(tmp_path / "C", version, graph)
    assert compiles(shim_log) == []
    # A graph no source has is compiled, as without the cache.
    other = make_graphs(1, seed="nobody-has-it")[0]
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", REPO)
    jit_compile(tmp_path / "C", version, other)
    assert len(compiles(shim_log)) == 1


def test_a_bucket_upstream_and_an_unreachable_one(tmp_path, hub, hub_bucket, version, shim_log, monkeypatch):
    graph = make_graphs(1, seed="in-another-bucket")[0]
    team = BucketRef("dir", str(tmp_path / "team-bucket"))
    BucketClient(team).create()
    use(team, tmp_path / "A", monkeypatch)
    jit_compile(tmp_path / "A", version, graph)  # compiled, and published to the team's bucket by the shim
    assert len(compiles(shim_log)) == 1
    use(hub_bucket, tmp_path / "B", monkeypatch)
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", f"nobody/no-such-cache {team.location}")  # the first is missing
    team_files = {item["path"] for item in BucketClient(team).list("", recursive=True)}
    jit_compile(tmp_path / "B", version, graph)
    assert len(compiles(shim_log)) == 1  # no second compile: the team's bucket had it
    assert {item["path"] for item in BucketClient(team).list("", recursive=True)} == team_files  # read only
    module = entry_path(tmp_path / "A", version, graph).name
    assert BucketClient(hub_bucket).paths_info([f"{version_dir_name(version)}/{module}/model.done"])


def test_todo_entries_are_filled_from_upstreams_and_published(tmp_path, hub, hub_bucket, version, monkeypatch):
    from optimum_neuron_cache.integrations.parallel_compile import fill_todo_entries
    from optimum_neuron_cache.testing.simulated_neuronx_cc import ENV_EXTRACT_ONLY

    graphs = make_graphs(2, seed="todo-graphs")
    compile_graph(tmp_path / "origin", version, graphs[0])
    cache_repo_of(hub, tmp_path / "origin", version, graphs[:1])
    env = {**os.environ, ENV_EXTRACT_ONLY: "1"}
    for graph in graphs:  # collect: HLO and flags only
        jit_compile(tmp_path / "cache", version, graph, env=env)
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", REPO)
    fill = fill_todo_entries(bucket=hub_bucket, cache_dir=tmp_path / "cache", compiler_version=version)
    module = entry_path(tmp_path / "origin", version, graphs[0]).name
    assert fill.filled == [f"{version_dir_name(version)}/{module}"]
    assert read_entry(tmp_path / "cache" / version_dir_name(version) / module, version).state is EntryState.SUCCESS
    assert read_entry(entry_path(tmp_path / "cache", version, graphs[1]), version).state is EntryState.TODO
    assert BucketClient(hub_bucket).paths_info([f"{version_dir_name(version)}/{module}/model.done"])


def test_lookup_and_explain_read_an_upstream_registry_as_export_records(tmp_path, hub, version, monkeypatch):
    import json

    from click.testing import CliRunner

    from optimum_neuron_cache.cli import cli
    from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache

    entry = {"_entry_class": "SingleModelCacheEntry", "_model_id": "meta-llama/Llama-3.1-8B", "_task": "text-generation",
             "model_type": "llama", "neuron": {"batch_size": 4, "sequence_length": 4096, "tp_degree": 8}}
    registry = f"{version_dir_name(version)}/0_REGISTRY/0.4.1"
    hub.create_model_repo(REPO, {
        f"{registry}/llama/meta-llama/Llama-3.1-8B/0123456789abcdef0123.json": json.dumps(entry).encode(),
        f"{registry}/llama/meta-llama/Llama-3.1-8B/1111111111abcdef0123.json":
            json.dumps({**entry, "neuron": {**entry["neuron"], "batch_size": 1}}).encode(),
        f"{registry}/llama/other/model/2222222222abcdef0123.json": json.dumps({**entry, "_model_id": "other/model"}).encode(),
    })
    bucket = BucketRef("dir", str(tmp_path / "b"))
    BucketClient(bucket).create()
    clear_lookup_cache()
    assert lookup_cache("meta-llama/Llama-3.1-8B", compiler_version=version, bucket=bucket) == []
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", REPO)
    clear_lookup_cache()
    records = lookup_cache("meta-llama/Llama-3.1-8B", compiler_version=version, bucket=bucket)
    assert sorted(r.export_config["batch_size"] for r in records) == [1, 4]
    assert lookup_cache("meta-llama/Llama-3.1-8B", compiler_version=version, bucket=bucket, batch_size=4)[0].task == "text-generation"
    out = CliRunner().invoke(cli, ["explain", "meta-llama/Llama-3.1-8B", "--compiler-version", version, "--bucket",
                                   bucket.location, "--batch-size", "4", "--tp", "8"])
    assert out.exit_code == 0, out.output
    assert f"match: neuronxcc-{version} text-generation target=? batch_size=4" in out.output


def test_a_run_fetches_a_model_from_an_upstream_bucket_and_publishes_it_home(tmp_path, hub_bucket, version, monkeypatch):
    from optimum_neuron_cache import hub_neuronx_cache

    team = BucketRef("dir", str(tmp_path / "team-bucket"))
    BucketClient(team).create()
    graphs = make_graphs(2, seed="team-model")
    with hub_neuronx_cache("org/model", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=team,
                           cache_dir=tmp_path / "A"):
        for graph in graphs:
            compile_graph(tmp_path / "A", version, graph)
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", team.location)
    with hub_neuronx_cache("org/model", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=hub_bucket,
                           cache_dir=tmp_path / "B") as run:
        pass
    assert len(run.fetched) == 2 and run.compiled == [] and not run.warnings
    modules = [entry_path(tmp_path / "A", version, graph).name for graph in graphs]
    home = BucketClient(hub_bucket).paths_info([f"{version_dir_name(version)}/{module}/model.done" for module in modules])
    assert len(home) == 2
    monkeypatch.delenv("NEURON_CACHE_UPSTREAM")
    with hub_neuronx_cache("org/model", "text-generation", {"batch_size": 1}, compiler_version=version, bucket=hub_bucket,
                           cache_dir=tmp_path / "C") as again:
        pass
    assert len(again.fetched) == 2  # at home now


def test_an_upstream_named_twice_is_asked_once(tmp_path, hub, version, monkeypatch):
    """The same source in several spellings (a prefix, the repo id's casing, a directory's path) is one upstream:
    read once, its records listed once."""
    import json

    from optimum_neuron_cache.lookup import clear_lookup_cache, lookup_cache

    entry = {"_entry_class": "SingleModelCacheEntry", "_model_id": "meta-llama/Llama-3.1-8B",
             "_task": "text-generation", "model_type": "llama",
             "neuron": {"batch_size": 4, "sequence_length": 4096, "tp_degree": 8}}
    hub.create_model_repo(REPO, {f"{version_dir_name(version)}/0_REGISTRY/0.4.1/llama/meta-llama/Llama-3.1-8B/"
                                 "0123456789abcdef0123.json": json.dumps(entry).encode()})
    team = tmp_path / "team-bucket"
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", f"{REPO} hf://models/{REPO} {REPO.upper()} {team} "
                                                f"{team}/../team-bucket {REPO}@v2 hf://buckets/team/cache")
    assert configured_upstreams() == (RepoRef(REPO), BucketRef("dir", str(team)), RepoRef(REPO, "v2"),
                                      BucketRef("hf", "team/cache"))
    save_upstreams([RepoRef(REPO), RepoRef(REPO.upper()), BucketRef("hf", "team/cache")])
    monkeypatch.delenv("NEURON_CACHE_UPSTREAM")
    assert configured_upstreams() == (RepoRef(REPO), BucketRef("hf", "team/cache"))

    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", f"{REPO} hf://models/{REPO} {REPO.upper()}")
    bucket = BucketRef("dir", str(tmp_path / "b"))
    BucketClient(bucket).create()
    clear_lookup_cache()
    hub.reset_counts()
    records = lookup_cache("meta-llama/Llama-3.1-8B", compiler_version=version, bucket=bucket)
    assert [r.export_config["batch_size"] for r in records] == [4]
    assert hub.requests.count("GET", r"^/api/models/[^/]+/[^/]+(/revision/[^/]+)?$") == 1  # one repo info


def test_the_shim_reads_through_an_entry_stored_in_lfs_not_xet(tmp_path, hub, hub_bucket, version, shim_log, monkeypatch):
    """A Git cache repo whose NEFFs sit in LFS outside Xet (older uploads): read through, checked by LFS sha256."""
    graph = make_graphs(1, seed="lfs-graph")[0]
    compile_graph(tmp_path / "origin", version, graph)
    path = entry_path(tmp_path / "origin", version, graph)
    hub.create_model_repo(REPO, {f"{version_dir_name(version)}/{path.name}/{item.name}":
                                 {"lfs": item.read_bytes()} if item.name == "model.neff" else item.read_bytes()
                                 for item in sorted(path.iterdir())})
    use(hub_bucket, tmp_path / "B", monkeypatch)
    monkeypatch.setenv("NEURON_CACHE_UPSTREAM", REPO)
    result = jit_compile(tmp_path / "B", version, graph)
    assert compiles(shim_log) == []
    assert (result.path / "model.neff").read_bytes() == (path / "model.neff").read_bytes()
    assert BucketClient(hub_bucket).paths_info([f"{version_dir_name(version)}/{path.name}/model.done"])
