"""The local cache model: root resolution as libneuronxla does it, entry states, noise, compiler version."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_neuron_cache.errors import CompilerVersionError, ConfigurationError
from optimum_neuron_cache.local_cache import DEFAULT_CACHE_ROOT, EntryState, resolve_cache_root, scan_entries
from optimum_neuron_cache.neuron_sdk import resolve_compiler_version
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, compile_graph, make_graphs


@pytest.mark.parametrize(
    ("environ", "expected", "source"),
    [
        ({}, DEFAULT_CACHE_ROOT, "default"),
        ({"NEURON_COMPILE_CACHE_URL": "/data/cache"}, "/data/cache", "NEURON_COMPILE_CACHE_URL"),
        ({"NEURON_CC_FLAGS": "--cache_dir=/flags/a --model-type=transformer", "NEURON_COMPILE_CACHE_URL": "/data/cache"}, "/flags/a", "--cache_dir in NEURON_CC_FLAGS"),
        ({"NEURON_CC_FLAGS": "-O1 --cache_dir /flags/b"}, "/flags/b", "--cache_dir in NEURON_CC_FLAGS"),
        ({"NEURON_COMPILE_CACHE_URL": "file:///mnt/fsx/cache"}, "/mnt/fsx/cache", "NEURON_COMPILE_CACHE_URL"),
    ],
)
def test_root_follows_libneuronxla_precedence(environ, expected, source):
    root = resolve_cache_root(environ=environ)
    assert root.path == Path(expected)
    assert root.source == source
    assert root.disabled_reason is None


def test_explicit_cache_dir_wins(tmp_path):
    root = resolve_cache_root(tmp_path, environ={"NEURON_CC_FLAGS": "--cache_dir=/elsewhere"})
    assert root.path == tmp_path


@pytest.mark.parametrize(
    "environ",
    [
        {"NEURON_COMPILE_CACHE_URL": "s3://my-bucket/neuron-cache"},
        {"NEURON_CC_FLAGS": "--cache_dir=s3://my-bucket/prefix"},
        {"NEURON_CC_FLAGS": "--no_cache", "NEURON_COMPILE_CACHE_URL": "/data/cache"},
    ],
)
def test_s3_root_or_no_cache_turn_sync_off_instead_of_being_a_path(environ):
    root = resolve_cache_root(environ=environ)
    assert root.path is None
    assert root.disabled_reason and "\n" not in root.disabled_reason
    assert ("s3://" in root.disabled_reason) or ("--no_cache" in root.disabled_reason)


def test_empty_cache_dir_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="empty"):
        resolve_cache_root(environ={"NEURON_COMPILE_CACHE_URL": " "})


def _states(root: Path, version: str) -> dict[str, EntryState]:
    return {entry.name: entry.state for entry in scan_entries(root, version)}


def test_every_state_of_a_new_compiler(tmp_path, version):
    ok, failed, crashed, todo = make_graphs(4, seed="states")
    compile_graph(tmp_path, version, ok)
    with pytest.raises(CompileFailed):
        compile_graph(tmp_path, version, failed, outcome="failed")
    compile_graph(tmp_path, version, crashed, outcome="crash")
    compile_graph(tmp_path, version, todo, outcome="todo")
    # An interrupted compile of 2.15+: a NEFF without model.done is not a hit.
    interrupted = compile_graph(tmp_path, version, make_graphs(1, seed="interrupted")[0]).path
    (interrupted / "model.done").unlink()
    states = _states(tmp_path, version)
    assert sorted(states.values()) == sorted(
        [EntryState.SUCCESS, EntryState.FAILED, EntryState.LOCKED, EntryState.TODO, EntryState.INCOMPLETE]
    )
    assert states[interrupted.name] is EntryState.INCOMPLETE


@pytest.mark.parametrize("old_version", ["2.14.227.0+2d4f85be", "2.12.68.0"])
def test_legacy_compilers_have_no_marker(tmp_path, old_version):
    ok, failed = make_graphs(2, seed="legacy")
    entry = compile_graph(tmp_path, old_version, ok).path
    assert "model.done" not in os.listdir(entry)
    with pytest.raises(CompileFailed):
        compile_graph(tmp_path, old_version, failed, outcome="failed")
    states = _states(tmp_path, old_version)
    assert states[entry.name] is EntryState.LEGACY_SUCCESS
    assert EntryState.FAILED in states.values()  # on 2.12 a 5-byte model.neff sits beside model.log


def test_noise_under_the_root_is_tolerated(tmp_path, version):
    entry = compile_graph(tmp_path, version, make_graphs(1)[0]).path
    vdir = entry.parent
    (tmp_path / "lock").write_bytes(b"")
    (vdir / "0_REGISTRY").mkdir()
    (vdir / "MODULE_12345").mkdir()  # a whole traced model: no '+'
    (tmp_path / "USER_neuroncc-1.0.47218.0+e6a7f8c05").mkdir()
    (vdir / "stray.txt").write_text("x")
    (vdir / "MODULE_1+abc").symlink_to(entry)  # a symlinked entry is never followed
    (tmp_path / "neuronxcc-not-a-version").mkdir()
    assert [e.name for e in scan_entries(tmp_path)] == [entry.name]


def test_symlinks_inside_an_entry_are_not_files_of_it(tmp_path, version):
    entry = compile_graph(tmp_path, version, make_graphs(1)[0]).path
    secret = tmp_path / "secret"
    secret.write_text("token")
    (entry / "wrapped_neff.hlo").symlink_to(secret)
    (found,) = scan_entries(tmp_path, version)
    assert "wrapped_neff.hlo" not in found.files
    assert found.state is EntryState.SUCCESS


def test_compiler_version_explicit_then_env_then_clear_error(monkeypatch):
    assert resolve_compiler_version("2.21.33363.0+82129205", environ={}) == "2.21.33363.0+82129205"
    assert resolve_compiler_version(None, environ={"NEURON_CC_VERSION": "2.15.128.0+56dc5a86"}) == "2.15.128.0+56dc5a86"
    with pytest.raises(CompilerVersionError, match="NEURON_CC_VERSION") as info:
        resolve_compiler_version(None, environ={})
    assert "\n" not in str(info.value)
    with pytest.raises(CompilerVersionError, match="not a neuronx-cc version"):
        resolve_compiler_version("latest", environ={})


def test_pypi_placeholders_of_the_sdk_are_treated_as_absent(tmp_path):
    """PyPI's neuronx-cc / libneuronxla / torch-neuronx raise ImportError('WRONG PACKAGE') on import."""
    for name in ("neuronxcc", "libneuronxla", "torch_neuronx"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('raise ImportError("WRONG PACKAGE. Please install from the Neuron repository")\n')
    code = textwrap.dedent(
        """
        from optimum_neuron_cache.neuron_sdk import sdk_info, resolve_compiler_version
        from optimum_neuron_cache.errors import CompilerVersionError
        info = sdk_info()
        assert info.neuronx_cc is None and info.libneuronxla is None and info.torch_neuronx is None, info
        try:
            resolve_compiler_version(None, environ={})
        except CompilerVersionError as exc:
            print("ERROR", exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("ERROR cannot tell the neuronx-cc version")


def test_installed_compiler_version_is_read_from_neuronxcc(tmp_path):
    (tmp_path / "neuronxcc").mkdir()
    (tmp_path / "neuronxcc" / "__init__.py").write_text('__version__ = "2.19.8089.0+8ab9f450"\n')
    code = "from optimum_neuron_cache.neuron_sdk import resolve_compiler_version as r; print(r(None, environ={}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "2.19.8089.0+8ab9f450"


# ------------------------------------------------------------------- old and development compiler versions

DEV_VERSION = "2.0.0.22266a0+a69f71e55"  # an early development build's folder, as found in real caches


def test_development_version_folders_are_entries_of_a_legacy_compiler(tmp_path):
    from optimum_neuron_cache import remote_layout as layout
    from optimum_neuron_cache.local_cache import version_from_dir_name
    from optimum_neuron_cache.neuron_sdk import validate_compiler_version, version_tuple, writes_done_marker

    assert version_from_dir_name(f"neuronxcc-{DEV_VERSION}") == DEV_VERSION
    assert layout.parse_version_prefix(f"neuronxcc-{DEV_VERSION}") == DEV_VERSION
    assert validate_compiler_version(DEV_VERSION, source="test") == DEV_VERSION
    assert version_tuple(DEV_VERSION) == (2, 0, 0, 22266) and not writes_done_marker(DEV_VERSION)
    entry = compile_graph(tmp_path, DEV_VERSION, make_graphs(1, seed="dev")[0]).path
    (found,) = scan_entries(tmp_path)
    assert (found.compiler_version, found.name, found.state) == (DEV_VERSION, entry.name, EntryState.LEGACY_SUCCESS)


@pytest.mark.parametrize("name", [
    "neuronxcc-2.0.0.22266A0+a69f71e55",  # the fourth part is lowercase
    "neuronxcc-2.0.0.a22266+a69f71e55",   # ... and starts with a digit
    "neuronxcc-2.21.0.0\n", "neuronxcc-2.21.0.0 ", "neuronxcc-2.21.0.0+", "neuronxcc-2.21.0.0+ab/cd",
    "neuronxcc-2.21.0.0+ab..cd", "neuronxcc-٢.٢١.٠", "neuronxcc-2.21.33363.0+" + "a" * 41,
    "neuronxcc-2.0.0.22266a0-rc1", "neuronxcc-..", "neuronxcc-2.21", "neuronxcc-2.21.0.0.0",
])
def test_version_folder_names_are_still_checked_strictly(tmp_path, name):
    from optimum_neuron_cache import remote_layout as layout
    from optimum_neuron_cache.local_cache import version_from_dir_name

    assert version_from_dir_name(name) is None and layout.parse_version_prefix(name) is None
    if "/" not in name and "\n" not in name:
        (tmp_path / name).mkdir()
        (tmp_path / name / "MODULE_1+a").mkdir()
        assert scan_entries(tmp_path) == []



def test_the_versions_of_a_bucket_root_leave_every_other_name_out():
    from optimum_neuron_cache import remote_layout as layout

    root = ["neuronxcc-2.21.33363.0+82129205", "leases", "neuronxcc-..", "neuronxcc-2.21", f"neuronxcc-{DEV_VERSION}",
            "neuronxcc-2.19.64268.0+e9ba6c7b", "MODULE_1+a", "neuronxcc-2.21.33363.0+82129205"]
    assert layout.versions_in(root) == sorted({DEV_VERSION, "2.19.64268.0+e9ba6c7b", "2.21.33363.0+82129205"})

# ------------------------------------------------------------- flags hashes: JSON or text, whatever the version

#: Versions with both kinds of flags hash in public caches: 2.12 hashes the text (`+2c2d707e` for
#: "--model-type=transformer --auto-cast=none", aws-neuron-sdk#825), 2.15.128 the JSON list (`+d7517139` for [],
#: optimum-internal-testing/neuron-testing-cache; `+39f12043`, optimum-neuron#698), 2.15.141 the text
#: (`+4497a662`, aws-neuron-sdk#1023) and the JSON list (`+b64a7507`, aws-neuron/optimum-neuron-cache).
HASH_VERSIONS = ["2.12.68.0", "2.14.227.0+2d4f85be", "2.15.128.0+56dc5a86", "2.15.141.0+d3cfc8ca", "2.21.33363.0+82129205"]


def test_the_simulated_hashes_are_the_real_ones():
    from optimum_neuron_cache.testing.simulated_compiler import flags_hash

    assert flags_hash("2.12.68.0", ("--model-type=transformer", "--auto-cast=none"), "text") == "2c2d707e"
    assert flags_hash("2.14.227.0", (), None) == "d41d8cd9"  # an empty compile_flags.txt
    assert flags_hash("2.15.128.0", (), "json") == "d7517139"
    assert flags_hash("2.15.141.0", ("--model-type", "transformer", "-O1", "--model-type=transformer"), "json") == "b64a7507"
    assert flags_hash("2.22.12471.0", ("--target=trn1",), "json") == "e30acd3a"  # 2.16+: the target is hashed
    assert flags_hash("2.16.372.0", ("--target=trn1", "--model-type=transformer", "--auto-cast=none", "--execute-repetition=1"), "json") == "613edded"
    assert flags_hash("2.16.372.0", ("--target=trn2", "--model-type=transformer", "--auto-cast=none", "--execute-repetition=1"), "json") == "7ac4dbae"
    assert flags_hash("2.16.372.0", ("--target=trn3",), "json") == "70e3f644"  # aws-neuron-sdk NKI quickstart


@pytest.mark.parametrize("style", ["json", "text"])
@pytest.mark.parametrize("version", HASH_VERSIONS)
def test_entries_of_either_flags_hash_are_read_the_same_way(tmp_path, version, style):
    from optimum_neuron_cache.testing.simulated_compiler import flags_hash

    flags = ("--model-type=transformer", "-O1")
    ok, failed = make_graphs(2, seed=f"style-{style}", flags=flags)
    entry = compile_graph(tmp_path, version, ok, flags_hash_style=style).path
    with pytest.raises(CompileFailed):
        compile_graph(tmp_path, version, failed, outcome="failed", flags_hash_style=style)
    assert entry.name.endswith("+" + flags_hash(version, flags, style))
    states = {e.name: e.state for e in scan_entries(tmp_path, version)}
    legacy = version.startswith(("2.12.", "2.14."))
    assert states[entry.name] is (EntryState.LEGACY_SUCCESS if legacy else EntryState.SUCCESS)
    assert EntryState.FAILED in states.values()
    assert compile_graph(tmp_path, version, ok, flags_hash_style=style).hit


def test_nothing_in_the_package_computes_a_flags_hash():
    """The MODULE name is opaque: no code of the package (the simulated compiler aside) hashes flags, so no
    version boundary can decide how."""
    package = Path(__file__).resolve().parent.parent / "optimum_neuron_cache"
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if "testing" not in path.parts and "md5(" in path.read_text()]
    assert offenders == []
