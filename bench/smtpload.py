"""SMTP load with no database: the ceiling of item 2, and the sink's own capacity.

``bare``: the bare aiosmtplib loop. ``procs`` processes, each with ``conns`` reused connections,
send pre-rendered mails as fast as they can: what a Python SMTP client can do here, with nothing
else in the way. The relay's throughput is compared with this, at the same process and
connection counts.

``blast``: a minimal pipelining client (raw asyncio, 20 mails per round trip) that drives the
sink as hard as a client can, to show how far the sink is from being the limit.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from functools import partial
from multiprocessing.synchronize import Event
from typing import cast

import aiosmtplib

from bench.sink import Sink
from bench.stats import rate_10_90


def sample_mail(i: int = 0, message_id: str | None = None) -> tuple[str, list[str], bytes]:
    """The verification-like mail every system sends: envelope and DATA bytes."""
    from outbox.smtp import render_email

    mail = render_email(
        email_payload(i),
        message_id=uuid.UUID(message_id) if message_id else uuid.uuid4(),
        mail_from="noreply@example.com",
    )
    return mail.sender, mail.recipients, mail.data


SUBJECT = "Congratulations, you are a member of Outbox Demo now."
TEXT = (
    "Hello,\n\nWelcome to Outbox Demo. Please confirm your address by opening this link:\n\n"
    "http://127.0.0.1:8000/users/verify?token=eyJ1aWQiOjEyMzQ1LCJlbWFpbCI6InVzZXJAZXhhbXBsZS5jb20ifQ"
    ".ZxY1Ab.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU\n\n"
    "The link is valid for 48 hours. If you did not sign up, ignore this mail.\n"
)


def email_payload(i: int) -> dict[str, str]:
    return {"to": f"user{i}@example.com", "subject": SUBJECT, "text": TEXT}


async def _bare_worker(host: str, port: int, conns: int, n: int) -> None:
    sender, rcpts, data = sample_mail()
    per = [n // conns + (1 if k < n % conns else 0) for k in range(conns)]

    async def one(count: int) -> None:
        client = aiosmtplib.SMTP(hostname=host, port=port, timeout=30)
        await client.connect()
        for _ in range(count):
            await client.sendmail(sender, rcpts, data)
        await client.quit()

    await asyncio.gather(*(one(c) for c in per if c))


def _bare_proc(host: str, port: int, conns: int, n: int, go: Event) -> None:
    go.wait()
    asyncio.run(_bare_worker(host, port, conns, n))


def bare(sink: Sink, *, procs: int, conns: int, total: int) -> float:
    """Mails/s of ``procs`` bare aiosmtplib processes (10-90 % window of the sink's times)."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    per = total // procs
    ps = [
        ctx.Process(target=_bare_proc, args=(sink.host, sink.port, conns, per, go))
        for _ in range(procs)
    ]
    sink.reset()
    for p in ps:
        p.start()
    time.sleep(0.5)  # let them import
    go.set()
    for p in ps:
        p.join(600)
    times, _ = sink.records()
    return rate_10_90(times)


class _Blaster(asyncio.Protocol):
    def __init__(
        self, chunk: bytes, per_round: int, rounds: int, done: asyncio.Future[None]
    ) -> None:
        self.chunk, self.per_round, self.rounds, self.done = chunk, per_round, rounds, done
        self.seen = 0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's transport
        self.transport.write(b"EHLO blaster\r\n" + self.chunk)

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        self.seen += data.count(b"queued\r\n")
        self.tail = data[-8:]
        if self.seen >= self.per_round:
            self.seen -= self.per_round
            self.rounds -= 1
            if self.rounds <= 0:
                self.transport.write(b"QUIT\r\n")
                if not self.done.done():
                    self.done.set_result(None)
            else:
                self.transport.write(self.chunk)


async def _blast(host: str, port: int, conns: int, n: int) -> None:
    _, rcpts, data = sample_mail()
    one = b"MAIL FROM:<noreply@example.com>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpts[0].encode()
    one += data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"
    per_round = 20
    rounds = max(1, n // (conns * per_round))
    loop = asyncio.get_running_loop()
    futures = []
    for _ in range(conns):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            partial(_Blaster, one * per_round, per_round, rounds, done), host, port
        )
        futures.append(done)
    await asyncio.gather(*futures)


def _blast_proc(host: str, port: int, conns: int, n: int, go: Event) -> None:
    go.wait()
    asyncio.run(_blast(host, port, conns, n))


def blast(sink: Sink, *, procs: int = 1, conns: int = 4, total: int = 20000) -> float:
    """Mails/s the sink takes from a minimal pipelining client: the sink's capacity here."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    ps = [
        ctx.Process(target=_blast_proc, args=(sink.host, sink.port, conns, total // procs, go))
        for _ in range(procs)
    ]
    sink.reset()
    for p in ps:
        p.start()
    time.sleep(0.5)
    go.set()
    for p in ps:
        p.join(600)
    times, _ = sink.records()
    return rate_10_90(times)
