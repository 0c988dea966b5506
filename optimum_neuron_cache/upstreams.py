"""Read-through upstreams: read-only sources consulted for what the bucket lacks, graph by graph.

An upstream is an optimum-neuron Git cache repo on the Hub (e.g. `aws-neuron/optimum-neuron-cache`, entries at
`neuronxcc-<ver>/MODULE_*/`: see remote_layout.py) or another bucket. They are listed in NEURON_CACHE_UPSTREAM,
or saved with `neuron-cache set --upstream`, and are only ever read.

Per-graph lookups (the compiler shim on a bucket miss, filling todo entries) ask each upstream in order for
the exact MODULE with one paths-info, and take it with the same verification (the bucket server checks every
byte against its Xet hash), the same atomic install (`fetch.execute_fetch`, or the shim's whole-file rename)
and the same bounded cost (the server's retry budget; the shim's backoff note per source). What an upstream
gave is then published to the bucket by the run that fetched it, through `publish.publish`, so the next run
finds it at home. A per-model fetch can read another bucket's model area; a Git cache repo has no per-model
listing of its entries (its registry names no MODULE keys), so a Git upstream serves graphs one by one only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .atomic import atomic_write
from .buckets import BucketRef, hf_home, parse_bucket
from .client import BucketClient
from .errors import ConfigurationError, InvalidBucketError
from .fetch import Action, FetchOp, FetchPlan, FetchResult, complete_flat_entries, download_checked, execute_fetch, flat_probe_paths
from .hub_repos import RepoClient, RepoRef, parse_repo
from .local_cache import EntryState, LocalEntry
from .remote_layout import RemoteFile

log = logging.getLogger("optimum_neuron_cache")

SETTING_FILE_NAME = "neuron_cache_upstreams"
Upstream = RepoRef | BucketRef


def parse_upstream(spec: str) -> Upstream:
    """A model repo (`org/name[@rev]`, `hf://models/org/name`) or a bucket (`hf://buckets/ns/name`, a directory).
    A bare `org/name` is a model repo here: upstreams are mostly optimum-neuron cache repos."""
    text = spec.strip()
    if text.startswith(("hf://buckets/", "https://huggingface.co/buckets/", "file://", "/", "./", "../", "~")):
        try:
            return parse_bucket(text)
        except InvalidBucketError as exc:
            raise ConfigurationError(f"upstream {spec!r}: {exc}") from None
    try:
        return parse_repo(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"upstream {spec!r} is not a model repo (org/name[@revision]), a bucket "
                                 f"(hf://buckets/ns/name) or a directory: {exc}") from None


def same_source(upstream: Upstream) -> tuple[str, ...]:
    """What tells two upstreams apart: a model repo's id regardless of case (the Hub resolves `Org/Name` and
    `org/name` to one repo) and its revision, a Hub bucket's id, a directory's normalized path."""
    if isinstance(upstream, RepoRef):
        revision = upstream.revision
        if len(revision) == 40 and revision.isalnum():  # a commit sha, in either case
            revision = revision.lower()
        return ("model", upstream.repo_id.lower(), revision)
    return (upstream.kind, os.path.normpath(upstream.location) if upstream.kind == "dir" else upstream.location)


def unique_upstreams(upstreams: Iterable[Upstream]) -> tuple[Upstream, ...]:
    """The upstreams in order, each source once (its first spelling kept): a source named twice is asked once."""
    seen: set[tuple[str, ...]] = set()
    unique = []
    for upstream in upstreams:
        if same_source(upstream) not in seen:
            seen.add(same_source(upstream))
            unique.append(upstream)
    return tuple(unique)


def setting_path(environ: Mapping[str, str] | None = None) -> Path:
    """The file holding the saved upstreams (`neuron-cache set --upstream`), one per line."""
    return hf_home(environ) / SETTING_FILE_NAME


def save_upstreams(upstreams: Iterable[Upstream], environ: Mapping[str, str] | None = None) -> Path:
    """Save the upstreams (none: forget them), atomically."""
    path = setting_path(environ)
    names = [str(upstream) for upstream in unique_upstreams(upstreams)]
    if not names:
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(f"{name}\n" for name in names))
    return path


def configured_upstreams(environ: Mapping[str, str] | None = None) -> tuple[Upstream, ...]:
    """NEURON_CACHE_UPSTREAM, else the saved setting, else none, each source once; a bad name raises
    ConfigurationError."""
    specs = settings.upstream(environ)
    if specs is None:
        try:
            specs = tuple(line.strip() for line in setting_path(environ).read_text(encoding="utf-8").splitlines() if line.strip())
        except (FileNotFoundError, NotADirectoryError):
            specs = ()
    return unique_upstreams(parse_upstream(spec) for spec in specs)


def client_for(upstream: Upstream, environ: Mapping[str, str] | None = None) -> RepoClient | BucketClient:
    """A reader of the upstream: both speak `paths_info` and `download` as fetch.py expects."""
    return BucketClient(upstream, environ) if isinstance(upstream, BucketRef) else RepoClient(upstream, environ)


@dataclass(frozen=True)
class UpstreamHit:
    """A complete entry an upstream holds in its flat area."""

    upstream: Upstream
    client: RepoClient | BucketClient
    files: Mapping[str, RemoteFile]


def find_entries(upstream: Upstream, compiler_version: str, modules: Iterable[str],
                 environ: Mapping[str, str] | None = None) -> tuple[RepoClient | BucketClient, dict[str, dict[str, RemoteFile]]]:
    """The complete entries among `modules` that the upstream's flat area holds (one paths-info)."""
    client = client_for(upstream, environ)
    wanted = sorted(set(modules))
    if not wanted:
        return client, {}
    return client, complete_flat_entries(compiler_version, client.paths_info(flat_probe_paths(compiler_version, wanted)))


def find_entry(upstream: Upstream, compiler_version: str, module: str,
               environ: Mapping[str, str] | None = None) -> UpstreamHit | None:
    """One graph's complete entry in the upstream's flat area, or None."""
    client, found = find_entries(upstream, compiler_version, [module], environ)
    return UpstreamHit(upstream, client, found[module]) if module in found else None


def install_neff(client: RepoClient | BucketClient, neff: RemoteFile, output: Path) -> str | None:
    """Download a NEFF (verified by the server, size checked here) and rename it onto `output` whole; the
    problem, or None once it is there."""
    staging = Path(tempfile.mkdtemp(prefix=".neuron-cache-", dir=output.parent))
    try:
        staged = staging / "model.neff"
        problems = download_checked(client, [(neff, staged)])
        if problems:
            return problems[staged]
        os.replace(staged, output)
        return None
    finally:
        for leftover in staging.iterdir() if staging.exists() else []:
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            staging.rmdir()


@dataclass
class UpstreamFill:
    """What filling todo entries from the upstreams did: MODULE names filled, and one line per problem."""

    filled: list[str]
    warnings: list[str]


def fill_todo(root: Path, compiler_version: str, todo: Iterable[LocalEntry],
              environ: Mapping[str, str] | None = None) -> UpstreamFill:
    """Fill local todo entries from the upstreams, in order, each with what the ones before lacked: one
    paths-info and one download per upstream that has any. Best effort: a failing upstream is one warning."""
    pending = {entry.name: entry for entry in todo if entry.state is EntryState.TODO}
    fill = UpstreamFill([], [])
    if not pending:
        return fill
    for upstream in configured_upstreams(environ):
        if not pending:
            break
        try:
            client, found = find_entries(upstream, compiler_version, pending, environ)
            ops = tuple(FetchOp(name, Action.FILL, f"a todo entry here, filled from upstream {upstream}",
                                tuple(f for fname, f in files.items() if fname not in pending[name].files), "flat")
                        for name, files in sorted(found.items()))
            if not ops:
                continue
            result: FetchResult = execute_fetch(client, root, FetchPlan(compiler_version, None, ops))
        except ConfigurationError:
            raise
        except Exception as exc:  # an upstream is a bonus: its failure never costs the run more than a line
            fill.warnings.append(f"upstream {upstream} skipped: {exc}")
            continue
        fill.filled += result.fetched
        fill.warnings += [f"entry {name} not filled from upstream {upstream}: {why}" for name, why in result.failed]
        for name in result.fetched:
            pending.pop(name, None)
    return fill


def fill_and_publish(root: Path, compiler_version: str, bucket: BucketRef,
                     environ: Mapping[str, str] | None = None) -> UpstreamFill:
    """Fill the local todo entries the bucket lacked from the upstreams, then publish what they gave to the
    bucket (`publish.publish`, journaled: if the bucket fails, the next run publishes them)."""
    from . import remote_layout as layout
    from .errors import NeuronCacheError
    from .journal import JournalKey
    from .local_cache import read_entry, scan_entries, version_dir_name
    from .publish import defer, publish_leftovers

    try:
        todo = [entry for entry in scan_entries(root, compiler_version) if entry.state is EntryState.TODO]
        fill = fill_todo(root, compiler_version, todo, environ)
    except ConfigurationError as exc:
        return UpstreamFill([], [f"upstreams not read: {exc}"])
    if not fill.filled:
        return fill
    key = JournalKey(str(bucket), compiler_version, None, layout.DEFAULT_TASK)
    entries = [read_entry(root / version_dir_name(compiler_version) / name, compiler_version) for name in fill.filled]
    try:
        publish_leftovers(BucketClient(bucket, environ), root, key, area=None,
                          with_entries=[entry for entry in entries if entry.state.publishable])
    except (NeuronCacheError, OSError) as exc:
        with contextlib.suppress(OSError):
            defer(root, key, fill.filled)
        fill.warnings.append(f"entries from upstreams not published to {bucket}: {exc} (journaled for the next run)")
    return fill


def registry_records(client: RepoClient, model_id: str, tasks: list[str] | None,
                     versions: list[str] | None) -> list:
    """An optimum-neuron Git cache repo's registry entries of `model_id` as export records: per version, one
    listing of `0_REGISTRY/`; the entries filed under the model's `<org>/<name>/` folders (optimum-neuron files
    each entry there, by model type) go in one download. Entries filed only by architecture digest are not read."""
    from bucket_server.protocol import MAX_RECORD_BYTES

    from . import remote_layout as layout
    from .records import record_from_registry

    if versions is None:
        versions = layout.versions_in(client.folders(""))
    wanted = tuple(part.lower() for part in model_id.split("/"))
    found: list[tuple[RemoteFile, str]] = []
    for version in versions:
        for item in client.list(layout.registry_prefix(version), recursive=True):
            parsed = layout.parse_registry_path(version, str(item.get("path", "")))
            remote = layout.remote_file(item) if parsed is not None else None
            if remote is None or not 0 < remote.size <= MAX_RECORD_BYTES:
                continue
            if tuple(part.lower() for part in parsed.folders[-len(wanted):]) == wanted:
                found.append((remote, version))
    if not found:
        return []
    records, seen = [], set()
    with tempfile.TemporaryDirectory(prefix="neuron-cache-registry-") as tmp:
        local = [Path(tmp) / f"{index}.json" for index in range(len(found))]
        client.download([{"path": remote.path, "local_path": str(path), "size": remote.size, "xet_hash": remote.xet_hash,
                          "digest": remote.digest} for (remote, _), path in zip(found, local)])
        for (remote, version), path in zip(found, local):
            if not path.is_file():
                continue
            record = record_from_registry(path.read_text(encoding="utf-8", errors="replace"), remote.path, version)
            if record is None or record.model_id.lower() != model_id.lower() or (tasks and record.task not in tasks):
                continue
            if (record.compiler_version, record.record_id) not in seen:  # an entry and its aliases are one record
                seen.add((record.compiler_version, record.record_id))
                records.append(record)
    return records


def upstream_records(model, tasks: list[str] | None, versions: list[str] | None,
                     environ: Mapping[str, str] | None = None) -> list:
    """The export records the upstreams hold of `model` (a remote_layout.ModelRef): another bucket's records
    (both layouts), a Git cache repo's registry entries. Best effort: a failing upstream is one warning."""
    from .lookup import read_bucket_records

    records = []
    for upstream in configured_upstreams(environ):
        try:
            if isinstance(upstream, BucketRef):
                records += read_bucket_records(BucketClient(upstream, environ), model, tasks,
                                               versions[0] if versions else None, versions is None)
            elif not model.is_local:
                records += registry_records(RepoClient(upstream, environ).pinned(), model.model_id, tasks, versions)
        except ConfigurationError:
            raise
        except Exception as exc:
            log.warning("optimum-neuron-cache: records of upstream %s not read: %s", upstream, exc)
    return records


def read_through(client: BucketClient, root: Path, compiler_version: str, model_folder: str | None, task: str,
                 key, area: str | None) -> UpstreamFill:
    """A run's enter, after the bucket's fetch: install the model's entries that upstream buckets hold in their
    model areas (a Git cache repo cannot list a model's entries), then fill todo entries from every upstream;
    publish what they gave to the bucket (`publish.publish`, journaled under `key`). Best effort."""
    from .fetch import execute_fetch as run_fetch
    from .fetch import plan_fetch
    from .errors import NeuronCacheError
    from .local_cache import read_entry, scan_entries, version_dir_name
    from .publish import defer, publish_leftovers

    got = UpstreamFill([], [])
    for upstream in configured_upstreams(client.environ):
        if not isinstance(upstream, BucketRef) or model_folder is None:
            continue
        try:
            local = {entry.name: entry for entry in scan_entries(root, compiler_version)}
            upstream_client = BucketClient(upstream, client.environ)
            plan = plan_fetch(upstream_client, compiler_version, model_folder, task, local, missing_bucket_is_empty=True)
            plan = FetchPlan(compiler_version, plan.area, tuple(op for op in plan.ops if op.action is Action.INSTALL))
            result = run_fetch(upstream_client, root, plan)
        except ConfigurationError:
            raise
        except Exception as exc:
            got.warnings.append(f"upstream {upstream} skipped: {exc}")
            continue
        got.filled += result.fetched
        got.warnings += [f"entry {name} not fetched from upstream {upstream}: {why}" for name, why in result.failed]
    todo = [entry for entry in scan_entries(root, compiler_version) if entry.state is EntryState.TODO]
    filled = fill_todo(root, compiler_version, todo, client.environ)
    got.filled += filled.filled
    got.warnings += filled.warnings
    if got.filled:
        entries = [read_entry(root / version_dir_name(compiler_version) / name, compiler_version) for name in got.filled]
        try:
            publish_leftovers(client, root, key, area=area, with_entries=[entry for entry in entries if entry.state.publishable])
        except (NeuronCacheError, OSError) as exc:
            with contextlib.suppress(OSError):
                defer(root, key, got.filled)
            got.warnings.append(f"entries from upstreams not published to {client.bucket}: {exc} (journaled for the next run)")
    return got
