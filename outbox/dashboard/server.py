"""``outbox admin``: the dashboard on a server of its own, at ``/admin``, behind a login.

Also answers ``/healthz`` (200 when the database answers, 503 otherwise) for a load balancer or
a supervisor, and sends ``/`` to ``/admin/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from outbox.dashboard.app import create_dashboard
from outbox.db import create_engine

APPLICATION_NAME = "outbox-admin"


def create_admin_server(database_url: str, *, password: str) -> Starlette:
    """The ``outbox admin`` app; its engine is disposed of when the server stops."""
    engine = create_engine(database_url, application_name=APPLICATION_NAME, pool_size=2)

    async def healthz(request: Request[Any]) -> Response:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any failure to answer is "not healthy", said in one line
            return JSONResponse({"status": "unavailable", "error": type(exc).__name__}, 503)
        return JSONResponse({"status": "ok"})

    async def home(request: Request[Any]) -> Response:
        return RedirectResponse("/admin/", status_code=303)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return Starlette(
        routes=[
            Route("/", home),
            Route("/healthz", healthz),
            Mount("/admin", create_dashboard(engine, password=password)),
        ],
        lifespan=lifespan,
    )


__all__ = ["create_admin_server"]
