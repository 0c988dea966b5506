"""Print the results as tables (Markdown, so they paste into docs/performance.md as they are)."""

from __future__ import annotations

from typing import Any

from .machine import BUSY_SHARE


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _bytes(count: float | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{int(count)} B"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _counts(stats: dict[str, Any]) -> str:
    server = stats.get("requests")
    hub = stats.get("hub_requests")
    return f"{server if server is not None else '-'} / {hub if hub is not None else '-'}"


def _moved(stats: dict[str, Any]) -> str:
    for key in ("bytes_transferred", "bytes_stored", "bytes_uploaded"):
        if stats.get(key) is not None:
            return _bytes(stats[key])
    return "-"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def figures_table(figures: list[dict[str, Any]]) -> str:
    lines = [_row(["figure", "method", "median", "ratio", "requests (server / Hub)", "bytes moved", "bytes needed",
                   "Hub bytes out"]),
             _row(["---"] * 8)]
    for fig in figures:
        if "by_models" in fig:
            continue
        ours = fig["ours"]
        lines.append(_row([f"**{fig['id']}**", "ours" + (f" ({ours['server_mode']})" if ours.get("server_mode") else ""),
                           _time(ours.get("median_s")), "", _counts(ours), _moved(ours), _bytes(ours.get("bytes_needed")),
                           _bytes(ours.get("hub_bytes_out"))]))
        for name, stats in fig["baselines"].items():
            value = next((v for k, v in fig["ratios"].items() if name in k), None)
            key = next((k for k in fig["ratios"] if name in k), "")
            lines.append(_row(["", name, _time(stats.get("median_s")), f"{_ratio(value)} ({key})" if key else "",
                               _counts(stats), _moved(stats), _bytes(stats.get("bytes_needed")), _bytes(stats.get("hub_bytes_out"))]))
    return "\n".join(lines)


def lookup_table(fig: dict[str, Any]) -> str:
    sizes = list(fig["by_models"])
    methods = [m for m in fig["by_models"][sizes[0]] if m != "emulator_list"]
    emulator = any("emulator_list" in fig["by_models"][size] for size in sizes)
    lines = [_row([f"{fig['id']} (models in bucket)", *[f"{m}: median" for m in methods], *[f"{m}: requests (server / Hub)" for m in methods],
                   *(["emulator's own listing time: one version / all versions"] if emulator else [])]),
             _row(["---"] * (1 + 2 * len(methods) + emulator))]
    for size in sizes:
        row = fig["by_models"][size]
        lines.append(_row([size, *[_time(row[m].get("median_s")) for m in methods], *[_counts(row[m]) for m in methods],
                           *([f"{_time(row.get('emulator_list', {}).get('one_version_s'))} / "
                              f"{_time(row.get('emulator_list', {}).get('all_versions_s'))}"] if emulator else [])]))
    return "\n".join(lines)


def targets_table(figures: list[dict[str, Any]], *, smoke: bool = False) -> str:
    """The targets and whether each was met; a smoke run's tiny sizes say nothing about them, so it judges none."""
    lines = [_row(["figure", "target", "value", "met"]), _row(["---"] * 4)]
    for fig in figures:
        for item in fig["targets"]:
            value = item["value"]
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            if item.get("interval"):  # how far the ratio could move by chance (bench.harness.ratio_interval)
                shown += f" (by chance {item['interval'][0]:.2f} to {item['interval'][1]:.2f})"
            met = "not judged (smoke)" if smoke else "yes" if item["met"] else "**MISSED**"
            lines.append(_row([fig["id"], item["text"], shown, met]))
    return "\n".join(lines)


#: What a smoke run's report says first and last.
SMOKE_NOTE = ("Smoke run (tiny sizes, one repetition): it checks that the harness works, not the figures. "
              "Its timings mean nothing and its targets are not judged; run `python -m bench` for figures.")


def render(results: dict[str, Any]) -> str:
    figures = results["figures"]
    env = results.get("environment", {})
    header = (f"{results.get('command', '')}: {env.get('cpus')} CPUs, load average {env.get('load_average_at_start')} at start, "
              f"{env.get('load_average')} at end; huggingface_hub {env.get('huggingface_hub')}, hf_xet {env.get('hf_xet')}; "
              f"Hub emulator Xet mode {results.get('config', {}).get('xet')}")
    others = env.get("others_cpu_share")
    if others is not None:
        header += f"; other processes used {others:.0%} of the CPUs during the run"
        if others > BUSY_SHARE:
            header += (f"\n**Warning: the machine was busy (other processes used {others:.0%} of its {env.get('cpus')} CPUs): "
                       "timings are not trustworthy.**")
    else:  # no /proc/stat: the load average at the start is all there is
        load = (env.get("load_average_at_start") or [0])[0]
        if env.get("cpus") and load > env["cpus"]:
            header += f"\n**Warning: the machine was busy (load {load} on {env['cpus']} CPUs at the start): timings are not trustworthy.**"
    reported = env.get("vm_reported_mb")
    if reported is not None:
        header += (f"; the guest handed {reported / 1024:.1f} GB of free memory to its host during the run (free page "
                   "reporting: a sample's `vm_reported_mb` says how much during it)")
    if env.get("writes_bytecode") is False:
        header += ("; PYTHONDONTWRITEBYTECODE is set: a process compiles from source every module whose bytecode "
                   "nobody wrote (the cold-start figure: the server's own environment, unless uv compiled it when it "
                   "installed it; every process: the project's and its dependencies' modules, unless compiled at install)")
    smoke = bool(results.get("smoke"))
    parts = [header, figures_table(figures)]
    if smoke:
        parts.insert(0, f"**{SMOKE_NOTE}**")
    for fig in figures:
        if "by_models" in fig:
            parts.append(lookup_table(fig))
    parts.append(targets_table(figures, smoke=smoke))
    problems = [(fig["id"], check) for fig in figures for check in fig["checks"]]
    if problems:
        parts.append("Checks that failed:\n" + "\n".join(f"- {fid}: {check}" for fid, check in problems))
    notes = [(fig["id"], fig["notes"]) for fig in figures if fig.get("notes")]
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {fid}: {note}" for fid, note in notes))
    return "\n\n".join(parts)
