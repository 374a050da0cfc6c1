"""Retry delays: exponential, capped, with jitter. Pure, so tests pass their own ``rng``."""

from __future__ import annotations

import random


def next_delay(attempts: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before the next try, after ``attempts`` failed tries (1 for the first).

    "Equal jitter": half of the exponential step is fixed and half is random. Full jitter spreads
    load slightly better but can pick a delay near zero, which turns an outage into a hot loop;
    this keeps a floor of ``step / 2`` while still de-synchronising relays after a shared outage.
    """
    step = min(cap, base * 2.0 ** max(0, attempts - 1))
    return step / 2 + rng.uniform(0, step / 2)
