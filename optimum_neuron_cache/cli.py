"""`neuron-cache`: the cache at the terminal (also `python -m optimum_neuron_cache`).

Exit codes: 0 success, 1 the operation failed, 2 bad usage (a malformed bucket id, model id or compiler
version, a cache dir or bucket path that is not a directory, a bad NEURON_CACHE_* setting), 130 interrupted.
Errors are one line on stderr; `--debug` adds the traceback. Progress bars (bytes and
rates) appear on fetch and sync when stderr is a terminal, unless `--quiet`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import __version__
from . import remote_layout as layout
from . import settings
from .buckets import (
    BucketRef, bucket_and_source, embedded_default, parse_bucket, resolve_bucket, save_bucket, setting_path,
)
from .client import BucketClient, ProgressCallback, running_server, stop_server
from .cli_lifecycle import age, renamed
from .compile_leases import list_leases, plan_sweep, sweep_leases
from .compile_locks import running_compilers
from .errors import ConfigurationError, NeuronCacheError
from .fetch import Action, FetchPlan, choose, execute_fetch, heal_line, model_tasks, plan_fetch
from .journal import JournalKey
from .progress import size_text, terminal_progress
from .publish import publish_leftovers
from .host_state import HostState
from .inventory import bucket_inventory
from .local_cache import CacheRoot, resolve_cache_root, scan_entries, version_dir_name
from .explain import differences, why_nothing
from .lookup import FILTER_KEYS, lookup_cache
from .records import ExportFilter, compiler_flags
from .stats import Stats, read_stats, record_run, stats_path, zero_stats
from .maintenance import cache_status, execute_cleanup, plan_cleanup
from .neuron_sdk import (
    ENV_COMPILER_VERSION, compile_target, compiler_version_and_source, format_sdk_summary, resolve_compiler_version,
    sdk_summary, unpinned_target_warning, validate_compiler_version,
)
from .sync import sync_cache
from .upstreams import configured_upstreams, parse_upstream, save_upstreams, setting_path as upstreams_path

log = logging.getLogger("optimum_neuron_cache")


#: What a terminal acts on rather than shows: C0 controls (ESC starts its escape sequences), DEL, C1 controls
#: (0x9b is a one-byte CSI), and the bidirectional overrides that reorder what is shown.
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: Any) -> str:
    """Text for a terminal, with every control character shown as an escape (`\\x1b`): anything read from a
    bucket, a repo or the local state folder goes through this before it is printed (JSON output is ASCII)."""
    return _TERMINAL_CONTROLS.sub(lambda found: "\\x%02x" % ord(found[0]) if ord(found[0]) < 0x100
                                  else "\\u%04x" % ord(found[0]), str(text))


class _TerminalSafeFormatter(logging.Formatter):
    """Log lines on the terminal escaped as `terminal_safe` does: a message is one line, a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(terminal_safe(line) for line in super().formatException(ei).split("\n"))


def echo(message: Any, err: bool = False) -> None:
    """One line on stdout (or stderr) with its control characters escaped: the print of bucket-derived text."""
    click.echo(terminal_safe(message), err=err)


def size(count: int) -> str:
    """A byte count for people (kB, MB, GB: powers of 1000)."""
    return size_text(count)


def plural(count: int, one: str, many: str) -> str:
    """"1 entry", "3 entries"."""
    return f"{count} {one if count == 1 else many}"


def confirmed(yes: bool, question: str, *, ask: bool = True) -> bool:
    """The one rule of every command that removes, once it has shown its plan: `--yes` acts; on a terminal, ask
    (`ask=False`, for --json, never does); otherwise the plan was a preview."""
    if yes:
        return True
    if ask and sys.stdin.isatty():
        return click.confirm(question, default=False, err=True)
    return False


yes_option = click.option("--yes", "-y", is_flag=True, help="Act without asking (default: show the plan, then ask on a "
                          "terminal; elsewhere only show it).")


class Output:
    """Where the CLI writes: results on stdout; progress on stderr, only for a terminal."""

    def __init__(self, quiet: bool, debug: bool) -> None:
        self.quiet = quiet
        self.debug = debug

    def progress(self, description: str) -> tuple[ProgressCallback | None, Callable[[], None]]:
        """A progress callback and its closer: a tqdm bar on a terminal, nothing otherwise or with --quiet."""
        return terminal_progress(description, quiet=self.quiet)

    def info(self, message: str) -> None:
        """A result line on stdout, unless --quiet."""
        if not self.quiet:
            echo(message)


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """`-q` after a subcommand means what it means before one."""
    out = ctx.find_object(Output)
    if value and out is not None:
        out.quiet = True


class CacheCommand(click.Command):
    """A command that also takes `-q/--quiet` after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_quiet,
                                        help="No progress bars and no informational output."))


class CacheGroup(click.Group):
    """Turns every error into one line (`error: ...`) and an exit code; Ctrl-C into exit 130; a closed pipe
    (`| head`) into a quiet exit."""

    command_class = CacheCommand
    group_class = type

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; the project's errors become one line and exit 2 (bad input) or 1, Ctrl-C exit 130."""
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # click's own (usage, bad parameter): the same style as ours
            hint = f" (see `{exc.ctx.command_path} --help`)" if isinstance(exc, click.UsageError) and exc.ctx else ""
            echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except NeuronCacheError as exc:
            if ctx.find_object(Output) and ctx.find_object(Output).debug:
                raise
            echo(f"error: {exc}", err=True)
            ctx.exit(2 if isinstance(exc, ConfigurationError) else 1)
        except OSError as exc:  # the disk said no (permissions, a full disk...): one line, not a traceback
            if exc.errno == errno.EPIPE or (ctx.find_object(Output) and ctx.find_object(Output).debug):
                raise  # a reader that stopped reading (`| head`): click exits without a word
            echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing partial was left in the cache", err=True)
            ctx.exit(130)


def _root(cache_dir: str | None, *, create: bool = False) -> Path:
    """The local compile cache, checked to be a directory (created with `create`): a regular file or an
    uncreatable path is bad input, said in one line, not a traceback from deep in a scan."""
    root: CacheRoot = resolve_cache_root(cache_dir)
    if root.path is None:
        raise ConfigurationError(f"bucket sync is off: {root.disabled_reason}")
    source = "--cache-dir" if cache_dir is not None else root.source
    root.require_directory(source)
    _create_cache_dir(root.path, source, create=create)
    return root.path


def _create_cache_dir(path: Path, source: str, *, create: bool) -> None:
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the compile cache dir {path} (from {source}): "
                                     f"{exc.strerror or exc}; pass a directory you can write") from None


def _bucket(name: str | BucketRef | None) -> BucketRef:
    """The bucket to use; a directory bucket's path must not be a file (the server would call it missing)."""
    ref = resolve_bucket(name)
    if ref.kind == "dir" and os.path.lexists(ref.location) and not os.path.isdir(ref.location):
        raise ConfigurationError(f"bucket {ref} is not a directory: name a directory (`neuron-cache create DIR` makes one) "
                                 "or a Hub bucket NS/NAME")
    return ref


def _compiler_version(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--compiler-version is checked the same way by every command that takes it."""
    return None if value is None else validate_compiler_version(value, source="--compiler-version")


def _json(data: Any) -> str:
    """JSON that every parser accepts: a non-finite number is a bug, never `Infinity` in the output."""
    return json.dumps(data, indent=1, allow_nan=False)


bucket_option = click.option("--bucket", "-b", help="hf://buckets/NS/NAME, NS/NAME or a directory (default: NEURON_CACHE_BUCKET, `set`, the embedded default).")
cache_dir_option = click.option("--cache-dir", help="The local compile cache (default: as libneuronxla resolves it).")
version_option = click.option("--compiler-version", callback=_compiler_version, help="neuronx-cc version (default: the installed one, or NEURON_CC_VERSION).")
task_option = click.option("--task", "-t", default=None, help="The task of --to-model's area (default: `default`).")
read_task_option = click.option("--task", "-t", default=None, help="Only this task (default: every task of the model).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group(cls=CacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no informational output.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(__version__, prog_name="neuron-cache")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Share AWS Neuron compile artifacts through Hugging Face Storage Buckets."""
    fresh = not logging.getLogger().handlers
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    if fresh:  # the handler basicConfig made (not one a host program or pytest installed)
        logging.getLogger().handlers[0].setFormatter(_TerminalSafeFormatter("%(levelname)s %(message)s"))
    ctx.obj = Output(quiet, debug)


# ---------------------------------------------------------------------------------------- buckets


@cli.command()
@click.argument("bucket")
@click.option("--public", is_flag=True, help="Create a public Hub bucket (private by default).")
@click.option("--private", is_flag=True, hidden=True, help="The default; kept for scripts that pass it.")
@click.pass_obj
def create(out: Output, bucket: str, public: bool, private: bool) -> None:
    """Create BUCKET (a private Hub bucket unless --public, or a directory; exists-ok) and make it the default."""
    if public and private:
        raise click.UsageError("--public and --private contradict each other: give one")
    ref = _bucket(parse_bucket(bucket))
    result = BucketClient(ref).create(private=not public)
    if ref.kind == "hf" and result.bucket_id and result.bucket_id != ref.location:
        named = _bucket(parse_bucket(result.bucket_id))  # the Hub's namespace and casing, as later commands need
        click.echo(f"the Hub names {ref} {named}")
        ref = named
    click.echo(f"{'created' if result.created else 'exists'}: {ref}")
    save_bucket(ref)
    click.echo(f"default bucket: {ref} (saved in {setting_path()})")


@cli.command(name="set")
@click.argument("bucket", required=False)
@click.option("--unset", is_flag=True, help="Forget the saved default bucket.")
@click.option("--upstream", "upstreams", multiple=True, help="A read-only upstream (repeatable, in order): an optimum-neuron "
              "cache repo (org/name[@rev]) or a bucket. `--upstream ''` forgets them. NEURON_CACHE_UPSTREAM overrides.")
def set_(bucket: str | None, unset: bool, upstreams: tuple[str, ...]) -> None:
    """Save BUCKET as the default bucket (or forget it with --unset); or save the read-only upstreams."""
    if upstreams and not bucket and not unset:
        _set_upstreams(upstreams)
        return
    if unset == bool(bucket):
        raise click.UsageError("give a BUCKET, or --unset")
    if unset:
        save_bucket(None)
        click.echo(f"default bucket unset; now: {resolve_bucket(None)}")
        return
    ref = parse_bucket(bucket or "")
    path = save_bucket(ref)
    click.echo(f"default bucket: {ref} (saved in {path})")


def _set_upstreams(specs: tuple[str, ...]) -> None:
    """Save the upstreams (`--upstream ''` alone forgets them)."""
    parsed = [parse_upstream(spec) for spec in specs if spec.strip()]
    path = save_upstreams(parsed)
    if parsed:
        click.echo(f"upstreams (read only, in order): {', '.join(map(str, parsed))} (saved in {path})")
    else:
        click.echo(f"upstreams forgotten; now: {', '.join(map(str, configured_upstreams())) or 'none'}")


# ------------------------------------------------------------------------------------ fetch, sync


@cli.command()
@click.argument("model_id")
@read_task_option
@cache_dir_option
@bucket_option
@version_option
@click.option("--target", "--instance-type", "target", help="Only entries of configurations compiled for this target "
              "(trn1, trn2, inf2...).")
@click.option("--batch-size", type=int, help="Only entries of configurations with this batch size.")
@click.option("--sequence-length", type=int, help="Only entries of configurations with this sequence length.")
@click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", type=int, help="Only entries of "
              "configurations with this tensor parallel size.")
@click.option("--dtype", help="Only entries of configurations of this dtype (bf16 = bfloat16 = torch.bfloat16).")
@click.option("--config", "config_json", help="An export config as JSON: only entries of configurations that match "
              "each of its fields (the options above override it).")
@click.option("--dry-run", is_flag=True, help="Show the plan: each entry, what would be done and why.")
@json_option
@click.pass_obj
def fetch(out: Output, model_id: str, task: str | None, cache_dir: str | None, bucket: str | None,
          compiler_version: str | None, target: str | None, batch_size: int | None, sequence_length: int | None,
          tensor_parallel_size: int | None, dtype: str | None, config_json: str | None, dry_run: bool,
          as_json: bool) -> None:
    """Warm the local compile cache with MODEL_ID's entries from the bucket.

    Without --task, every task the bucket holds the model under. With a filter (--batch-size, --dtype,
    --config...), only the entries that the matching export records list (the whole area of a task where
    none matches). Also publishes what earlier runs of this model on this host compiled and left
    unpublished (killed, or the bucket was down)."""
    if as_json:
        out.quiet = True  # the lines below become one JSON object at the end
    model = layout.model_ref(model_id)
    config = _json_object(click.get_current_context(), None, config_json, "--config")
    wanted = ExportFilter.of(config, target=_target_option(target), batch_size=batch_size,
                             sequence_length=sequence_length, tensor_parallel_size=tensor_parallel_size, dtype=dtype)
    root = _root(cache_dir, create=not dry_run)
    version = resolve_compiler_version(compiler_version)
    ref = _bucket(bucket)
    _warn_unpinned_target(version, ref)
    client = BucketClient(ref)
    local = {entry.name: entry for entry in scan_entries(root, version)}
    found = [] if task else model_tasks(client, version, model)
    tasks = [layout.task_name(task)] if task else found or [layout.DEFAULT_TASK]
    plans = []
    for task_name in tasks:
        plan = plan_fetch(client, version, model.folder, task_name, local)
        plans.append((task_name, choose(client, plan, wanted) if wanted else plan))
    whose = f" of {model.model_id} (every task: {', '.join(found)})" if found else ""
    chosen = _chosen(plans, wanted)
    if dry_run:
        for task_name, plan in plans:
            where = f" [{task_name}]" if task is None else ""
            for op in plan.ops:
                size_text = f" ({size(sum(f.size for f in op.files))})" if op.files else ""
                out.info(f"{op.action.value:8} neuronxcc-{version}/{op.module}{where}{size_text}: {op.reason}")
        items = [item for _, plan in plans for item in plan.items]
        needed = sum(plan.bytes_needed for _, plan in plans)
        out.info(f"would fetch {plural(len(items), 'entry', 'entries')} ({size(needed)}){chosen}{whose}" if items
                 else f"nothing to fetch{chosen}{whose}")
        if as_json:
            click.echo(_json({**_fetch_plan_json(ref, version, plans), "executed": False, "bytes_needed": needed}))
        return
    HostState(root).remove_stale_temp_dirs()
    progress, close = out.progress("fetch")
    results = []
    try:
        for _, plan in plans:
            results.append(execute_fetch(client, root, plan, progress))
    finally:
        close()
    target_dir = root / version_dir_name(version)
    fetched = [module for result in results for module in result.fetched]
    fetched_bytes = sum(result.bytes for result in results)
    record_run(Stats(fetches=1, hits=len(fetched), bytes_downloaded=fetched_bytes))
    if not any(plan.remote_modules or plan.items for _, plan in plans):
        out.info(f"nothing to fetch: {why_nothing(client, version, model.folder, task and tasks[0], model.model_id)}")
    else:
        present = sum(op.action is Action.PRESENT for _, plan in plans for op in plan.ops) + \
            sum(len(result.installed_by_others) for result in results)
        unlisted = sum(op.action is Action.UNLISTED for _, plan in plans for op in plan.ops)
        left_out = f"; {unlisted} left out (not listed by the matching export records)" if unlisted else ""
        out.info(f"fetched {plural(len(fetched), 'entry', 'entries')} ({size(fetched_bytes)}){chosen}{whose} into "
                 f"{target_dir}; {present} already present{left_out}")
    for task_name, plan in plans:
        if plan.choice is not None and plan.choice.modules is None and plan.remote_modules:
            out.info(f"{task_name}: {plan.choice.line()}")
    if line := heal_line([module for result in results for module in result.healed], version):
        out.info(line)
    for module, why in (failure for result in results for failure in result.failed):
        echo(f"warning: {module} not fetched: {why}", err=True)
    for module, why in (stranded for _, plan in plans for stranded in plan.stranded):
        echo(f"warning: {module} is locked here and the lock cannot be told stale ({why}); if no compile is "
                   "running, run `neuron-cache cleanup --locks` and fetch again", err=True)
    if task is None and layout.DEFAULT_TASK not in tasks:  # what killed runs without a task left is published too
        plans.append((layout.DEFAULT_TASK, FetchPlan(version, layout.model_area_prefix(version, model.folder,
                                                                                       layout.DEFAULT_TASK))))
    for task_name, plan in plans:
        _publish_leftovers(out, client, root, version, model.folder, task_name, plan)
    if as_json:
        click.echo(_json({**_fetch_plan_json(ref, version, plans), "executed": True, "cache_dir": str(root),
                          "fetched": fetched, "bytes": fetched_bytes,
                          "healed": [module for result in results for module in result.healed],
                          "failed": [{"entry": module, "why": why} for result in results
                                     for module, why in result.failed]}))
    if any(result.failed for result in results):
        sys.exit(1)


def _fetch_plan_json(ref: BucketRef, version: str, plans: list[tuple[str, FetchPlan]]) -> dict[str, Any]:
    """The plan of `fetch --json`: each task's operations with their reasons."""
    return {"bucket": str(ref), "compiler_version": version,
            "tasks": {task: [{"entry": op.module, "action": op.action.value, "reason": op.reason,
                              "bytes": sum(f.size for f in op.files)} for op in plan.ops] for task, plan in plans}}


def _chosen(plans: list[tuple[str, FetchPlan]], wanted: ExportFilter) -> str:
    """What the filters chose, for the summary line: " of 1 matching configuration (batch_size=1)"."""
    if not wanted:
        return ""
    choices = [plan.choice for _, plan in plans if plan.choice is not None and plan.choice.modules is not None]
    matching = sum(len(choice.matching) for choice in choices)
    return f" of {plural(matching, 'matching configuration', 'matching configurations')} ({wanted})"


def _warn_unpinned_target(version: str, ref: BucketRef) -> None:
    """Compilers up to 2.15 leave the target out of MODULE names: say so once, as a run does, when a shared
    bucket is used without `--target` pinned in NEURON_CC_FLAGS (docs/integrations.md, compile targets)."""
    if ref != embedded_default() and (line := unpinned_target_warning(version, str(ref))):
        click.echo(f"warning: {line}", err=True)


def _publish_leftovers(out: Output, client: BucketClient, root: Path, version: str, folder: str, task: str,
                       plan: FetchPlan) -> None:
    """What killed runs of this model left in the journal goes up now; a failure is a warning, not an error
    (the fetch itself succeeded, and the entries stay journaled)."""
    key = JournalKey(str(client.bucket), version, folder, task)
    try:
        publication = publish_leftovers(client, root, key, area=plan.area, known_in_area=plan.remote_modules)
    except (NeuronCacheError, OSError) as exc:
        click.echo(f"warning: entries earlier runs left unpublished stay journaled: {exc}", err=True)
        return
    if publication is not None and publication.result.published:
        record_run(Stats(publishes=len(publication.result.published), bytes_uploaded=publication.result.bytes_uploaded))
        out.info(f"published {plural(len(publication.result.published), 'entry', 'entries')} that earlier runs of {folder} left unpublished")


@cli.command()
@cache_dir_option
@bucket_option
@version_option
@click.option("--to-model", "model_id",
              help="Also publish every entry to this model's area (use a cache dir of that model only).")
@task_option
@click.option("--dry-run", is_flag=True, help="Show what would be published.")
@json_option
@renamed("--model", "--to-model", "model_id")
@click.pass_obj
def sync(out: Output, cache_dir: str | None, bucket: str | None, compiler_version: str | None, model_id: str | None,
         task: str | None, dry_run: bool, as_json: bool) -> None:
    """Publish every local success entry the bucket lacks."""
    if task and not model_id:
        raise click.UsageError("--task goes with --to-model")
    model = layout.model_ref(model_id) if model_id else None
    task_name = layout.task_name(task)
    root = _root(cache_dir)
    ref = _bucket(bucket)
    client = BucketClient(ref)
    progress, close = (None, lambda: None) if dry_run or as_json else out.progress("sync")
    try:
        report = sync_cache(client, root, compiler_version=compiler_version, model_folder=model.folder if model else None,
                            task=task_name, dry_run=dry_run, progress=progress)
    finally:
        close()
    if not dry_run:
        record_run(Stats(publishes=sum(len(v.result.published) for v in report if v.result),
                         bytes_uploaded=sum(v.result.bytes_uploaded for v in report if v.result)))
    total_entries = total_bytes = 0
    items = []
    for version_sync in report:
        plan = version_sync.plan
        if plan.items:
            _warn_unpinned_target(version_sync.compiler_version, ref)
        for item in plan.items:
            area = item.to_model.split("/models/", 1)[1] if item.to_model else None
            items.append({"compiler_version": version_sync.compiler_version, "entry": item.entry.name,
                          "to_flat": item.to_flat, "to_model": area})
            if not as_json:
                where = " + ".join(["flat"] * item.to_flat + ([area] if area else []))
                out.info(f"{'would publish' if dry_run else 'published'} "
                         f"neuronxcc-{version_sync.compiler_version}/{item.entry.name} -> {where}")
        total_entries += len(plan.items)
        total_bytes += plan.bytes_to_upload
    if as_json:
        click.echo(_json({"bucket": str(ref), "cache_dir": str(root), "dry_run": dry_run, "entries": items,
                          "bytes": total_bytes}))
        return
    verb = "would publish" if dry_run else "published"
    out.info(f"{verb} {plural(total_entries, 'entry', 'entries')} ({size(total_bytes)}) to {ref}" if total_entries else f"nothing to publish: {ref} has every success entry of {root}")


@cli.command()
@click.argument("model_id")
@read_task_option
@version_option
@click.option("--target", "--instance-type", "target", help="e.g. trn1, trn2, inf2.")
@click.option("--batch-size", type=int)
@click.option("--sequence-length", type=int)
@click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", type=int)
@click.option("--dtype", help="e.g. bf16, fp16 (compared with auto_cast_type / torch_dtype / dtype).")
@click.option("--config", "config_json", help="The whole export config as JSON (fields above override it).")
@bucket_option
@json_option
def explain(model_id: str, task: str | None, compiler_version: str | None, target: str | None, batch_size: int | None,
            sequence_length: int | None, tensor_parallel_size: int | None, dtype: str | None, config_json: str | None,
            bucket: str | None, as_json: bool) -> None:
    """Why MODEL_ID would miss: this machine's compiler, target, flags and export config against the nearest records."""
    try:
        version = resolve_compiler_version(compiler_version)
    except ConfigurationError:
        version = None  # no SDK here: compare everything else, across every version in the bucket
    config = _json_object(click.get_current_context(), None, config_json, "--config") or {}
    stated = {"batch_size": batch_size, "sequence_length": sequence_length,
              "tensor_parallel_size": tensor_parallel_size, "dtype": dtype}
    here_target = _target_option(target) or (found.target if (found := compile_target(None, config)) else None)
    ref = _bucket(bucket)
    records = lookup_cache(model_id, task, compiler_version=version, all_versions=version is None, bucket=ref)
    if version is not None and not records:
        records = lookup_cache(model_id, task, all_versions=True, bucket=ref)
    flags = compiler_flags()
    comparisons = []
    for record in records:
        wanted = dict(config)
        for name, value in stated.items():
            if value is not None:
                keys = [key for key in FILTER_KEYS[name] if key in record.export_config] or [FILTER_KEYS[name][0]]
                wanted[keys[0]] = value
        comparisons.append((differences(record, version, flags, wanted, here_target), record))
    comparisons.sort(key=lambda item: (len(item[0]), item[1].created_at))
    if as_json:
        click.echo(_json({"here": {"compiler_version": version, "target": here_target, "compile_flags": flags},
                          "nearest": [{"record": record.to_dict(), "differences": diffs}
                                      for diffs, record in comparisons[:3]]}))
        return
    click.echo(f"here: compiler {version or '(unknown: no Neuron SDK; pass --compiler-version)'}; "
               f"target {here_target or '(unknown: pass --target)'}; flags {' '.join(flags) or '(none)'}")
    if not records:
        click.echo(f"no export records of {model_id} in {ref}" + ("" if task else " (any task)") +
                   ": nothing was published for it with an export config")
        return
    for diffs, record in comparisons[:3]:
        config_text = " ".join(f"{k}={v}" for k, v in sorted(record.export_config.items()))
        echo(f"{'match' if not diffs else f'{len(diffs)} difference(s)'}: neuronxcc-{record.compiler_version} "
             f"{record.task} target={record.effective_target or '?'} {config_text}")
        for diff in diffs:
            echo(f"    {diff}")


@cli.command(name="stats")
@click.option("--zero", is_flag=True, help="Reset the figures.")
@json_option
def stats_command(zero: bool, as_json: bool) -> None:
    """This host's figures: fetches, hits, misses, publishes, bytes, time saved, remote errors."""
    if zero:
        zero_stats()
        click.echo(f"stats reset ({stats_path()})")
        return
    last, total = read_stats()
    if as_json:
        click.echo(_json({"last_run": asdict(last), "total": asdict(total)}))
        return
    rows = [("", "LAST RUN", "TOTAL")]
    for name, label in (("fetches", "fetches"), ("hits", "hits (entries from the bucket)"),
                        ("misses", "misses (compiled here)"), ("publishes", "published"),
                        ("bytes_downloaded", "downloaded"), ("bytes_uploaded", "uploaded"),
                        ("seconds_saved", "compile time saved"), ("remote_errors", "remote errors"),
                        ("lease_compiled", "compiled here under a lease"),
                        ("lease_fetched_after_wait", "fetched after waiting on another host"),
                        ("lease_compiled_twice", "compiled twice (here and elsewhere)")):
        values = [getattr(last, name), getattr(total, name)]
        if name.startswith("bytes"):
            cells = [size(int(v)) for v in values]
        elif name == "seconds_saved":
            cells = [_duration(v) for v in values]
        else:
            cells = [str(int(v)) for v in values]
        rows.append((label, *cells))
    _table(rows)
    if total.hits_without_duration:
        click.echo(f"({total.hits_without_duration} hits had no recorded compile time and are not counted in the time saved)")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ------------------------------------------------------------------------------------ lookup, ls


@cli.command()
@click.argument("model_id")
@read_task_option
@version_option
@click.option("--all-versions", is_flag=True, help="Every compiler version in the bucket.")
@click.option("--target", "--instance-type", "target", help="e.g. trn1, trn2, inf2.")
@click.option("--batch-size", type=int)
@click.option("--sequence-length", type=int)
@click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", type=int)
@click.option("--dtype", help="e.g. bf16, fp16.")
@bucket_option
@json_option
def lookup(model_id: str, task: str | None, compiler_version: str | None, all_versions: bool, target: str | None,
           batch_size: int | None, sequence_length: int | None, tensor_parallel_size: int | None, dtype: str | None,
           bucket: str | None, as_json: bool) -> None:
    """List the cached export configurations of MODEL_ID, with the compile flags of each."""
    if compiler_version and all_versions:
        raise click.UsageError("--compiler-version and --all-versions exclude each other")
    target = _target_option(target)
    records = lookup_cache(model_id, task, compiler_version=compiler_version, all_versions=all_versions, bucket=_bucket(bucket),
                           target=target, batch_size=batch_size, sequence_length=sequence_length,
                           tensor_parallel_size=tensor_parallel_size, dtype=dtype)
    if as_json:
        click.echo(_json([record.to_dict() for record in records]))
        return
    if not records:
        click.echo(f"no cached configuration of {model_id} matches" + ("" if task else " in any task"))
        return
    for record in records:
        config = " ".join(f"{key}={value}" for key, value in sorted(record.export_config.items()))
        echo(f"neuronxcc-{record.compiler_version}  {record.task}  target={record.effective_target or '?'}  {config}")
        echo(f"    flags: {' '.join(record.compile_flags) or '(none)'}  modules: {len(record.modules)}  "
             f"created: {record.created_at}")


@cli.command(name="ls")
@version_option
@click.option("--model", "model_id", help="Only this model.")
@click.option("--target", "--instance-type", "target", help="Only model areas with a record of this target (trn1, trn2, inf2...).")
@bucket_option
@json_option
def ls(compiler_version: str | None, model_id: str | None, target: str | None, bucket: str | None, as_json: bool) -> None:
    """What the bucket holds, by compiler version and model: entries, sizes, and the targets of the records."""
    from .lookup import read_records

    model = layout.model_ref(model_id) if model_id else None
    target = _target_option(target)
    ref = _bucket(bucket)
    client = BucketClient(ref)
    inventory = bucket_inventory(client, compiler_version=compiler_version, model_folder=model.folder if model else None)
    # The targets come from the records (one download for all of them; records from before targets were
    # recorded count by their export config's target, else as "?").
    paths = [path for area in inventory.areas for path in area.record_paths]
    targets_of: dict[str, set[str]] = {}
    for record in read_records(client, paths):
        targets_of.setdefault(record.path, set()).add(record.effective_target or "?")
    areas = []
    for area in inventory.areas:
        targets = sorted(set().union(*(targets_of.get(path, set()) for path in area.record_paths)))
        if target is None or target in targets:
            areas.append((area, targets))
    if as_json:
        click.echo(_json([{**{k: v for k, v in asdict(area).items() if k != "record_paths"}, "targets": targets}
                          for area, targets in areas]))
        return
    if not areas:
        click.echo(f"{ref} holds no entries" + (f" for {model_id}" if model_id else "") + (f" with a record of target {target}" if target else ""))
        return
    rows = [("COMPILER", "AREA", "ENTRIES", "SIZE", "RECORDS", "TARGETS")]
    for area, targets in areas:
        entries = f"{area.entries}" + (f" (+{area.incomplete} incomplete)" if area.incomplete else "")
        rows.append((area.compiler_version, area.area or "(flat)", entries, size(area.bytes),
                     str(area.records) if area.area else "-", ",".join(targets) if area.area else "-"))
    _table(rows)


def _target_option(value: str | None) -> str | None:
    """--target as a compile target (an instance type counts as its family), or a usage error."""
    from .neuron_sdk import normalize_target

    if value is None:
        return None
    target = normalize_target(value)
    if target is None:
        raise click.BadParameter(f"{value!r} is not a compile target: pass e.g. trn1, trn2, inf2 or an instance type "
                                 "such as trn1.32xlarge", param_hint="--target")
    return target


def _table(rows: list[tuple[str, ...]]) -> None:
    rows = [tuple(terminal_safe(cell) for cell in row) for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# --------------------------------------------------------------------------------- status, cleanup


@cli.command()
@cache_dir_option
@json_option
def status(cache_dir: str | None, as_json: bool) -> None:
    """What the cache will do here, and what it did: the effective configuration (each value with where it came
    from), the local compile cache by state, the Neuron SDK, and this host's hit rate."""
    root = resolve_cache_root(cache_dir)
    root.require_directory("--cache-dir" if cache_dir is not None else None)
    versions = cache_status(root.path) if root.path else []
    sdk = sdk_summary(str(root.path) if root.path else None)
    configuration = _configuration(root)
    _, total = read_stats()
    looked_up = total.hits + total.misses
    hit_rate = round(total.hits / looked_up, 4) if looked_up else None
    if as_json:
        click.echo(_json({
            "cache_dir": str(root.path) if root.path else root.url, "source": root.source, "sync_disabled": root.disabled_reason,
            "versions": [{"compiler_version": v.compiler_version, "states": dict(v.states), "bytes": v.bytes} for v in versions],
            "sdk": sdk, "bucket": str(resolve_bucket(None)),
            "configuration": [{"name": name, "value": value, "source": source} for name, value, source in configuration],
            "hits": total.hits, "misses": total.misses, "hit_rate": hit_rate,
        }))
        return
    for name, value, source in configuration:
        echo(f"{name}: {value}" + (f" ({source})" if source else ""))
    if root.disabled_reason:
        echo(f"bucket sync: off ({root.disabled_reason})")
    for line in format_sdk_summary(sdk, str(root.path) if root.path else None):
        echo(line)
    if looked_up:
        echo(f"hit rate: {hit_rate:.0%} ({total.hits} hits, {total.misses} misses on this host; "
             "`neuron-cache stats` for the rest)")
    if not versions:
        click.echo("no entries")
        return
    states = ("success", "legacy_success", "failed", "locked", "todo", "incomplete")
    rows = [("COMPILER", *[state.upper() for state in states], "SIZE")]
    for version in versions:
        rows.append((version.compiler_version, *[str(version.states.get(state, 0)) for state in states], size(version.bytes)))
    _table(rows)


def _configuration(root: CacheRoot) -> list[tuple[str, str, str]]:
    """(what, value, where it came from) for everything that decides what the cache does here: the bucket, the
    cache dir, the compiler version and target, the upstreams, and every variable that is set."""
    bucket, bucket_source = bucket_and_source(None)
    rows = [("bucket", str(bucket), bucket_source), ("cache dir", str(root.path or root.url), root.source)]
    try:
        rows.append(("compiler", *compiler_version_and_source(None)))
    except ConfigurationError:
        rows.append(("compiler", "unknown", f"no Neuron SDK here: set {ENV_COMPILER_VERSION} or pass --compiler-version"))
    found = compile_target(None, None)
    rows.append(("target", found.target, found.source) if found else
                ("target", "unknown", "not a Neuron instance: set NEURON_PLATFORM_TARGET_OVERRIDE or pass --target"))
    upstreams = configured_upstreams()
    upstream_source = (settings.UPSTREAM if settings.upstream() is not None
                       else f"saved in {upstreams_path()}" if upstreams else "")
    rows.append(("upstreams", ", ".join(map(str, upstreams)) or "none", upstream_source))
    for name in (*settings.VARIABLES, *settings.FOREIGN_VARIABLES):
        value = os.environ.get(name)
        if value is not None and value.strip():
            shown = "(set, not shown)" if name in settings.SECRET_VARIABLES else value
            rows.append((name, shown, "environment"))
    return rows


@cli.command()
@cache_dir_option
@click.option("--failed", is_flag=True, help="Remove cached compile failures.")
@click.option("--locks", is_flag=True, help="Remove stale locks (refused while neuronx-cc runs).")
@click.option("--old-versions", is_flag=True, help="Remove entries of other compiler versions than --compiler-version.")
@version_option
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@yes_option
@json_option
def cleanup(cache_dir: str | None, failed: bool, locks: bool, old_versions: bool, compiler_version: str | None,
            dry_run: bool, yes: bool, as_json: bool) -> None:
    """Remove poisoned entries, stale locks and leftover downloads (default: --failed --locks).

    Shows the plan, then asks on a terminal; --yes acts without asking; elsewhere the plan is only shown."""
    if not (failed or locks or old_versions):
        failed = locks = True
    keep = resolve_compiler_version(compiler_version) if old_versions else None
    root = _root(cache_dir)
    plan = plan_cleanup(root, failed=failed, locks=locks, old_versions=old_versions, keep_version=keep,
                        compilers=running_compilers() if locks else [])
    for message in [] if as_json else plan.refused:
        echo(f"warning: {message}", err=True)
    if as_json:
        acted = bool(plan.removals) and not dry_run and yes
        freed = execute_cleanup(plan) if acted else 0
        click.echo(_json({"cache_dir": str(root), "executed": acted, "refused": plan.refused, "freed": freed,
                          "removals": [{"path": str(r.path.relative_to(root)), "reason": r.reason, "bytes": r.bytes}
                                       for r in plan.removals]}))
        if plan.refused and not dry_run and yes:
            sys.exit(1)
        return
    for removal in plan.removals:
        echo(f"would remove {removal.path.relative_to(root)} ({removal.reason})")
    summary = f"{size(plan.bytes)} in {plural(len(plan.removals), 'removal', 'removals')}"
    if not plan.removals:
        echo("nothing to clean up")
    elif dry_run or not confirmed(yes, f"remove them ({summary})?"):
        echo(f"would free {summary}" + ("" if dry_run else "; run again with --yes to remove them"))
        return
    else:
        echo(f"freed {size(execute_cleanup(plan))} in {plural(len(plan.removals), 'removal', 'removals')}")
    if plan.refused and not dry_run and (yes or plan.removals):  # told to act, and it could not do all of it
        sys.exit(1)


# ------------------------------------------------------------------------- parallel compile, shim


#: An export config nests a few levels; anything deeper is a mistake or an attack (and would break the code after).
MAX_JSON_DEPTH = 32


def _json_object(ctx: click.Context, param: click.Parameter | None, value: str | None,
                 hint: str | None = None) -> dict[str, Any] | None:
    """A JSON object option (--config, --export-config), parsed once here: anything else is one usage line."""
    if value is None or value == "":
        return None
    try:
        parsed = json.loads(value)
    except RecursionError:
        parsed = None  # nested past the decoder's bound: said below as too deep
        depth = MAX_JSON_DEPTH + 1
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param=param, param_hint=hint) from None
    except ValueError:  # int("9" * 5000): over Python's limit of integer digits
        raise click.BadParameter("holds an integer of more than 4,300 digits: no export config field is that large",
                                 param=param, param_hint=hint) from None
    else:
        depth = _json_depth(parsed)
    if depth > MAX_JSON_DEPTH:
        raise click.BadParameter(f"nests arrays or objects deeper than {MAX_JSON_DEPTH} levels; pass the export "
                                 "config as a flat object, e.g. '{\"batch_size\": 1}'", param=param, param_hint=hint)
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"batch_size\": 1}'", param=param, param_hint=hint)
    return parsed


def _json_depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed JSON value (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@cli.group(name="parallel-compile")
def parallel_compile() -> None:
    """neuron_parallel_compile with the bucket cache: fetch before, hits during, publish after."""


@parallel_compile.command(name="run", context_settings={"ignore_unknown_options": True})
@click.option("--model", "model_id", help="Hub model id or local model directory (default: the flat area only).")
@click.option("--task", default="training", show_default=True, help="The area the run fetches from and publishes to "
              "(one task: unlike fetch, lookup and explain, which read every task without --task).")
@click.option("--export-config", callback=_json_object, help='JSON, e.g. \'{"batch_size": 1}\': writes an export record.')
@click.option("--no-shim", is_flag=True, help="Do not put the compiler shim on PATH.")
@click.option("--phases", is_flag=True,
              help="Run COMMAND (a neuron_parallel_compile call) as `--command collect`, fill its todo entries from the "
                   "bucket, split the compile with the other hosts through compile leases, then `--command compile`.")
@click.option("--no-leases", is_flag=True, help="With --phases: compile every missing graph here (no compile leases).")
@click.option("--lease-batch", type=click.IntRange(1, 4096), default=4, show_default=True,
              help="With --phases: graphs this host takes per round (about the compile's parallel workers).")
@bucket_option
@cache_dir_option
@version_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def parallel_compile_run(model_id: str | None, task: str, export_config: dict[str, Any] | None, no_shim: bool, phases: bool,
                         no_leases: bool, lease_batch: int, bucket: str | None, cache_dir: str | None,
                         compiler_version: str | None, command: tuple[str, ...]) -> None:
    """Fetch, run COMMAND (after --, e.g. -- neuron_parallel_compile torchrun ... train.py) with the compiler
    shim on PATH, then publish; exits with COMMAND's exit code."""
    from .integrations.parallel_compile import run_parallel_compile, split_phases

    if phases:
        try:
            collect, compile_ = split_phases(list(command))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        report = run_parallel_compile(collect_command=collect, compile_command=compile_, model_id=model_id, task=task,
                                      export_config=export_config, bucket=bucket, cache_dir=cache_dir,
                                      compiler_version=compiler_version, leases=False if no_leases else None,
                                      lease_batch=lease_batch)
    else:
        report = run_parallel_compile(list(command), model_id=model_id, task=task, export_config=export_config,
                                      bucket=bucket, cache_dir=cache_dir, compiler_version=compiler_version, shim=not no_shim)
    run = report.run
    click.echo(f"neuron-cache: fetched {len(run.fetched) + len(report.served)} ({len(run.fetched)} before the command, "
               f"{len(report.served)} while it ran), compiled {len(report.compiled)}, published {len(run.synced)}"
               + (f", record {run.record}" if run.record else ""), err=True)
    if report.leases is not None:
        tally = report.leases.tally
        click.echo(f"neuron-cache: leases: compiled here {tally.compiled_here}, fetched after waiting "
                   f"{tally.fetched_after_wait}, compiled twice {tally.compiled_twice}, without a lease "
                   f"{tally.compiled_without_lease}, taken over {tally.taken_over}", err=True)
    sys.exit(report.returncode)


@parallel_compile.command(name="fill-todo")
@bucket_option
@cache_dir_option
@version_option
def parallel_compile_fill_todo(bucket: str | None, cache_dir: str | None, compiler_version: str | None) -> None:
    """Complete collected (todo) entries (`neuron_parallel_compile --command collect`) from the bucket's flat area."""
    from .integrations.parallel_compile import fill_todo_entries

    result = fill_todo_entries(bucket=bucket, cache_dir=cache_dir, compiler_version=compiler_version)
    for warning in result.warnings:
        echo(f"warning: {warning}", err=True)
    click.echo(f"filled {len(result.filled)} of {len(result.todo)} todo entries from the flat area")


@cli.command()
@bucket_option
@version_option
@click.option("--sweep", is_flag=True, help="Remove leases whose graph the bucket now holds, or not renewed for --older-than.")
@click.option("--older-than", callback=age, default="1d", show_default=True, metavar="AGE",
              help="With --sweep: the age since the bucket got the lease's last write (by the bucket's clock).")
@yes_option
@json_option
def leases(bucket: str | None, compiler_version: str | None, sweep: bool, older_than: float, yes: bool,
           as_json: bool) -> None:
    """The compile leases of a bucket: which host compiles which graph right now (one listing, one read each).

    --sweep removes those whose graph the bucket holds or that nobody renewed: it shows them, then asks on a
    terminal; --yes acts without asking; elsewhere they are only shown."""
    import time as _time

    client = BucketClient(_bucket(bucket))
    found = list_leases(client, compiler_version)
    planned = plan_sweep(client, found, now=_time.time(), older_than=older_than) if sweep else []
    if not as_json:
        for item in planned:
            echo(f"{'sweeping' if yes else 'would sweep'} {item.lease.compiler_version}/{item.lease.module} "
                 f"({item.reason})")
    removed = sweep_leases(client, planned) if planned and confirmed(
        yes, f"remove {plural(len(planned), 'lease', 'leases')}?", ask=not as_json) else []
    gone = {(lease.compiler_version, lease.module) for lease in removed}
    found = [lease for lease in found if (lease.compiler_version, lease.module) not in gone]
    if as_json:
        click.echo(_json({"leases": [{"compiler_version": lease.compiler_version, "module": lease.module,
                                      "holder": asdict(lease.holder) if lease.holder else None,
                                      "uploaded": lease.uploaded}
                                     for lease in found],
                          "sweep": [{"lease": f"{item.lease.compiler_version}/{item.lease.module}",
                                     "reason": item.reason} for item in planned],
                          "swept": [f"{lease.compiler_version}/{lease.module}" for lease in removed]}))
        return
    if planned and not removed:
        echo(f"would sweep {plural(len(planned), 'lease', 'leases')}; run again with --sweep --yes to remove them")
    elif removed:
        echo(f"swept {plural(len(removed), 'lease', 'leases')}")
    if not found:
        click.echo(f"{client.bucket} holds no compile leases")
        return
    now = _time.time()
    rows = [("COMPILER", "GRAPH", "HOLDER", "SINCE", "LAST WRITE")]
    for lease in found:
        holder = lease.holder
        rows.append((lease.compiler_version, lease.module, holder.describe() if holder else "(unreadable)",
                     _duration(max(0.0, now - holder.started)) if holder else "-",
                     f"{_duration(max(0.0, now - lease.uploaded))} ago" if lease.uploaded is not None else "-"))
    _table(rows)


@cli.group()
def shim() -> None:
    """The neuronx-cc shim: looks each graph up in the bucket before the real compiler runs."""


@shim.command(name="install")
@click.argument("directory")
def shim_install(directory: str) -> None:
    """Write the shim as DIRECTORY/neuronx-cc and print the PATH line that puts it first."""
    from .integrations.compiler_shim import install_compiler_shim, real_compiler_besides

    path = install_compiler_shim(directory)
    real = real_compiler_besides(path)
    click.echo(f"installed {path}" + (f" (real compiler: {real})" if real else " (no real neuronx-cc on PATH yet)"), err=True)
    click.echo(f'export PATH="{path.parent}:$PATH"')


# ------------------------------------------------------------------------------------------ import


@cli.command(name="import")
@click.argument("repo_id")
@click.option("--revision", help="A branch, tag or commit sha of the repo (default: main).")
@bucket_option
@click.option("--dry-run", is_flag=True, help="Show the plan: each entry and record, what would be done and why.")
@json_option
@click.pass_obj
def import_(out: Output, repo_id: str, revision: str | None, bucket: str | None, dry_run: bool, as_json: bool) -> None:
    """Copy an optimum-neuron cache repo (e.g. aws-neuron/optimum-neuron-cache) into the bucket.

    Its entries go to the bucket's flat area (by a server-side copy by Xet hash where the repo's files are
    Xet-backed and the bucket is on the Hub, else streamed), its registry entries become export records.
    Resumable: run it again after an interruption and it skips what the bucket has."""
    from .hub_repos import RepoClient, parse_repo
    from .import_repo import describe_plan, execute_import, plan_import

    repo = parse_repo(repo_id, revision)
    ref = _bucket(bucket)
    repo_client, bucket_client = RepoClient(repo), BucketClient(ref)
    plan = plan_import(repo_client, bucket_client)
    planned = [{"action": op.action.value, "compiler_version": op.compiler_version, "name": op.name, "reason": op.reason}
               for op in plan.ops]
    if dry_run:
        if as_json:
            click.echo(_json({"repo": str(plan.repo), "bucket": str(ref), "executed": False, "plan": planned}))
            return
        for line in describe_plan(plan, size):
            out.info(line)
        return
    if not as_json:
        out.info(describe_plan(plan, size)[1].strip())
    total = len(plan.entries) + len(plan.records)
    bar = None if as_json or out.quiet or not sys.stderr.isatty() or not total else \
        tqdm(desc="import", total=total, unit="entry", file=sys.stderr, leave=False)
    try:
        result = execute_import(plan, repo_client, bucket_client, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(_json({"repo": str(plan.repo), "bucket": str(ref), "executed": True, "plan": planned,
                          "imported": result.imported, "records": result.records,
                          "failed": [{"entry": name, "why": why} for name, why in result.failed],
                          "bytes_copied": result.bytes_copied, "bytes_streamed": result.bytes_streamed}))
        sys.exit(1 if result.failed else 0)
    out.info(f"imported {plural(len(result.imported), 'entry', 'entries')} ({size(result.bytes_copied)} copied by Xet hash, "
             f"{size(result.bytes_streamed)} streamed) and {plural(len(result.records), 'export record', 'export records')} "
             f"from {plan.repo} into {ref}")
    for name, why in result.failed:
        echo(f"warning: {name} not imported: {why} (run the import again to retry)", err=True)
    if result.failed:
        sys.exit(1)


# ------------------------------------------------------------------------------------------ server


@cli.group()
def server() -> None:
    """The bucket server of this user, host and endpoint."""


@server.command(name="status")
@json_option
def server_status(as_json: bool) -> None:
    """Show the running server (pid, socket, version, idle time)."""
    info = running_server()
    if as_json:
        click.echo(_json(info))
        return
    if info is None:
        click.echo("no bucket server is running (one starts on demand)")
        return
    click.echo(f"pid: {info['pid']}\nsocket: {info['socket']}\nendpoint: {info['endpoint']}\n"
               f"version: {info['server_version']} (protocol {info['protocol']}, huggingface_hub {info['huggingface_hub']})\n"
               f"python: {info['python']}\nuptime: {info['uptime']:.0f}s\nidle: {info['idle_for']:.0f}s (exits after {info['idle_timeout']:.0f}s idle)\n"
               f"connections: {info['connections'] - 1}")


@server.command(name="stop")
def server_stop() -> None:
    """Stop the running server (the next request starts a new one)."""
    click.echo("stopped the bucket server" if stop_server() else "no bucket server was running")


# ---------------------------------------------------------- prune, scrub, du (cli_lifecycle.py)

from .cli_lifecycle import register as _register_lifecycle  # noqa: E402  (it uses the helpers above)

_register_lifecycle(cli)


def main() -> None:
    """The `neuron-cache` entry point."""
    cli(prog_name="neuron-cache")
