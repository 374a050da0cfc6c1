"""Run a Starlette app's lifespan the way an ASGI server does, for httpx.ASGITransport.

httpx's ASGITransport sends only HTTP requests: it never runs the lifespan, so the app's
``request.state`` (engine, settings) would be empty. ``lifespan_running`` plays the server's part
of the ASGI lifespan protocol (as uvicorn does): it starts the app's lifespan with a ``state``
dict, waits for ``startup.complete``, and hands back an ASGI app that gives every request a
shallow copy of that state. On exit it sends ``lifespan.shutdown`` and waits for the app. So the
tests go through the real lifespan code, middleware and all, with no extra dependency.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@asynccontextmanager
async def lifespan_running(app: ASGIApp) -> AsyncIterator[ASGIApp]:
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()

    async def send(message: Message) -> None:
        await from_app.put(message)

    async def run_lifespan() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        await app({**scope, "state": state}, to_app.get, send)

    task = asyncio.create_task(run_lifespan())
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        await task  # re-raises the app's own exception
        raise RuntimeError(f"lifespan startup failed: {started.get('message')}")

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    try:
        yield with_state
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        stopped = await from_app.get()
        await task
        if stopped["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"lifespan shutdown failed: {stopped.get('message')}")
