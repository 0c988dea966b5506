"""The benchmark harness keeps working: `python -m bench --smoke` runs every figure on tiny sizes, once.

Not a benchmark: no timing is asserted. It checks that the JSON has every figure with its measures, and that
the harness's own sanity checks passed (each method moved what it had to, on both backends).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import expected_figures

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--quiet", "--out", str(out)], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=600)
    assert out.exists(), f"no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(out.read_text())
    figures = {fig["id"]: fig for fig in results["figures"]}
    assert sorted(figures) == sorted(expected_figures())
    assert results["smoke"] is True
    for fid, fig in figures.items():
        assert fig["ours"]["median_s"] > 0, fid
        assert fig["targets"] or fig["baselines"] or fid.endswith(("sync_new",)), fid
        assert fig["checks"] == [], f"{fid}: {fig['checks']}"
    for fid in ("hf.fetch_cold", "hf.sync_new", "hf.noop_warm", "hf.noop_cold_server", "hf.concurrent"):
        assert figures[fid]["baselines"] and all(value is not None for value in figures[fid]["ratios"].values()), fid
    for backend in ("hf", "dir"):
        assert figures[f"{backend}.fetch_cold"]["ours"]["bytes_transferred"] == figures[f"{backend}.fetch_cold"]["ours"]["bytes_needed"]
        assert figures[f"{backend}.concurrent"]["ours"]["bytes_transferred"] == figures[f"{backend}.concurrent"]["ours"]["bytes_needed"]
        assert figures[f"{backend}.sync_again"]["ours"]["bytes_uploaded"] == 0
        assert set(figures[f"{backend}.lookup"]["by_models"]) == {"1", "3"}
    assert proc.returncode == 0, proc.stdout[-3000:]
