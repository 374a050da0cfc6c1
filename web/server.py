"""``outbox web``: the signup app under uvicorn, with the limits an open port needs.

Everything about the listening server is decided here (``outbox.cli`` only passes its flags), so
the production recipe and its tests share one code path. Issue 11's findings 1, 4, 7 and 8:

- **Slow clients are cut off.** uvicorn's ``timeout_keep_alive`` covers the idle time between
  requests, not a request in progress: a client sending a byte a second was served forever, and
  1,100 such connections exhausted a 1,024-descriptor limit. Here the request line and headers
  must arrive within ``client_timeout`` seconds of the connection (or of the next request's first
  byte), else the connection is closed (``HeaderDeadlineProtocol``), and the body within
  ``client_timeout`` seconds of the headers, else a 408 and the connection closed
  (``BodyDeadlineMiddleware``). Default 10 s: a phone on a poor link sends a signup form in well
  under a second. The soft descriptor limit is raised to the hard one at start (``RLIMIT_NOFILE``):
  connections still being read hold a descriptor for at most ``client_timeout`` seconds.
- **No proxy is trusted unless configured** (``TRUSTED_PROXIES``): uvicorn by default believes
  ``X-Forwarded-For`` from 127.0.0.1, so anything on the host (or a proxy that passes the header
  through) chose its own rate-limit bucket.
- **/metrics on a listener of its own** with ``metrics_port`` (prometheus_client's threaded
  server, as ``outbox relay`` does), and then not on the public port.
- **Nothing identifies the server** (no ``server: uvicorn``), and the access log never shows a
  query string (the verification token was logged with every click).
- **One process.** ``--workers`` is refused: run one ``outbox web`` per core (systemd template
  unit, README) behind the proxy instead; each process keeps its own metrics listener.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
import uvicorn
from prometheus_client import start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from web.app import create_app
from web.metrics import Metrics
from web.settings import Settings

CLIENT_TIMEOUT_S = 10.0

logger = logging.getLogger(__name__)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take too long.

    The deadline starts when the connection is made, and again with the first byte of each
    next request on a kept-alive connection; it ends when h11 has a whole request head.
    """

    header_timeout_s = CLIENT_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._header_timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class BodyDeadlineMiddleware:
    """Answers 408 and closes the connection when the body is not complete ``timeout_s``
    seconds after the request's headers; the app sees a disconnect."""

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False
        timed_out = False
        started = False

        async def receive_by_deadline() -> Message:
            nonlocal body_done, timed_out
            if timed_out:
                return {"type": "http.disconnect"}
            if body_done:  # the app waits for a disconnect now: no deadline on that
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_unless_cut(message: Message) -> None:
            nonlocal started
            if timed_out and not started:
                return  # the app's answer to the "disconnect"; ours goes out below
            started = True
            await send(message)

        await self.app(scope, receive_by_deadline, send_unless_cut)
        if timed_out and not started:
            await send(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [(b"connection", b"close"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})


class QueryFreeAccessLog(logging.Filter):
    """Drops the query string from uvicorn's access log lines: it can hold a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].partition("?")[0], *args[3:])
        return True


def raise_open_files_limit() -> int:
    """Raise the soft descriptor limit to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def uvicorn_config(
    settings: Settings,
    *,
    host: str,
    port: int,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    client_timeout_s: float = CLIENT_TIMEOUT_S,
) -> uvicorn.Config:
    """The uvicorn configuration of ``outbox web``; starts the metrics listener if asked."""
    metrics = Metrics()
    app: ASGIApp = create_app(settings, metrics=metrics, metrics_route=metrics_port is None)
    app = BodyDeadlineMiddleware(app, timeout_s=client_timeout_s)
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)

    class Protocol(HeaderDeadlineProtocol):
        header_timeout_s = client_timeout_s

    trusted = settings.trusted_proxies
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": Protocol,
        "log_config": None,
        "server_header": False,
        "proxy_headers": trusted is not None,
        "forwarded_allow_ips": trusted if trusted is not None else "",
        "lifespan": "on",
    }
    return uvicorn.Config(app, **options)


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    client_timeout_s: float = CLIENT_TIMEOUT_S,
) -> None:
    """Run ``outbox web`` until SIGINT/SIGTERM (uvicorn's own handling)."""
    files = raise_open_files_limit()
    logging.getLogger("uvicorn.access").addFilter(QueryFreeAccessLog())
    config = uvicorn_config(
        settings,
        host=host,
        port=port,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        client_timeout_s=client_timeout_s,
    )
    logger.info(
        "clients get %.0f s for headers and %.0f s for a body; %d open files allowed",
        client_timeout_s,
        client_timeout_s,
        files,
        extra={"action": "start_web"},
    )
    uvicorn.Server(config).run()


__all__ = [
    "CLIENT_TIMEOUT_S",
    "BodyDeadlineMiddleware",
    "HeaderDeadlineProtocol",
    "QueryFreeAccessLog",
    "raise_open_files_limit",
    "serve",
    "uvicorn_config",
]
