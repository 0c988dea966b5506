"""python -m stress [--ranks 32] [--hosts 4] [--fetch-trials 50] [--sync-trials 50] [--phase-trials 50] [--silent-runs 5] [--json out.json]

Runs every stress scenario on the dir backend (and the hf backend through the local Hub emulator with
--hf), in an isolated environment under a temp dir, and prints one row per scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from stress import hostile, phases, scenarios


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m stress")
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--fetch-trials", type=int, default=50)
    parser.add_argument("--sync-trials", type=int, default=50)
    parser.add_argument("--phase-trials", type=int, default=50, help="kills at each named phase (stress/phases.py)")
    parser.add_argument("--connects", type=int, default=256, help="processes connecting to the server at once")
    parser.add_argument("--flips", type=int, default=1000,
                        help="dir-bucket writes and listings under symlink flips (each lists the whole bucket: time grows as the square)")
    parser.add_argument("--silent-runs", type=int, default=5, help="whole runs against each dead or silent remote (0: skip)")
    parser.add_argument("--only", choices=["ranks", "hosts", "fetch", "sync", "phases", "connects", "flips", "silent"],
                        action="append",
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--hf", action="store_true", help="also run against the local Hub emulator (Xet over HTTP)")
    parser.add_argument("--hf-only", action="store_true", help="run against the local Hub emulator only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="neuron-cache-stress-"))
    os.environ.update({
        "HF_HOME": str(work / "hf_home"), "XDG_CACHE_HOME": str(work / "xdg"), "HF_XET_CACHE": str(work / "xet"),
        "NEURON_CACHE_RUNTIME_DIR": str(work / "rt"), "HF_HUB_DISABLE_TELEMETRY": "1",
        "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv")),
    })
    results = []
    backends = ["hf"] if args.hf_only else ["dir"] + (["hf"] if args.hf else [])
    try:
        for backend in backends:
            with _bucket(backend, work) as (bucket, bucket_for):
                for name, run in (
                    ("ranks", lambda w: scenarios.ranks_on_one_host(w, bucket, args.ranks)),
                    ("hosts", lambda w: scenarios.hosts_syncing_the_same_entries(w, bucket_for("hosts"), args.hosts)),
                    ("fetch", lambda w: scenarios.crash_fetch(w, bucket_for("fetch"), args.fetch_trials)),
                    ("sync", lambda w: scenarios.crash_sync(w, args.sync_trials, bucket_for=lambda t: bucket_for(f"sync-{t}"))),
                    ("phases", lambda w: phases.crash_at_phases(w, bucket_for, args.phase_trials)),
                    ("connects", lambda w: hostile.connect_storm(w, bucket, args.connects)),
                    ("flips", lambda w: hostile.symlink_flips(w, args.flips) if backend == "dir" else {}),
                ):
                    if args.only and name not in args.only:
                        continue
                    started = time.monotonic()
                    outcome = run(work / f"{backend}-{name}")
                    seconds = round(time.monotonic() - started, 1)
                    for figures in outcome.values() if isinstance(outcome, dict) else [outcome]:
                        row = {"backend": backend, **asdict(figures), "seconds": seconds}
                        results.append(row)
                        print(f"{backend:4} {figures.scenario:40} trials {figures.trials:3}  failures {figures.failures}  "
                              f"bytes {figures.bytes_transferred}/{figures.bytes_needed}  {seconds}s", flush=True)
                        for note in figures.notes[:5]:
                            print(f"     {note}")
        if args.silent_runs > 0 and (not args.only or "silent" in args.only):
            from stress.silent_remote import silent_remote

            for figures in silent_remote(work / "silent", args.silent_runs):
                results.append({"backend": "hf", **asdict(figures)})
                print(f"hf   {figures.scenario:40} trials {figures.trials:3}  failures {figures.failures}  cost median "
                      f"{figures.median_seconds}s max {figures.max_seconds}s  attempts {figures.attempts}"
                      f"{'' if figures.bounded else '  (a known limit: not bounded yet)'}", flush=True)
                for note in figures.notes[:5]:
                    print(f"     {note}")
    finally:
        from optimum_neuron_cache.client import stop_server

        stop_server()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(row["failures"] for row in results) else 0


class _bucket:
    """A dir bucket, or a Hub bucket on a fresh emulator (Xet over HTTP, so many processes transfer at once)."""

    def __init__(self, backend: str, work: Path) -> None:
        self.backend, self.work, self.emulator = backend, work, None

    def __enter__(self):
        if self.backend == "dir":
            def bucket_for(name: str) -> str:
                path = self.work / "buckets" / name
                path.mkdir(parents=True, exist_ok=True)
                return str(path)
            return bucket_for("main"), bucket_for
        from optimum_neuron_cache.buckets import BucketRef
        from optimum_neuron_cache.client import BucketClient
        from hub_emulator import HubEmulator

        self.emulator = HubEmulator(self.work / "hub", xet="http").start()
        os.environ["HF_ENDPOINT"] = self.emulator.endpoint

        def bucket_for(name: str) -> str:
            BucketClient(BucketRef("hf", f"stress/{name}")).create()
            return f"stress/{name}"
        return bucket_for("main"), bucket_for

    def __exit__(self, *exc) -> None:
        if self.emulator is not None:
            from optimum_neuron_cache.client import stop_server

            stop_server()
            self.emulator.stop()
            os.environ.pop("HF_ENDPOINT", None)


if __name__ == "__main__":
    sys.exit(main())
