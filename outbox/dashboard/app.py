"""The operator dashboard: a Starlette app to mount anywhere, e.g. ``app.mount("/admin", ...)``.

Pages are server-rendered HTML with one small stylesheet; the chart is SVG drawn on the server,
and the overview refreshes itself with a ``<meta http-equiv="refresh">``. Nothing is fetched from
another host and no script runs, so the Content-Security-Policy forbids scripts outright.

Looking is the default: every GET is read-only, and every change (retry, discard, log in or out)
is a POST carrying the session's CSRF token. The bulk actions ("Retry all dead", "Discard all
dead") are reached through a confirmation page that says how many messages they touch.

Links are built from the mount point the request came through (``root_path``), so the same app
works at ``/admin``, ``/ops/queue`` or behind a proxy's prefix.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from outbox import admin, queries as outbox_queries
from outbox.dashboard import auth, queries
from outbox.dashboard.chart import build_chart
from outbox.dashboard.queries import Cursor, State

logger = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_CSS = (_HERE / "static" / "dashboard.css").read_bytes()
REFRESH_S = 10
_MAX_FIELD = 300  # longest topic or search term taken from a query string

# Jinja2Templates(directory=...) autoescapes .html templates.
templates = Jinja2Templates(directory=_HERE / "templates")

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

# What an action reports on the page it redirects to. Only these fixed texts are shown, so a
# crafted link cannot put words of its own on the operator's screen.
NOTICES = {
    "retried": "Retried: the message is due now and the next relay run sends it.",
    "not-dead": "Nothing done: that message is not dead (any more).",
    "discarded": "Discarded: the dead message was deleted.",
    "retried-all": "Retried every dead message: they are due now.",
    "discarded-all": "Discarded the dead messages you confirmed (any that died since are kept).",
    "logged-out": "Logged out.",
}


def _ago(seconds: float | None) -> str:
    """``"4 s"``, ``"3 min"``, ``"2 h 5 min"``, ``"3 d 4 h"``: a duration at a glance."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _parse_time(value: Any) -> datetime | None:
    """An ISO time with its offset, as the confirmation form sends it; ``None`` otherwise."""
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _recipient(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


templates.env.filters["ago"] = _ago
templates.env.filters["when"] = _when
templates.env.filters["recipient"] = _recipient
templates.env.globals["state_of"] = queries.state_of


def create_dashboard(
    engine: AsyncEngine,
    *,
    password: str | None,
    secret_key: str | None = None,
    throttle: auth.LoginThrottle | None = None,
) -> Starlette:
    """The dashboard as an ASGI app. ``password=None``: no login (``outbox dev`` on 127.0.0.1).

    ``engine`` stays the caller's: the dashboard neither creates nor disposes of it.
    ``secret_key`` signs the session cookie (random per process when not given; pass one when
    several worker processes serve the dashboard). ``throttle`` bounds failed logins per client
    address (5 per 5 minutes by default, in this process's memory).
    """
    if password is not None and not password:
        raise ValueError("an empty dashboard password would let anyone in: pass None for none")
    codec = auth.SessionCodec(secret_key)
    limiter = throttle or auth.LoginThrottle()
    Handler = Callable[[Request[Any], auth.Session], Awaitable[Response]]

    def base(request: Request[Any]) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def render(
        request: Request[Any],
        name: str,
        session: auth.Session,
        *,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        notice = NOTICES.get(request.query_params.get("notice", ""))
        response = templates.TemplateResponse(
            request,
            name,
            {
                "base": base(request),
                "csrf_field": auth.CSRF_FIELD,
                "csrf_token": session.csrf,
                "logged_in": password is not None and session.authenticated,
                "notice": notice,
                "states": list(State),
                **context,
            },
            status_code=status_code,
            headers=HEADERS,
        )
        return response

    def set_session(request: Request[Any], response: Response, session: auth.Session) -> None:
        response.set_cookie(
            auth.COOKIE_NAME,
            codec.dump(session),
            max_age=auth.SESSION_MAX_AGE_S,
            path=base(request) + "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def redirect(request: Request[Any], path: str, **params: str) -> Response:
        query = f"?{urlencode(params)}" if params else ""
        return RedirectResponse(f"{base(request)}{path}{query}", status_code=303, headers=HEADERS)

    def page(
        handler: Handler, *, public: bool = False
    ) -> Callable[[Request[Any]], Awaitable[Response]]:
        """Load (or start) the session, send strangers to the login page, check every POST's
        CSRF token before the handler runs, and send a new session's cookie."""

        async def endpoint(request: Request[Any]) -> Response:
            session = codec.load(request.cookies.get(auth.COOKIE_NAME))
            fresh = session is None
            if session is None:
                session = auth.new_session(authenticated=False)
            if request.method == "POST":
                form = await request.form()
                if fresh or not auth.csrf_matches(session, form.get(auth.CSRF_FIELD)):
                    response = render(
                        request,
                        "error.html",
                        session,
                        status_code=403,
                        title="This form has expired",
                        detail="Nothing was changed. Go back, reload the page and try again.",
                    )
                    if fresh:
                        set_session(request, response, session)
                    return response
            if password is not None and not public and not session.authenticated:
                if request.method == "POST":
                    return PlainTextResponse("log in first", status_code=403, headers=HEADERS)
                target = request.url.path.removeprefix(base(request)) or "/"
                if request.url.query:
                    target += f"?{request.url.query}"
                return redirect(request, "/login", next=target)
            response = await handler(request, session)
            if fresh:
                set_session(request, response, session)
            return response

        return endpoint

    # The topic menu of the list pages: the per-topic counts read the whole unsent and dead sets,
    # too much for every page of a paged list, so their topic names are kept for REFRESH_S.
    known_topics: list[Any] = [float("-inf"), []]

    async def topic_names(conn: AsyncConnection) -> list[str]:
        if time.monotonic() - known_topics[0] > REFRESH_S:
            rows = await outbox_queries.count_by_topic(conn)
            known_topics[:] = [time.monotonic(), [row["topic"] for row in rows]]
        names: list[str] = known_topics[1]
        return names

    async def overview(request: Request[Any], session: auth.Session) -> Response:
        counts = await admin.status(engine)
        async with engine.connect() as conn:
            topics = await outbox_queries.count_by_topic(conn)
            known_topics[:] = [time.monotonic(), [row["topic"] for row in topics]]
            series = await queries.settled_per_minute(conn)
        return render(
            request,
            "overview.html",
            session,
            counts=counts,
            topics=topics,
            chart=build_chart(series),
            refresh_s=REFRESH_S,
            updated=datetime.now(UTC),
        )

    async def messages(request: Request[Any], session: auth.Session) -> Response:
        params = request.query_params
        state_text = params.get("state", "")
        if state_text and state_text not in State.__members__.values():
            return render(
                request,
                "error.html",
                session,
                status_code=400,
                title="No such state",
                detail="A message is pending, retrying, dead or sent.",
            )
        state = State(state_text) if state_text else None
        topic = params.get("topic", "").strip()[:_MAX_FIELD]
        q = params.get("q", "").strip()[:_MAX_FIELD]
        after = Cursor.decode(params.get("after", ""))
        async with engine.connect() as conn:
            found = await queries.list_messages(
                conn, state=state, topic=topic or None, q=q or None, after=after
            )
            topics = await topic_names(conn)
        filters = {"state": state_text, "topic": topic, "q": q}
        kept = {k: v for k, v in filters.items() if v}
        next_link = None
        if found.next is not None:
            next_link = (
                f"{base(request)}/messages?{urlencode({**kept, 'after': found.next.encode()})}"
            )
        first_link = f"{base(request)}/messages?{urlencode(kept)}" if after else None
        return render(
            request,
            "messages.html",
            session,
            rows=found.rows,
            state=state,
            topic=topic,
            q=q,
            topics=topics,
            next_link=next_link,
            first_link=first_link,
        )

    async def message(request: Request[Any], session: auth.Session) -> Response:
        message_id = int(request.path_params["id"])
        row = None
        if message_id <= queries.MAX_ID:
            async with engine.connect() as conn:
                row = await queries.get_message(conn, id=message_id)
        if row is None:
            return render(
                request,
                "error.html",
                session,
                status_code=404,
                title=f"No message {message_id}",
                detail="It was discarded or purged, or never existed.",
            )
        age = (row["now"] - row["created_at"]).total_seconds()
        due_in = (row["available_at"] - row["now"]).total_seconds()
        return render(
            request,
            "message.html",
            session,
            row=row,
            state=queries.state_of(row),
            payload=json.dumps(row["payload"], indent=2, ensure_ascii=False),
            age_s=age,
            due_in_s=due_in,
        )

    async def retry_one(request: Request[Any], session: auth.Session) -> Response:
        message_id = min(int(request.path_params["id"]), queries.MAX_ID)
        done = await admin.retry(engine, ids=[message_id], all_dead=False)
        return redirect(
            request, f"/messages/{message_id}", notice="retried" if done else "not-dead"
        )

    async def discard_one(request: Request[Any], session: auth.Session) -> Response:
        message_id = min(int(request.path_params["id"]), queries.MAX_ID)
        done = await admin.discard(engine, ids=[message_id], all_dead=False)
        if not done:
            return redirect(request, f"/messages/{message_id}", notice="not-dead")
        return redirect(request, "/messages", state="dead", notice="discarded")

    async def bulk(request: Request[Any], session: auth.Session) -> Response:
        action = request.path_params["action"]
        if action not in ("retry", "discard"):
            return render(
                request, "error.html", session, status_code=404, title="No such action", detail=""
            )
        if request.method == "POST":
            if action == "retry":
                await admin.retry(engine, ids=[], all_dead=True)
                return redirect(request, "/messages", state="dead", notice="retried-all")
            until = _parse_time((await request.form()).get("dead_until"))
            if until is None:
                return redirect(request, "/dead/discard")  # ask again
            await admin.discard(engine, ids=[], all_dead=True, dead_until=until)
            return redirect(request, "/messages", state="dead", notice="discarded-all")
        async with engine.connect() as conn:
            dead, latest = await queries.dead_summary(conn)
        return render(
            request,
            "confirm.html",
            session,
            action=action,
            dead=dead,
            dead_until=latest.isoformat() if latest else "",
        )

    async def login(request: Request[Any], session: auth.Session) -> Response:
        target = request.query_params.get("next", "/")
        # Only a path of this dashboard: never "//host" or "/\\host", which browsers read as
        # another site.
        if not target.startswith("/") or target[1:2] in ("/", "\\"):
            target = "/"
        if password is None:
            return redirect(request, target)
        if request.method == "GET":
            return render(request, "login.html", session, next=target, error=None)
        client = request.client.host if request.client else "unknown"
        wait = limiter.retry_after(client)
        if wait > 0:
            response = render(
                request,
                "login.html",
                session,
                status_code=429,
                next=target,
                error=f"Too many wrong passwords. Try again in {_ago(math.ceil(wait))}.",
            )
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        form = await request.form()
        given = form.get("password")
        if not isinstance(given, str) or not auth.password_matches(password, given):
            limiter.failed(client)
            return render(
                request,
                "login.html",
                session,
                status_code=401,
                next=target,
                error="Wrong password.",
            )
        limiter.succeeded(client)
        response = redirect(request, target)
        set_session(request, response, auth.new_session(authenticated=True))
        return response

    async def logout(request: Request[Any], session: auth.Session) -> Response:
        response = redirect(request, "/login" if password else "/", notice="logged-out")
        set_session(request, response, auth.new_session(authenticated=False))
        return response

    async def stylesheet(request: Request[Any]) -> Response:
        return Response(
            _CSS,
            media_type="text/css",
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    async def database_error(request: Request[Any], exc: Exception) -> Response:
        """The database is down or not migrated: say which, in the page, as a 503."""
        orig = getattr(exc, "orig", None)
        if isinstance(orig, psycopg.errors.UndefinedTable):
            title = "Database not migrated"
            detail = "Run outbox migrate (or alembic upgrade head), then reload."
        elif isinstance(exc, OperationalError | InterfaceError) or getattr(
            exc, "connection_invalidated", False
        ):
            title = "The database does not answer"
            detail = "Nothing is lost: relays wait for it too. Reload once it is back."
        else:
            raise exc
        logger.warning("dashboard: %s: %s", title, type(orig or exc).__name__)
        session = auth.new_session(authenticated=False)
        return render(request, "error.html", session, status_code=503, title=title, detail=detail)

    return Starlette(
        exception_handlers={DBAPIError: database_error},
        routes=[
            Route("/", page(overview), name="overview"),
            Route("/messages", page(messages), name="messages"),
            Route("/messages/{id:int}", page(message), name="message"),
            Route("/messages/{id:int}/retry", page(retry_one), methods=["POST"]),
            Route("/messages/{id:int}/discard", page(discard_one), methods=["POST"]),
            Route("/dead/{action}", page(bulk), methods=["GET", "POST"]),
            Route("/login", page(login, public=True), methods=["GET", "POST"]),
            Route("/logout", page(logout, public=True), methods=["POST"]),
            Route("/dashboard.css", stylesheet),
        ],
    )


__all__ = ["create_dashboard"]
