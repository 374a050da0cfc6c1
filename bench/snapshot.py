"""Item 9: the relay's drain while another session holds a snapshot open.

The public failure of PostgreSQL queues: an open transaction (a report, a stuck session, a
replica's ``hot_standby_feedback``) holds back the xmin horizon, VACUUM can remove no dead row
version made after it, and a queue table whose every message is inserted, updated and deleted
fills with dead versions that each claim steps over. On a cluster the bench starts itself
(``bench.cluster``: autovacuum on, defaults), two relays work rounds of "insert N no-op messages
(one transaction, NOTIFY), wait until all are sent, delete the sent rows (as a purge does)",
first for a while with nothing else open, then for a longer while with a REPEATABLE READ
transaction that has read the outbox open in another session the whole time. Each phase starts
after a VACUUM of the outbox, so both start from a table without dead rows. Each round's rate
is the 10-90 % window of its ``sent_at`` times.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bench.cluster import Cluster
from bench.harness import (
    NOTIFY_CHANNEL,
    Bench,
    Relays,
    connect,
    create_database,
    fetch_value,
    libpq_url,
    log,
    migrate_service,
    sent_times,
    wait_drained,
)
from bench.sink import Sink
from bench.stats import median, rate_10_90, ratio

RELAYS = 2
# The goal (issue 10): the drain with the snapshot held within 20 % of the drain without it.
GOAL = 0.8

_STATS_SQL = (
    "SELECT n_dead_tup, n_live_tup, autovacuum_count FROM pg_stat_user_tables"
    " WHERE relname = 'outbox'"
)


def _round(url: str, n: int) -> dict[str, float]:
    """Insert ``n`` messages and NOTIFY in one transaction, wait for the relays to send them
    all, then delete them (a purge); the round's rate and the table's counters after it."""
    started = time.monotonic()
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload) SELECT 'noop', '{}'::jsonb"
            " FROM generate_series(1, %s)",
            (n,),
        )
        conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    if not wait_drained(url, timeout=600, every=0.05):
        raise TimeoutError(f"relays did not drain a round of {n}")
    drained = time.monotonic() - started
    rate = rate_10_90(sent_times(url))
    with connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL")
        conn.execute("SELECT pg_stat_force_next_flush()")
        dead, live, autovacuums = conn.execute(_STATS_SQL).fetchone() or (0, 0, 0)
    return {
        "rate": rate,
        "seconds": drained,
        "dead": dead,
        "live": live,
        "autovacuums": autovacuums,
    }


def _vacuum(url: str) -> None:
    """Both phases start from a table with no dead rows, so they differ only in the snapshot."""
    with connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")


def _phase(url: str, n: int, seconds: float) -> dict[str, Any]:
    """Rounds for ``seconds``; the first, last and median rates and the dead rows at the end."""
    rounds: list[dict[str, float]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds or not rounds:
        r = _round(url, n)
        r["t"] = time.monotonic() - t0
        rounds.append(r)
    rates = [r["rate"] for r in rounds]
    late = rates[-max(1, len(rates) // 4) :]
    return {
        "seconds": time.monotonic() - t0,
        "rounds": rounds,
        "first": rates[0],
        "last": rates[-1],
        "median": median(rates),
        "late_median": median(late),  # the last quarter of the rounds
        # Wall time of a round until all sent: the fill's commit, the drain, and the bench's
        # own polling for "nothing due" (which also walks the due index, dead entries and all).
        "round_s_median": median([r["seconds"] for r in rounds]),
        "round_s_late": median([r["seconds"] for r in rounds[-len(late) :]]),
        "dead_end": rounds[-1]["dead"],
        "dead_max": max(r["dead"] for r in rounds),
        "autovacuums": rounds[-1]["autovacuums"] - rounds[0]["autovacuums"],
    }


@contextmanager
def held_snapshot(url: str) -> Iterator[dict[str, Any]]:
    """A session in a REPEATABLE READ transaction that has read the outbox: its snapshot (and
    so the xmin horizon of the database) stays where it was until the block ends. Yields a
    dict that gets the snapshot's age in transactions at the end (proof that it was held)."""
    info: dict[str, Any] = {}
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("SET application_name = 'bench-held-snapshot'")
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT count(*) FROM outbox").fetchone()
        pid = fetch_value(conn, "SELECT pg_backend_pid()")
        try:
            yield info
        finally:
            with connect(url, autocommit=True) as other:
                row = other.execute(
                    "SELECT coalesce(age(backend_xmin), 0), state FROM pg_stat_activity"
                    " WHERE pid = %s",
                    (pid,),
                ).fetchone()
                info["xmin_age"], info["state"] = row or (None, None)
            conn.execute("ROLLBACK")


def item9_snapshot(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    with Cluster() as cluster:
        settings = cluster.settings()
        name = "outbox_bench_snapshot"
        create_database(cluster.admin_url, name)
        url = cluster.admin_url.rsplit("/", 1)[0] + f"/{name}"
        migrate_service(url)
        with Relays(
            url, sink.url, RELAYS, imports=("bench.noop",), poll_interval=30, concurrency=16
        ):
            _phase(url, s.snapshot_fill, 0)  # warm-up: one round
            log(f"item 9: {s.snapshot_base_s:.0f} s of rounds without a held snapshot")
            _vacuum(url)
            base = _phase(url, s.snapshot_fill, s.snapshot_base_s)
            log(
                f"item 9: without: {base['median']:,.0f}/s over {len(base['rounds'])} rounds; "
                f"{s.snapshot_hold_s:.0f} s with a snapshot held"
            )
            _vacuum(url)
            with held_snapshot(url) as snap:
                held = _phase(url, s.snapshot_fill, s.snapshot_hold_s)
            log(
                f"item 9: held: first {held['first']:,.0f}/s, last {held['last']:,.0f}/s, "
                f"{held['dead_end']:,} dead rows (snapshot age {snap.get('xmin_age')} xids)"
            )
    r = ratio(held["late_median"], base["median"])
    return {
        "cluster": settings,
        "relays": RELAYS,
        "fill": s.snapshot_fill,
        "without": base,
        "held": held,
        "snapshot": snap,
        "ratio": r,
        "goal": GOAL,
        "held_goal": r >= GOAL,
    }
