"""One rank of the concurrent-enter figure: `python -m bench.worker '<json spec>'`.

It imports everything first, prints `ready`, waits for a line on stdin (the start signal, sent to every rank
at once), enters and exits `hub_neuronx_cache`, and prints one JSON line: monotonic start and end times
(CLOCK_MONOTONIC is system-wide, so the parent compares them across processes), requests to the bucket
server, the bytes this rank asked the server to download, what it installed, its CPU time after the signal, and
whether it waited for another rank's fetch (the host's fetch gate).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    from bench.harness import entry_bytes
    from optimum_neuron_cache import hub_neuronx_cache
    from optimum_neuron_cache.client import BucketClient

    requested = [0]
    original = BucketClient.download

    def counting_download(self, files, **kwargs):  # the bytes this rank asks the server for
        requested[0] += entry_bytes(files)
        return original(self, files, **kwargs)

    BucketClient.download = counting_download
    context = hub_neuronx_cache(spec["model"], spec["task"], compiler_version=spec["version"], bucket=spec["bucket"],
                                cache_dir=spec["cache_dir"])
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0 = time.process_time()
    started = time.monotonic()
    with context as run:
        pass
    ended = time.monotonic()
    cpu = time.process_time() - cpu0
    print(json.dumps({"start": started, "end": ended, "cpu": cpu, "requests": run.requests, "bytes_requested": requested[0],
                      "fetched": len(run.fetched), "bytes_installed": run.bytes_downloaded, "warnings": run.warnings,
                      "waited": run.waited_for_host_fetch}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
