"""The benchmark says how far a ratio of medians could move by chance, so that a target judged on one run of 7
noisy samples is read for what it is."""

from __future__ import annotations

import random
import statistics

from bench.harness import ratio_interval


def _noisy(count: int, seed: int) -> tuple[list[float], list[float]]:
    """Pairs like the VM's: ours 5% slower than the baseline, each sample off by up to 25%, now and then 2x."""
    rng = random.Random(seed)
    ours, base = [], []
    for _ in range(count):
        ours.append(0.21 * rng.uniform(0.85, 1.25) * (2 if rng.random() < 0.1 else 1))
        base.append(0.20 * rng.uniform(0.85, 1.25) * (2 if rng.random() < 0.1 else 1))
    return ours, base


def test_the_interval_holds_the_runs_ratio_and_narrows_with_more_repetitions():
    ours, base = _noisy(7, seed=3)
    low, high = ratio_interval(ours, base)
    assert low <= statistics.median(ours) / statistics.median(base) <= high
    assert ratio_interval(ours, base) == (low, high)  # the same run, the same interval
    widths = [statistics.median(hi - lo for lo, hi in (ratio_interval(*_noisy(n, seed)) for seed in range(20)))
              for n in (7, 21)]
    assert widths[1] < widths[0] * 0.8


def test_too_few_pairs_or_a_zero_give_no_interval():
    assert ratio_interval([0.2, 0.3], [0.2, 0.3]) is None
    assert ratio_interval([0.2, 0.3, 0.0], [0.2, 0.3, 0.25]) is None  # the zero sample is left out: 2 pairs
