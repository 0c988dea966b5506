"""Run the benchmark: `uv run --extra test python -m bench [--smoke] [options]` (see docs/performance.md)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import FIGURES
from .config import BACKENDS, DEFAULT, SMOKE, with_overrides
from .harness import BenchEnv, write_json
from .machine import MachineMark, adopt_orphans, others_share, page_reporting, reported_mb
from .report import SMOKE_NOTE, render


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: checks that the harness works, not the figures (targets are not judged)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/<time>.json)")
    parser.add_argument("--reps", type=int, help="repetitions of the figures that move data")
    parser.add_argument("--fetch-reps", type=int, help="repetitions of the cold fetch figures (default 21: their targets are narrower than a median of 7 can resolve)")
    parser.add_argument("--slow-reps", type=int, help="repetitions of the slow baselines far from any target (hf buckets sync)")
    parser.add_argument("--fast-reps", type=int, help="repetitions of the millisecond figures")
    parser.add_argument("--entries", type=int, help="MODULE entries of the benchmarked model (2 to 40)")
    parser.add_argument("--models", type=int, help="models in the bucket for fetch / sync / no-op")
    parser.add_argument("--lookup-models", type=_ints, help="bucket sizes for lookup, e.g. 1,50,500")
    parser.add_argument("--procs", type=int, help="processes entering at once")
    parser.add_argument("--neff-median", type=int, help="median NEFF size in bytes")
    parser.add_argument("--neff-max", type=int, help="largest NEFF in bytes")
    parser.add_argument("--verify-reps", type=int, help="repetitions of each side of the verification-cost figure")
    parser.add_argument("--link-rate", type=float, help="bytes/s of the link in hf.verify_cost_link (default 250e6)")
    parser.add_argument("--lease-reps", type=int, help="repetitions of each side of the lease figures (default 3)")
    parser.add_argument("--lease-hosts", type=int, help="hosts of the second lease figure (default 4)")
    parser.add_argument("--lease-graphs", type=int, help="graphs each host compiles in the lease figures (default 4)")
    parser.add_argument("--lease-seconds", type=float, help="simulated compile time of a graph in the lease figures (default 1)")
    parser.add_argument("--cold-modes", type=_names, help="server start modes for the cold figure: uv,current")
    parser.add_argument("--backends", type=_names, help=f"subset of {','.join(BACKENDS)}")
    parser.add_argument("--only", type=_names, help=f"subset of the figure groups: {','.join(FIGURES)}")
    parser.add_argument("--xet", choices=("local", "http"), help="the Hub emulator's Xet storage (default http)")
    parser.add_argument("--emulator-nagle", action="store_true",
                        help="leave Nagle's algorithm on in the Hub emulator (40 ms per request; see docs/performance.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (buckets, caches, server logs)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                            "load_average": [round(x, 2) for x in os.getloadavg()],
                            # PYTHONDONTWRITEBYTECODE: a module never compiled before is compiled at each import
                            "writes_bytecode": not sys.dont_write_bytecode}
    for package in ("huggingface_hub", "hf_xet", "uv"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = None
    return info


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = SMOKE if args.smoke else DEFAULT
    cfg = with_overrides(base, reps=args.reps, fetch_reps=args.fetch_reps, slow_reps=args.slow_reps, fast_reps=args.fast_reps, entries=args.entries, models=args.models,
                         lookup_models=args.lookup_models, procs=args.procs, neff_median=args.neff_median,
                         neff_max=args.neff_max, verify_reps=args.verify_reps, link_rate=args.link_rate,
                         cold_modes=args.cold_modes, backends=args.backends, xet=args.xet,
                         lease_reps=args.lease_reps, lease_hosts=args.lease_hosts, lease_graphs=args.lease_graphs,
                         lease_seconds=args.lease_seconds)
    groups = args.only or tuple(FIGURES)
    unknown = set(groups) - set(FIGURES)
    if unknown:
        raise SystemExit(f"unknown figure groups {sorted(unknown)}; choose from {list(FIGURES)}")
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    adopt_orphans()
    mark, reporting = MachineMark.now(), page_reporting()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[bench {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    from . import scenarios as sc

    figures: list[dict[str, Any]] = []
    with BenchEnv(keep=args.keep, nodelay=not args.emulator_nagle) as env:
        log(f"temp dir {env.root}")
        world = None
        if set(groups) - {"leases"}:  # the lease figure brings its own bucket and graphs
            world = sc.build_world(env, cfg, log)
            log(f"benchmarked model: {len(world.target_modules)} entries, {world.target_bytes / 1e6:.1f} MB")
        for backend in cfg.backends:
            site_groups = [g for g in ("fetch", "verify", "sync", "noop", "cold", "concurrent") if g in groups]
            if site_groups and world is not None:
                if backend == "dir":
                    site_groups = [g for g in site_groups if g != "cold"]
                site = sc.Site(world, backend, cfg.models)
                try:
                    for group in site_groups:
                        log(f"{backend}: {group}")
                        if group == "fetch":
                            figures.append(sc.fetch_cold(site))
                        elif group == "verify":
                            figures.append(sc.verify_cost(site))
                            if backend == "hf":
                                figures.append(sc.verify_cost(site, cfg.link_rate))
                        elif group == "sync":
                            figures.extend(sc.sync_figures(site))
                        elif group == "noop":
                            figures.append(sc.noop_warm(site))
                        elif group == "cold":
                            figures.append(sc.noop_cold_server(site))
                        elif group == "concurrent":
                            figures.append(sc.concurrent(site))
                finally:
                    site.close()
            if "lookup" in groups:
                log(f"{backend}: lookup")
                figures.append(sc.lookup_figure(world, backend, log))
            if "leases" in groups and backend == "hf":
                log(f"{backend}: leases")
                figures.extend(sc.lease_cost(env, cfg, log))
    results = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": cfg.smoke,
        "config": {**asdict(cfg), "sizes": asdict(cfg.sizes)},
        "environment": {**environment(), "load_average_at_start": load_before,
                        "others_cpu_share": others_share(mark, os.cpu_count() or 1),
                        "vm_reported_mb": reported_mb(reporting, page_reporting())},
        "seconds": round(time.monotonic() - started, 1),
        "figures": figures,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    write_json(out, results)
    print(render(results))
    print(f"\nJSON: {out} ({results['seconds']} s)")
    if cfg.smoke:
        print(SMOKE_NOTE)
    return results


def main(argv: list[str] | None = None) -> int:
    results = run(argv)
    return 1 if any(fig["checks"] for fig in results["figures"]) else 0


if __name__ == "__main__":
    sys.exit(main())
