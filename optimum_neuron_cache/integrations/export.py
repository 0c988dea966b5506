"""`cached_compile`: wrap any compile function with the bucket cache, from the arguments it already takes.

    from optimum_neuron_cache.integrations import cached_compile

    @cached_compile                                    # everything derived from each call's arguments
    def export(model_id, batch_size=1, sequence_length=2048, tensor_parallel_size=2, auto_cast_type="bf16"):
        ...                                            # neuronx-cc runs here

    export("meta-llama/Llama-3.2-1B", batch_size=4)     # fetch, compile (hits where cached), publish + record

    # Or around a function you do not own, with explicit values (they win over derived ones):
    build = cached_compile("my-org/my-model", task="text-generation", export_config={"target": "trn2"})(builder.compile)

The export record is derived from each call: the model id (`model_id`, `model_name_or_path`, `model`,
`pretrained_model_name_or_path`, `checkpoint`, `model_path`, a model object's `name_or_path`), the task,
and the batch size, sequence length, tensor parallel size, dtype and target, under the names exporters
use (`tp_degree`, `num_cores`, `seq_len`, `max_length`, `auto_cast_type`, `torch_dtype`, `instance_type`,
...), read from the arguments themselves or from config arguments (`neuron_config`, `export_config`,
`*config`, dicts or objects). `compiler_args` are recorded too. A local model directory is keyed by content
(see docs/remote-layout.md); a derived model id that names nothing the cache can key (a file, a model
built in memory) falls back to the flat area only, with one warning. Explicit arguments that are wrong
raise before the compile runs, as `hub_neuronx_cache` does.

After a call, `wrapped.last_run` is the `CacheRun` (fetched, compiled, synced, record, warnings).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .. import remote_layout as layout
from ..buckets import BucketRef
from ..config_fields import ALIASES, normalize_dtype
from ..context import hub_neuronx_cache
from ..errors import ConfigurationError

log = logging.getLogger("optimum_neuron_cache")

F = TypeVar("F", bound=Callable[..., Any])

MODEL_ARGUMENTS = ("model_id", "model_name_or_path", "pretrained_model_name_or_path", "model_path", "checkpoint",
                   "model", "model_dir")
TASK_ARGUMENTS = ("task",)
#: Canonical export-config key -> the argument / attribute names exporters give it (first found wins).
CONFIG_ALIASES = ALIASES
COMPILER_ARGUMENTS = ("compiler_args", "compiler_flags")


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar, or None when `value` is not one (tensors, modules, callables)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float, str)):
        return value
    if type(value).__name__ == "dtype" or str(value).startswith("torch."):
        return str(value)
    return None


def _get(source: Any, name: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(name)
    try:
        return getattr(source, name, None)
    except Exception:
        return None


@dataclass(frozen=True)
class DerivedExport:
    """What a call's arguments say about the export (None / empty where they say nothing)."""

    model_id: str | None
    task: str | None
    export_config: dict[str, Any] = field(default_factory=dict)
    #: Why a model argument was not usable as a model id (it is then left out), or None.
    model_problem: str | None = None


def _model_id_from(value: Any) -> tuple[str | None, str | None]:
    """(model id, problem) from a model argument: a Hub id, a local directory, or a model object."""
    if isinstance(value, (str, os.PathLike)):
        candidate: Any = os.fspath(value)
    else:
        candidate = _get(value, "name_or_path") or _get(_get(value, "config"), "_name_or_path")
        if not isinstance(candidate, (str, os.PathLike)) or not os.fspath(candidate):
            return None, f"the {type(value).__name__} passed as the model names no checkpoint (no name_or_path)"
        candidate = os.fspath(candidate)
    if not candidate:
        return None, None
    try:
        layout.model_ref(candidate)
    except ConfigurationError as exc:
        return None, str(exc)
    return candidate, None


def derive_export(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], *,
                  model_argument: str | None = None) -> DerivedExport:
    """The model id, task and export config a call of `fn(*args, **kwargs)` implies."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        bound.apply_defaults()
        arguments: dict[str, Any] = dict(bound.arguments)
    except (TypeError, ValueError):  # builtins, C functions, signatures that do not bind: keyword arguments only
        arguments = dict(kwargs)
    # **kwargs of the wrapped function are flattened: exporters often take their options that way.
    for name, parameter in list(arguments.items()):
        if isinstance(parameter, dict) and name in _var_keyword_names(fn):
            arguments.pop(name)
            arguments.update(parameter)

    model_id = problem = None
    names = (model_argument,) if model_argument else MODEL_ARGUMENTS
    for name in names:
        if name in arguments and arguments[name] is not None:
            model_id, problem = _model_id_from(arguments[name])
            break
    task = next((arguments[name] for name in TASK_ARGUMENTS if isinstance(arguments.get(name), str)), None)

    config: dict[str, Any] = {}
    # Config-like arguments (neuron_config=..., export_config=...) are read after the plain arguments.
    config_sources = [value for name, value in arguments.items()
                      if "config" in name.lower() and value is not None and not isinstance(value, (str, bytes, int, float))]
    model_value = next((arguments[name] for name in names if name and arguments.get(name) is not None), None)
    if model_value is not None and not isinstance(model_value, (str, os.PathLike)):
        config_sources.append(_get(model_value, "neuron_config"))
    for key, aliases in CONFIG_ALIASES.items():
        for source in [arguments, *config_sources]:
            value = next((_plain(_get(source, alias)) for alias in aliases if _plain(_get(source, alias)) is not None), None)
            if value is not None:
                config[key] = normalize_dtype(value) if key == "dtype" else value
                break
    for name in COMPILER_ARGUMENTS:
        value = arguments.get(name)
        if isinstance(value, str) and value.strip():
            config["compiler_args"] = value.split()
        elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            config["compiler_args"] = list(value)
    return DerivedExport(model_id=model_id, task=task, export_config=config, model_problem=problem)


def _var_keyword_names(fn: Callable[..., Any]) -> set[str]:
    try:
        return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD}
    except (TypeError, ValueError):
        return set()


@overload
def cached_compile(model_id: F) -> F: ...
@overload
def cached_compile(model_id: str | os.PathLike[str] | None = None, task: str | None = None,
                   export_config: Mapping[str, Any] | None = None, *, bucket: str | BucketRef | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, compiler_version: str | None = None,
                   model_argument: str | None = None, derive: bool = True) -> Callable[[F], F]: ...


def cached_compile(model_id: Any = None, task: str | None = None, export_config: Mapping[str, Any] | None = None, *,
                   bucket: str | BucketRef | None = None, cache_dir: str | os.PathLike[str] | None = None,
                   compiler_version: str | None = None, model_argument: str | None = None, derive: bool = True) -> Any:
    """Decorate (or wrap) a compile function so that each call runs inside `hub_neuronx_cache`.

    Explicit `model_id`, `task` and `export_config` entries win over what is derived from the call;
    `derive=False` uses the explicit values only. `model_argument` names the parameter holding the model
    when it is not one of the usual names. Usable bare: `@cached_compile`.
    """
    if callable(model_id) and not isinstance(model_id, (str, os.PathLike)):
        return cached_compile()(model_id)
    explicit_config = dict(export_config) if export_config is not None else None
    if model_id is not None:
        layout.model_ref(model_id)  # bad explicit input raises at decoration time
    if task is not None:
        layout.task_name(task)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            derived = derive_export(fn, args, kwargs, model_argument=model_argument) if derive else DerivedExport(None, None)
            chosen_model = model_id if model_id is not None else derived.model_id
            chosen_task = task if task is not None else derived.task
            if task is None and chosen_task is not None:
                try:
                    layout.task_name(chosen_task)
                except ConfigurationError:
                    log.warning("optimum-neuron-cache: task %r of this call is not a task name; using the default", chosen_task)
                    chosen_task = None
            if model_id is None and derived.model_problem:
                log.warning("optimum-neuron-cache: %s; this compile uses the flat area only (no per-model entries "
                            "or export record)", derived.model_problem)
            config = {**derived.export_config, **(explicit_config or {})}
            context = hub_neuronx_cache(chosen_model, chosen_task, config or None, compiler_version=compiler_version,
                                        bucket=bucket, cache_dir=cache_dir)
            with context as run:
                wrapper.last_run = run  # type: ignore[attr-defined]
                return fn(*args, **kwargs)

        wrapper.last_run = None  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
