"""The bucket layout contract: paths, model ids, casing, local models keyed by content, the allow-list."""

from __future__ import annotations

import json

import pytest

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.errors import ConfigurationError, InvalidModelIdError
from optimum_neuron_cache.records import compiler_flags, make_record

V = "2.21.33363.0+82129205"


def test_paths_follow_the_contract():
    assert layout.flat_entry_prefix(V, "MODULE_1+abc") == f"neuronxcc-{V}/MODULE_1+abc"
    ref = layout.model_ref("meta-llama/Llama-3.2-1B")
    assert ref.folder == "meta-llama--Llama-3.2-1B"
    assert layout.model_entry_prefix(V, ref.folder, "text-generation", "MODULE_1+abc") == (
        f"neuronxcc-{V}/models/meta-llama--Llama-3.2-1B/text-generation/MODULE_1+abc"
    )
    assert layout.model_ref("gpt2").folder == "gpt2"
    assert layout.task_name(None) == "default"
    record_id = "0123456789abcdef"
    assert layout.export_record_path(V, "gpt2", "default", record_id) == f"neuronxcc-{V}/models/gpt2/default/exports/{record_id}.json"


@pytest.mark.parametrize("bad", ["", "a/b/c", "../etc", "org/..", "org//name", "org/na me", "-org/name", "org--x/name", "org/name\x00"])
def test_malformed_model_ids_are_refused_in_one_line(bad):
    with pytest.raises(InvalidModelIdError) as info:
        layout.model_ref(bad)
    assert "\n" not in str(info.value)


def test_bad_task_is_refused():
    with pytest.raises(ConfigurationError):
        layout.task_name("../x")


def test_casing_reuses_what_the_bucket_has():
    assert layout.reuse_casing("org--model", ["Org--Model", "other--x"]) == "Org--Model"
    assert layout.reuse_casing("Org--Model", ["Org--Model"]) == "Org--Model"
    assert layout.reuse_casing("new--one", ["Org--Model"]) == "new--one"


def test_local_model_dirs_are_keyed_by_content(tmp_path):
    a, b, c = tmp_path / "a" / "my-model", tmp_path / "b" / "my-model", tmp_path / "c" / "my-model"
    for path, config in ((a, {"hidden_size": 8}), (b, {"hidden_size": 8}), (c, {"hidden_size": 16})):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
    ref_a, ref_b, ref_c = (layout.model_ref(str(p)) for p in (a, b, c))
    assert ref_a.is_local and ref_a.folder == ref_b.folder != ref_c.folder
    assert ref_a.folder.startswith("local--my-model-")
    assert "unknown" not in ref_a.folder


def test_only_allow_listed_files_of_modules_parse_from_an_area():
    area = f"neuronxcc-{V}/models/gpt2/default"
    good = layout.parse_area_path(f"{area}/MODULE_1+abc/model.neff", area)
    assert good == layout.AreaFile("MODULE_1+abc", "model.neff")
    for path in [
        f"{area}/MODULE_1+abc/model.log",
        f"{area}/MODULE_1+abc/model.hlo_module.pb.lock",
        f"{area}/MODULE_1+abc/../../x/model.neff",
        f"{area}/MODULE_1/model.neff",
        f"{area}/MODULE_1+abc/sub/model.neff",
        f"{area}/exports/abc.json",
        f"{area}/MODULE_1+a\\b/model.neff",
        "other/MODULE_1+abc/model.neff",
    ]:
        assert layout.parse_area_path(path, area) is None, path


def test_commit_file_is_the_marker_or_the_neff_of_old_compilers():
    assert layout.commit_file(["model.neff", "model.done"], V) == "model.done"
    assert layout.commit_file(["model.neff"], "2.14.227.0") == "model.neff"
    assert layout.commit_file(["model.neff"], V) == "model.done"


def test_export_records_keep_compile_flags_without_wrapper_flags():
    env = {"NEURON_CC_FLAGS": "--model-type=transformer --cache_dir=/x --log_level WARNING --retry_failed_compilation -O1 --no_cache"}
    assert compiler_flags(env) == ["--model-type=transformer", "-O1"]
    first = make_record("gpt2", "default", V, {"batch_size": 1, "sequence_length": 128}, ["MODULE_2+b", "MODULE_1+a"], env)
    second = make_record("gpt2", "default", V, {"sequence_length": 128, "batch_size": 1}, [], env)
    other_flags = make_record("gpt2", "default", V, {"batch_size": 1, "sequence_length": 128}, [], {"NEURON_CC_FLAGS": "-O2"})
    assert first.record_id == second.record_id != other_flags.record_id
    data = json.loads(first.to_json())
    assert data["modules"] == ["MODULE_1+a", "MODULE_2+b"]
    assert {"model_id", "task", "compiler_version", "export_config", "compile_flags", "package_version", "created_at"} <= set(data)


def test_paths_under_a_version_are_classified_or_refused():
    from optimum_neuron_cache.remote_layout import VersionPath, split_version_path

    v = "2.21.33363.0+82129205"
    assert split_version_path(v, f"neuronxcc-{v}/MODULE_1+a/model.neff") == VersionPath("", "MODULE_1+a", "model.neff")
    assert split_version_path(v, f"neuronxcc-{v}/models/org--m/default/MODULE_1+a/model.done") == \
        VersionPath("org--m/default", "MODULE_1+a", "model.done")
    assert split_version_path(v, f"neuronxcc-{v}/models/org--m/default/exports/{'a' * 16}.json") == \
        VersionPath("org--m/default", record=f"{'a' * 16}.json")
    for hostile in (f"neuronxcc-{v}/MODULE_1+a/model.log", f"neuronxcc-{v}/MODULE_1+a/../x/model.neff",
                    f"neuronxcc-{v}/models/org--m/default/MODULE_1+a/sub/model.neff", "neuronxcc-2.0.0/MODULE_1+a/model.neff",
                    f"neuronxcc-{v}/models/org--m/default/exports/x.txt"):
        assert split_version_path(v, hostile) is None


def test_digest_manifests_have_their_own_places_beside_the_entries():
    v = "2.21.0.0+abc"
    module = "MODULE_123+abc"
    assert layout.flat_manifest_path(v, module) == f"neuronxcc-{v}/digests/{module}.json"
    assert layout.split_version_path(v, layout.flat_manifest_path(v, module)) == layout.VersionPath("", manifest=f"{module}.json")
    area = layout.model_area_prefix(v, "org--m", "default")
    name, text = layout.digest_manifest({"b" * 64: "blake3:" + "1" * 64, "a" * 64: "blake3:" + "2" * 64})
    assert layout.digest_manifest({"a" * 64: "blake3:" + "2" * 64, "b" * 64: "blake3:" + "1" * 64}) == (name, text)
    assert layout.is_area_manifest(f"{area}/digests/{name}", area)
    assert layout.split_version_path(v, f"{area}/digests/{name}") == layout.VersionPath("org--m/default", manifest=name)
    for bad in (f"neuronxcc-{v}/digests/x.json", f"neuronxcc-{v}/digests/{module}/model.neff",
                f"{area}/digests/{name[:-5]}.txt", f"{area}/digests/../{name}"):
        assert layout.split_version_path(v, bad) is None and not layout.is_area_manifest(bad, area)
    # Nothing about a manifest looks like an entry of the local cache tree.
    assert layout.parse_area_path(layout.flat_manifest_path(v, module), layout.version_prefix(v)) is None
