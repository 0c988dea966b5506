"""`neuron-cache prune`, `scrub` and `du`: a bucket over its lifetime. Registered on the CLI group by cli.py.

Exit codes as for every command (cli.py); `scrub` also exits 1 when it finds a problem, so that a scheduled
job can alert on it. Each has `--json` (always valid JSON).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
from tqdm import tqdm

from . import remote_layout as layout
from . import settings
from .client import BucketClient
from .errors import ConfigurationError
from .neuron_sdk import validate_compiler_version
from .prune import PrunePlan, PrunePolicy, execute_prune, plan_prune
from .scrub import DEFAULT_STALE_AFTER, repair as repair_entries, repair_plan, scrub as run_scrub
from .survey import survey_bucket
from .usage import bucket_usage


def age(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """An option's age in seconds: `3600`, `90s`, `15m`, `12h`, `30d`, `2w` (settings.duration, as everywhere)."""
    if value is None:
        return None
    seconds = settings.duration(value)
    if seconds is None:
        raise ConfigurationError(f"{param.opts[0] if param.opts else 'age'} {value!r} is not an age: give seconds "
                                 "(3600), or a number followed by s, m, h, d or w (e.g. 30d)")
    return seconds


def renamed(old: str, new: str, dest: str, *, multiple: bool = False,
            callback: Callable[..., Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`old`, the former spelling of option `new` (parameter `dest`), kept as a hidden alias: it still works, and
    says the new name in one line on stderr. With both spellings, a repeatable option takes both; a single one
    must agree. It goes among the command's option decorators."""
    alias = f"renamed_{dest}"

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(*args: Any, **params: Any) -> Any:
            value = params.pop(alias)
            if value:
                click.echo(f"note: {old} is now {new} (the old name still works)", err=True)
                if multiple:
                    params[dest] = (*params.get(dest, ()), *value)
                elif params.get(dest) is not None and params[dest] != value:
                    raise click.UsageError(f"{old} and {new} name different values: give {new} only")
                else:
                    params[dest] = value
            return command(*args, **params)

        return click.option(old, alias, hidden=True, multiple=multiple, callback=callback)(run)

    return decorate


def _versions(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(validate_compiler_version(v, source=param.opts[0]) for v in value)


def policy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The prune policy, shared by `prune` (what to remove) and `du` (what that would free). `--model` (a filter
    everywhere else) is `--drop-model` here, as `--drop-version`; `prune --compiler-version` scopes `--drop-model`
    (`du --compiler-version` scopes the whole report); the old spellings are hidden aliases."""
    for option in reversed([
        renamed("--model", "--drop-model", "models", multiple=True),
        renamed("--model-version", "--compiler-version", "model_versions", multiple=True, callback=_versions),
        click.option("--keep-versions", type=click.IntRange(min=0), help="Keep the newest K compiler versions, remove the others."),
        click.option("--drop-version", "drop_versions", multiple=True, callback=_versions, help="Remove this compiler version (repeatable)."),
        click.option("--drop-model", "models", multiple=True,
                     help="Remove this model's areas and export records (repeatable)."),
        click.option("--task", "-t", default=None, help="With --drop-model: only this task's area."),
        click.option("--unreferenced-older-than", "unreferenced", callback=age, metavar="AGE",
                     help="Remove flat entries no model area or export record references, written more than AGE ago (e.g. 30d)."),
        click.option("--incomplete-older-than", "incomplete", callback=age, metavar="AGE",
                     help="Remove entries that never got their commit file (a publisher that died), written more than AGE ago."),
        click.option("--dangling-records", is_flag=True, help="Remove export records naming entries their area no longer holds."),
    ]):
        command = option(command)
    return command


def _policy(keep_versions: int | None, drop_versions: tuple[str, ...], models: tuple[str, ...], task: str | None,
            model_versions: tuple[str, ...], unreferenced: float | None, incomplete: float | None,
            dangling_records: bool) -> PrunePolicy:
    if (task or model_versions) and not models:
        raise click.UsageError("--task and prune's --compiler-version go with --drop-model")
    folders = tuple(layout.model_ref(model).folder for model in models)
    return PrunePolicy(keep_versions=keep_versions, drop_versions=drop_versions, models=folders,
                       task=layout.task_name(task) if task else None, model_versions=model_versions,
                       unreferenced_older_than=unreferenced, incomplete_older_than=incomplete,
                       dangling_records=dangling_records)


def _plan_dict(plan: PrunePlan) -> dict[str, Any]:
    return {"records": [asdict(r) for r in plan.records], "entries": [asdict(e) for e in plan.entries],
            "strays": [asdict(s) for s in plan.strays], "stamps": [asdict(s) for s in plan.stamps], "files": plan.files, "bytes": plan.bytes,
            "complete_before": plan.complete_before, "complete_after": plan.complete_after}


def register(cli: click.Group) -> None:
    """Add the commands to the `neuron-cache` group."""
    from .cli import (
        Output, _bucket, _json, _table, bucket_option, confirmed, echo, plural, size, version_option, yes_option,
    )

    @cli.command()
    @bucket_option
    @policy_options
    @click.option("--compiler-version", "model_versions", multiple=True, callback=_versions,
                  help="With --drop-model: only under this compiler version (repeatable; default: every version).")
    @click.option("--all", "allow_all", is_flag=True, help="Allow a plan that removes every complete entry.")
    @yes_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def prune(out: Output, bucket: str | None, keep_versions: int | None, drop_versions: tuple[str, ...],
              models: tuple[str, ...], task: str | None, model_versions: tuple[str, ...], unreferenced: float | None,
              incomplete: float | None, dangling_records: bool, allow_all: bool, yes: bool, as_json: bool) -> None:
        """Remove from the bucket what a policy says nobody needs: shows the plan, then asks on a terminal; --yes acts
        without asking; elsewhere the plan is only shown.

        An entry goes commit file first, then content; export records before the entries they name."""
        policy = _policy(keep_versions, drop_versions, models, task, model_versions, unreferenced, incomplete, dangling_records)
        if policy.empty:
            raise click.UsageError("say what to remove: --keep-versions, --drop-version, --drop-model, "
                                   "--unreferenced-older-than, --incomplete-older-than or --dangling-records")
        ref = _bucket(bucket)
        client = BucketClient(ref)
        plan = plan_prune(survey_bucket(client, with_records=policy.needs_records), policy, allow_all=allow_all)
        verb = "removed" if yes else "would remove"
        if not as_json:
            for record in plan.records:
                out.info(f"{verb} {record.path} ({size(record.bytes)}): {record.reason}")
            for entry in plan.entries:
                where = layout.entry_prefix_of(entry.compiler_version, entry.area, entry.module)
                out.info(f"{verb} {where} ({size(entry.bytes)}): {entry.reason}")
            for stray in [*plan.strays, *plan.stamps]:
                out.info(f"{verb} {stray.path} ({size(stray.bytes)}): {stray.reason}")
        result = None
        if not plan.empty and confirmed(yes, f"remove them from {ref} ({size(plan.bytes)})?", ask=not as_json):
            progress, close = _count_bar(out, "prune")
            try:
                result = execute_prune(client, plan, progress=progress)
            finally:
                close()
        if as_json:
            click.echo(_json({"bucket": str(ref), "executed": result is not None, "plan": _plan_dict(plan),
                              "result": asdict(result) if result else None}))
            return
        if plan.empty:
            click.echo(f"nothing to prune in {ref}")
            return
        summary = (f"{plural(len(plan.entries), 'entry', 'entries')}, {plural(len(plan.records), 'export record', 'export records')}"
                   + (f", {len(plan.strays)} other files" if plan.strays else "") + f" ({size(plan.bytes)})")
        if result is None:
            click.echo(f"would remove {summary} from {ref}; run again with --yes to remove them")
            return
        click.echo(f"removed {summary} from {ref}")
        if result.rewritten_removed:
            click.echo(f"removed again {len(result.rewritten_removed)} commit files a concurrent publisher wrote over "
                       "removed content")
        if result.republished:
            click.echo(f"left {plural(len(result.republished), 'entry', 'entries')} a concurrent publisher published again meanwhile")

    @cli.command(name="scrub")
    @bucket_option
    @version_option
    @click.option("--read", is_flag=True, help="Also read every committed file back, hashed against its digest.")
    @click.option("--stale-after", callback=age, metavar="AGE",
                  help="Report entries without a commit file written more than AGE ago (default 1d).")
    @click.option("--repair", is_flag=True, help="Remove the commit files of entries found missing, short or corrupt "
                  "(shown, then asked on a terminal; --yes acts without asking; elsewhere only shown).")
    @yes_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def scrub(out: Output, bucket: str | None, compiler_version: str | None, read: bool, stale_after: float | None,
              repair: bool, yes: bool, as_json: bool) -> None:
        """Re-check what the bucket holds against its digests; exits 1 when it finds a problem."""
        ref = _bucket(bucket)
        client = BucketClient(ref)
        progress, close = out.progress("scrub") if read else (None, lambda: None)
        try:
            report = run_scrub(client, compiler_version=compiler_version, read=read,
                               stale_after=DEFAULT_STALE_AFTER if stale_after is None else stale_after, progress=progress)
        finally:
            close()
        to_repair = repair_plan(report) if repair else []
        if not as_json:
            for finding in report.findings:
                echo(f"{finding.problem.value:15} {finding.path}: {finding.detail}")
            for path in to_repair:
                echo(f"{'removed' if yes else 'would remove'} {path} (the commit file of a bad entry)")
        files = plural(len(to_repair), "commit file", "commit files")
        if to_repair and confirmed(yes, f"remove these {files}?", ask=not as_json):
            repair_entries(client, report)
        if as_json:
            click.echo(_json({"bucket": str(ref), "ok": report.ok, "entries": report.entries, "files": report.files,
                              "records": report.records, "read_files": report.read_files, "read_bytes": report.read_bytes,
                              "unverifiable": report.unverifiable,
                              "findings": [{**asdict(f), "problem": f.problem.value} for f in report.findings],
                              "repaired": report.repaired}))
        else:
            checked = f"checked {report.entries} entries ({report.files} files) and {report.records} export records in {ref}"
            if read:
                checked += f"; read back {report.read_files} files ({size(report.read_bytes)})"
                if report.unverifiable:
                    checked += f", {report.unverifiable} without a digest to check against"
            click.echo(f"{checked}: " + ("no problem" if report.ok else plural(len(report.findings), "problem", "problems")))
            if report.repaired:
                click.echo(f"removed {len(report.repaired)} commit files of bad entries: the next compile of those "
                           "graphs publishes them again")
            elif to_repair:
                click.echo(f"would remove {files} of bad entries; run again with --repair --yes to remove them")
        if not report.ok:
            sys.exit(1)

    @cli.command(name="du")
    @bucket_option
    @version_option
    @policy_options
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def du(bucket: str | None, compiler_version: str | None, keep_versions: int | None, drop_versions: tuple[str, ...],
           models: tuple[str, ...], task: str | None, unreferenced: float | None, incomplete: float | None,
           dangling_records: bool, as_json: bool, model_versions: tuple[str, ...] = ()) -> None:
        """Bytes per compiler version, per model, unreferenced; with prune options, what that prune would free."""
        policy = _policy(keep_versions, drop_versions, models, task, model_versions, unreferenced, incomplete, dangling_records)
        ref = _bucket(bucket)
        survey = survey_bucket(BucketClient(ref), compiler_version=compiler_version, with_records=True)
        usage = bucket_usage(survey, policy)
        if as_json:
            click.echo(_json({"bucket": str(ref), "bytes": usage.bytes, "unique_bytes": usage.unique_bytes,
                              "unreferenced_bytes": usage.unreferenced_bytes,
                              "versions": [asdict(v) for v in usage.versions], "models": [asdict(m) for m in usage.models],
                              "prune": asdict(usage.prune) if usage.prune else None}))
            return
        if not usage.versions:
            click.echo(f"{ref} holds no compiler version folder")
            return
        rows = [("COMPILER", "ENTRIES", "SIZE", "UNIQUE", "FLAT", "MODELS", "RECORDS", "OTHER", "UNREFERENCED")]
        for v in usage.versions:
            rows.append((v.compiler_version, str(v.entries), size(v.bytes), size(v.unique_bytes), size(v.flat_bytes),
                         size(v.model_bytes), size(v.record_bytes), size(v.other_bytes),
                         f"{size(v.unreferenced_bytes)} ({v.unreferenced_entries})"))
        _table(rows)
        if usage.models:
            click.echo("")
            rows = [("COMPILER", "MODEL", "TASKS", "ENTRIES", "SIZE", "RECORDS")]
            rows += [(m.compiler_version, m.model, ",".join(m.tasks), str(m.entries), size(m.bytes), str(m.records))
                     for m in usage.models]
            _table(rows)
        click.echo(f"\ntotal {size(usage.bytes)} listed, {size(usage.unique_bytes)} unique content, "
                   f"{size(usage.unreferenced_bytes)} in flat entries nothing references")
        if usage.prune is not None:
            click.echo(f"this prune would remove {usage.prune.entries} entries and {usage.prune.records} export records, "
                       f"freeing {size(usage.prune.bytes)}")


def _count_bar(out: Any, description: str) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A tqdm bar counting files on a terminal (nothing otherwise, or with --quiet)."""
    if out.quiet or not sys.stderr.isatty():
        return None, lambda: None
    bar = tqdm(desc=description, unit="file", file=sys.stderr, leave=False, total=0)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(max(0, done - bar.n))

    return update, bar.close
