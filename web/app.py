"""The application factory: settings in, a Starlette app out, nothing at import time.

No module-level engine or settings: ``create_app`` is called by ``outbox web`` / ``outbox dev``
(and by tests) with a ``Settings`` object, and the lifespan opens the database engine when the
server starts and disposes of it when it stops. Handlers reach both through ``request.state``.
The lifespan also runs the rate-limit cleanup (web.ratelimit.sweep_forever), outside requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute

from outbox.db import create_engine
from outbox.dberrors import missing_schema
from web import pages
from web.csrf import is_https
from web.headers import SecurityHeadersMiddleware
from web.metrics import Metrics, MetricsMiddleware
from web.passwords import HashGate
from web.ratelimit import RateLimits, sweep_forever
from web.routes import ROUTES
from web.settings import Settings
from web.state import AppState

APPLICATION_NAME = "outbox-web"
logger = logging.getLogger(__name__)


async def _not_migrated(request: Request, exc: Exception) -> Response:
    """A request that hit a missing table: 503 (the service is not ready, /healthz says why)
    and one log line for the operator, instead of a bare 500 and a traceback per request."""
    missing = missing_schema(exc)
    if missing is None:
        raise exc
    logger.error(
        "database not migrated (%s): run alembic upgrade head",
        missing,
        extra={"action": "check_schema"},
    )
    return PlainTextResponse(
        "Service unavailable: please try again later.",
        status_code=503,
        headers={"Retry-After": "60"},
    )


def create_app(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    extra_routes: Sequence[BaseRoute] | None = None,
    metrics: Metrics | None = None,
    metrics_route: bool = True,
    hash_gate: HashGate | None = None,
) -> Starlette:
    """Build the signup app; raise ``ConfigError`` at once if it could not work.

    ``engine``: use this engine instead of creating one from ``DATABASE_URL``; its owner keeps
    it (the app does not dispose of it). ``extra_routes`` are mounted after the app's own, for
    ``outbox dev``'s ``/dev/mail``. ``metrics``: the collectors to use (``outbox web
    --metrics-port`` serves the same ones on a listener of its own, and passes
    ``metrics_route=False`` so the public port has no /metrics). ``hash_gate``: the bound on
    concurrent password hashing (default: 2 per core, web.passwords).
    """
    settings.require("secret_key", "base_url", *(() if engine is not None else ("database_url",)))
    database_url = settings.database_url
    metrics = metrics or Metrics()
    rate_limits = RateLimits.from_settings(settings)
    hashing = hash_gate or HashGate()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        own = None
        if engine is None:
            assert database_url is not None  # checked above, when the app was built
            own = create_engine(database_url, application_name=APPLICATION_NAME)
        used = engine or own
        assert used is not None
        cleanup = asyncio.create_task(sweep_forever(used))
        try:
            yield AppState(
                engine=used,
                settings=settings,
                metrics=metrics,
                rate_limits=rate_limits,
                hashing=hashing,
            )
        finally:
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            if own is not None:
                await own.dispose()

    routes = [r for r in ROUTES if metrics_route or getattr(r, "path", None) != "/metrics"]
    app = Starlette(
        routes=[*routes, *(extra_routes or ())],
        middleware=[
            Middleware(SecurityHeadersMiddleware, https=is_https(settings)),
            Middleware(MetricsMiddleware, metrics=metrics),
        ],
        exception_handlers={ProgrammingError: _not_migrated, HTTPException: pages.http_error},
        lifespan=lifespan,
    )
    # A request for /users/register/ would be redirected to an absolute URL built from the Host
    # header (an attacker's host, through a cache or a confused proxy): answer 404 instead.
    app.router.redirect_slashes = False
    return app


__all__ = ["create_app"]
