"""Item 5's measuring loop, shared by this project (``bench.ours``) and the peers (``bench.peers``).

Both sides offer messages the same way (``open_loop`` in producer processes) and are timed the
same way (``latency_run``), so the loop lives here and each side hands in its own producer: a
module-level function, which the spawned producer process imports by name. Neither side imports
the other.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

from bench.sink import Sink
from bench.stats import median, percentile

# (message id, time the enqueue committed) for every message a producer offered.
Committed = list[tuple[str, float]]
# produce(url, rate, seconds): offer messages at ``rate``/s for ``seconds``; runs in a process of
# its own, so it must be picklable (a module-level function, or a functools.partial of one).
Producer = Callable[[str, float, float], Committed]


async def open_loop(
    one: Callable[[int], Coroutine[Any, Any, None]], rate: float, seconds: float
) -> None:
    """Start ``one(i)`` at a steady ``rate`` per second for ``seconds``, never waiting for it
    (an open loop: a slow system gets more in flight, as with real users)."""
    n = int(rate * seconds)
    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


def _producer_proc(
    produce: Producer, url: str, rate: float, seconds: float, conn: Connection[Committed, Any]
) -> None:
    conn.send(produce(url, rate, seconds))


def latency_run(
    kind: str, produce: Producer, url: str, sink: Sink, rate: float, seconds: float
) -> dict[str, float]:
    """Offer ``rate`` messages/s for ``seconds`` from producer processes running ``produce``;
    match each commit time with the sink's acceptance time by Message-ID. ``kind`` names the
    system in errors."""
    sink.reset()
    ctx = multiprocessing.get_context("spawn")
    # One Python producer cannot offer 1,000 transactions/s and still read its clock on time:
    # above 300/s the rate is split over several producer processes.
    nprod = max(1, round(rate / 300))
    pipes, ps = [], []
    for _ in range(nprod):
        parent, child = ctx.Pipe()
        pipes.append(parent)
        ps.append(
            ctx.Process(target=_producer_proc, args=(produce, url, rate / nprod, seconds, child))
        )
    for p in ps:
        p.start()
    try:
        committed: Committed = [c for parent in pipes for c in parent.recv()]
    except EOFError:
        raise RuntimeError(f"a {kind} producer process failed (see the log above)") from None
    for p in ps:
        p.join(60)
    n = len(committed)
    sink.wait_count(n, timeout=60)
    times, ids = sink.records()
    accepted: dict[str, float] = {}
    for t, raw in zip(times, ids, strict=True):
        key = raw.decode(errors="replace").strip("<>").split("@", 1)[0]
        accepted.setdefault(key, t)
    lat = [(accepted[mid] - t) * 1000 for mid, t in committed if mid in accepted]
    span = max(t for _, t in committed) - min(t for _, t in committed) if committed else 0
    return {
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "delivered": len(lat),
        "offered": n,
        "achieved_rate": (n - 1) / span if span else float("nan"),
        "producers": nprod,
    }


def median_runs(runs: list[dict[str, float]]) -> dict[str, Any]:
    """One figure per key, the median over ``runs``, with the runs themselves kept."""
    merged: dict[str, Any] = {k: median([r[k] for r in runs]) for k in runs[0]}
    merged["runs"] = runs
    return merged
