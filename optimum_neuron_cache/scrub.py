"""Scrub: re-check what a bucket holds, report what went bad, and (on request) un-commit the bad entries.

Two depths, both on the survey (survey.py):
- **From the listing** (always; costs the listing only). What the bucket itself says about each file: its
  size, and its digest as the server lists it. On a directory bucket the server compares each file with
  the digest sidecar written when it was published, and lists a file changed since as `stale`; on a Hub
  bucket each file's Xet hash is the content address, so two copies of one entry (flat and a model's area)
  must list the same hash and size. Also: commit files whose NEFF is missing, entries that never got their
  commit file (older than an age: a publisher that died), names the layout does not allow, export records
  that are unreadable or name entries their area no longer holds.
- **By reading** (`read=True`): every file of every committed entry goes through the server's verified
  download into a temporary folder, so its bytes are hashed against the bucket's digest (the Xet hash on
  the Hub, checked by BLAKE3 where an export record binds it; the BLAKE3 sidecar on a directory bucket).
  Bytes are read, checked and thrown away, batch by batch.

Repair removes the commit files of entries whose files are missing, short or corrupt: a reader then skips
them, and the next compile of those graphs publishes them again (a publisher asks for commit files only).
A file that does not transfer says nothing of its content: it is read again, then reported unreadable,
never repaired.
"""

from __future__ import annotations

import enum
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bucket_server.messages import STALE_DIGEST, TRANSFER, DownloadRequest, DownloadResult

from . import remote_layout as layout
from .client import BucketClient
from .errors import RemoteUnavailableError
from .local_cache import NEFF
from .prune import BATCH_PATHS, RECORD_GRACE
from .survey import BucketSurvey, ListedFile, RecordFile, RemoteEntry, VersionSurvey

#: An entry without its commit file is a publisher that died once it is this old (a live one commits within
#: its three batches).
DEFAULT_STALE_AFTER = 24 * 3600.0
#: Bytes read back per download request when scrubbing by reading (the temp folder holds at most this much).
READ_BATCH_BYTES = 2 << 30
#: Times the files that did not transfer are asked for again (all in one request) before they are reported.
READ_RETRIES = 2


class Problem(str, enum.Enum):
    """What is wrong with a finding; the first three are repaired by removing commit files."""

    MISSING = "missing"
    SHORT = "short"
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"
    UNCOMMITTED = "uncommitted"
    BAD_NAME = "bad-name"
    BAD_RECORD = "bad-record"
    DANGLING_RECORD = "dangling-record"

    @property
    def repairable(self) -> bool:
        """Removing the entry's commit file makes the bucket consistent again."""
        return self in (Problem.MISSING, Problem.SHORT, Problem.CORRUPT)


@dataclass(frozen=True)
class Finding:
    """One problem, where it is, and what a repair removes."""

    problem: Problem
    #: The entry's folder, or the file's path.
    path: str
    detail: str
    #: Commit files `--repair` removes (empty: nothing a repair does).
    repair_paths: tuple[str, ...] = ()


@dataclass
class ScrubReport:
    """What a scrub checked and found."""

    entries: int = 0
    files: int = 0
    records: int = 0
    #: Files hashed by reading them back (0 unless `read`), and files with no digest to check against.
    read_files: int = 0
    read_bytes: int = 0
    unverifiable: int = 0
    findings: list[Finding] = field(default_factory=list)
    #: Commit files removed by the repair.
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing found."""
        return not self.findings


def _entry_finding(entry: RemoteEntry, problem: Problem, detail: str) -> Finding:
    commit = entry.paths([entry.commit_name]) if entry.has_commit else []
    return Finding(problem, layout.entry_prefix_of(entry.compiler_version, entry.area, entry.module), detail, tuple(commit))


def _check_entry(entry: RemoteEntry, now: float, stale_after: float) -> list[Finding]:
    """What the listing says is wrong with one entry on its own."""
    if not entry.has_commit:
        newest = entry.newest_upload
        if newest is not None and now - newest > stale_after:
            return [Finding(Problem.UNCOMMITTED, layout.entry_prefix_of(entry.compiler_version, entry.area, entry.module),
                            f"content without its {entry.commit_name} for {(now - newest) / 3600:.0f} h: a publisher that died "
                            "(`neuron-cache prune --incomplete-older-than` removes it)")]
        return []
    findings = []
    if NEFF not in entry.files:
        findings.append(_entry_finding(entry, Problem.MISSING, f"{entry.commit_name} is there but {NEFF} is missing"))
    elif entry.files[NEFF].size == 0:
        findings.append(_entry_finding(entry, Problem.SHORT, f"{NEFF} is empty"))
    stale = sorted(name for name, f in entry.files.items() if f.digest == STALE_DIGEST)
    if stale:
        findings.append(_entry_finding(entry, Problem.CORRUPT, f"{', '.join(stale)} changed after it was published "
                                                               "(its size or time differs from its digest record)"))
    return findings


def _check_copies(flat: RemoteEntry, copy: RemoteEntry) -> list[Finding]:
    """A model area's copy against the flat area's: the same files, sizes and content."""
    if not (flat.complete and copy.has_commit):
        return []
    findings = []
    missing = sorted(set(flat.files) - set(copy.files))
    if missing:
        findings.append(_entry_finding(copy, Problem.MISSING, f"{', '.join(missing)} missing (the flat area's copy has it)"))
    for name in sorted(set(flat.files) & set(copy.files)):
        a, b = flat.files[name], copy.files[name]
        if a.size != b.size:
            short = copy if b.size < a.size else flat
            findings.append(_entry_finding(short, Problem.SHORT, f"{name} is {min(a.size, b.size)} bytes, its other copy "
                                                                 f"{max(a.size, b.size)}"))
        elif _differs(a, b):
            findings += [_entry_finding(e, Problem.CORRUPT, f"{name} differs from its other copy (same size, other "
                                                            "content hash): one of them is corrupt") for e in (flat, copy)]
    return findings


def _differs(a: ListedFile, b: ListedFile) -> bool:
    """Two copies list different content: other Xet hashes, or other digests of one algorithm."""
    if a.xet_hash and b.xet_hash:
        return a.xet_hash != b.xet_hash
    if not a.digest or not b.digest or STALE_DIGEST in (a.digest, b.digest):
        return False
    return a.digest.split(":")[0] == b.digest.split(":")[0] and a.digest != b.digest


def _check_records(found: VersionSurvey, now: float) -> list[Finding]:
    findings = []
    for record in found.records:
        if record.record is None and record.file.path in found.unread_records:
            findings.append(Finding(Problem.UNREADABLE, record.file.path, "did not transfer (asked for twice): its "
                                    "content is unknown; run `neuron-cache scrub` again"))
            continue
        if record.record is None:
            findings.append(Finding(Problem.BAD_RECORD, record.file.path, "not a readable export record"))
            continue
        present = found.complete_in(record.area)
        missing = [m for m in record.record.modules if m not in present]
        if missing and record.file.uploaded is not None and now - record.file.uploaded > RECORD_GRACE:
            findings.append(Finding(Problem.DANGLING_RECORD, record.file.path,
                                    f"names {len(missing)} entries its area does not hold (e.g. {missing[0]}); "
                                    "`neuron-cache prune --dangling-records` removes it"))
    return findings


def check_listing(survey: BucketSurvey, *, now: float | None = None, stale_after: float = DEFAULT_STALE_AFTER) -> ScrubReport:
    """Everything the survey's listings tell (pure: no I/O)."""
    now = time.time() if now is None else now
    report = ScrubReport()
    report.findings += [Finding(Problem.BAD_NAME, name, "not a compiler version folder (neuronxcc-<version>)")
                        for name in survey.bad_top_level]
    for version in survey.ordered_versions():
        found = survey.versions[version]
        report.entries += len(found.entries)
        report.files += sum(len(e.files) for e in found.entries.values())
        report.records += len(found.records)
        report.findings += [Finding(Problem.BAD_NAME, f.path, "a name the layout does not allow here") for f in found.bad_names]
        for entry in found.entries.values():
            report.findings += _check_entry(entry, now, stale_after)
            flat = found.entries.get(("", entry.module))
            if entry.area and flat is not None:
                report.findings += _check_copies(flat, entry)
        if found.records_read:
            report.findings += _check_records(found, now)
    report.findings = merged(report.findings)
    return report


def merged(findings: list[Finding]) -> list[Finding]:
    """One finding per problem and path, their details joined (a short NEFF may be both empty and shorter
    than its other copy)."""
    by_key: dict[tuple[Problem, str], Finding] = {}
    for finding in findings:
        key = (finding.problem, finding.path)
        if key in by_key:
            first = by_key[key]
            by_key[key] = Finding(first.problem, first.path, f"{first.detail}; {finding.detail}",
                                  tuple(sorted(set(first.repair_paths) | set(finding.repair_paths))))
        else:
            by_key[key] = finding
    return list(by_key.values())


# ------------------------------------------------------------------------------------------- reading

#: progress(bytes read back so far, bytes to read).
ByteProgress = Callable[[int, int], None]


def _batches(files: list[tuple[RemoteEntry, ListedFile]], limit: int) -> Iterable[list[tuple[RemoteEntry, ListedFile]]]:
    batch: list[tuple[RemoteEntry, ListedFile]] = []
    size = 0
    for pair in files:
        if batch and size + pair[1].size > limit:
            yield batch
            batch, size = [], 0
        batch.append(pair)
        size += pair[1].size
    if batch:
        yield batch


def _read_back(client: BucketClient, batch: list[tuple[RemoteEntry, ListedFile]], records: list[RecordFile],
               errors: list[RemoteUnavailableError]) -> tuple[dict[str, str], dict[str, str]]:
    """Download one batch into a temporary folder (and throw it away): (path -> why its bytes do not match,
    path -> why it did not transfer). A download the bucket refuses whole leaves every file untransferred (its
    error added to `errors`)."""
    hashes = {f.xet_hash for _, f in batch if f.xet_hash}
    manifests = [r.file for r in records if r.record is not None and hashes & set(r.record.digests)]
    with tempfile.TemporaryDirectory(prefix="neuron-cache-scrub-") as tmp:
        items = [m.download_item(str(Path(tmp) / f"m{i}.json"), manifest=True) for i, m in enumerate(manifests)]
        items += [listed.download_item(str(Path(tmp) / str(i))) for i, (_, listed) in enumerate(batch)]
        try:
            reply: DownloadResult = client.send(DownloadRequest(tuple(items)))
        except RemoteUnavailableError as exc:
            errors.append(exc)
            return {}, {listed.path: str(exc) for _, listed in batch}
    asked = {listed.path for _, listed in batch}  # a manifest that fails costs only its shortcut
    mismatched: dict[str, str] = {}
    unread: dict[str, str] = {}
    for failure in reply.failed:
        if failure.path in asked:
            (unread if failure.kind == TRANSFER else mismatched)[failure.path] = failure.reason
    return mismatched, unread


def check_by_reading(client: BucketClient, survey: BucketSurvey, report: ScrubReport, *,
                     batch_bytes: int = READ_BATCH_BYTES, progress: ByteProgress | None = None) -> None:
    """Read every file of every committed entry back through the server's verified download (into a
    temporary folder, a batch at a time) and add a CORRUPT finding for each entry with a file whose bytes do
    not match. A file that does not transfer is asked for again (READ_RETRIES times, all such files in one
    request), then reported UNREADABLE: nothing is known of its content, so nothing is repaired. Export
    records whose digests bind a batch's Xet hashes ride along as digest manifests."""
    flagged = {f.path for f in report.findings if f.problem.repairable}
    files: list[tuple[RemoteEntry, ListedFile]] = []
    for found in survey.versions.values():
        for entry in found.entries.values():
            prefix = layout.entry_prefix_of(entry.compiler_version, entry.area, entry.module)
            if not entry.has_commit or prefix in flagged:
                continue
            for listed in entry.files.values():
                if listed.digest is None:
                    report.unverifiable += 1
                elif listed.digest != STALE_DIGEST:
                    files.append((entry, listed))
    records = [r for v in survey.versions.values() for r in v.records if r.record is not None and r.record.digests]
    total = sum(f.size for _, f in files)
    done = 0
    mismatched: dict[str, str] = {}
    unread: dict[str, str] = {}
    errors: list[RemoteUnavailableError] = []
    for batch in _batches(files, batch_bytes):
        bad, missed = _read_back(client, batch, records, errors)
        mismatched.update(bad)
        unread.update(missed)
        done += sum(f.size for _, f in batch)
        if progress is not None:
            progress(done, total)
    for _ in range(READ_RETRIES):
        again = [pair for pair in files if pair[1].path in unread]
        if not again:
            break
        for batch in _batches(again, batch_bytes):
            bad, missed = _read_back(client, batch, records, errors)
            mismatched.update(bad)
            for _, listed in batch:
                if listed.path in missed:
                    unread[listed.path] = missed[listed.path]
                else:
                    del unread[listed.path]
    if errors and files and len(unread) == len(files):
        raise errors[0]  # nothing came through at all: the bucket is down, one error says it (not a line per entry)
    report.read_files = sum(1 for _, f in files if f.path not in unread)
    report.read_bytes = sum(f.size for _, f in files if f.path not in unread)
    by_path = {listed.path: entry for entry, listed in files}
    for problem, found_bad in ((Problem.CORRUPT, mismatched), (Problem.UNREADABLE, unread)):
        reasons: dict[str, tuple[RemoteEntry, list[str]]] = {}
        for path, why in sorted(found_bad.items()):
            entry = by_path[path]
            key = layout.entry_prefix_of(entry.compiler_version, entry.area, entry.module)
            reasons.setdefault(key, (entry, []))[1].append(f"{path.rsplit('/', 1)[-1]}: {why}")
        for entry, why in reasons.values():
            finding = _entry_finding(entry, problem, "; ".join(why))
            if problem is Problem.UNREADABLE:  # a repair has nothing to act on
                finding = Finding(problem, finding.path, f"{finding.detail} (did not transfer in {READ_RETRIES + 1} "
                                  "attempts: its content is unknown, nothing repaired; run `neuron-cache scrub "
                                  "--read` again)")
            report.findings.append(finding)


def scrub(client: BucketClient, *, compiler_version: str | None = None, read: bool = False,
          stale_after: float = DEFAULT_STALE_AFTER, progress: ByteProgress | None = None) -> ScrubReport:
    """Survey the bucket (with its records) and check it; by reading its files too with `read`."""
    from .survey import survey_bucket

    survey = survey_bucket(client, compiler_version=compiler_version, with_records=True)
    report = check_listing(survey, stale_after=stale_after)
    if read:
        check_by_reading(client, survey, report, progress=progress)
    return report


def repair_plan(report: ScrubReport) -> list[str]:
    """The commit files a repair removes: those of the entries found missing, short or corrupt (once each)."""
    return sorted({p for f in report.findings if f.problem.repairable for p in f.repair_paths})


def repair(client: BucketClient, report: ScrubReport, *, batch: int = BATCH_PATHS) -> list[str]:
    """Remove the commit files `repair_plan` names."""
    paths = repair_plan(report)
    for start in range(0, len(paths), batch):
        client.batch(delete=paths[start:start + batch])
    report.repaired = paths
    return paths
