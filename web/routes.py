"""The HTTP endpoints, thin: read input, call one use case, answer.

Every POST takes a form or a JSON body. A form post is answered with pages and redirects and must
carry the CSRF token; a JSON post is answered with JSON. Whatever the input, the answer is a
4xx with a message, never a 500, and a password is never echoed, logged or re-rendered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NoReturn

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from outbox.queries import missing_tables
from web import csrf, forms, pages, ratelimit, signup
from web.forms import FieldError, Submission
from web.metrics import CONTENT_TYPE
from web.openapi import DOCUMENT
from web.passwords import hash_password
from web.state import AppState
from web.tables import metadata as app_tables
from web.tokens import TokenExpiredError, TokenInvalidError, read_token
from web.users import mark_verified

logger = logging.getLogger(__name__)

SUCCESS_PATH = "/users/register/success"
# /healthz answers within this bound even when the database hangs (a load balancer's probe must
# get an answer, not a timeout of its own).
HEALTHZ_TIMEOUT_S = 2.0
# Every table the app reads or writes: the library's and the app's own (web.tables).
SCHEMA_TABLES = ("outbox", *sorted(app_tables.tables))
_SENT = {"status": "verification_sent"}
_EXPIRED_FORM = "This form has expired. Please try again."
_TOO_MANY = "Too many requests. Please wait a while and try again."


class _Rejected(Exception):
    """A request refused before any work, with the answer and the metrics label."""

    def __init__(self, reason: str, response: Response) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def _page(
    request: Request[AppState], name: str, *, status_code: int = 200, **context: object
) -> Response:
    settings = request.state["settings"]
    return pages.render(
        request,
        name,
        site_name=settings.site_name,
        secure_cookie=settings.link_base.startswith("https://"),
        status_code=status_code,
        **context,
    )


def _error(
    request: Request[AppState],
    error: FieldError,
    *,
    status: int,
    as_json: bool,
    form: str,
    email: str = "",
) -> Response:
    """A JSON error, or the register page again with the message next to the right form."""
    if as_json:
        return JSONResponse({"error": error.message, "field": error.field}, status_code=status)
    return _page(
        request,
        "register.html",
        status_code=status,
        form=form,
        error=error.message,
        field=error.field,
        email=email,
    )


async def _read(request: Request[AppState], *, form: str) -> Submission:
    """The decoded body, CSRF-checked if it is a form; raises ``_Rejected`` otherwise."""
    try:
        submission = await forms.read_submission(request)
    except forms.BodyError as exc:
        reason = {413: "too_large", 415: "unsupported_type"}.get(exc.status, "invalid")
        error = FieldError(None, exc.message)
        raise _Rejected(
            reason, _error(request, error, status=exc.status, as_json=exc.is_json, form=form)
        ) from None
    if not submission.is_json and not csrf.is_valid(request, submission.text(csrf.FIELD_NAME)):
        response = _error(
            request,
            FieldError(None, _EXPIRED_FORM),
            status=400,
            as_json=False,
            form=form,
            email=submission.text("email") or "",
        )
        raise _Rejected("csrf", response)
    return submission


def _reject_invalid(
    request: Request[AppState], submission: Submission, error: FieldError, *, form: str
) -> NoReturn:
    """A 400 for input that parsed but is not valid: the form again (with the address the user
    typed, never the password) or the JSON error."""
    response = _error(
        request,
        error,
        status=400,
        as_json=submission.is_json,
        form=form,
        email=submission.text("email") or "",
    )
    raise _Rejected("invalid", response)


async def _check_rate(
    request: Request[AppState], submission: Submission, *, action: str, email: str, form: str
) -> None:
    """Raise ``_Rejected`` with a 429 and Retry-After when this client or address is over its
    limit (counted in PostgreSQL, so the limit holds across web processes)."""
    state = request.state
    client = request.client.host if request.client else "unknown"
    buckets = state["rate_limits"].buckets(action, client=client, email=email)
    retry_after = await ratelimit.check(state["engine"], buckets)
    if retry_after is None:
        return
    error = FieldError(None, _TOO_MANY)
    response = _error(
        request, error, status=429, as_json=submission.is_json, form=form, email=email
    )
    response.headers["Retry-After"] = str(retry_after)
    raise _Rejected("rate_limited", response)


def _accepted(submission: Submission) -> Response:
    if submission.is_json:
        return JSONResponse(_SENT, status_code=202)
    return RedirectResponse(SUCCESS_PATH, status_code=303)


async def home(request: Request[AppState]) -> Response:
    return RedirectResponse("/users/register", status_code=303)


async def register_form(request: Request[AppState]) -> Response:
    return _page(request, "register.html")


async def register(request: Request[AppState]) -> Response:
    """Create the account (or mail the owner a notice); the same answer either way."""
    state = request.state
    try:
        submission = await _read(request, form="register")
        parsed = forms.parse_signup(submission)
        if isinstance(parsed, FieldError):
            _reject_invalid(request, submission, parsed, form="register")
        await _check_rate(request, submission, action="signup", email=parsed.email, form="register")
    except _Rejected as rejected:
        state["metrics"].signups.labels(rejected.reason).inc()
        return rejected.response
    password_hash = await hash_password(parsed.password)
    async with state["engine"].begin() as conn:
        await signup.register(
            conn, email=parsed.email, password_hash=password_hash, settings=state["settings"]
        )
    state["metrics"].signups.labels("accepted").inc()
    return _accepted(submission)


async def register_success(request: Request[AppState]) -> Response:
    return _page(request, "success.html")


async def resend(request: Request[AppState]) -> Response:
    """Mail a fresh link to an unverified account; the same answer for any valid address."""
    try:
        submission = await _read(request, form="resend")
        email = forms.parse_email(submission)
        if isinstance(email, FieldError):
            _reject_invalid(request, submission, email, form="resend")
        await _check_rate(request, submission, action="resend", email=email, form="resend")
    except _Rejected as rejected:
        return rejected.response
    async with request.state["engine"].begin() as conn:
        await signup.resend(conn, email=email, settings=request.state["settings"])
    return _accepted(submission)


async def verify(request: Request[AppState]) -> Response:
    """Mark the account verified; clicking again is fine; a bad or old link gets a 400 page."""
    state = request.state
    counter = state["metrics"].verifications
    try:
        claims = read_token(state["settings"], request.query_params.get("token", ""))
    except TokenExpiredError:
        counter.labels("expired").inc()
        return _page(request, "error.html", status_code=400, reason="expired")
    except TokenInvalidError:
        counter.labels("invalid").inc()
        return _page(request, "error.html", status_code=400, reason="invalid")
    async with state["engine"].begin() as conn:
        found = await mark_verified(conn, user_id=claims.user_id, email=claims.email)
    if not found:  # the account is gone (or the token names another address)
        counter.labels("invalid").inc()
        return _page(request, "error.html", status_code=400, reason="invalid")
    counter.labels("verified").inc()
    return _page(request, "verify.html", email=claims.email)


async def healthz(request: Request[AppState]) -> Response:
    """200 when the database answers within HEALTHZ_TIMEOUT_S and has the app's tables, 503 with
    a ``reason`` otherwise: an unmigrated database would fail every signup, so the server is not
    healthy just because ``SELECT 1`` works."""
    try:
        async with asyncio.timeout(HEALTHZ_TIMEOUT_S):
            async with request.state["engine"].connect() as conn:
                missing = await missing_tables(conn, SCHEMA_TABLES)
    except (TimeoutError, OSError, SQLAlchemyError) as exc:
        logger.warning(
            "database health check failed: %s",
            type(exc).__name__,
            extra={"action": "check_health"},
        )
        reason = f"database unreachable ({type(exc).__name__})"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    if missing:
        reason = f"database not migrated (no table {', '.join(missing)}): run alembic upgrade head"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request[AppState]) -> Response:
    """Prometheus text format, from the app's own registry."""
    return Response(request.state["metrics"].exposition(), media_type=CONTENT_TYPE)


async def openapi(request: Request[AppState]) -> Response:
    return JSONResponse(DOCUMENT)


ROUTES: list[BaseRoute] = [
    Route("/", home, methods=["GET"], name="home"),
    Route("/users/register", register_form, methods=["GET"], name="register_form"),
    Route("/users/register", register, methods=["POST"], name="register"),
    Route(SUCCESS_PATH, register_success, methods=["GET"], name="register_success"),
    Route("/users/verify", verify, methods=["GET"], name="verify"),
    Route("/users/verify/resend", resend, methods=["POST"], name="resend"),
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/metrics", metrics, methods=["GET"], name="metrics"),
    Route("/openapi.json", openapi, methods=["GET"], name="openapi"),
]

__all__ = ["HEALTHZ_TIMEOUT_S", "ROUTES"]
