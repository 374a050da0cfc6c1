"""Give every system its best: try each setting of a small grid, then time the best one.

A ratio against a peer run at one arbitrary setting says little (a sweep from outside got
pgqueuer to about 2x what its default-ish setting showed), so items 3 and 4 sweep ours and every
peer the same way: one short drain per setting (workers started once for it, after a warm-up
drain that also sizes the timed one), then the best setting's median of the usual repeats. The
grid, with each setting's rate or error, goes into the results; the page shows the best.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.harness import log
from bench.stats import median

Setting = dict[str, int]
# measure(setting, drains, target_s): start the workers for ``setting``, warm up, run ``drains``
# timed drains each sized to last about ``target_s``, stop the workers; the drains' rates.
Measure = Callable[[Setting, int, float], list[float]]


def label(setting: Setting) -> str:
    """``procs 2, batch 100``: a setting as the page spells it."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in setting.items())


def sweep(
    name: str, grid: list[Setting], measure: Measure, *, runs: int, sweep_s: float, timed_s: float
) -> dict[str, Any]:
    """One short drain per setting of ``grid``, then ``runs`` drains at the best one.

    A setting that fails is recorded with its error and left out of the choice; when every
    setting fails the result is an error, as a failed item is."""
    points: list[dict[str, Any]] = []
    for setting in grid:
        try:
            rate = measure(setting, 1, sweep_s)[0]
        except Exception as exc:  # one bad setting must not lose the rest of the grid
            log(f"sweep {name} {label(setting)} failed: {exc!r}")
            points.append({"setting": setting, "error": f"{type(exc).__name__}: {exc}"})
            continue
        log(f"sweep {name} {label(setting)}: {rate:,.0f}/s")
        points.append({"setting": setting, "rate": rate})
    good = [p for p in points if "rate" in p and p["rate"] == p["rate"]]
    if not good:
        return {"error": "every setting of the sweep failed", "grid": points}
    best = max(good, key=lambda p: float(p["rate"]))
    rates = measure(best["setting"], runs, timed_s)
    log(f"sweep {name} best {label(best['setting'])}: {median(rates):,.0f}/s")
    return {
        "rate": median(rates),
        "runs": rates,
        "setting": best["setting"],
        "sweep_rate": best["rate"],
        "grid": points,
    }
