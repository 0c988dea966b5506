"""Usage: where a bucket's bytes are (per compiler version, per model, unreferenced), and what a prune frees.

Figures are listed sizes. Copies of one entry in the flat area and in model areas are listed once per copy,
but cost storage once (Hub buckets copy by Xet hash; directory buckets hard-link where they can): `unique`
counts each content once, by its Xet hash or digest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bucket_server.messages import STALE_DIGEST

from .prune import PrunePlan, PrunePolicy, plan_prune
from .survey import BucketSurvey, VersionSurvey


@dataclass
class VersionUsage:
    """One compiler version's bytes; dropping the version frees `bytes`."""

    compiler_version: str
    #: Complete entries, in every area (a flat entry and its model-area copy count twice).
    entries: int = 0
    bytes: int = 0
    unique_bytes: int = 0
    flat_bytes: int = 0
    model_bytes: int = 0
    record_bytes: int = 0
    #: Entries that never got their commit file, and names the layout does not allow.
    other_bytes: int = 0
    #: Complete flat entries that no model area holds and no export record names.
    unreferenced_entries: int = 0
    unreferenced_bytes: int = 0


@dataclass
class ModelUsage:
    """One model folder under one compiler version (every task)."""

    compiler_version: str
    model: str
    tasks: list[str] = field(default_factory=list)
    entries: int = 0
    bytes: int = 0
    records: int = 0


@dataclass
class PruneEstimate:
    """What a prune with the given policy would remove."""

    entries: int
    records: int
    files: int
    bytes: int


@dataclass
class Usage:
    """A bucket's usage."""

    versions: list[VersionUsage] = field(default_factory=list)
    models: list[ModelUsage] = field(default_factory=list)
    prune: PruneEstimate | None = None

    @property
    def bytes(self) -> int:
        """Every listed byte of every compiler version."""
        return sum(v.bytes for v in self.versions)

    @property
    def unique_bytes(self) -> int:
        """Each content counted once."""
        return sum(v.unique_bytes for v in self.versions)

    @property
    def unreferenced_bytes(self) -> int:
        """Bytes of flat entries nothing references."""
        return sum(v.unreferenced_bytes for v in self.versions)


def _version_usage(found: VersionSurvey) -> tuple[VersionUsage, list[ModelUsage]]:
    usage = VersionUsage(found.compiler_version)
    models: dict[str, ModelUsage] = {}
    seen: set[str] = set()
    referenced = {module for (area, module) in found.entries if area}
    referenced |= {m for r in found.records if r.record is not None for m in r.record.modules}

    def unique(key: str | None, path: str, size: int) -> None:
        token = key or path
        if token not in seen:
            seen.add(token)
            usage.unique_bytes += size

    for (area, module), entry in sorted(found.entries.items()):
        for listed in entry.files.values():
            unique(listed.xet_hash or (listed.digest if listed.digest != STALE_DIGEST else None), listed.path, listed.size)
        if not entry.complete:
            usage.other_bytes += entry.bytes
            continue
        usage.entries += 1
        if not area:
            usage.flat_bytes += entry.bytes
            if module not in referenced:
                usage.unreferenced_entries += 1
                usage.unreferenced_bytes += entry.bytes
            continue
        usage.model_bytes += entry.bytes
        folder, _, task = area.partition("/")
        model = models.setdefault(folder, ModelUsage(found.compiler_version, folder))
        model.entries += 1
        model.bytes += entry.bytes
        if task not in model.tasks:
            model.tasks.append(task)
    for record in found.records:
        usage.record_bytes += record.file.size
        unique(None, record.file.path, record.file.size)
        folder, _, task = record.area.partition("/")
        model = models.setdefault(folder, ModelUsage(found.compiler_version, folder))
        model.records += 1
        model.bytes += record.file.size
        if task not in model.tasks:
            model.tasks.append(task)
    for listed in [*found.manifests, *found.stamps.values()]:  # metadata publishes write, counted with the records
        usage.record_bytes += listed.size
        unique(None, listed.path, listed.size)
    for listed in found.bad_names:
        usage.other_bytes += listed.size
        unique(None, listed.path, listed.size)
    usage.bytes = usage.flat_bytes + usage.model_bytes + usage.record_bytes + usage.other_bytes
    for model in models.values():
        model.tasks.sort()
    return usage, sorted(models.values(), key=lambda m: (-m.bytes, m.model.lower()))


def bucket_usage(survey: BucketSurvey, policy: PrunePolicy | None = None) -> Usage:
    """The survey's usage (pure); with a policy, what a prune with it would free (never refused here)."""
    usage = Usage()
    for version in survey.ordered_versions():
        found, models = _version_usage(survey.versions[version])
        usage.versions.append(found)
        usage.models += models
    if policy is not None and not policy.empty:
        plan: PrunePlan = plan_prune(survey, policy, allow_all=True)
        usage.prune = PruneEstimate(len(plan.entries), len(plan.records), plan.files, plan.bytes)
    return usage
