"""libneuronxla, when installed: detected, its cache root and compiler version read from it, reported for status.

The SDK is not installable here, so each test puts small stand-in packages on PYTHONPATH of a fresh
interpreter (detection is cached per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parent.parent

PROBE = textwrap.dedent(
    """
    import json, sys
    from optimum_neuron_cache.local_cache import resolve_cache_root
    from optimum_neuron_cache.neuron_sdk import libneuronxla_info, sdk_summary, format_sdk_summary, resolve_compiler_version
    info = libneuronxla_info()
    root = resolve_cache_root()
    our_root = sys.argv[1] if sys.argv[1] != "-" else (str(root.path) if root.path else None)
    summary = sdk_summary(our_root)
    try:
        version = resolve_compiler_version(None, environ={})
    except Exception as exc:
        version = "ERROR " + type(exc).__name__
    print(json.dumps({"info": info.__dict__ if info else None, "summary": summary,
                      "lines": format_sdk_summary(summary, our_root), "resolved": version,
                      "root": {"path": str(root.path) if root.path else None, "source": root.source,
                               "disabled": root.disabled_reason}}))
    """
)


def probe(tmp_path: Path, packages: dict[str, str], our_root: str = "/var/tmp/neuron-compile-cache", env: dict | None = None) -> dict:
    site = tmp_path / "site"
    for relative, text in packages.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    run_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), **(env or {})}
    done = subprocess.run([sys.executable, "-c", PROBE, our_root], env=run_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


#: A stand-in with the API shape public code relies on (the real package is not installable here):
#: `libneuronxla.neuron_cc_cache.CacheUrl.get_cache_url(cache_dir=None)` returns an object with `.url` and
#: `.is_s3()`. Callers pass NEURON_CC_FLAGS' `--cache_dir` themselves: torch-neuronx's
#: `torch_neuronx/parallel_compile/neuron_parallel_compile.py` (`CacheUrl.get_cache_url(cache_dir)` with
#: `setup_args().cache_dir`, then `cache_url.url`), Ray's `python/ray/train/torch/xla/config.py`
#: (`CacheUrl.get_cache_url(explicit_cache_dir)` from a `--cache_dir` regex on NEURON_CC_FLAGS), and
#: optimum-neuron's `optimum/neuron/cache/hub_cache.py` (`CacheUrl.get_cache_url(cache_dir=cache_dir)`,
#: `cache_url.is_s3()`). Its own resolution (the argument, NEURON_COMPILE_CACHE_URL, the default) is the one
#: the SDK docs describe; `FAKE_SDK_DEFAULT_ROOT` stands for an SDK whose default differs from ours.
LIBNEURONXLA = {
    "libneuronxla/__init__.py": '__version__ = "2.2.4410.0"\n',
    "libneuronxla/neuron_cc_cache.py": """
        import os

        class CacheUrl:
            def __init__(self, url):
                self.url = url

            def is_s3(self):
                return self.url.startswith("s3://")

            @classmethod
            def get_cache_url(cls, cache_dir=None):
                default = os.environ.get("FAKE_SDK_DEFAULT_ROOT", "/var/tmp/neuron-compile-cache")
                return cls(cache_dir or os.environ.get("NEURON_COMPILE_CACHE_URL") or default)
        """,
}


def test_without_the_sdk_nothing_is_reported(tmp_path):
    out = probe(tmp_path, {})
    assert out["info"] is None
    assert out["lines"] == ["neuron sdk: neuronx-cc not installed, libneuronxla not installed, torch-neuronx not installed"]


def test_pypi_placeholders_count_as_absent(tmp_path):
    placeholder = 'raise ImportError("WRONG PACKAGE. Please install from the Neuron repository")\n'
    out = probe(tmp_path, {"libneuronxla/__init__.py": placeholder, "neuronxcc/__init__.py": placeholder})
    assert out["info"] is None and out["summary"]["libneuronxla"] is None


def test_cache_root_and_compiler_version_are_read_from_libneuronxla(tmp_path):
    out = probe(tmp_path, {**LIBNEURONXLA, "neuronxcc/__init__.py": '__version__ = "2.21.33363.0+82129205"\n'},
                our_root="/fsx/cache", env={"NEURON_COMPILE_CACHE_URL": "/fsx/cache"})
    info = out["info"]
    assert info["version"] == "2.2.4410.0" and info["cache_url"] == "/fsx/cache"
    assert info["compiler_version"] == "2.21.33363.0+82129205" and info["compiler_version_source"] == "neuronxcc"
    assert out["summary"]["root_mismatch"] is False
    assert out["lines"][1] == "libneuronxla: cache /fsx/cache, compiler 2.21.33363.0+82129205"


def test_a_root_libneuronxla_does_not_share_is_reported(tmp_path):
    out = probe(tmp_path, LIBNEURONXLA, our_root="/somewhere/else", env={"NEURON_COMPILE_CACHE_URL": "s3://team/cache"})
    assert out["summary"]["root_mismatch"] is True
    assert "differs from the cache dir used here, /somewhere/else" in out["lines"][1]


def test_the_compiler_version_libneuronxla_reports_is_used_when_neuronxcc_does_not_import(tmp_path):
    packages = dict(LIBNEURONXLA)
    packages["libneuronxla/neuron_cc_cache.py"] = textwrap.dedent(packages["libneuronxla/neuron_cc_cache.py"]) + "\ndef get_neuronxcc_version():\n    return '2.19.8089.0+8ab9f450'\n"
    out = probe(tmp_path, packages)
    assert out["info"]["compiler_version"] == "2.19.8089.0+8ab9f450" and out["info"]["compiler_version_source"] == "libneuronxla"
    assert out["resolved"] == "2.19.8089.0+8ab9f450"


def test_a_libneuronxla_without_the_expected_api_is_reported_not_fatal(tmp_path):
    out = probe(tmp_path, {"libneuronxla/__init__.py": '__version__ = "2.0.0"\n'})
    assert out["info"]["version"] == "2.0.0" and out["info"]["cache_url"] is None
    assert "neuron_cc_cache does not import" in out["info"]["problem"]
    assert out["lines"][1] == "libneuronxla: cache unknown, compiler unknown"
    assert out["resolved"] == "ERROR CompilerVersionError"


def test_the_compiler_version_printed_by_neuronx_cc_is_parsed():
    from optimum_neuron_cache.neuron_sdk import parse_compiler_version_output

    text = "NeuronX Compiler version 2.21.33363.0+82129205\n\nPython version 3.10.12\nHWM version 2.21.0\n"
    assert parse_compiler_version_output(text) == "2.21.33363.0+82129205"
    assert parse_compiler_version_output("neuronx-cc: command not found") is None


def test_the_cache_dir_of_neuron_cc_flags_is_passed_to_libneuronxla(tmp_path):
    """As torch-neuronx's neuron_parallel_compile does: libneuronxla's resolution without the argument ignores
    --cache_dir, so `status` would report a mismatch whenever it is set."""
    out = probe(tmp_path, LIBNEURONXLA, our_root="-", env={"NEURON_CC_FLAGS": "-O1 --cache_dir=/fsx/flags-cache",
                                                           "NEURON_COMPILE_CACHE_URL": "/fsx/env-cache"})
    assert out["info"]["cache_url"] == "/fsx/flags-cache"
    assert out["root"] == {"path": "/fsx/flags-cache", "source": "libneuronxla (CacheUrl.get_cache_url)", "disabled": None}
    assert out["summary"]["root_mismatch"] is False
    assert out["lines"][1].startswith("libneuronxla: cache /fsx/flags-cache, compiler")


def test_the_cache_root_follows_libneuronxla_where_it_is_installed(tmp_path):
    out = probe(tmp_path, LIBNEURONXLA, our_root="-", env={"FAKE_SDK_DEFAULT_ROOT": str(tmp_path / "sdk-default")})
    assert out["root"]["path"] == str(tmp_path / "sdk-default")
    assert out["root"]["source"] == "libneuronxla (CacheUrl.get_cache_url)"
    # Without libneuronxla, the same environment gives our own default.
    assert probe(tmp_path / "none", {}, our_root="-", env={"FAKE_SDK_DEFAULT_ROOT": "/x"})["root"]["path"] == "/var/tmp/neuron-compile-cache"


def test_an_s3_root_from_libneuronxla_turns_bucket_sync_off(tmp_path):
    out = probe(tmp_path, LIBNEURONXLA, our_root="-", env={"NEURON_COMPILE_CACHE_URL": "s3://team/cache"})
    assert out["root"]["path"] is None and "s3://team/cache" in out["root"]["disabled"]


def test_a_failing_libneuronxla_leaves_our_own_resolution(tmp_path):
    packages = dict(LIBNEURONXLA)
    packages["libneuronxla/neuron_cc_cache.py"] = textwrap.dedent("""
        class CacheUrl:
            @classmethod
            def get_cache_url(cls, cache_dir=None):
                raise RuntimeError("no cache for you")
        """)
    out = probe(tmp_path, packages, our_root="-", env={"NEURON_CC_FLAGS": "--cache_dir /fsx/c"})
    assert out["root"] == {"path": "/fsx/c", "source": "--cache_dir in NEURON_CC_FLAGS", "disabled": None}
    assert "CacheUrl.get_cache_url() failed (RuntimeError: no cache for you)" in out["info"]["problem"]


def test_an_explicit_cache_dir_still_wins_and_a_differing_libneuronxla_root_is_reported(tmp_path):
    out = probe(tmp_path, LIBNEURONXLA, our_root="/somewhere/else", env={"NEURON_CC_FLAGS": "--cache_dir=/fsx/c"})
    assert out["summary"]["root_mismatch"] is True and out["info"]["cache_url"] == "/fsx/c"
