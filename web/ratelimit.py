"""Rate limits for signup and resend, counted in PostgreSQL so they hold across web processes.

A fixed-window counter per bucket (``signup:ip:203.0.113.9``, ``resend:email:ann@x``): one
upsert per check increments the bucket's count for the current window, or starts a new window.
It runs in its own short transaction, before the request's real work, so a rejected request still
counts and an accepted one costs one small round trip. No new server: the database the app
already has keeps the counters.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from sqlalchemy import Column, DateTime, Integer, Table, Text, text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.errors import ConfigError
from web.settings import Settings
from web.users import metadata

rate_limits_table = Table(
    "rate_limits",
    metadata,
    Column("bucket", Text, primary_key=True),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("hits", Integer, nullable=False),
)

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


@dataclass(frozen=True)
class RateLimits:
    """The app's limits, parsed once at start-up so a typo fails there, not on a request."""

    per_ip: RateLimit | None
    per_email: RateLimit | None

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        return cls(
            per_ip=RateLimit.parse(settings.rate_limit_per_ip, name="RATE_LIMIT_PER_IP"),
            per_email=RateLimit.parse(settings.rate_limit_per_email, name="RATE_LIMIT_PER_EMAIL"),
        )

    def buckets(self, action: str, *, client: str, email: str) -> dict[str, RateLimit]:
        """The buckets one ``action`` ("signup", "resend") from ``client`` for ``email`` hits."""
        limits = {}
        if self.per_ip is not None:
            limits[f"{action}:ip:{client}"] = self.per_ip
        if self.per_email is not None:
            limits[f"{action}:email:{email.lower()}"] = self.per_email
        return limits


# Counts one hit on every bucket and returns each bucket's count in its current window. Window
# starts are aligned to multiples of the window length, so every process computes the same window
# from the database clock. Buckets are sorted by the caller so that two requests upserting the
# same buckets lock them in the same order (no deadlock).
_HIT = text(
    """
    WITH clock AS (SELECT extract(epoch FROM statement_timestamp()) AS t)
    INSERT INTO rate_limits AS r (bucket, window_start, hits)
    SELECT b.bucket, to_timestamp(floor((SELECT t FROM clock) / b.win) * b.win), 1
    FROM unnest(CAST(:buckets AS text[]), CAST(:windows AS integer[])) AS b(bucket, win)
    ON CONFLICT (bucket) DO UPDATE
    SET hits = CASE WHEN r.window_start = excluded.window_start THEN r.hits + 1 ELSE 1 END,
        window_start = excluded.window_start
    RETURNING r.bucket, r.hits, extract(epoch FROM r.window_start) AS start,
              (SELECT t FROM clock) AS now
    """
)
# Windows that ended long ago: swept now and then by whichever request happens to pass.
_SWEEP = text(
    "DELETE FROM rate_limits WHERE window_start < statement_timestamp() - interval '2 days'"
)
_SWEEP_PROBABILITY = 0.01


async def check(engine: AsyncEngine, limits: dict[str, RateLimit]) -> int | None:
    """Count a hit on every bucket of ``limits``.

    Returns ``None`` when every bucket is within its limit, else the seconds until the last
    exceeded window ends (the Retry-After value).
    """
    if not limits:
        return None
    buckets = sorted(limits)
    params = {"buckets": buckets, "windows": [limits[b].window_s for b in buckets]}
    async with engine.begin() as conn:
        rows = (await conn.execute(_HIT, params)).all()
        if random.random() < _SWEEP_PROBABILITY:
            await conn.execute(_SWEEP)
    waits = [
        float(start) + limits[bucket].window_s - float(now)
        for bucket, hits, start, now in rows
        if hits > limits[bucket].limit
    ]
    return max(1, math.ceil(max(waits))) if waits else None
