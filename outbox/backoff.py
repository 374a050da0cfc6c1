"""Retry delays: exponential, capped, with jitter. Pure, so tests pass their own ``rng``.

``next_delay`` schedules a message's next try (``outbox.outcome``): the delay is stored as the
row's ``available_at``, from seconds up to an hour, and counted by the row's ``attempts``. Waiting
for the database is another job (an in-process sleep between tries of one statement, capped at a
second, counted by the loop) and is tenacity's, in ``outbox.reconnect``; ``database_delay`` is the
same wait for the one loop not on tenacity yet, the relay's owner-lock session
(``Relay._keep_owner``), whose count starts again after every session that opened.
"""

from __future__ import annotations

import random

from outbox.reconnect import DATABASE_BASE_S, DATABASE_CAP_S


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
