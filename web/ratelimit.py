"""Rate limits for signup and resend, counted in PostgreSQL so they hold across web processes.

A fixed-window counter per bucket: one bucket per (action, client network) and one per (action,
mailbox). Decisions of issue 11 (findings 6 and 7):

- **A refused request writes nothing.** The check reads the request's buckets first (locking the
  rows that exist, so concurrent requests for one bucket take turns) and counts a hit on every
  bucket only when all of them are within their limits. So a client that is over its own limit
  cannot spend anyone's per-address allowance, and cannot grow the table: before, every refused
  request still counted (12 requests an hour kept any address out) and wrote a new row per new
  address. Two requests for a bucket that has no row yet may both pass: a limit can be exceeded
  by the number of simultaneous first requests, never more.
- **Keys are HMAC-SHA256 digests** (keyed with ``SECRET_KEY``) of ``action:ip:<network>`` and
  ``action:email:<mailbox>``: the table holds no address, and a 6 KB ``X-Forwarded-For`` is a
  32-character key like any other (it was a 500: btree row too big).
- **Networks, not addresses**: an IPv6 client is counted per /64 (one customer's allocation;
  a /128 per request is free to an attacker), IPv4-mapped IPv6 as the IPv4 address.
- **Mailboxes, not spellings**: ``web.identity.mailbox_key``, so case, Unicode and ``+tag``
  variants of one mailbox share its bucket.
- **Cleanup runs outside requests** (``sweep_forever`` in the app's lifespan), in batches of
  ``SWEEP_BATCH`` rows, through the ``expires_at`` index. Before, 1 % of requests swept the whole
  table inside the request (0.2-0.44 s at a million rows).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import re
from dataclasses import dataclass

from sqlalchemy import Column, DateTime, Index, Integer, Table, Text, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.errors import ConfigError
from web.identity import mailbox_key
from web.settings import Settings
from web.users import metadata

logger = logging.getLogger(__name__)

rate_limits_table = Table(
    "rate_limits",
    metadata,
    Column("bucket", Text, primary_key=True),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("hits", Integer, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
Index("ix_rate_limits_expires_at", rate_limits_table.c.expires_at)

SWEEP_BATCH = 1000
SWEEP_INTERVAL_S = 300.0
SWEEP_FIRST_AFTER_S = 10.0
_IPV6_PREFIX = 64

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd]|second|minute|hour|day)\s*$")
_UNIT = {"s": 1, "second": 1, "m": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400}
_UNIT["day"] = 86400


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` requests per ``window_s`` seconds."""

    limit: int
    window_s: int

    @classmethod
    def parse(cls, spec: str, *, name: str) -> RateLimit | None:
        """``"20/hour"``, ``"5/10m"``, ``"100/1d"``; ``"off"`` (or ``"0"``) for no limit."""
        if spec.strip().lower() in ("off", "0", "none"):
            return None
        match = _SPEC.match(spec.lower())
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"{name} must look like 20/hour, 5/10m or off, not {spec!r}")
        window = int(match.group(2) or 1) * _UNIT[match.group(3)]
        return cls(limit=int(match.group(1)), window_s=window)


def client_network(host: str) -> str:
    """The unit a client is counted in: an IPv4 address, an IPv6 /64, or the text as given."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a proxy's odd header, "unknown"): hashed like the rest
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{_IPV6_PREFIX}", strict=False))
    return str(address)


@dataclass(frozen=True)
class RateLimits:
    """The app's limits, parsed once at start-up so a typo fails there, not on a request."""

    per_ip: RateLimit | None
    per_email: RateLimit | None
    key: bytes = b""

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        return cls(
            per_ip=RateLimit.parse(settings.rate_limit_per_ip, name="RATE_LIMIT_PER_IP"),
            per_email=RateLimit.parse(settings.rate_limit_per_email, name="RATE_LIMIT_PER_EMAIL"),
            key=(settings.secret_key or "").encode(),
        )

    def bucket(self, name: str) -> str:
        """The stored key of bucket ``name``: an HMAC digest, so no address is kept."""
        return hmac.new(self.key, name.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def buckets(self, action: str, *, client: str, email: str) -> dict[str, RateLimit]:
        """The buckets one ``action`` ("signup", "resend") from ``client`` for ``email`` hits."""
        limits = {}
        if self.per_ip is not None:
            limits[self.bucket(f"{action}:ip:{client_network(client)}")] = self.per_ip
        if self.per_email is not None:
            limits[self.bucket(f"{action}:email:{mailbox_key(email)}")] = self.per_email
        return limits


# The buckets' current rows, locked (in key order, so two requests never deadlock) until the
# transaction ends, and the transaction's clock: every statement of the check uses that one
# instant, so the window computed here is the window the upsert below writes. Uses the primary key.
_CURRENT = text(
    """
    SELECT extract(epoch FROM transaction_timestamp()) AS now,
           r.bucket, r.hits, extract(epoch FROM r.window_start) AS start
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT bucket, hits, window_start FROM rate_limits
        WHERE bucket = ANY(CAST(:buckets AS text[]))
        ORDER BY bucket
        FOR UPDATE
    ) AS r ON true
    """
)
# Counts one hit on every bucket (only after _CURRENT found all of them within their limits).
# Window starts are aligned to multiples of the window length, so every process computes the
# same window; ``expires_at`` is when the window's count stops mattering (the sweep's index).
_HIT = text(
    """
    WITH clock AS (SELECT extract(epoch FROM transaction_timestamp()) AS t)
    INSERT INTO rate_limits AS r (bucket, window_start, hits, expires_at)
    SELECT b.bucket, to_timestamp(floor((SELECT t FROM clock) / b.win) * b.win), 1,
           to_timestamp(floor((SELECT t FROM clock) / b.win) * b.win + b.win)
    FROM unnest(CAST(:buckets AS text[]), CAST(:windows AS integer[])) AS b(bucket, win)
    ORDER BY b.bucket
    ON CONFLICT (bucket) DO UPDATE
    SET hits = CASE WHEN r.window_start = excluded.window_start THEN r.hits + 1 ELSE 1 END,
        window_start = excluded.window_start,
        expires_at = excluded.expires_at
    """
)
# Expired windows, at most :batch rows per statement, oldest first, through
# ix_rate_limits_expires_at; SKIP LOCKED leaves rows a request holds right now to the next round.
_DELETE_EXPIRED = text(
    """
    DELETE FROM rate_limits WHERE bucket IN (
        SELECT bucket FROM rate_limits
        WHERE expires_at < statement_timestamp()
        ORDER BY expires_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    """
)


async def check(engine: AsyncEngine, limits: dict[str, RateLimit]) -> int | None:
    """Count a hit on every bucket of ``limits`` if all are within their limits.

    Returns ``None`` when the request may go on (and was counted), else the seconds until the
    last exceeded window ends (the Retry-After value); then nothing was written.
    """
    if not limits:
        return None
    buckets = sorted(limits)
    async with engine.begin() as conn:
        rows = (await conn.execute(_CURRENT, {"buckets": buckets})).all()
        now = float(rows[0].now)
        waits = []
        for row in rows:
            if row.bucket is None:
                continue
            window = limits[row.bucket].window_s
            current_start = math.floor(now / window) * window
            hits = int(row.hits) if float(row.start) == current_start else 0
            if hits >= limits[row.bucket].limit:
                waits.append(current_start + window - now)
        if waits:
            return max(1, math.ceil(max(waits)))
        windows = [limits[b].window_s for b in buckets]
        await conn.execute(_HIT, {"buckets": buckets, "windows": windows})
    return None


async def sweep(engine: AsyncEngine, *, batch: int = SWEEP_BATCH) -> int:
    """Delete every expired window, ``batch`` rows per short transaction; the rows deleted."""
    deleted = 0
    while True:
        async with engine.begin() as conn:
            count = (await conn.execute(_DELETE_EXPIRED, {"batch": batch})).rowcount
        deleted += count
        if count < batch:
            return deleted


async def sweep_forever(
    engine: AsyncEngine,
    *,
    interval_s: float = SWEEP_INTERVAL_S,
    first_after_s: float = SWEEP_FIRST_AFTER_S,
) -> None:
    """Run ``sweep`` every ``interval_s`` seconds until cancelled; a failed round is logged.

    The first round waits ``first_after_s``, so a server that is started and stopped at once
    (tests, a crash loop) does not sweep on every start.
    """
    await asyncio.sleep(first_after_s)
    while True:
        try:
            await sweep(engine)
        except (OSError, SQLAlchemyError) as exc:
            logger.warning(
                "rate limit cleanup failed: %s", type(exc).__name__, extra={"action": "sweep"}
            )
        await asyncio.sleep(interval_s)


__all__ = [
    "RateLimit",
    "RateLimits",
    "check",
    "client_network",
    "rate_limits_table",
    "sweep",
    "sweep_forever",
]
