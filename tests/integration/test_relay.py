"""The relay against a real PostgreSQL and a real SMTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import HandlerRegistry, Relay, RelayConfig, enqueue
from outbox.db import engine_libpq_url
from outbox.mail import SmtpSender
from outbox.settings import SmtpConfig
from web.capture import CaptureServer

MAIL_FROM = "noreply@example.test"


def email_registry(smtp: CaptureServer, *, timeout: float = 5.0) -> HandlerRegistry:
    registry = HandlerRegistry()
    sender = SmtpSender(SmtpConfig.from_url(smtp.url), mail_from=MAIL_FROM, timeout=timeout)
    registry.register("email", sender)
    return registry


def payload(n: int = 0) -> dict[str, object]:
    return {"to": f"user{n}@example.test", "subject": f"Hello {n}", "text": f"Body {n}"}


async def enqueue_committed(engine: AsyncEngine, count: int) -> None:
    async with engine.begin() as conn:
        for n in range(count):
            await enqueue(conn, topic="email", payload=payload(n))


async def row(engine: AsyncEngine, sql: str) -> dict[str, object]:
    async with engine.connect() as conn:
        return dict((await conn.execute(text(sql))).mappings().one())


class CountInFlight:
    """A handler that takes ``seconds`` and counts the most calls it had running at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.in_flight = 0
        self.most = 0

    async def __call__(self, message: object) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1


class Clock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def test_relay_commit_delivers_exactly_one_mail_with_headers(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    async with engine.begin() as conn:
        message_id = await enqueue(
            conn,
            topic="email",
            payload={"to": "ann@example.test", "subject": "Welcome", "text": "Hi Ann"},
        )
    relay = Relay(engine, email_registry(smtp_server))

    result = await relay.drain()

    assert (result.claimed, result.sent) == (1, 1)
    [mail] = smtp_server.mails
    msg = mail.message
    assert msg["To"] == "ann@example.test"
    assert msg["From"] == MAIL_FROM
    assert msg["Subject"] == "Welcome"
    assert msg["Message-ID"] == f"<{message_id}@example.test>"
    assert msg.get_content().strip() == "Hi Ann"
    assert mail.rcpt_tos == ("ann@example.test",)
    stored = await row(engine, "SELECT sent_at, attempts, result FROM outbox")
    assert stored["sent_at"] is not None
    assert stored["attempts"] == 1
    assert str(stored["result"]).startswith("250 ")


async def test_relay_rollback_sends_nothing(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    async with engine.connect() as conn:
        await conn.begin()
        await enqueue(conn, topic="email", payload=payload())
        await conn.rollback()

    result = await Relay(engine, email_registry(smtp_server)).drain()

    assert result.claimed == 0
    assert smtp_server.mails == []
    assert (await row(engine, "SELECT count(*) AS n FROM outbox"))["n"] == 0


async def test_relay_row_inserted_by_sql_uses_column_defaults(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO outbox (topic, payload) VALUES ('email', CAST(:p AS jsonb))"),
            {"p": '{"to": "sql@example.test", "subject": "S", "text": "T"}'},
        )
    await Relay(engine, email_registry(smtp_server)).drain()

    stored = await row(engine, "SELECT message_id FROM outbox")
    [mail] = smtp_server.mails
    assert mail.message["Message-ID"] == f"<{stored['message_id']}@example.test>"


async def test_relay_451_is_retried_later_with_backoff(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    await enqueue_committed(engine, 1)
    clock = Clock()
    relay = Relay(engine, email_registry(smtp_server), clock=clock, rng=random.Random(1))
    smtp_server.reply = "451 4.3.0 Try again later"

    first = await relay.drain()

    assert (first.claimed, first.retrying) == (1, 1)
    stored = await row(
        engine,
        "SELECT attempts, last_error, available_at, dead_at, sent_at FROM outbox",
    )
    assert stored["attempts"] == 1
    assert "451" in str(stored["last_error"])
    assert stored["dead_at"] is None and stored["sent_at"] is None
    delay = (stored["available_at"] - clock.now).total_seconds()  # type: ignore[operator]
    assert 1.0 <= delay <= 2.0  # first step: base 2 s with equal jitter

    # Not due yet: nothing happens.
    assert (await relay.drain()).claimed == 0
    # Once due and the server is healthy, it goes out.
    smtp_server.reply = None
    clock.advance(delay)
    second = await relay.drain()
    assert second.sent == 1
    assert len(smtp_server.mails) == 1


async def test_relay_550_is_dead_at_once(engine: AsyncEngine, smtp_server: CaptureServer) -> None:
    await enqueue_committed(engine, 1)
    smtp_server.reply = "550 5.1.1 No such user"

    result = await Relay(engine, email_registry(smtp_server)).drain()

    assert result.dead == 1
    stored = await row(engine, "SELECT attempts, last_error, dead_at FROM outbox")
    assert stored["attempts"] == 1
    assert stored["dead_at"] is not None
    assert "550" in str(stored["last_error"])


async def test_relay_exhausted_attempts_are_dead_with_last_error(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    await enqueue_committed(engine, 1)
    smtp_server.reply = "421 4.7.0 Service not available"
    clock = Clock()
    config = RelayConfig(max_attempts=3, backoff_base=1, backoff_cap=10)
    relay = Relay(engine, email_registry(smtp_server), config, clock=clock)

    outcomes = []
    for _ in range(3):
        result = await relay.drain()
        outcomes.append((result.retrying, result.dead))
        clock.advance(60)

    assert outcomes == [(1, 0), (1, 0), (0, 1)]
    stored = await row(engine, "SELECT attempts, last_error, dead_at FROM outbox")
    assert stored["attempts"] == 3
    assert stored["dead_at"] is not None
    assert "421" in str(stored["last_error"])
    assert smtp_server.data_attempts == 3


async def test_relay_message_id_is_stable_across_retries(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    """The same row must carry the same Message-ID on every attempt, so receivers can dedupe."""
    await enqueue_committed(engine, 1)
    clock = Clock()
    registry = email_registry(smtp_server)
    relay = Relay(engine, registry, clock=clock)
    seen: list[str] = []

    async def spy(message: object) -> str | None:
        from outbox.message import OutboxMessage

        assert isinstance(message, OutboxMessage)
        seen.append(str(message.message_id))
        return await registry.get("email")(message)

    spying = HandlerRegistry()
    spying.register("email", spy)
    relay = Relay(engine, spying, clock=clock)
    smtp_server.reply = "451 busy"
    await relay.drain()
    smtp_server.reply = None
    clock.advance(3600)
    await relay.drain()

    assert len(seen) == 2 and seen[0] == seen[1]
    [mail] = smtp_server.mails
    assert seen[0] in mail.message_id


async def test_two_relays_deliver_each_of_2000_messages_exactly_once(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    await enqueue_committed(engine, 2000)
    config = RelayConfig(batch_size=50, concurrency=16)
    relays = [Relay(engine, email_registry(smtp_server), config) for _ in range(2)]

    results = await asyncio.gather(*(relay.drain() for relay in relays))

    ids = [mail.message_id for mail in smtp_server.mails]
    assert len(ids) == 2000
    assert len(set(ids)) == 2000
    assert sum(r.sent for r in results) == 2000
    assert all(r.sent > 0 for r in results), "both relays should have taken a share"
    stored = await row(
        engine, "SELECT count(*) FILTER (WHERE sent_at IS NULL) AS unsent FROM outbox"
    )
    assert stored["unsent"] == 0


async def test_relay_reopens_a_pooled_connection_the_server_dropped(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    """Regression: a pooled SMTP connection closed by the server while idle must not cost an
    attempt; the sender reconnects at once because nothing was sent on it yet."""
    registry = email_registry(smtp_server)
    relay = Relay(engine, registry, RelayConfig(concurrency=1))
    await enqueue_committed(engine, 1)
    assert (await relay.drain()).sent == 1
    smtp_server.stop()  # drops the pooled connection
    smtp_server.start()
    await enqueue_committed(engine, 1)

    result = await relay.drain()

    assert result.sent == 1, result
    assert len(smtp_server.mails) == 2
    stored = await row(engine, "SELECT max(attempts) AS n FROM outbox")
    assert stored["n"] == 1


async def test_relay_timeout_after_body_is_ambiguous_and_others_keep_flowing(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    smtp_server.stall = {"user0@example.test"}
    await enqueue_committed(engine, 5)
    relay = Relay(engine, email_registry(smtp_server, timeout=0.5), RelayConfig(send_timeout=1.0))

    result = await relay.drain()

    assert (result.sent, result.retrying) == (4, 1)
    stored = await row(
        engine,
        "SELECT attempts, last_error FROM outbox WHERE payload->>'to' = 'user0@example.test'",
    )
    assert "may have accepted" in str(stored["last_error"])
    assert relay.metrics.ambiguous._value.get() == 1
    assert {m.rcpt_tos[0] for m in smtp_server.mails} == {
        f"user{n}@example.test" for n in range(1, 5)
    }


async def test_relay_delivers_to_a_unicode_address_with_smtputf8(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    async with engine.begin() as conn:
        await enqueue(
            conn,
            topic="email",
            payload={"to": "用户@例子.广告", "subject": "你好 Zoë", "text": "Grüße"},
        )

    result = await Relay(engine, email_registry(smtp_server)).drain()

    assert result.sent == 1
    [mail] = smtp_server.mails
    assert mail.rcpt_tos == ("用户@例子.广告",)
    assert mail.message["Subject"] == "你好 Zoë"


async def test_a_batch_larger_than_concurrency_sends_every_wave_however_long_it_takes(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    """No transaction is held while handlers run, so a batch of many waves no longer has to
    release the rows it could not start within the send timeout: every row goes out, each
    attempt counted once. (The lock-holding relay released rows after ``send_timeout``.)"""
    await enqueue_committed(engine, 6)
    smtp_server.delay = 0.25
    relay = Relay(
        engine,
        email_registry(smtp_server),
        RelayConfig(batch_size=6, concurrency=1, send_timeout=0.4),
    )

    result = await relay.run_once()

    assert (result.claimed, result.sent, result.released) == (6, 6, 0)
    stored = await row(
        engine,
        "SELECT count(*) FILTER (WHERE sent_at IS NOT NULL AND attempts = 1 "
        "AND claimed_by IS NULL) AS settled FROM outbox",
    )
    assert stored["settled"] == 6


async def test_a_batch_runs_exactly_concurrency_handlers_at_once(engine: AsyncEngine) -> None:
    """A batch larger than --concurrency keeps that many sends in flight, never more."""
    slow = CountInFlight(0.01)
    registry = HandlerRegistry()
    registry.register("slow", slow)
    async with engine.begin() as conn:
        for n in range(40):
            await enqueue(conn, topic="slow", payload={"n": n})
    relay = Relay(engine, registry, RelayConfig(batch_size=40, concurrency=4))

    result = await relay.run_once()

    assert result.sent == 40
    assert slow.most == 4


async def test_a_send_past_the_send_timeout_is_cut_off_and_retried_while_the_rest_go_out(
    engine: AsyncEngine,
) -> None:
    async def handler(message: object) -> None:
        from outbox.message import OutboxMessage

        assert isinstance(message, OutboxMessage)
        if message.payload["n"] == 1:
            await asyncio.sleep(30)  # hangs
        if message.payload["n"] == 2:
            try:
                await asyncio.sleep(30)  # hangs, and swallows the first cancellation
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)

    registry = HandlerRegistry()
    registry.register("t", handler)
    async with engine.begin() as conn:
        for n in range(6):
            await enqueue(conn, topic="t", payload={"n": n})
    relay = Relay(engine, registry, RelayConfig(batch_size=6, concurrency=3, send_timeout=0.3))
    loop = asyncio.get_running_loop()
    began = loop.time()

    result = await relay.run_once()

    assert loop.time() - began < 2.0
    assert (result.sent, result.retrying) == (5, 1)
    stored = await row(
        engine,
        "SELECT attempts, sent_at IS NULL AS unsent, last_error FROM outbox "
        "WHERE payload->>'n' = '1'",
    )
    assert stored["attempts"] == 1 and stored["unsent"]
    assert "did not finish within the timeout" in str(stored["last_error"])
    # The worker that hit the timeout is not left cancelled: the next batch runs normally.
    async with engine.begin() as conn:
        await enqueue(conn, topic="t", payload={"n": 99})
    assert (await relay.run_once()).sent == 1


async def test_a_batch_cancelled_mid_send_is_rescued_at_once_by_the_next_relay(
    engine: AsyncEngine,
) -> None:
    """A shutdown's cancellation is not taken for a send timeout (see also test_watchdog): the
    row stays claimed, its attempt counted, and once the relay's owner lock is gone another relay
    takes it over at its first rescue, with the reason on the row."""
    registry = HandlerRegistry()
    calls: list[int] = []

    async def hang(message: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(30)

    registry.register("t", hang)
    async with engine.begin() as conn:
        await enqueue(conn, topic="t", payload={})
    relay = Relay(engine, registry, RelayConfig(send_timeout=5))
    batch = asyncio.create_task(relay.run_once())
    await asyncio.sleep(0.5)
    batch.cancel()

    try:
        await batch
    except asyncio.CancelledError:
        pass
    else:  # pragma: no cover - the assertion below explains
        raise AssertionError("run_once finished instead of being cancelled")
    stored = await row(engine, "SELECT attempts, sent_at, claimed_by FROM outbox")
    assert stored["attempts"] == 1 and stored["sent_at"] is None
    assert stored["claimed_by"] is not None

    result = await Relay(engine, registry).drain()

    assert result.sent == 1 and len(calls) == 2
    stored = await row(engine, "SELECT attempts, sent_at, claimed_by, last_error FROM outbox")
    assert stored["attempts"] == 2 and stored["sent_at"] is not None
    assert stored["claimed_by"] is None
    assert stored["last_error"] == "relay died while handling it"


async def test_bytes_in_flight_are_bounded_not_rows(engine: AsyncEngine) -> None:
    """A relay holds at most ``max_bytes_in_flight`` payload bytes (plus one message) claimed
    and not yet handled, whatever its concurrency and batch size: memory follows bytes, not rows
    (a batch of a hundred 10 MB messages used to land in one process at once)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox (topic, payload) SELECT 'big', jsonb_build_object('blob', "
                "(SELECT string_agg(md5(g::text || random()::text), '') "
                " FROM generate_series(1, 4000) AS g)) FROM generate_series(1, 12)"
            )
        )
        size = int(
            (await conn.execute(text("SELECT max(pg_column_size(payload)) FROM outbox"))).scalar()
            or 0
        )
    big = CountInFlight(0.05)
    registry = HandlerRegistry()
    registry.register("big", big)
    config = RelayConfig(batch_size=100, concurrency=16, max_bytes_in_flight=int(size * 2.5))
    relay = Relay(engine, registry, config)

    result = await relay.drain()

    assert size > 50_000  # md5 text does not compress much: the bound is about real bytes
    assert result.sent == 12
    assert big.most == 3  # 2.5 messages' bytes: two under the budget, and the one that crosses it


async def test_an_idle_relay_claims_once_per_notified_message_and_still_wakes_at_once(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    """At a low rate each claim takes the one row there is; the relay then waits for the next
    NOTIFY instead of claiming again for nothing while the mail goes out, and the next message
    is still sent long before the poll interval."""
    relay = Relay(
        engine,
        email_registry(smtp_server),
        RelayConfig(poll_interval=30),
        listen_dsn=engine_libpq_url(engine),
    )
    task = asyncio.create_task(relay.run())

    def claims() -> float:
        (family,) = relay.metrics.claim_seconds.collect()
        return next(s.value for s in family.samples if s.name.endswith("_count"))

    async with asyncio.timeout(10):
        while relay.listener is None or not relay.listener.connected or not claims():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # past the first claim(s) of the run
        before = claims()
        for n in range(5):
            async with engine.begin() as conn:
                await enqueue(conn, topic="email", payload=payload(n))
            while len(smtp_server.mails) < n + 1:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
    after = claims()
    relay.stop()
    await task
    assert after - before == 5
