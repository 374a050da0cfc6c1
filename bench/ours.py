"""This project's side of items 2-7: relay processes, the SQL ceiling, latency, scale, NOTIFY."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import time
import uuid
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import psycopg
from psycopg import sql

from bench import smtpload
from bench.harness import (
    CLAIM_AFTER_SQL,
    CLAIM_SQL,
    DUE_EXISTS_SQL,
    INSERT_NOTIFY_SQL,
    INSERT_SQL,
    NOTIFY_CHANNEL,
    SETTLE_SQL,
    Bench,
    Relays,
    connect,
    fetch_value,
    fill_outbox,
    log,
    sent_times,
    truncate_outbox,
    wait_drained,
)
from bench.runner import Committed, latency_run, median_runs, open_loop
from bench.sink import Sink
from bench.stats import median, rate_10_90, ratio
from bench.sweep import Setting, sweep
from outbox import queries

RELAY_CONCURRENCY = 16
# How often the relay claims from the start of the due index while it resumes full batches (the
# default of ``outbox.claim.ClaimCursor``); the SQL ceiling claims the same way, so it must match.
RESCAN_EVERY_S = 1.0


def relay_drain(url: str, n: int, *, email: bool, sink: Sink | None, timeout: float = 600) -> float:
    """One timed drain by relays that are already running and listening: fill ``n`` rows in one
    transaction, NOTIFY, wait until all are sent; rate over the 10-90 % window."""
    truncate_outbox(url)
    if sink is not None:
        sink.reset()
    fill_outbox(url, n, topic="email" if email else "noop", email=email, notify=True)
    if email:
        assert sink is not None
        if not sink.wait_count(n, timeout):
            raise TimeoutError(f"relay sent {sink.count()} of {n} mails")
        times, _ = sink.records()
    else:
        if not wait_drained(url, timeout=timeout):
            raise TimeoutError("relay did not drain")
        times = sent_times(url)
    return rate_10_90(times)


# --- item 2: relay vs bare aiosmtplib ----------------------------------------------------------


def item2_smtp(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    out: dict[str, Any] = {"rows": []}
    # The sink alone, driven by a minimal pipelining client: how far it is from being the limit.
    blast = [smtpload.blast(sink, procs=1, conns=4, total=s.smtp_total) for _ in range(s.runs)]
    out["sink_capacity"] = median(blast)
    log(f"item 2: sink capacity {out['sink_capacity']:.0f} mails/s")
    url = b.create_db("smtp")
    for procs in s.relay_procs:
        ceiling, relay, sink_cpu = [], [], []
        with Relays(url, sink.url, procs, concurrency=RELAY_CONCURRENCY, poll_interval=30):
            warm = relay_drain(url, s.warm, email=True, sink=sink)
            n = s.size_for(warm, s.smtp_total)
            warm_bare = smtpload.bare(sink, procs=procs, conns=RELAY_CONCURRENCY, total=s.warm)
            n_bare = s.size_for(warm_bare, s.smtp_total)
            for _ in range(s.runs):  # interleaved, so both see the same noise
                ceiling.append(
                    smtpload.bare(sink, procs=procs, conns=RELAY_CONCURRENCY, total=n_bare)
                )
                cpu0, t0 = sink.cpu_seconds(), time.monotonic()
                relay.append(relay_drain(url, n, email=True, sink=sink))
                sink_cpu.append((sink.cpu_seconds() - cpu0) / (time.monotonic() - t0))
        row = {
            "procs": procs,
            "ceiling": median(ceiling),
            "relay": median(relay),
            "ratio": ratio(median(relay), median(ceiling)),
            "sink_cpu": median(sink_cpu),
            "ceiling_runs": ceiling,
            "relay_runs": relay,
        }
        log(
            f"item 2: {procs} proc(s): relay {row['relay']:.0f}/s, bare {row['ceiling']:.0f}/s"
            f" -> {row['ratio']:.0%}"
        )
        out["rows"].append(row)
    b.drop_db(url)
    return out


# --- item 3: the SQL ceiling ------------------------------------------------------------------


def _sql_worker(url: str, batch: int, go: Event) -> None:
    """Claim and settle as the relay does, resume point included (see ``outbox.claim``): the
    claim commits on its own (attempt, owner, lease), then a fenced settle commits."""
    owner = uuid.uuid4()
    claimer = {"owner": owner, "lease": 30.0, "topics": ["noop"], "clock": None, "budget": 2**62}
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        go.wait()
        after: tuple[datetime, int] | None = None  # (available_at, id) of the last full batch
        rescan_at = 0.0
        while True:
            rows = []
            if after is not None and time.monotonic() < rescan_at:
                params = {"limit": batch, "now": None, "after_at": after[0], "after_id": after[1]}
                rows = conn.execute(CLAIM_AFTER_SQL, params | claimer, prepare=True).fetchall()
            if not rows:
                params = {"limit": batch, "now": None}
                rows = conn.execute(CLAIM_SQL, params | claimer, prepare=True).fetchall()
                rescan_at = time.monotonic() + RESCAN_EVERY_S
            if not rows:
                return
            after = (rows[-1][6], rows[-1][0]) if len(rows) == batch else None
            ids = [r[0] for r in rows]
            sent = {
                "ids": ids,
                "owners": [owner] * len(ids),
                "attempts": [r[4] for r in rows],
                "results": [None] * len(ids),
            }
            conn.execute(SETTLE_SQL, queries.settle_params(None, sent=sent), prepare=True)


def sql_ceiling(url: str, n: int, *, procs: int, batch: int) -> float:
    """The bare SQL loop: same CLAIM_DUE and SETTLE_MANY, psycopg, no relay code (two
    statements per batch in autocommit, as the relay does)."""
    truncate_outbox(url)
    fill_outbox(url, n, topic="noop", email=False)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    ps = [ctx.Process(target=_sql_worker, args=(url, batch, go)) for _ in range(procs)]
    for p in ps:
        p.start()
    time.sleep(0.3)
    go.set()
    for p in ps:
        p.join(600)
    return rate_10_90(sent_times(url))


def item3_noop(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    url = b.create_db("noop")
    rows = []
    for batch in s.batch_sizes:
        relay: list[float] = []
        ceiling: list[float] = []
        floor = batch * 20  # enough batches for the 10-90 % window to mean something
        warm_n = max(s.warm, floor)
        with Relays(
            url,
            sink.url,
            s.queue_procs,
            batch_size=batch,
            concurrency=RELAY_CONCURRENCY,
            imports=("bench.noop",),
            poll_interval=30,
        ):
            n = s.size_for(relay_drain(url, warm_n, email=False, sink=None), s.queue_total, floor)
            n_sql = s.size_for(
                sql_ceiling(url, warm_n, procs=s.queue_procs, batch=batch), s.queue_total, floor
            )
            for _ in range(s.runs):
                ceiling.append(sql_ceiling(url, n_sql, procs=s.queue_procs, batch=batch))
                relay.append(relay_drain(url, n, email=False, sink=None))
        row = {
            "batch": batch,
            "relay": median(relay),
            "sql": median(ceiling),
            "ratio": ratio(median(relay), median(ceiling)),
            "relay_runs": relay,
            "sql_runs": ceiling,
        }
        log(
            f"item 3: batch {batch}: relay {row['relay']:.0f}/s, SQL {row['sql']:.0f}/s"
            f" -> {row['ratio']:.0%}"
        )
        rows.append(row)

    def measure(setting: Setting, drains: int, target_s: float) -> list[float]:
        batch = setting["batch"]
        floor = batch * 20
        with Relays(
            url,
            sink.url,
            setting["procs"],
            batch_size=batch,
            concurrency=RELAY_CONCURRENCY,
            imports=("bench.noop",),
            poll_interval=30,
        ):
            warm = relay_drain(url, max(s.warm, floor), email=False, sink=None)
            n = s.size_for(warm, s.queue_total, floor, target_s=target_s)
            return [relay_drain(url, n, email=False, sink=None) for _ in range(drains)]

    batches = (100, 1000) if s.sweep_wide else (100,)
    grid = [{"procs": p, "batch": b} for p in s.sweep_procs for b in batches]
    best = sweep(
        "outbox no-op", grid, measure, runs=s.runs, sweep_s=s.sweep_target_s, timed_s=s.target_s
    )
    b.drop_db(url)
    return {"rows": rows, "procs": s.queue_procs, "sweep": best}


# --- item 4: ours with the email job ----------------------------------------------------------


def item4_email_ours(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    url = b.create_db("email")
    rates, ceiling = [], []
    with Relays(url, sink.url, s.queue_procs, concurrency=RELAY_CONCURRENCY, poll_interval=30):
        n = s.size_for(relay_drain(url, s.warm, email=True, sink=sink), s.smtp_total)
        for _ in range(s.runs):
            ceiling.append(
                smtpload.bare(sink, procs=s.queue_procs, conns=RELAY_CONCURRENCY, total=n)
            )
            rates.append(relay_drain(url, n, email=True, sink=sink))
    log(f"item 4: relay email {median(rates):.0f}/s (bare {median(ceiling):.0f}/s)")

    def measure(setting: Setting, drains: int, target_s: float) -> list[float]:
        with Relays(
            url, sink.url, setting["procs"], concurrency=RELAY_CONCURRENCY, poll_interval=30
        ):
            warm = relay_drain(url, s.warm, email=True, sink=sink)
            n = s.size_for(warm, s.smtp_total, target_s=target_s)
            return [relay_drain(url, n, email=True, sink=sink) for _ in range(drains)]

    grid = [{"procs": p} for p in s.sweep_procs]
    best = sweep(
        "outbox email", grid, measure, runs=s.runs, sweep_s=s.sweep_target_s, timed_s=s.target_s
    )
    b.drop_db(url)
    return {
        "rate": median(rates),
        "runs": rates,
        "ceiling": median(ceiling),
        "procs": s.queue_procs,
        "sweep": best,
    }


# --- item 5: commit -> SMTP acceptance ---------------------------------------------------------


async def _produce_outbox(url: str, rate: float, seconds: float) -> Committed:
    from outbox import enqueue
    from outbox.db import create_engine

    # At most 10 connections per producer: the server's max_connections (100) is shared with
    # the relays, the peers and whatever else runs on this machine.
    engine = create_engine(url, application_name="bench-producer", pool_size=5)
    done: Committed = []

    async def one(i: int) -> None:
        async with engine.begin() as conn:
            mid = await enqueue(conn, topic="email", payload=smtpload.email_payload(i))
        done.append((str(mid), time.time()))

    async with engine.begin() as conn:  # open a few connections before the clock starts
        await conn.exec_driver_sql("SELECT 1")
    await open_loop(one, rate, seconds)
    await engine.dispose()
    return done


def produce_outbox(url: str, rate: float, seconds: float) -> Committed:
    """Item 5's producer for this project (a ``bench.runner.Producer``): ``outbox.enqueue``, one
    transaction per message."""
    return asyncio.run(_produce_outbox(url, rate, seconds))


def item5_latency_ours(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    url = b.create_db("latency")
    out: dict[str, Any] = {}
    for rate in s.latency_rates:
        # One relay process at 100/s, as each peer gets one worker; at 1,000/s, which is near
        # what one process can send at all (item 2), as many as in items 3 and 4.
        procs = 1 if rate <= 100 else s.queue_procs
        try:
            with Relays(url, sink.url, procs, concurrency=RELAY_CONCURRENCY, poll_interval=5):
                latency_run("outbox", produce_outbox, url, sink, 50, 1.0)  # warm-up
                runs = [
                    latency_run(
                        "outbox", produce_outbox, url, sink, rate, s.latency_seconds / s.runs * 2
                    )
                    for _ in range(max(1, s.runs // 2 + 1))
                ]
        except Exception as exc:  # keep the other rate and the peers
            log(f"item 5: outbox at {rate}/s failed: {exc!r}")
            out[f"error_{rate}"] = f"{type(exc).__name__}: {exc}"
            continue
        out[str(rate)] = median_runs(runs)
        out[str(rate)]["relays"] = procs
        log(
            f"item 5: outbox at {rate}/s: p50 {out[str(rate)]['p50']:.1f} ms, "
            f"p99 {out[str(rate)]['p99']:.1f} ms"
        )
    b.drop_db(url)
    return out


# --- item 6: scale -----------------------------------------------------------------------------


def _drain_with_memory(url: str, relays: Relays, n: int) -> tuple[list[float], list[int]]:
    fill_outbox(url, n, topic="noop", email=False, notify=True)
    rss: list[int] = []
    deadline = time.monotonic() + 1800
    with connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            rss.append(sum(relays.rss_kib()))
            if not fetch_value(conn, DUE_EXISTS_SQL):
                break
            time.sleep(0.5)
    rss.append(sum(relays.rss_kib()))
    return sent_times(url), rss


def item6_scale(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    url = b.create_db("scale")
    rows = []
    memory: dict[str, Any] = {}
    with Relays(
        url,
        sink.url,
        s.queue_procs,
        concurrency=RELAY_CONCURRENCY,
        imports=("bench.noop",),
        poll_interval=30,
    ) as relays:
        relay_drain(url, s.warm, email=False, sink=None)  # warm-up
        for n in s.scale_rows:
            big = n >= 500_000 or n == max(s.scale_rows)
            runs = 1 if big else min(3, s.runs)
            rates, window_rates = [], []
            for _ in range(runs):
                truncate_outbox(url)
                times, rss = _drain_with_memory(url, relays, n)
                rates.append(rate_10_90(times))
                if big:
                    window_rates = _window_rates(times)
                    memory = {
                        "rows": n,
                        "rss_mib": [r / 1024 for r in rss],
                        "start_mib": rss[0] / 1024,
                        "peak_mib": max(rss) / 1024,
                        "end_mib": rss[-1] / 1024,
                    }
            rate = median(window_rates) if big else median(rates)
            rows.append(
                {"rows": n, "kept_sent": 0, "rate": rate, "runs": rates, "windows": window_rates}
            )
            log(f"item 6: {n} due rows: {rate:.0f}/s")
        # The same with a long history of sent rows kept in the table.
        n = s.scale_rows[min(1, len(s.scale_rows) - 1)]
        truncate_outbox(url)
        fill_outbox(url, s.scale_sent_kept, topic="noop", email=False, sent=True)
        with connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE outbox")
        rates = []
        for _ in range(min(3, s.runs)):
            with connect(url, autocommit=True) as conn:
                conn.execute("DELETE FROM outbox WHERE sent_at > now() - interval '1 hour'")
            fill_outbox(url, n, topic="noop", email=False, notify=True)
            if not wait_drained(url, timeout=900):
                raise TimeoutError("scale drain")
            rates.append(rate_10_90(sent_times(url)))
        rows.append(
            {
                "rows": n,
                "kept_sent": s.scale_sent_kept,
                "rate": median(rates),
                "runs": rates,
                "windows": [],
            }
        )
        log(f"item 6: {n} due rows with {s.scale_sent_kept} sent kept: {median(rates):.0f}/s")
    b.drop_db(url)
    return {"rows": rows, "memory": memory, "procs": s.queue_procs}


def _window_rates(times: list[float], windows: int = 8) -> list[float]:
    """Rates of successive slices of one long drain (10-90 % of it, cut in ``windows``)."""
    ordered = sorted(times)
    n = len(ordered)
    lo, hi = int(n * 0.1), int(n * 0.9)
    step = (hi - lo) // windows
    rates = []
    for k in range(windows):
        chunk = ordered[lo + k * step : lo + (k + 1) * step]
        if len(chunk) > 10 and chunk[-1] > chunk[0]:
            rates.append((len(chunk) - 1) / (chunk[-1] - chunk[0]))
    return rates


# --- item 7: what NOTIFY costs -----------------------------------------------------------------


async def _writer(url: str, notify: bool, seconds: float, tasks: int) -> int:
    insert = INSERT_NOTIFY_SQL if notify else INSERT_SQL
    # email_key: the address's canonical key (web.identity); these addresses are already canonical.
    user_sql = (
        "INSERT INTO users (email, email_key, password_hash)"
        " VALUES (%(email)s, %(email)s, %(hash)s) RETURNING id"
    )
    count = 0
    stop_at = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal count
        async with await psycopg.AsyncConnection.connect(url) as conn:
            while time.monotonic() < stop_at:
                async with conn.transaction():
                    cur = await conn.execute(
                        user_sql,
                        {
                            "email": f"{uuid.uuid4().hex}@example.com",
                            "hash": "$argon2id$v=19$bench",
                        },
                    )
                    row = await cur.fetchone()
                    assert row is not None  # INSERT ... RETURNING: one row
                    user_id = row[0]
                    await conn.execute(
                        insert,
                        {
                            "topic": "email",
                            "available_at": None,
                            "channel": NOTIFY_CHANNEL,
                            "payload": json.dumps(
                                {"to": f"u{user_id}@example.com", "subject": "s", "text": "t"}
                            ),
                        },
                    )
                count += 1

    await asyncio.gather(*(loop() for _ in range(tasks)))
    return count


def _writer_proc(
    url: str, notify: bool, seconds: float, tasks: int, go: Event, conn: Connection[int, Any]
) -> None:
    go.wait()
    conn.send(asyncio.run(_writer(url, notify, seconds, tasks)))


def insert_rate(
    url: str, *, notify: bool, seconds: float, writers: int = 8, procs: int = 2
) -> float:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    pipes: list[Connection[Any, int]] = []
    ps = []
    for _ in range(procs):
        parent, child = ctx.Pipe()
        pipes.append(parent)
        ps.append(
            ctx.Process(
                target=_writer_proc, args=(url, notify, seconds, writers // procs, go, child)
            )
        )
    for p in ps:
        p.start()
    time.sleep(0.5)
    go.set()
    total = sum(p.recv() for p in pipes)
    for p in ps:
        p.join(30)
    return total / seconds


def item7_notify(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    url = b.create_db("notify")
    # A relay's LISTEN connection is open, as in production, so notifications are consumed.
    stop = threading.Event()

    def listen() -> None:
        with psycopg.connect(url, autocommit=True) as listener:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            while not stop.is_set():
                for _ in listener.notifies(timeout=0.2):
                    pass

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    with_n, without = [], []
    insert_rate(url, notify=True, seconds=s.notify_seconds / 2)
    for _ in range(s.runs):
        without.append(insert_rate(url, notify=False, seconds=s.notify_seconds))
        with_n.append(insert_rate(url, notify=True, seconds=s.notify_seconds))
    stop.set()
    thread.join(5)
    b.drop_db(url)
    out = {
        "with": median(with_n),
        "without": median(without),
        "cost": 1 - ratio(median(with_n), median(without)),
        "with_runs": with_n,
        "without_runs": without,
    }
    log(
        f"item 7: {out['without']:.0f} tx/s without NOTIFY, {out['with']:.0f} with "
        f"({out['cost']:.1%} cost)"
    )
    return out
