"""What writing a file costs into memory freed a moment ago, against memory that sat free for a while:
`python -m bench.memory_recency [--reps N] [--mb M]`.

Some VMs hand memory that stays free to their host (Linux free page reporting, with virtio-balloon); the next
write into it waits for the host to give it back. On the development machine, writing 176 MB into memory free
for 1.5 s or more costs about 9x writing it into memory just freed (docs/performance.md, "The VM's page
reporting"). The benchmark frees each sample's predecessor right before the sample (`harness.release`), so
that ours and the baselines write into the same kind of memory; this probe tells whether a machine needs it.

For each pause, in turn: flush, remove the file of the previous write, wait the pause, write the file again
(page cache only, not flushed). Each line gives the writes' wall times and median system CPU, and what the
guest reported to its host from each free to the end of its write (`machine.page_reporting()`, where the
kernel counts it).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from .machine import page_reporting, reported_mb

PAUSES = (0.0, 0.5, 1.0, 1.5, 2.5, 4.0)
BLOCK = 8 << 20


def write(path: Path, blocks: int, data: bytes) -> tuple[float, float]:
    """(wall s, system CPU s) of writing `blocks` blocks of `data` to `path`."""
    usage0, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with open(path, "wb") as out:
        for _ in range(blocks):
            out.write(data)
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_stime - usage0.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_recency", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6, help="writes per pause (default 6)")
    parser.add_argument("--mb", type=int, default=176, help="size of each write in MB (default 176, a fetch's)")
    args = parser.parse_args(argv)
    data, blocks = os.urandom(BLOCK), max(1, (args.mb << 20) // BLOCK)
    found = page_reporting()
    print("free page reporting: " + (f"on (order {found.order}, {found.passes} passes so far)" if found else "not found"))
    results: dict[float, list[tuple[float, float, float | None]]] = {pause: [] for pause in PAUSES}
    with tempfile.TemporaryDirectory(prefix="memory-recency-") as scratch:
        previous: Path | None = None
        for rep in range(args.reps):
            for pause in PAUSES:
                os.sync()
                before = page_reporting()
                if previous is not None:
                    previous.unlink()
                time.sleep(pause)
                previous = Path(scratch) / f"write-{rep}-{pause}"
                results[pause].append((*write(previous, blocks, data), reported_mb(before, page_reporting())))
    for pause, samples in results.items():
        reported = [mb for _, _, mb in samples if mb is not None]
        print(f"pause {pause:3.1f} s: wall ms {sorted(round(wall * 1000) for wall, _, _ in samples)}, "
              f"median system CPU {statistics.median(cpu for _, cpu, _ in samples) * 1000:.0f} ms"
              + (f", reported to the host from the free to the end of the write: {sorted(round(mb) for mb in reported)} MB" if reported else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
