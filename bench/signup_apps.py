"""Item 1's comparison apps: the seed's two versions and the floor, same contract as the real app.

Each is a small Starlette app with ``POST /users/register`` taking ``{"email", "password"}`` as
JSON and answering 202 ``{"status": "verification_sent"}``, writing the user row with the real
app's own statement (``web.users.create_user``) in one transaction, after hashing the password
with the real app's ``web.passwords.hash_password`` (argon2id in a worker thread). They differ
only in what happens to the verification mail (built with ``web.mails.verification_mail``):

- ``inline`` (the seed's first version): sent by the handler itself with aiosmtplib, after the
  commit and before answering;
- ``celery`` (the seed's second version): ``send_verification.delay(...)`` after the commit, a
  Celery task on RabbitMQ that a Celery worker sends with smtplib;
- ``nomail``: nothing is sent at all (the floor).

Run as ``python -m bench.signup_apps KIND --port N`` with ``BENCH_DATABASE_URL`` and
``BENCH_SMTP_URL`` in the environment (uvicorn, one worker process). The Celery worker is
``celery -A bench.signup_apps worker -Q bench_signup`` with ``BENCH_CELERY=1``.
"""

from __future__ import annotations

import argparse
import os
import smtplib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from celery import Celery  # in .venv-bench only; mypy skips it (pyproject.toml)
    from sqlalchemy.ext.asyncio import AsyncEngine

    from web.settings import Settings

QUEUE = "bench_signup"
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
KINDS = ("inline", "celery", "nomail")


def _smtp_target() -> tuple[str, int]:
    parts = urlsplit(os.environ["BENCH_SMTP_URL"])
    return parts.hostname or "127.0.0.1", parts.port or 25


def _settings() -> Settings:
    from web.settings import Settings

    return Settings(
        database_url=os.environ["BENCH_DATABASE_URL"],
        secret_key="bench",
        base_url="http://127.0.0.1:8000",
        mail_from="noreply@example.com",
    )


def _message(to: str, subject: str, text: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "noreply@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(text)
    return msg


# --- Celery (the seed's second version) -------------------------------------------------------


def celery_app() -> Celery:
    from celery import Celery

    app = Celery("bench_signup", broker=AMQP_URL)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="send_verification")  # type: ignore[untyped-decorator]  # Celery: Any here
    def send_verification(to: str, subject: str, text: str) -> None:
        host, port = _smtp_target()
        with smtplib.SMTP(host, port, timeout=30) as client:
            client.send_message(_message(to, subject, text))

    return app


app = celery_app() if os.environ.get("BENCH_CELERY") else None  # celery -A bench.signup_apps


# --- the web apps ------------------------------------------------------------------------------


def create_app(kind: str) -> Starlette:
    import aiosmtplib

    from outbox.db import create_engine
    from web.mails import verification_mail
    from web.passwords import hash_password
    from web.tokens import make_token
    from web.users import create_user

    settings = _settings()
    database_url = settings.database_url
    assert database_url is not None
    task = celery_app().tasks["send_verification"] if kind == "celery" else None
    state: dict[str, AsyncEngine] = {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        state["engine"] = create_engine(database_url, application_name=f"bench-{kind}")
        try:
            yield
        finally:
            await state["engine"].dispose()

    async def register(request: Request) -> Response:
        body = await request.json()
        email, password = body.get("email"), body.get("password")
        if not isinstance(email, str) or not isinstance(password, str) or len(password) < 8:
            return JSONResponse({"error": "invalid"}, status_code=400)
        password_hash = await hash_password(password)
        async with state["engine"].begin() as conn:
            user = await create_user(conn, email=email, password_hash=password_hash)
        if user is not None and kind != "nomail":
            token = make_token(settings, user_id=user.id, nonce=user.token_nonce)
            mail = verification_mail(settings, to=email, token=token)
            if kind == "inline":
                host, port = _smtp_target()
                await aiosmtplib.send(
                    _message(email, mail["subject"], mail["text"]),
                    hostname=host,
                    port=port,
                    timeout=30,
                )
            else:
                assert task is not None
                task.delay(to=email, subject=mail["subject"], text=mail["text"])
        return JSONResponse({"status": "verification_sent"}, status_code=202)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/users/register", register, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.kind),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
