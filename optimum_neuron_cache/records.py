"""Export records: what a later user needs to judge whether a cached compile matches theirs.

One JSON file per (export config, compile flags, compile target) under the model's `exports/` folder. The
flags are NEURON_CC_FLAGS without wrapper flags (which never reach the compiler), so a lookup never claims a
match that was compiled with other flags; the target keeps a trn1 and a trn2 build of one configuration apart.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import remote_layout as layout
from ._version import __version__
from .config_fields import canonical, names_of, same_value, value_of
from .local_cache import ENV_CC_FLAGS, split_flags
from .neuron_sdk import compile_target, normalize_target
from .remote_layout import area_record_path

log = logging.getLogger("optimum_neuron_cache")

RECORD_SCHEMA = 1
#: libneuronxla's own flags: consumed by its wrapper, never passed to neuronx-cc, never in the flags hash.
_WRAPPER_FLAGS_WITH_VALUE = ("--cache_dir", "--log_level")
_WRAPPER_FLAGS = ("--no_cache", "--retry_failed_compilation")


def compiler_flags(environ: Mapping[str, str] | None = None) -> list[str]:
    """NEURON_CC_FLAGS as the compiler sees them: wrapper flags removed."""
    env = os.environ if environ is None else environ
    tokens = split_flags(env.get(ENV_CC_FLAGS, ""))
    kept: list[str] = []
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in _WRAPPER_FLAGS or any(token.startswith(flag + "=") for flag in _WRAPPER_FLAGS_WITH_VALUE):
            continue
        if token in _WRAPPER_FLAGS_WITH_VALUE:
            skip_next = True
            continue
        kept.append(token)
    return kept


def _canonical(value: Any) -> Any:
    """JSON-safe and order-independent: the same config always gives the same record id."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass(frozen=True)
class ExportRecord:
    """What a later user needs to judge whether a cached compile matches theirs (docs/remote-layout.md)."""
    model_id: str
    task: str
    compiler_version: str
    export_config: dict[str, Any]
    compile_flags: list[str]
    modules: list[str] = field(default_factory=list)
    #: The compile target (trn1, trn2, inf2...): see `neuron_sdk.compile_target`. None in records written
    #: before targets were recorded, and where nothing said it.
    target: str | None = None
    #: How long each module took to compile here (seconds), where the files tell: what a hit saves.
    compile_seconds: dict[str, float] = field(default_factory=dict)
    #: Xet hash -> `blake3:<hex>` of the files this run uploaded, recorded at publish time: a reader's bucket
    #: server checks a download of that content by BLAKE3 (about 5x cheaper than recomputing the Xet hash).
    digests: dict[str, str] = field(default_factory=dict)
    package_version: str = __version__
    created_at: str = ""
    schema: int = RECORD_SCHEMA

    @property
    def record_id(self) -> str:
        """The record's id: a digest of its export config, compile flags and target, so one configuration has one
        record per target (a trn1 and a trn2 compile of it never overwrite each other). Without a target the
        digest is the one of records from before targets were recorded."""
        return _record_id(self.export_config, self.compile_flags, self.target)

    @property
    def effective_target(self) -> str | None:
        """The recorded target, else (older records) the one the export config states, if any."""
        return self.target or normalize_target(value_of(self.export_config, "target"))

    def to_json(self) -> str:
        """The record as stored in the bucket."""
        return json.dumps(asdict(self), sort_keys=True, indent=1) + "\n"


def _record_id(export_config: Mapping[str, Any], compile_flags: list[str], target: str | None) -> str:
    key: dict[str, Any] = {"export_config": export_config, "compile_flags": compile_flags}
    if target is not None:
        key["target"] = target
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def record_id_for(export_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> str:
    """The id `make_record` would give a record of `export_config` here, without making the record: what an exit
    asks of each configuration to know whether its record is in the bucket already."""
    found = compile_target(environ, export_config)
    return _record_id(_canonical(dict(export_config)), compiler_flags(environ), found.target if found else None)


def make_record(model_id: str, task: str, compiler_version: str, export_config: Mapping[str, Any],
                modules: list[str], environ: Mapping[str, str] | None = None,
                compile_seconds: Mapping[str, float] | None = None) -> ExportRecord:
    """A record of this run: the export config made canonical, the compile flags and target in force, the
    modules sorted."""
    found = compile_target(environ, export_config)
    return ExportRecord(
        model_id=model_id,
        task=task,
        compiler_version=compiler_version,
        export_config=_canonical(dict(export_config)),
        compile_flags=compiler_flags(environ),
        modules=sorted(set(modules)),
        target=found.target if found else None,
        compile_seconds={name: round(seconds, 3) for name, seconds in sorted((compile_seconds or {}).items())},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def compile_seconds(entry_path: Path) -> float | None:
    """How long the compile of an entry took, read from its files: libneuronxla writes the HLO and flags
    before compiling and the NEFF (then model.done) after, so the gap between their times is the compile."""
    try:
        started = min(os.stat(entry_path / name).st_mtime for name in os.listdir(entry_path) if name.startswith("model.hlo"))
        finished = max(os.stat(entry_path / name).st_mtime for name in ("model.neff", "model.done") if (entry_path / name).exists())
    except (OSError, ValueError):
        return None
    return max(0.0, finished - started)


def exit_records(model_id: str, task: str, compiler_version: str, area: str, entries: Mapping[str, Any], *,
                 config: Mapping[str, Any] | None, compiled: set[str], used: set[str],
                 earlier: Iterable[tuple[Mapping[str, Any], set[str]]], recorded: Collection[str],
                 previous: Iterable[ExportRecord]) -> list[tuple[str, ExportRecord]]:
    """The export records a run writes on exit, as (bucket path, record).

    A record lists the graphs its configuration compiled: this run's `compiled`, plus what killed runs of the
    same configuration compiled (`earlier`: their configs and entries, each also recorded on its own). A run
    that compiled nothing cannot tell which of the model's entries it `used`, so its record names all of them,
    unless that configuration is `recorded` already. A record that would list no graph is never written. A
    record rewritten for a configuration keeps the digests of the one it replaces (`previous`, read on enter):
    readers go on checking those files by BLAKE3.
    """
    configs: dict[str, tuple[Mapping[str, Any], set[str]]] = {}
    for earlier_config, names in earlier:
        configs.setdefault(record_id_for(earlier_config), (earlier_config, set()))[1].update(names)
    if config is not None:
        record_id = record_id_for(config)
        before = configs.get(record_id, ({}, set()))[1]
        if compiled or before:
            modules = set(compiled) | before
        elif f"{record_id}.json" in recorded:
            modules = set()  # recorded already, and nothing new was compiled
        else:
            modules = set(used)
        configs[record_id] = (config, modules)
    digests = {record.record_id: record.digests for record in previous if record.digests}
    writes = []
    for record_id, (record_config, modules) in sorted(configs.items()):
        if not modules:
            continue
        seconds = {name: s for name in modules if name in entries
                   and (s := compile_seconds(entries[name].path)) is not None}
        record = make_record(model_id, task, compiler_version, record_config, sorted(modules), compile_seconds=seconds)
        if digests.get(record_id):
            record = replace(record, digests=dict(digests[record_id]))
        writes.append((area_record_path(area, f"{record_id}.json"), record))
    return writes


# ------------------------------------------------------------------------------ reading records

#: No compile of one graph takes a month: a larger duration in a record is corrupt or hostile, not slow.
MAX_COMPILE_SECONDS = 30 * 24 * 3600.0

@dataclass(frozen=True)
class CachedExport(ExportRecord):
    """An export record found in the bucket, and where it lives there."""

    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """What `lookup --json` prints: the configuration, not the digests kept for the bucket server."""
        return {key: value for key, value in asdict(self).items() if key != "digests"}

    def matches(self, filters: Mapping[str, Any]) -> bool:
        """Whether every given filter matches one of the config keys that carry it (numbers compared as numbers).
        `target` matches the recorded target (an instance type counts as its family: trn1.32xlarge is trn1),
        or, in records from before targets were recorded, the export config's."""
        for name, wanted in filters.items():
            if wanted is None:
                continue
            if canonical(name) == "target":
                if self.effective_target != (normalize_target(wanted) or str(wanted).strip().lower()):
                    return False
                continue
            keys = names_of(canonical(name))
            values = [self.export_config[key] for key in keys if key in self.export_config]
            if not any(same_value(value, wanted, name) for value in values):
                return False
        return True


@dataclass(frozen=True)
class ExportFilter:
    """What a fetch asks of export records, parsed once: (field, wanted value) pairs, each field under its
    canonical name (`tp_degree` -> `tensor_parallel_size`), values JSON-canonical. A record matches when each
    field matches by meaning (`CachedExport.matches`: `bf16` = `bfloat16`, an instance type = its family)."""

    fields: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, config: Mapping[str, Any] | None = None, **stated: Any) -> ExportFilter:
        """A whole export config (`--config`, a run's export_config) and the fields stated one by one, which
        override the config's; fields given as None are not asked."""
        wanted: dict[str, Any] = {}
        for name, value in [*_canonical(dict(config or {})).items(), *stated.items()]:
            if value is not None:
                wanted[canonical(name)] = value
        return cls(tuple(sorted(wanted.items())))

    def __bool__(self) -> bool:
        return bool(self.fields)

    @property
    def key(self) -> str:
        """A stable text of the filter (what a host's fetch note keeps, to know it was asked the same)."""
        return json.dumps(self.fields, sort_keys=True, default=str)

    def matches(self, record: CachedExport) -> bool:
        return record.matches(dict(self.fields))

    def __str__(self) -> str:
        return " ".join(f"{name}={json.dumps(value) if isinstance(value, (dict, list)) else value}"
                        for name, value in self.fields)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_bucket_json(text: str) -> Any:
    """JSON from the bucket: NaN, Infinity and numbers that overflow to them (1e309) are refused, so no
    figure read from a bucket can poison a sum, a comparison or the JSON we print."""
    return json.loads(text, parse_float=_finite, parse_constant=_not_a_number)


def _compile_seconds(value: object) -> dict[str, float]:
    """compile_seconds: MODULE name -> seconds, each finite, from 0 to MAX_COMPILE_SECONDS."""
    if not isinstance(value, dict):
        raise ValueError("compile_seconds is not an object")
    seconds: dict[str, float] = {}
    for name, number in value.items():
        if not layout.is_module_name(name):
            raise ValueError(f"compile_seconds names {name!r}, not a MODULE entry")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= MAX_COMPILE_SECONDS:
            raise ValueError(f"compile_seconds of {name} is {number!r}, not a number of seconds from 0 to {MAX_COMPILE_SECONDS:.0f}")
        seconds[name] = float(number)
    return seconds


def parse_record(text: str, path: str) -> CachedExport | None:
    """A record, or None (with a warning) when it is not one: buckets hold whatever someone put there.
    Every number in it is finite, and its compile durations are bounded, or the whole record is skipped."""
    try:
        data = load_bucket_json(text)
        if not isinstance(data, dict) or not isinstance(data.get("export_config"), dict):
            raise ValueError("not an export record")
        flags = data.get("compile_flags", [])
        modules = data.get("modules", [])
        if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise ValueError("compile_flags is not a list of strings")
        if not (isinstance(modules, list) and all(isinstance(m, str) and layout.is_module_name(m) for m in modules)):
            raise ValueError("modules is not a list of MODULE names")
        seconds = _compile_seconds(data.get("compile_seconds", {}))
        target = data.get("target")
        if target is not None and (not isinstance(target, str) or normalize_target(target) != target):
            raise ValueError(f"target {target!r} is not a compile target such as trn1")
        digests = data.get("digests", {})  # checked where it is used: by the bucket server
        if not (isinstance(digests, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
            digests = {}
        return CachedExport(
            model_id=str(data["model_id"]), task=str(data["task"]), compiler_version=str(data["compiler_version"]),
            export_config=data["export_config"], compile_flags=flags, modules=modules, target=target,
            compile_seconds=seconds, digests=digests,
            created_at=str(data.get("created_at", "")), package_version=str(data.get("package_version", "")), path=path,
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("optimum-neuron-cache: ignoring malformed export record %s: %s", path, exc)
        return None


# ------------------------------------------------------------- optimum-neuron's records, read as export records


def _registry_config(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The export configuration of an optimum-neuron registry entry: its `neuron` config (a single model), or
    each sub-model's `neuron` config by name (a pipeline's MultiModelCacheEntry)."""
    neuron = data.get("neuron")
    if isinstance(neuron, dict):
        config = dict(neuron)
        if isinstance(data.get("model_type"), str):
            config.setdefault("model_type", data["model_type"])
        return config
    subs = {name: value["neuron"] for name, value in data.items()
            if isinstance(value, dict) and isinstance(value.get("neuron"), dict)}
    return subs or None


def record_from_registry(text: str, path: str, compiler_version: str) -> CachedExport | None:
    """An entry of an optimum-neuron Git cache repo's registry (`neuronxcc-<ver>/0_REGISTRY/...`) as an export
    record, or None (with a warning) when it is not one. It lists no modules: the registry does not say which
    graphs a configuration compiled (optimum-neuron finds them graph by graph at compile time)."""
    from .errors import ConfigurationError

    try:
        data = load_bucket_json(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        model_id, task = data.get("_model_id"), data.get("_task") or layout.DEFAULT_TASK
        if not isinstance(model_id, str) or layout.hub_model_folder(model_id) is None:
            raise ValueError(f"_model_id {model_id!r} is not a Hub model id")
        task = layout.task_name(task) if isinstance(task, str) else layout.DEFAULT_TASK
        config = _registry_config(data)
        if config is None:
            raise ValueError("no neuron configuration")
    except (ValueError, TypeError, RecursionError, ConfigurationError) as exc:
        log.warning("optimum-neuron-cache: ignoring registry entry %s: %s", path, exc)
        return None
    return CachedExport(model_id=model_id, task=task, compiler_version=compiler_version,
                        export_config=_canonical(config), compile_flags=[], modules=[], package_version="",
                        path=path)


def record_from_pr1102(text: str, path: str, model_id: str, task: str, compiler_version: str) -> CachedExport | None:
    """A record of optimum-neuron PR #1102's layout (`exports/<on version>/<sha256(config)[:8]>.json`, the bare
    export config) as an export record, or None (with a warning) when it is not a JSON object. Its model, task
    and compiler version are those of the area it was found in; it lists no modules (that layout does not)."""
    try:
        data = load_bucket_json(text)
        if not isinstance(data, dict) or not data:
            raise ValueError("not a non-empty JSON object")
    except (ValueError, TypeError, RecursionError) as exc:
        log.warning("optimum-neuron-cache: ignoring record %s: %s", path, exc)
        return None
    return CachedExport(model_id=model_id, task=task, compiler_version=compiler_version,
                        export_config=_canonical(data), compile_flags=[], modules=[], package_version="", path=path)
