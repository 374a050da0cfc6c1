"""Head-of-line measurement: drain 2,000 messages in-process with some sends that hang.

Item 8 of ``python -m bench`` (``item8_stall``), and on its own ``python -m bench.stall
[--admin-url URL] [--rounds N] [--slow-after S] [--max-slow N]``.
Each case drains 2,000 messages with ``Relay.drain()`` (batch 100, concurrency 16, send timeout
2 s) on a database of its own. Handlers sleep 5 ms; a "hung" one sleeps until the relay's send
timeout cuts it off. Slot utilisation is handler time (useful and hung) divided by wall time
times ``concurrency``: it passes 100 % when slow sends run beside the workers (``max_slow``).
The point is the shape (what one hung send costs the whole relay), not the absolute rate; see
ARCHITECTURE.md appendix A for the figures of the lock-holding relay this replaced.

Only the public ``Relay`` / ``RelayConfig`` / ``HandlerRegistry`` API is used, so the same script
measures an older checkout too (``cd <checkout> && <venv>/bin/python -m bench.stall``);
``--slow-after`` and ``--max-slow`` are passed to ``RelayConfig`` only when given, for the same
reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from bench.harness import Bench, libpq_url, log
from bench.stats import median
from outbox import HandlerRegistry, OutboxMessage, Relay, RelayConfig
from outbox.db import create_engine
from outbox.migrate import upgrade_url

MESSAGES = 2000
HANDLER_S = 0.005
CONCURRENCY = 16
BATCH = 100
SEND_TIMEOUT = 2.0


async def drain_once(
    url: str,
    hang_every: int | None,
    handler_s: float = HANDLER_S,
    slow: dict[str, Any] | None = None,
) -> tuple[float, int, int, float]:
    """(seconds, sent, retried, slot utilisation) of one drain."""
    busy = 0.0

    async def handler(message: OutboxMessage) -> None:
        nonlocal busy
        started = time.perf_counter()
        try:
            if hang_every and message.payload["n"] % hang_every == hang_every // 2:
                await asyncio.sleep(3600)
            await asyncio.sleep(handler_s)
        finally:
            busy += time.perf_counter() - started

    registry = HandlerRegistry()
    registry.register("t", handler)
    engine = create_engine(url, application_name="outbox-relay", pool_size=4)
    config = RelayConfig(
        batch_size=BATCH, concurrency=CONCURRENCY, send_timeout=SEND_TIMEOUT, **(slow or {})
    )
    try:
        started = time.perf_counter()
        result = await Relay(engine, registry, config).drain()
        took = time.perf_counter() - started
    finally:
        await engine.dispose()
    return took, result.sent, result.retrying, busy / (took * CONCURRENCY)


def fresh_database(admin_url: str, messages: int = MESSAGES) -> str:
    name = f"bench_stall_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    rendered = url.render_as_string(hide_password=False)
    upgrade_url(rendered)
    with psycopg.connect(libpq_url(rendered)) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload) SELECT 't', jsonb_build_object('n', g) "
            "FROM generate_series(1, %s) AS g",
            (messages,),
        )
    return name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def _describe(slow: dict[str, Any]) -> str:
    return "".join(f", {key}={value:g}" for key, value in slow.items())


CASES: tuple[tuple[str, int | None], ...] = (("none", None), ("1 per 400", 400), ("1 per 100", 100))


def item8_stall(b: Bench) -> dict[str, Any]:
    """The drain for each case, rounds interleaved case by case so all see the same noise; the
    goal (issue 10): 1 hung per 100 within 1.5x the no-hang drain plus one send timeout."""
    s = b.sizes
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in CASES}
    for _ in range(s.stall_rounds):
        for label, every in CASES:
            name = fresh_database(b.admin_url, s.stall_messages)
            try:
                url = make_url(b.admin_url).set(drivername="postgresql+psycopg", database=name)
                took, sent, retried, used = asyncio.run(
                    drain_once(url.render_as_string(hide_password=False), every)
                )
            finally:
                drop_database(b.admin_url, name)
            runs[label].append(
                {"seconds": took, "sent": sent, "retrying": retried, "utilisation": used}
            )
            log(f"item 8: hung {label}: {took:.2f} s, sent {sent}, retrying {retried}")
    cases: dict[str, dict[str, Any]] = {
        label: {
            "seconds": median([r["seconds"] for r in rs]),
            "sent": median([r["sent"] for r in rs]),
            "retrying": median([r["retrying"] for r in rs]),
            "utilisation": median([r["utilisation"] for r in rs]),
            "runs": rs,
        }
        for label, rs in runs.items()
    }
    bound = 1.5 * float(cases["none"]["seconds"]) + SEND_TIMEOUT
    return {
        "messages": s.stall_messages,
        "batch": BATCH,
        "concurrency": CONCURRENCY,
        "send_timeout": SEND_TIMEOUT,
        "handler_ms": HANDLER_S * 1000,
        "cases": cases,
        "bound_s": bound,
        "held": float(cases["1 per 100"]["seconds"]) <= bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--handler-ms", type=float, default=HANDLER_S * 1000)
    parser.add_argument("--only-none", action="store_true", help="skip the cases with hung sends")
    parser.add_argument("--slow-after", type=float, help="RelayConfig.slow_after (seconds)")
    parser.add_argument("--max-slow", type=int, help="RelayConfig.max_slow")
    args = parser.parse_args()
    slow: dict[str, Any] = {}
    if args.slow_after is not None:
        slow["slow_after"] = args.slow_after
    if args.max_slow is not None:
        slow["max_slow"] = args.max_slow
    for label, every in CASES[:1] if args.only_none else CASES:
        for _ in range(args.rounds):
            name = fresh_database(args.admin_url, args.messages)
            try:
                url = make_url(args.admin_url).set(drivername="postgresql+psycopg", database=name)
                took, sent, retried, used = asyncio.run(
                    drain_once(
                        url.render_as_string(hide_password=False),
                        every,
                        args.handler_ms / 1000,
                        slow,
                    )
                )
            finally:
                drop_database(args.admin_url, name)
            print(
                f"{args.messages} x {args.handler_ms:g} ms, concurrency {CONCURRENCY} x batch "
                f"{BATCH}{_describe(slow)}, hung={label:>9}: {took:6.2f} s "
                f"({args.messages / took:,.0f}/s), "
                f"sent={sent} retried={retried}, slot utilisation {used:.0%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
