"""How the peers send the mail: their natural idiom, with connections reused.

An ``EmailMessage`` built from the same fields the outbox payload carries, handed to aiosmtplib
(async peers: a pool of reused connections, one per concurrent job) or to smtplib (Celery: one
connection per worker process, kept open). The Message-ID is set from the job's own id so the
sink can match it with the producer's commit time.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
from email.message import EmailMessage
from email.utils import formatdate
from urllib.parse import urlsplit

import aiosmtplib

MAIL_FROM = "noreply@example.com"


def _target() -> tuple[str, int]:
    parts = urlsplit(os.environ["BENCH_SMTP_URL"])
    return parts.hostname or "127.0.0.1", parts.port or 25


def build(to: str, subject: str, text: str, message_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = MAIL_FROM
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{message_id}@example.com>"
    msg.set_content(text)
    return msg


class AsyncMailPool:
    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._slots: asyncio.Queue[aiosmtplib.SMTP | None] | None = None

    async def send(self, to: str, subject: str, text: str, message_id: str) -> None:
        if self._slots is None:
            self._slots = asyncio.Queue()
            for _ in range(self.size):
                self._slots.put_nowait(None)
        client = await self._slots.get()
        try:
            if client is None or not client.is_connected:
                host, port = _target()
                client = aiosmtplib.SMTP(hostname=host, port=port, timeout=30)
                await client.connect()
            await client.send_message(build(to, subject, text, message_id))
        except Exception:
            if client is not None:
                client.close()
            client = None
            raise
        finally:
            self._slots.put_nowait(client)


_sync_client: smtplib.SMTP | None = None


def send_sync(to: str, subject: str, text: str, message_id: str) -> None:
    global _sync_client
    if _sync_client is None:
        host, port = _target()
        _sync_client = smtplib.SMTP(host, port, timeout=30)
    try:
        _sync_client.send_message(build(to, subject, text, message_id))
    except (smtplib.SMTPException, OSError):
        _sync_client = None
        raise
