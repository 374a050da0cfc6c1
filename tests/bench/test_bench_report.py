"""The sweep's choice and the page's goals, on results written by hand (nothing is timed here).

The smoke run proves the scenarios run; these pin what the page concludes from their results:
each system's best swept setting is the one compared, the issue's targets (no-op 2.5x, email
3x the fastest peer; the stall and snapshot bounds) are marked held or missed, and a grid point
that failed is shown, not silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.sweep import Setting, sweep


def test_sweep_drains_each_setting_once_then_times_the_two_best() -> None:
    calls: list[tuple[Setting, int]] = []
    short = {1: 100.0, 2: 300.0, 4: 200.0, 8: 250.0}  # one short drain each
    timed = {2: 240.0, 8: 260.0}  # the repeats: the lucky short drain (2) does not hold up

    def measure(setting: Setting, drains: int, target_s: float) -> list[float]:
        calls.append((setting, drains))
        if setting["procs"] == 4:
            raise TimeoutError("workers never drained")
        if drains == 1:
            return [short[setting["procs"]]]
        return [timed[setting["procs"]] + k for k in range(drains)]

    grid = [{"procs": 1}, {"procs": 2}, {"procs": 4}, {"procs": 8}]
    out = sweep("x", grid, measure, runs=3, sweep_s=0.1, timed_s=1.0)
    assert calls == [
        ({"procs": 1}, 1),
        ({"procs": 2}, 1),
        ({"procs": 4}, 1),
        ({"procs": 8}, 1),
        ({"procs": 2}, 3),
        ({"procs": 8}, 3),
    ]
    assert out["setting"] == {"procs": 8}  # the better timed median, not the best short drain
    assert out["rate"] == 261.0
    assert out["runs"] == [260.0, 261.0, 262.0]
    assert [f["setting"] for f in out["finalists"]] == [{"procs": 2}, {"procs": 8}]
    assert "TimeoutError" in out["grid"][2]["error"]


def test_sweep_with_every_setting_failing_is_an_error() -> None:
    def measure(setting: Setting, drains: int, target_s: float) -> list[float]:
        raise RuntimeError("no broker")

    out = sweep("x", [{"procs": 1}], measure, runs=3, sweep_s=0.1, timed_s=1.0)
    assert "error" in out and len(out["grid"]) == 1


def _swept(rate: float, **setting: int) -> dict[str, Any]:
    return {
        "rate": rate,
        "runs": [rate],
        "setting": setting,
        "grid": [{"setting": setting, "rate": rate}, {"setting": {"procs": 9}, "error": "E: x"}],
    }


def _data(noop_ours: float, email_ours: float, stall_s: float, held_ratio: float) -> dict[str, Any]:
    phase = {
        "seconds": 10.0,
        "rounds": [{"rate": 1.0}] * 4,
        "first": 1000.0,
        "last": 900.0,
        "median": 1000.0,
        "late_median": 1000.0 * held_ratio,
        "dead_end": 5,
        "dead_max": 9,
        "autovacuums": 1,
    }
    return {
        "size": "full",
        "started": "now",
        "seconds": 60,
        "machine": {
            "cores": 2,
            "cpu": "cpu",
            "memory_gib": 24,
            "python": "3.11",
            "postgresql": "15",
            "platform": "linux",
            "pg_settings": {
                "shared_buffers": "128MB",
                "synchronous_commit": "on",
                "fsync": "on",
                "max_connections": "100",
            },
        },
        "items": {
            "noop": {
                "procs": 2,
                "rows": [{"batch": 100, "relay": 900.0, "sql": 1000.0, "ratio": 0.9}],
                "sweep": _swept(noop_ours, procs=2, batch=1000),
                "peers": {
                    "pgqueuer": _swept(1000.0, procs=1, batch=100),
                    "procrastinate": _swept(100.0, procs=4, concurrency=64),
                    "celery": {"error": "left out"},
                },
            },
            "email": {
                "rate": 500.0,
                "ceiling": 800.0,
                "procs": 2,
                "sweep": _swept(email_ours, procs=1),
                "peers": {"pgqueuer": _swept(100.0, procs=2, batch=100, pool=64)},
            },
            "stall": {
                "messages": 2000,
                "batch": 100,
                "concurrency": 16,
                "send_timeout": 2.0,
                "handler_ms": 5.0,
                "cases": {
                    label: {"seconds": s, "sent": 1, "retrying": 0, "utilisation": 0.5}
                    for label, s in (("none", 1.0), ("1 per 400", 2.5), ("1 per 100", stall_s))
                },
                "bound_s": 3.5,
                "held": stall_s <= 3.5,
            },
            "snapshot": {
                "cluster": {
                    "version": "15",
                    "autovacuum": "on",
                    "autovacuum_naptime": "1min",
                    "autovacuum_vacuum_scale_factor": "0.2",
                    "autovacuum_vacuum_threshold": "50",
                    "shared_buffers": "128MB",
                    "synchronous_commit": "on",
                    "fsync": "on",
                },
                "relays": 2,
                "fill": 1000,
                "without": phase,
                "held": phase,
                "snapshot": {"xmin_age": 1234, "state": "idle in transaction"},
                "ratio": held_ratio,
                "goal": 0.8,
                "held_goal": held_ratio >= 0.8,
            },
        },
    }


@pytest.mark.parametrize(
    ("noop", "email", "stall_s", "held_ratio", "marks"),
    [
        (2600.0, 310.0, 3.0, 0.9, ["held", "held", "held", "held"]),
        (2400.0, 290.0, 4.0, 0.7, ["missed", "missed", "missed", "missed"]),
    ],
)
def test_page_marks_the_issue_goals_against_each_systems_best(
    tmp_path: Path,
    noop: float,
    email: float,
    stall_s: float,
    held_ratio: float,
    marks: list[str],
) -> None:
    text = report.write(_data(noop, email, stall_s, held_ratio), tmp_path, charts=False).read_text()
    goals = text.split("Goals:", 1)[1].split("What bounds", 1)[0]
    lines = {
        "no-op": next(g for g in goals.splitlines() if g.startswith("- no-op drain >= 2.5x")),
        "email": next(g for g in goals.splitlines() if g.startswith("- email drain >= 3.0x")),
        "stall": next(g for g in goals.splitlines() if g.startswith("- stall:")),
        "snapshot": next(g for g in goals.splitlines() if g.startswith("- snapshot:")),
    }
    for (name, line), mark in zip(lines.items(), marks, strict=True):
        assert line.endswith(f"**{mark}**"), (name, line)
    # Compared with the fastest peer at its best setting, which the page names.
    assert "fastest peer pgqueuer at its best (procs 1, batch 100): 1,000/s" in text
    assert "procs 2, batch 1000" in text  # our best setting
    assert "procs 9: failed (E: x)" in text  # a failed grid point stays on the page
    assert "unswept" not in text and "no sweep of their" not in text
