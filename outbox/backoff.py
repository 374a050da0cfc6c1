"""Retry delays: exponential, capped, with jitter. Pure, so tests pass their own ``rng``.

The one backoff of the project: message retries (``outbox.outcome``), the relay's waits for its
database and the LISTEN connection's reconnects all use ``next_delay``.
"""

from __future__ import annotations

import random

# Waiting for the database: 0.1-0.2 s, then doubling up to 0.5-1 s, so a relay resumes within
# about a second of the database coming back, and a hundred relays do not retry in step.
DATABASE_BASE_S = 0.2
DATABASE_CAP_S = 1.0


def next_delay(attempts: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before the next try, after ``attempts`` failed tries (1 for the first).

    "Equal jitter": half of the exponential step is fixed and half is random. Full jitter spreads
    load slightly better but can pick a delay near zero, which turns an outage into a hot loop;
    this keeps a floor of ``step / 2`` while still de-synchronising relays after a shared outage.
    """
    step = min(cap, base * 2.0 ** max(0, attempts - 1))
    return step / 2 + rng.uniform(0, step / 2)


def database_delay(failures: int, rng: random.Random) -> float:
    """The wait after ``failures`` consecutive failures to reach or write the database."""
    return next_delay(failures, base=DATABASE_BASE_S, cap=DATABASE_CAP_S, rng=rng)
