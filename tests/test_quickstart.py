"""The README's main job: the quick start on the embedded default bucket (no account, no Neuron hardware)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from optimum_neuron_cache.buckets import embedded_default

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def _load():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SECONDS_PER_GRAPH = 0.0
    return module


def test_quickstart_shows_the_miss_the_sync_and_the_hit(capsys):
    quickstart = _load()
    quickstart.main()
    out = capsys.readouterr().out
    assert "[machine A] compile: 0 cache hits, 3 misses" in out
    assert "[machine A] exit: synced 3 new entries, export record neuronxcc-" in out
    assert "[machine B, fresh cache] enter: fetched 3 entries" in out
    assert "[machine B, fresh cache] compile: 3 cache hits, 0 misses" in out
    assert "[machine B, fresh cache] exit: synced 0 new entries" in out
    assert Path(embedded_default().location).is_dir()
    # Run again: the embedded default remembers, so machine A hits too.
    quickstart.main()
    assert "[machine A] compile: 3 cache hits, 0 misses" in capsys.readouterr().out
