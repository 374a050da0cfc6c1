"""Give every system its best: try each setting of a small grid, then time the best one.

A ratio against a peer run at one arbitrary setting says little (a sweep from outside got
pgqueuer to about 2x what its default-ish setting showed), so items 3 and 4 sweep ours and every
peer the same way: one short drain per setting (workers started once for it, after a warm-up
drain that also sizes the timed one), then the usual repeats at the two best settings, keeping
the better median. The
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
    name: str,
    grid: list[Setting],
    measure: Measure,
    *,
    runs: int,
    sweep_s: float,
    timed_s: float,
    finalists: int = 2,
) -> dict[str, Any]:
    """One short drain per setting of ``grid``, then ``runs`` drains at each of the ``finalists``
    fastest; the system's figure is the better of their medians.

    Why more than one finalist: one short drain per setting on a shared 2-core machine picks a
    lucky setting as often as the best one (measured: a setting's short drain came out 20 % above
    its own timed median, another's 10 % below), and timing two puts every system, ours and the
    peers alike, at the setting that holds up over the usual repeats. A setting that fails is
    recorded with its error and left out of the choice; when every setting fails the result is an
    error, as a failed item is."""
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
    timed: list[dict[str, Any]] = []
    for point in sorted(good, key=lambda p: -float(p["rate"]))[:finalists]:
        rates = measure(point["setting"], runs, timed_s)
        log(f"sweep {name} timed {label(point['setting'])}: {median(rates):,.0f}/s")
        timed.append({**point, "runs": rates, "median": median(rates)})
    best = max(timed, key=lambda t: float(t["median"]))
    log(f"sweep {name} best {label(best['setting'])}: {best['median']:,.0f}/s")
    return {
        "rate": best["median"],
        "runs": best["runs"],
        "setting": best["setting"],
        "sweep_rate": best["rate"],
        "finalists": [{k: t[k] for k in ("setting", "median", "runs")} for t in timed],
        "grid": points,
    }
