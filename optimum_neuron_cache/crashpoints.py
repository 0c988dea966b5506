"""Named phases where a test can kill this process, so that a crash test interrupts what it says it does.

A kill at a random instant rarely lands inside a 15 ms transfer; a kill at a named phase always does. With
`NEURON_CACHE_CRASH_AT=<phase>[@<n>]` set, the process sends itself SIGKILL the n-th time (default: the first)
it reaches `<phase>`: exactly what `kill -9` does at that instant, nothing cleaned up. Unset, `reached` is one
dictionary lookup. For tests and `python -m stress` only; docs/reliability.md lists the phases.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_CRASH_AT = "NEURON_CACHE_CRASH_AT"

#: The phases, in the order a run meets them.
PHASES = {
    "journal-write": "a journal record is written to its temp file, not yet renamed into place",
    "download-sent": "a download request is on the wire: the bucket server is transferring into the run's temp folder",
    "install": "before installing the n-th fetched entry (n-1 are in place)",
    "heal": "the n-th cached failure swapped for the bucket's entry, the failure not yet removed (without "
            "RENAME_EXCHANGE: moved aside, the bucket's entry not yet renamed in)",
    "stage-sent": "a publish's stage is on the wire: the bucket server is uploading its bytes, nothing added yet",
    "stage-done": "a publish's bytes are staged, its commit not yet sent",
    "commit-sent": "a publish's commit is on the wire: the bucket server is adding content, then commit files",
    "commit-done": "a publish's commit is acknowledged (everything committed), the journal not yet settled",
    "batch-sent": "the n-th batch (a prune's, a scrub's, an import's) is on the wire",
}

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_CRASH_AT)
    if not spec:
        return None
    phase, _, nth = spec.partition("@")
    if phase not in PHASES or (nth and not nth.isdigit()):
        raise ValueError(f"{ENV_CRASH_AT}={spec!r}: use <phase>[@<n>] with a phase among {', '.join(PHASES)}")
    return phase, int(nth or 1)


def reached(phase: str) -> None:
    """Die here (SIGKILL) if the test asked for this phase and this is the n-th time it is reached."""
    target = _target()
    if target is None or target[0] != phase:
        return
    with _lock:
        _counts[phase] = _counts.get(phase, 0) + 1
        if _counts[phase] == target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
