"""Progress of long transfers for a person at a terminal: one tqdm bar on stderr, or nothing.

`terminal_progress` gives no callback (so no progress frames are asked of the server) unless stderr is a
terminal, and draws its bar only once a transfer of at least `min_total` bytes reports. tqdm is imported
only then: `import optimum_neuron_cache` stays stdlib-only. Used by the CLI and by the context's fetch and
publish (docs/usage.md, "What a run shows").
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .client import ProgressCallback

#: The context's fetch and publish draw a bar only for a transfer of at least this many bytes (100 MB: a
#: quarter of a second on a local disk, seconds to the Hub); below it a bar would only flash. Not a setting.
BAR_MIN_BYTES = 100 * 1000 * 1000


def _nothing() -> None:
    return None


def terminal_progress(description: str, *, unit: str = "B", min_total: int = 0,
                      quiet: bool = False) -> tuple[ProgressCallback | None, Callable[[], None]]:
    """A progress callback and its closer: a tqdm bar on stderr (counting bytes, or `unit`s), drawn at the first
    report of a total of at least `min_total`; no callback when stderr is not a terminal, or `quiet`."""
    if quiet or not sys.stderr.isatty():
        return None, _nothing
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if total < max(min_total, 1):
                return
            from tqdm import tqdm  # lazily: only a drawn bar pays for it

            bar = tqdm(desc=description, unit=unit, unit_scale=unit == "B", unit_divisor=1000, file=sys.stderr,
                       leave=False, total=total)
        if total and bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def size_text(count: float) -> str:
    """A byte count for people, in powers of 1000 with three significant figures ("1.27GB", "640kB")."""
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(count) < 999.5:
            if abs(count) < 99.95:
                return f"{count:1.2f}{prefix}B" if abs(count) < 9.995 else f"{count:2.1f}{prefix}B"
            return f"{count:3.0f}{prefix}B"
        count /= 1000
    return f"{count:3.1f}YB"


def transfer_line(verb: str, entries: int, count: int, seconds: float) -> str:
    """The one line a run logs for a transfer: "fetched 3 entries (1.27GB in 3.4 s)"."""
    return f"{verb} {entries} {'entry' if entries == 1 else 'entries'} ({size_text(count)} in {seconds:.1f} s)"
