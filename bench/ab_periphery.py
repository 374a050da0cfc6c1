"""A/B of the PgBouncer and wide-mail changes on the enqueue and send paths, in one run.

``python -m bench.ab_periphery [--before REV] [--admin-url URL] [--rounds N]``

- **enqueue**: ``outbox.enqueue`` now runs its insert unprepared on any engine (so it works
  through PgBouncer's transaction pooling with psycopg's defaults). A = the insert as before
  (``queries.insert_message``: psycopg prepares it after 5 runs); B = ``outbox.enqueue``. Same
  engine and database, rounds alternated, each op its own transaction (begin, insert, commit)
  and, to see the statement alone, 200 inserts in one transaction.
- **render**: ``render_email`` of ``--before`` (default: the merge base with main) vs now, for
  1 recipient and for 40 (the most the old unfolded ``To:`` line could carry).
- **send**: ``SmtpSender`` of ``--before`` vs now, one recipient, to the bench's SMTP sink in a
  process of its own, 16 sends in flight.

Prints the median and the best round per operation; only ratios between A and B in the same run
mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import libpq_url
from bench.sink import Sink
from outbox import OutboxMessage, enqueue, migrate, queries
from outbox.db import create_engine
from outbox.smtp import SmtpConfig, SmtpSender, render_email

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = {"to": "ann@example.test", "subject": "Welcome", "text": "Hello " * 40}


def _module_at(rev: str, path: str, name: str) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def _median_us(samples: list[float], per: int) -> float:
    return statistics.median(samples) / per * 1e6


async def _ab(
    rounds: int, a: Callable[[], Awaitable[float]], b: Callable[[], Awaitable[float]]
) -> tuple[list[float], list[float]]:
    times_a: list[float] = []
    times_b: list[float] = []
    await a()  # warm both up (connections, psycopg's prepare threshold)
    await b()
    for i in range(rounds):  # ABBA order, so neither side always runs after the other
        if i % 2:
            times_b.append(await b())
            times_a.append(await a())
        else:
            times_a.append(await a())
            times_b.append(await b())
    return times_a, times_b


def _report(label: str, a: list[float], b: list[float], per: int) -> None:
    """Median and best round of each: on a busy shared machine the best round is the one least
    disturbed by others, the usual choice for a micro-benchmark (timeit reports it too)."""
    ma, mb = _median_us(a, per), _median_us(b, per)
    ba, bb = min(a) / per * 1e6, min(b) / per * 1e6
    print(
        f"{label:<40} median {ma:7.1f} -> {mb:7.1f} us ({mb / ma:5.3f})"
        f"   best {ba:7.1f} -> {bb:7.1f} us ({bb / ba:5.3f})"
    )


async def bench_enqueue(url: str, rounds: int) -> None:
    engine = create_engine(url, application_name="bench-ab", pool_size=1)

    async def one_per_tx(use_new: bool, n: int = 100) -> float:
        started = time.perf_counter()
        for _ in range(n):
            async with engine.begin() as conn:
                await _insert(engine, conn, use_new)
        return time.perf_counter() - started

    async def many_in_one_tx(use_new: bool, n: int = 200) -> float:
        async with engine.connect() as conn:
            started = time.perf_counter()
            for _ in range(n):
                await _insert(engine, conn, use_new)
            elapsed = time.perf_counter() - started
            await conn.rollback()
        return elapsed

    try:
        a, b = await _ab(rounds, lambda: one_per_tx(False), lambda: one_per_tx(True))
        _report("enqueue, one transaction each", a, b, 100)
        a, b = await _ab(rounds, lambda: many_in_one_tx(False), lambda: many_in_one_tx(True))
        _report("enqueue, 200 in one transaction", a, b, 200)
    finally:
        await engine.dispose()


async def _insert(engine: AsyncEngine, conn: Any, use_new: bool) -> None:
    if use_new:
        await enqueue(conn, topic="email", payload=PAYLOAD)
    else:
        # The insert alone, without enqueue's pooler check: the path before PgBouncer support.
        insert = queries.Insert.of(
            topic="email", payload=PAYLOAD, available_at=None, notify=True, dedupe_key=None
        )
        await conn.execute(insert.statement, insert.params)


def bench_render(before: ModuleType, rounds: int) -> None:
    mid = uuid.uuid4()
    for count in (1, 40):
        payload = dict(PAYLOAD, to=[f"user{n:03d}@example.test" for n in range(count)])

        def run(
            render: Callable[..., Any], n: int = 500, payload: dict[str, Any] = payload
        ) -> float:
            started = time.perf_counter()
            for _ in range(n):
                render(payload, message_id=mid, mail_from="noreply@example.test")
            return time.perf_counter() - started

        run(before.render_email)
        run(render_email)
        a = [0.0] * rounds
        b = [0.0] * rounds
        for i in range(rounds):  # ABBA order, as in _ab
            if i % 2:
                b[i] = run(render_email)
                a[i] = run(before.render_email)
            else:
                a[i] = run(before.render_email)
                b[i] = run(render_email)
        _report(f"render_email, {count} recipient(s)", a, b, 500)


async def bench_send(before: ModuleType, rounds: int) -> None:
    with Sink() as sink:
        config = SmtpConfig.from_url(sink.url)
        old = before.SmtpSender(config, mail_from="noreply@example.test", pool_size=16)
        new = SmtpSender(config, mail_from="noreply@example.test", pool_size=16)
        messages = [
            OutboxMessage(
                id=n,
                message_id=uuid.uuid4(),
                topic="email",
                payload=PAYLOAD,
                attempts=0,
                created_at=datetime.now(UTC),
            )
            for n in range(400)
        ]

        async def run(sender: Callable[[OutboxMessage], Awaitable[str]]) -> float:
            started = time.perf_counter()
            limit = asyncio.Semaphore(16)

            async def one(message: OutboxMessage) -> None:
                async with limit:
                    await sender(message)

            await asyncio.gather(*(one(m) for m in messages))
            return time.perf_counter() - started

        try:
            a, b = await _ab(rounds, lambda: run(old), lambda: run(new))
            _report("SmtpSender, 1 recipient, 16 in flight", a, b, len(messages))
        finally:
            await old.aclose()
            await new.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="git revision for 'before' (merge base)")
    parser.add_argument(
        "--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres", metavar="URL"
    )
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    before_rev = (
        args.before
        or subprocess.run(
            ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    print(f"before = {before_rev[:12]}, after = working tree; {args.rounds} rounds alternated")
    before_mail = _module_at(before_rev, "outbox/mail.py", "outbox_mail_before")

    name = f"bench_ab_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(args.admin_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # generated name
    url = admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate.upgrade_url(url)
        await bench_enqueue(url, args.rounds)
        bench_render(before_mail, args.rounds)
        await bench_send(before_mail, args.rounds)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
