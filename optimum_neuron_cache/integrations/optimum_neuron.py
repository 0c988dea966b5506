"""optimum-neuron's cache API on top of this package: switch with an import change.

    # before
    from optimum.neuron.cache import hub_neuronx_cache, synchronize_hub_cache, get_hub_cached_entries, select_hub_cached_entries
    # after
    from optimum_neuron_cache.integrations.optimum_neuron import (
        hub_neuronx_cache, synchronize_hub_cache, get_hub_cached_entries, select_hub_cached_entries)

The signatures of the three generations of optimum-neuron's API are accepted:

| optimum-neuron | call |
|---|---|
| model-repo cache | `hub_neuronx_cache(entry=None, cache_repo_id=None, cache_dir=None)` |
| with modes | `hub_neuronx_cache("training" \\| "inference", entry=None, cache_repo_id=None, cache_dir=None)` |
| bucket cache | `hub_neuronx_cache(model_id="unknown", task=None, export_config=None, compiler_version=None, bucket_id=None, cache_dir=None)` |

Differences (docs/integrations.md has the full list):

- `cache_repo_id` / `bucket_id` name a **bucket** (`ns/name`, `hf://buckets/ns/name` or a directory), not a
  model repository; default: NEURON_CACHE_BUCKET, the saved setting, then the embedded default (optimum-neuron
  defaults to the public `aws-neuron/optimum-neuron-cache` repository, which is not a bucket).
- Entries are published on exit of every `hub_neuronx_cache` block, not by a later `synchronize_hub_cache`
  (which still exists: it publishes every local success entry the bucket lacks, e.g. after
  `neuron_parallel_compile`). Failed, locked and incomplete entries are never published.
- `get_hub_cached_entries` returns the export configurations recorded for **this model id** (and task);
  optimum-neuron returned those of every model with the same architecture. Each dict is the recorded
  export config plus optimum-neuron's key names (`tp_degree`, `torch_dtype`, ...) where they can be derived.
- `ModelCacheEntry` objects are read duck-typed (`model_id`, `task`, `neuron_config`/`config`); nothing
  needs `transformers` or `torch`.
- Nothing here requires the Neuron SDK; a bucket that is down costs one warning, never an exception.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..buckets import BucketRef, resolve_bucket
from ..client import BucketClient
from ..context import CacheRun
from ..context import hub_neuronx_cache as _core_cache
from ..errors import ConfigurationError, NeuronCacheError
from ..local_cache import resolve_cache_root
from ..lookup import lookup_cache
from ..config_fields import normalize_dtype, same_value, value_of

log = logging.getLogger("optimum_neuron_cache")

MODES = ("training", "inference")

#: optimum-neuron's key names for the canonical fields (config_fields.py), added where a record lacks them.
_OPTIMUM_NAMES = {
    "batch_size": ("batch_size",),
    "sequence_length": ("sequence_length",),
    "tensor_parallel_size": ("tp_degree", "tensor_parallel_size"),
    "dtype": ("torch_dtype",),
    "target": ("target", "instance_type"),
}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


#: Where optimum-neuron's bucket PR (#1102, `optimum/neuron/cache/bucket_utils.py`) saves its bucket setting, in HF_HOME.
PR1102_SETTING_FILE = "optimum_neuron_cache_bucket"


def pr1102_saved_bucket(environ: Mapping[str, str] | None = None) -> BucketRef | None:
    """The bucket optimum-neuron's bucket PR saved (`optimum-cli neuron cache set`), or None; a name this package
    cannot read is said once and ignored."""
    from ..buckets import hf_home, parse_bucket
    from ..errors import InvalidBucketError

    try:
        text = (hf_home(environ) / PR1102_SETTING_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text:
        return None
    try:
        return parse_bucket(text)
    except InvalidBucketError as exc:
        log.warning("optimum-neuron-cache: ignoring optimum-neuron's saved bucket in %s: %s", hf_home(environ) / PR1102_SETTING_FILE, exc)
        return None


def _bucket(cache_repo_id: str | BucketRef | None, bucket_id: str | BucketRef | None) -> BucketRef:
    """The explicit bucket, else NEURON_CACHE_BUCKET, else this package's saved setting, else the one
    optimum-neuron's bucket PR saved, else the embedded default: our own settings win."""
    from .. import settings
    from ..buckets import read_saved_bucket

    explicit = bucket_id if bucket_id is not None else cache_repo_id
    if explicit is None and settings.bucket() is None and read_saved_bucket() is None:
        saved = pr1102_saved_bucket()
        if saved is not None:
            return saved
    return resolve_bucket(explicit)


class CompatCacheContext:
    """What the compat `hub_neuronx_cache` yields: optimum-neuron's `CacheContext` (a settable
    `export_config`) plus this package's `CacheRun` report under `.run` (and its fields as attributes)."""

    def __init__(self, run: CacheRun, export_config: dict[str, Any] | None) -> None:
        self.run = run
        self.export_config = export_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.run, name)


def _entry_fields(entry: Any) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(model id, task, export config) of an optimum-neuron ModelCacheEntry, read duck-typed."""
    if entry is None:
        return None, None, None
    model_id = getattr(entry, "model_id", None)
    task = getattr(entry, "task", None)
    config = getattr(entry, "neuron_config", None)
    if config is not None and not isinstance(config, Mapping):
        config = getattr(config, "to_dict", lambda: None)() or vars(config)
    return (str(model_id) if model_id else None, task if isinstance(task, str) else None,
            dict(config) if isinstance(config, Mapping) else None)


@contextmanager
def hub_neuronx_cache(*args: Any, entry: Any = None, cache_repo_id: str | BucketRef | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, model_id: str | None = None,
                      task: str | None = None, export_config: Mapping[str, Any] | None = None,
                      compiler_version: str | None = None, bucket_id: str | BucketRef | None = None,
                      mode: str | None = None) -> Iterator[CompatCacheContext]:
    """optimum-neuron's `hub_neuronx_cache`, any generation: fetch on enter, publish on exit."""
    positional = list(args)
    if positional and (isinstance(positional[0], str) and positional[0] in MODES or type(positional[0]).__name__ == "Mode"):
        first = positional.pop(0)
        mode = str(getattr(first, "value", first))
    if positional and not isinstance(positional[0], (str, os.PathLike)) and positional[0] is not None:
        entry = positional.pop(0)  # hub_neuronx_cache(entry, cache_repo_id, cache_dir)
        for name, value in zip(("cache_repo_id", "cache_dir"), positional, strict=False):
            if name == "cache_repo_id":
                cache_repo_id = value
            else:
                cache_dir = value
        positional = []
    if positional:  # the bucket generation: (model_id, task, export_config, compiler_version, bucket_id, cache_dir)
        names = ("model_id", "task", "export_config", "compiler_version", "bucket_id", "cache_dir")
        given = dict(zip(names, positional, strict=False))
        model_id = given.get("model_id", model_id)
        task = given.get("task", task)
        export_config = given.get("export_config", export_config)
        compiler_version = given.get("compiler_version", compiler_version)
        bucket_id = given.get("bucket_id", bucket_id)
        cache_dir = given.get("cache_dir", cache_dir)
    entry_model, entry_task, entry_config = _entry_fields(entry)
    model = model_id or entry_model
    if model == "unknown":
        model = None
    chosen_task = task or entry_task or ("training" if mode == "training" else None)
    config = dict(export_config) if export_config is not None else entry_config
    core = _core_cache(model, chosen_task, config, compiler_version=compiler_version,
                       bucket=_bucket(cache_repo_id, bucket_id), cache_dir=cache_dir)
    with core as run:
        context = CompatCacheContext(run, config)
        try:
            yield context
        finally:
            # optimum-neuron lets the block set the config once it is known (after compiling).
            if context.export_config != config:
                core.export_config = context.export_config


def synchronize_hub_cache(cache_path: str | os.PathLike[str] | None = None, cache_repo_id: str | BucketRef | None = None,
                          non_blocking: bool = False, *, bucket_id: str | BucketRef | None = None,
                          compiler_version: str | None = None) -> threading.Thread | None:
    """Publish every local success entry the bucket lacks to its flat area (the explicit push).

    `non_blocking=True` publishes in a (non-daemon) background thread, which is returned; the process
    does not exit before it ends. Remote failures are logged, never raised.
    """
    from ..sync import sync_cache

    if cache_path is not None and not Path(cache_path).is_dir():
        raise ValueError(f"The {cache_path} directory does not exist, cannot synchronize.")
    ref = _bucket(cache_repo_id, bucket_id)
    root = resolve_cache_root(cache_path)
    if root.path is None:
        log.warning("optimum-neuron-cache: nothing to synchronize: %s", root.disabled_reason)
        return None
    root_path = root.path

    def push() -> None:
        try:
            report = sync_cache(BucketClient(ref), root_path, compiler_version=compiler_version)
            published = sum(len(v.result.published) for v in report if v.result)
            log.info("optimum-neuron-cache: synchronized %s with %s: %d entries published", root_path, ref, published)
        except (NeuronCacheError, OSError) as exc:
            log.warning("optimum-neuron-cache: synchronization with %s failed: %s (run it again later)", ref, exc)

    if non_blocking:
        thread = threading.Thread(target=push, name="neuron-cache-synchronize", daemon=False)
        thread.start()
        return thread
    push()
    return None


def _as_optimum_entry(config: Mapping[str, Any], task: str, compiler_version: str,
                      target: str | None = None) -> dict[str, Any]:
    """An export record as optimum-neuron lists a cached entry: its config under optimum-neuron's names, with
    the record's compile target where the config states none (so `instance_type` filters by it)."""
    entry = dict(config)
    if target and value_of(config, "target") is None:
        entry["target"] = target
    for field, names in _OPTIMUM_NAMES.items():
        value = value_of(config, field)
        if value is not None:
            for name in names:
                entry.setdefault(name, value)
    if "torch_dtype" in entry:
        entry["torch_dtype"] = _DTYPE_NAMES.get(normalize_dtype(entry["torch_dtype"]), str(entry["torch_dtype"]))
    entry.setdefault("task", task)
    entry.setdefault("compiler_version", compiler_version)
    return entry


def get_hub_cached_entries(model_id: str, task: str | None = None, cache_repo_id: str | BucketRef | None = None, *,
                           mode: str | None = None, compiler_version: str | None = None,
                           bucket_id: str | BucketRef | None = None) -> list[dict[str, Any]]:
    """The export configurations recorded for `model_id` (and `task`; every task when None), newest first.

    A second positional argument "training" / "inference" is optimum-neuron's older `mode`: "training"
    selects the training task, "inference" every task. Remote failures give an empty list and a warning.
    """
    if task in MODES:
        mode, task = task, None
    if mode == "training" and task is None:
        task = "training"
    try:
        records = lookup_cache(model_id, task, compiler_version=compiler_version, bucket=_bucket(cache_repo_id, bucket_id))
    except ConfigurationError:
        raise  # bad input (model id, bucket name, compiler version) is the caller's to fix
    except (NeuronCacheError, OSError) as exc:
        log.warning("optimum-neuron-cache: cached entries of %s could not be read: %s", model_id, exc)
        return []
    return [_as_optimum_entry(record.export_config, record.task, record.compiler_version, record.target)
            for record in records]


def select_hub_cached_entries(model_id: str, task: str | None = None, cache_repo_id: str | BucketRef | None = None,
                              instance_type: str | None = None, batch_size: int | None = None,
                              sequence_length: int | None = None, tensor_parallel_size: int | None = None,
                              torch_dtype: Any = None, *, compiler_version: str | None = None,
                              bucket_id: str | BucketRef | None = None) -> list[dict[str, Any]]:
    """`get_hub_cached_entries` filtered like optimum-neuron's (each given value must match exactly;
    dtypes compare by meaning: torch.bfloat16 == "bfloat16" == "bf16")."""
    wanted = {"target": instance_type, "batch_size": batch_size, "sequence_length": sequence_length,
              "tp_degree": tensor_parallel_size, "torch_dtype": torch_dtype}
    selected = []
    for entry in get_hub_cached_entries(model_id, task, cache_repo_id, compiler_version=compiler_version, bucket_id=bucket_id):
        if any(value is not None and (key not in entry or not same_value(entry[key], value, key))
               for key, value in wanted.items()):
            continue
        selected.append(entry)
    return selected
