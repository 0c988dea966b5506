"""The one publish path: journal the entries, plan, execute, then settle the journal.

Every caller that publishes (the context's exit, a training session's checkpoints, the compiler shim, the CLI's
`sync`) goes through `publish`, so the write-ahead rule holds everywhere: the names of what may be published are
on disk (journal.py) before the first byte goes up, and leave the journal only once the bucket holds their
commit files. A run killed at any instant leaves them for the next run of the same model and task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from .client import BucketClient, ProgressCallback
from .host_state import HostState
from .journal import Journal, JournalKey, RunRecord, explicit_and_window
from .local_cache import LocalEntry, scan_entries
from .sync import RecordWrite, SyncPlan, SyncResult, execute_sync, plan_sync, published_meanwhile

log = logging.getLogger("optimum_neuron_cache")


@dataclass(frozen=True)
class Publication:
    """What a publish planned and did, and what is still journaled."""

    plan: SyncPlan
    result: SyncResult
    #: The journal record still holding names the bucket does not have yet (None: nothing left).
    record: RunRecord | None


def journal_key(client: BucketClient, compiler_version: str, model_folder: str | None, task: str) -> JournalKey:
    """The journal key of publishing to `client`'s bucket for a compiler version, model folder and task."""
    return JournalKey(str(client.bucket), compiler_version, model_folder, task)


def publish(client: BucketClient, root: Path, key: JournalKey, entries: Iterable[LocalEntry], *,
            area: str | None, known_in_area: Collection[str] = frozenset(), records: Iterable[RecordWrite] = (),
            record: RunRecord | None = None, create_bucket: bool = False,
            progress: ProgressCallback | None = None) -> Publication:
    """Publish `entries` (success entries) to the flat area and to `area` (the model's, or None), with
    `records` (export records) in the last batch.

    `record` is the caller's journal record (a run's own), which gets the names, and is returned with what is
    left. Without one, a record of this call is written and closed with what is left (then `record` is None in
    the result: nothing is left for the caller to do). On any exception the names stay journaled.
    """
    journal, state = Journal(root), HostState(root)
    candidates = list({entry.name: entry for entry in entries if entry.state.publishable}.values())  # each once
    names = tuple(sorted(entry.name for entry in candidates))
    writes = tuple(records)
    own = record is None
    if record is None:
        record = journal.begin(RunRecord(key=key, started=time.time(), entries=names, window=False, open=True))
    elif set(names) - set(record.entries):
        record = journal.update(record, entries=tuple(sorted(set(record.entries) | set(names))))
    try:
        if create_bucket and (candidates or writes):
            client.create()  # the embedded default is made on first use; real buckets never are
        plan = plan_sync(client, candidates, area, known_in_area, writes)
        result = execute_sync(client, state, plan, progress) if not plan.empty else SyncResult()
    except BaseException:
        if own:
            close(root, record)  # the names stay, for a later run
        raise
    # Settled: what the bucket already held, what we published, what another process of this host published
    # meanwhile, and what another process of the same key is publishing at this instant (its own record lists
    # it). Its record is read first: a publisher marks its publication before it drops its record, so an entry
    # whose record is gone has its markers. What a process of another key is publishing, unfinished, stays
    # journaled until a later run sees it committed.
    busy = set(result.in_progress) - journal.listed_elsewhere(key, result.in_progress, record)
    items = {item.entry.name: item for item in plan.items}
    busy = {name for name in busy if not published_meanwhile(state, plan, items[name])}
    left = journal.settle(record, set(names) - busy - set(result.unconfirmed))  # unconfirmed: a prune raced it
    if own and left is not None:
        close(root, left)
        left = None
    return Publication(plan, result, left)


def publish_leftovers(client: BucketClient, root: Path, key: JournalKey, *, area: str | None,
                      known_in_area: Collection[str] = frozenset(), with_entries: Iterable[LocalEntry] = (),
                      create_bucket: bool = False, progress: ProgressCallback | None = None) -> Publication | None:
    """Publish what earlier runs of `key` on this host left in the journal (killed, or the bucket was down),
    with `with_entries`, for callers that are not a `hub_neuronx_cache` run (the compiler shim, the CLI's
    fetch and sync).
    Export records of those runs are left to the next `hub_neuronx_cache` run of the model."""
    journal = Journal(root)
    leftovers = journal.leftovers(key)
    local = {entry.name: entry for entry in scan_entries(root, key.compiler_version)} if leftovers else {}
    earlier = [local[name] for name in sorted(explicit_and_window(leftovers, local, time.time()))]
    candidates = [*with_entries, *earlier]
    publication = publish(client, root, key, candidates, area=area, known_in_area=known_in_area,
                          create_bucket=create_bucket, progress=progress) if candidates else None
    # Their names are in the bucket now, or in this call's own record (closed with what is left): theirs can go,
    # except those that still owe an export record (the next `hub_neuronx_cache` run of the model writes it).
    if publication is None or publication.record is None:
        for leftover in leftovers:
            if not leftover.export_config:
                journal.drop(leftover)
    return publication


def defer(root: Path, key: JournalKey, names: Iterable[str]) -> None:
    """Journal entries for a later run without trying now (the bucket is known to be down)."""
    names = tuple(sorted(set(names)))
    if names:
        Journal(root).begin(RunRecord(key=key, started=time.time(), entries=names, window=False, open=False))


def close(root: Path, record: RunRecord | None) -> None:
    """The run is over: a record with names left becomes anyone's to publish; an empty one goes."""
    if record is None:
        return
    journal = Journal(root)
    if record.entries:
        journal.update(record, open=False, window=False)
    else:
        journal.drop(record)
