"""Small statistics: medians over runs, percentiles, and the 10-90 % throughput window."""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rate_10_90(times: Sequence[float]) -> float:
    """Completions per second between the 10th and the 90th percentile completion.

    Drops the start (process start-up, first claims) and the tail (the last stragglers), so the
    figure is the steady drain rate, measured the same way for every system.
    """
    n = len(times)
    if n < 10:
        return float("nan")
    ordered = sorted(times)
    t10, t90 = ordered[int(n * 0.1)], ordered[int(n * 0.9) - 1]
    if t90 <= t10:
        return float("nan")
    # Completions in (t10, t90]: exact even when they come in steps (a batch settles at once).
    return (bisect.bisect_right(ordered, t90) - bisect.bisect_right(ordered, t10)) / (t90 - t10)


def ratio(a: float, b: float) -> float:
    if not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b
