"""What the lifespan hands every request: ``request.state["engine"]`` and friends, typed.

Its own module so ``app`` (which builds it) and ``routes`` (which reads it) need not import
each other.
"""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy.ext.asyncio import AsyncEngine

from web.metrics import Metrics
from web.passwords import HashGate
from web.ratelimit import RateLimits
from web.settings import Settings


class AppState(TypedDict):
    engine: AsyncEngine
    settings: Settings
    metrics: Metrics
    rate_limits: RateLimits
    hashing: HashGate


__all__ = ["AppState"]
