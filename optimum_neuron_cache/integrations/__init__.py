"""Where users compile, the cache reaches them: exporters, trainers, neuron_parallel_compile, the compiler itself.

Nothing here is imported by `import optimum_neuron_cache`, and importing this package imports nothing
outside the stdlib and `filelock` either: each integration loads its own optional dependency
(`transformers` for the trainer callback) only when it is used.

| integration | use it for | module |
|---|---|---|
| `cached_compile` | any compile function (exporters, NxD model builders, ...) | `export` |
| `NeuronCacheCallback` | `transformers.Trainer` / optimum-neuron's `NeuronTrainer` | `trainer` |
| `TrainingCacheSession` | a custom training loop, rank-aware | `session` |
| `run_parallel_compile`, `fill_todo_entries` | `neuron_parallel_compile` | `parallel_compile` |
| `install_compiler_shim`, `compiler_shim_on_path` | hits across models sharing graphs, at the compiler | `compiler_shim` |
| `hub_neuronx_cache`, `synchronize_hub_cache`, `get_hub_cached_entries`, `select_hub_cached_entries` | code written against optimum-neuron's cache API | `optimum_neuron` |

See docs/integrations.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cached_compile": "export",
    "derive_export": "export",
    "DerivedExport": "export",
    "RankInfo": "ranks",
    "TrainingCacheSession": "session",
    "NeuronCacheCallback": "trainer",
    "run_parallel_compile": "parallel_compile",
    "fill_todo_entries": "parallel_compile",
    "install_compiler_shim": "compiler_shim",
    "compiler_shim_on_path": "compiler_shim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # PEP 562: load an integration only when it is asked for
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
