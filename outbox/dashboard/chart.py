"""The overview's chart: sent and dead messages per minute, drawn as SVG on the server.

No script and nothing from another host: the page's template writes one ``<rect>`` per bar from
the geometry computed here (plain numbers, so nothing needs escaping), and the stylesheet colours
them, dark mode included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC

from outbox.dashboard.queries import MinuteCounts

WIDTH = 720
HEIGHT = 200
_TOP = 12
_BOTTOM = 24  # room for the time labels
_LEFT = 44  # room for the scale labels


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    width: float
    sent_y: float
    sent_height: float
    dead_y: float
    dead_height: float
    label: str  # the bar's tooltip: "14:05 UTC: 120 sent, 3 dead"


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    baseline: float
    top: int
    scale_max: int
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # (x, "-30 min") under the axis
    total_sent: int
    total_dead: int


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``value`` (and at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def build_chart(series: Sequence[MinuteCounts]) -> Chart:
    """Stacked bars, dead on top of sent, one per minute, oldest on the left."""
    scale_max = _nice_ceiling(max((m.sent + m.dead for m in series), default=0))
    baseline = HEIGHT - _BOTTOM
    plot_height = baseline - _TOP
    slot = (WIDTH - _LEFT) / max(len(series), 1)
    bars = []
    for i, minute in enumerate(series):
        # A minute with anything in it stays visible however tall the busiest minute is: one
        # dead message among thousands sent is what an operator looks for.
        sent_h = max(plot_height * minute.sent / scale_max, 1.0 if minute.sent else 0.0)
        dead_h = max(plot_height * minute.dead / scale_max, 3.0 if minute.dead else 0.0)
        at = minute.minute.astimezone(UTC)
        bars.append(
            Bar(
                x=round(_LEFT + i * slot + 1, 2),
                width=round(max(slot - 2, 1), 2),
                sent_y=round(baseline - sent_h, 2),
                sent_height=round(sent_h, 2),
                dead_y=round(baseline - sent_h - dead_h, 2),
                dead_height=round(dead_h, 2),
                label=f"{at:%H:%M} UTC: {minute.sent} sent, {minute.dead} dead",
            )
        )
    n = len(series)
    ticks = [
        (round(_LEFT + i * slot, 2), f"-{n - i} min" if i < n else "now")
        for i in range(0, n + 1, 15)
    ]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=_LEFT,
        baseline=baseline,
        top=_TOP,
        scale_max=scale_max,
        bars=bars,
        ticks=ticks,
        total_sent=sum(m.sent for m in series),
        total_dead=sum(m.dead for m in series),
    )


__all__ = ["Bar", "Chart", "build_chart"]
