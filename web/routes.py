"""The HTTP endpoints, thin: read input, call one use case, answer.

Every POST takes a form or a JSON body. A form post is answered with pages and redirects and must
carry the CSRF token; a JSON post is answered with JSON. Whatever the input, the answer is a
4xx with a message, never a 500, and a password is never echoed, logged or re-rendered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
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
from web.passwords import HashingBusyError, hash_password
from web.state import AppState
from web.tables import metadata as app_tables
from web.tokens import TokenClaims, TokenExpiredError, TokenInvalidError, read_token
from web.users import find_by_token, mark_verified

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
_BAD_TOKEN = "The link is not valid (tampered, expired or replaced)."
_BUSY = "The server is busy. Please try again in a moment."
# Seconds a client is asked to wait when every password-hashing slot is taken.
BUSY_RETRY_AFTER_S = 2


class _Rejected(Exception):
    """A request refused before any work, with the answer and the metrics label."""

    def __init__(self, reason: str, response: Response) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def _page(
    request: Request[AppState], name: str, *, status_code: int = 200, **context: object
) -> Response:
    return pages.render(
        request, name, settings=request.state["settings"], status_code=status_code, **context
    )


def _error(
    request: Request[AppState],
    error: FieldError | Sequence[FieldError],
    *,
    status: int,
    as_json: bool,
    form: str,
    email: str = "",
) -> Response:
    """A JSON error, or the register page again with every message next to its field.

    JSON keeps DESIGN.md's ``{"error", "field"}`` (the first problem) and adds ``"errors"``, the
    list of all of them, so a client can show every one at once as the page does.
    """
    errors = [error] if isinstance(error, FieldError) else list(error)
    first = errors[0]
    if as_json:
        return JSONResponse(
            {
                "error": first.message,
                "field": first.field,
                "errors": [{"error": e.message, "field": e.field} for e in errors],
            },
            status_code=status,
        )
    return _page(
        request,
        "register.html",
        status_code=status,
        form=form,
        error=first.message,
        field=first.field,
        errors=errors,
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
    except forms.DisconnectedError:
        raise _Rejected("disconnected", Response(status_code=400)) from None
    settings = request.state["settings"]
    if not submission.is_json and not csrf.is_valid(
        request, submission.text(csrf.FIELD_NAME), settings
    ):
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
    request: Request[AppState],
    submission: Submission,
    error: FieldError | Sequence[FieldError],
    *,
    form: str,
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
        if isinstance(parsed, list):
            _reject_invalid(request, submission, parsed, form="register")
        async with _hashing_place(request, submission):
            await _check_rate(
                request, submission, action="signup", email=parsed.email, form="register"
            )
            password_hash = await hash_password(parsed.password, gate=state["hashing"])
    except _Rejected as rejected:
        state["metrics"].signups.labels(rejected.reason).inc()
        return rejected.response
    async with state["engine"].begin() as conn:
        await signup.register(
            conn, email=parsed.email, password_hash=password_hash, settings=state["settings"]
        )
    state["metrics"].signups.labels("accepted").inc()
    return _accepted(submission)


@asynccontextmanager
async def _hashing_place(request: Request[AppState], submission: Submission) -> AsyncIterator[None]:
    """A place in the hashing gate, or ``_Rejected`` with a 503 and Retry-After when it is full
    (web.passwords: hashing is bounded, never queued without end)."""
    try:
        async with request.state["hashing"].admit():
            yield
    except HashingBusyError:
        response = _error(
            request,
            FieldError(None, _BUSY),
            status=503,
            as_json=submission.is_json,
            form="register",
            email=submission.text("email") or "",
        )
        response.headers["Retry-After"] = str(BUSY_RETRY_AFTER_S)
        raise _Rejected("busy", response) from None


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


def _claims(request: Request[AppState], token: str) -> TokenClaims | Response:
    """The token's claims, or the 400 page (counted) for a bad or expired token."""
    counter = request.state["metrics"].verifications
    try:
        return read_token(request.state["settings"], token)
    except TokenExpiredError:
        counter.labels("expired").inc()
        return _page(request, "error.html", status_code=400, reason="expired")
    except TokenInvalidError:
        counter.labels("invalid").inc()
        return _page(request, "error.html", status_code=400, reason="invalid")


def _superseded(request: Request[AppState]) -> Response:
    """The account is gone, or a later signup replaced the link (or the address changed)."""
    request.state["metrics"].verifications.labels("invalid").inc()
    return _page(request, "error.html", status_code=400, reason="invalid")


async def verify_page(request: Request[AppState]) -> Response:
    """The page a mailed link opens: names the address and shows a Confirm button.

    It changes nothing (nor does HEAD): mail scanners and link previews fetch links, and the
    first version verified on GET, so a scanner confirmed an account nobody had looked at.
    """
    claims = _claims(request, request.query_params.get("token", ""))
    if isinstance(claims, Response):
        return claims
    async with request.state["engine"].connect() as conn:
        user = await find_by_token(conn, user_id=claims.user_id, nonce=claims.nonce)
    if user is None:
        return _superseded(request)
    return _page(
        request,
        "confirm.html",
        email=user.email,
        token=request.query_params["token"],
        verified=user.verified_at is not None,
    )


async def verify(request: Request[AppState]) -> Response:
    """Confirm: set verified_at (a second confirm is fine); a bad or old token gets a 400 page.

    A form post (field ``token`` and the CSRF field) is answered with pages; a JSON post
    (``{"token": ...}``) with JSON.
    """
    state = request.state
    try:
        submission = await _read(request, form="resend")
    except _Rejected as rejected:
        return rejected.response
    claims = _claims(request, submission.text("token") or "")
    if isinstance(claims, Response):
        if submission.is_json:
            return _json_token_error(claims.status_code)
        return claims
    async with state["engine"].begin() as conn:
        user = await mark_verified(conn, user_id=claims.user_id, nonce=claims.nonce)
    if user is None:
        response = _superseded(request)
        return _json_token_error(400) if submission.is_json else response
    state["metrics"].verifications.labels("verified").inc()
    if submission.is_json:
        return JSONResponse({"status": "verified"})
    return _page(request, "verify.html", email=user.email)


def _json_token_error(status: int) -> Response:
    return JSONResponse(
        {
            "error": _BAD_TOKEN,
            "field": "token",
            "errors": [{"error": _BAD_TOKEN, "field": "token"}],
        },
        status_code=status,
    )


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
    body = await request.state["metrics"].exposition_async()
    return Response(body, media_type=CONTENT_TYPE)


async def openapi(request: Request[AppState]) -> Response:
    return JSONResponse(DOCUMENT)


ROUTES: list[BaseRoute] = [
    Route("/", home, methods=["GET"], name="home"),
    Route("/users/register", register_form, methods=["GET"], name="register_form"),
    Route("/users/register", register, methods=["POST"], name="register"),
    Route(SUCCESS_PATH, register_success, methods=["GET"], name="register_success"),
    Route("/users/verify", verify_page, methods=["GET"], name="verify_page"),
    Route("/users/verify", verify, methods=["POST"], name="verify"),
    Route("/users/verify/resend", resend, methods=["POST"], name="resend"),
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/metrics", metrics, methods=["GET"], name="metrics"),
    Route("/openapi.json", openapi, methods=["GET"], name="openapi"),
]

__all__ = ["BUSY_RETRY_AFTER_S", "HEALTHZ_TIMEOUT_S", "ROUTES"]
