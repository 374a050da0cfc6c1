"""Prometheus metrics for the web app, on a registry of its own.

A registry per app (not prometheus_client's global one) so two apps in one process, such as the
tests' many apps, never share or collide on counters.

Signups are counted by outcome of the request only (accepted / invalid / ...), deliberately not
"new account" vs "already registered": /metrics is readable by anyone who can reach the app, and
a counter that moved differently for known addresses would undo the no-enumeration answer.

Bounded by construction (issue 11, finding 1): every label takes values from a fixed set. The
method label was the raw method, and h11 accepts any token as a method: 30,000 made-up methods
grew the process by 150 MiB and /metrics to 162 MB. Methods outside ``KNOWN_METHODS`` are now
``other``. The text is built in a worker thread (``exposition_async``), never on the event loop,
and ``outbox web --metrics-port`` serves it on a listener of its own, off the app's port.
"""

from __future__ import annotations

from time import perf_counter

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = CONTENT_TYPE_LATEST
# RFC 9110's methods and PATCH (RFC 5789); anything else a client invents is counted as "other".
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def method_label(method: str) -> str:
    """The request's method if it is a known one, else ``other``."""
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The app's collectors and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.signups = Counter(
            "web_signups",
            "Signup requests by result: accepted, invalid, csrf, too_large, unsupported_type, "
            "rate_limited, busy (hashing full), disconnected.",
            ["result"],
            registry=self.registry,
        )
        self.verifications = Counter(
            "web_verifications",
            "Verification link clicks by result: verified, expired, invalid.",
            ["result"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "web_request_duration_seconds",
            "Time to answer an HTTP request, by method (or other), route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )

    async def exposition_async(self) -> bytes:
        """The Prometheus text format of the registry, built in a worker thread: with many
        series it takes long enough to stall every other request on the event loop."""
        return await anyio.to_thread.run_sync(generate_latest, self.registry)


class MetricsMiddleware:
    """Times every HTTP request (plain ASGI, so responses are never buffered).

    The route label is the matched route's path template (``/users/verify``), never the raw
    path, so label cardinality stays bounded whatever URLs clients invent.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None)
            self.metrics.request_duration.labels(
                method_label(scope["method"]),
                route if isinstance(route, str) else "unmatched",
                str(status),
            ).observe(perf_counter() - start)


__all__ = ["CONTENT_TYPE", "KNOWN_METHODS", "Metrics", "MetricsMiddleware", "method_label"]
