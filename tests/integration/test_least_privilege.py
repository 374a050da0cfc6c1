"""The app and a relay run under the least-privilege roles of docs/least-privilege.sql."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from outbox import Relay
from outbox.db import create_engine
from outbox.settings import libpq_url
from tests.integration.test_relay import email_registry
from tests.integration.test_web import make_settings, serve
from web.capture import CaptureServer

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "least-privilege.sql"


def as_role(db_url: str, role: str) -> str:
    return make_url(db_url).set(username=role, password=None).render_as_string(hide_password=False)


@pytest.fixture
def roles(db_url: str) -> tuple[str, str]:
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute(SCRIPT.read_text().encode())
    return as_role(db_url, "outbox_web"), as_role(db_url, "outbox_relay")


async def test_least_privilege_roles_run_signup_and_delivery(
    db_url: str, roles: tuple[str, str], smtp_server: CaptureServer
) -> None:
    web_url, relay_url = roles
    web_engine = create_engine(web_url, application_name="outbox-web")
    relay_engine = create_engine(relay_url, application_name="outbox-relay")
    try:
        async with serve(make_settings(web_url), web_engine) as client:
            answer = await client.post(
                "/users/register", json={"email": "least@example.com", "password": "x" * 12}
            )
            assert answer.status_code == 202
            again = await client.post(
                "/users/register", json={"email": "least@example.com", "password": "y" * 12}
            )
            assert again.status_code == 202
            result = await Relay(relay_engine, email_registry(smtp_server)).drain()
            assert result.sent == 2
            answers = []
            for mail in smtp_server.mails:  # the second signup's link voided the first one's
                body = mail.message.get_body(preferencelist=("plain",))
                assert body is not None
                token = str(body.get_content()).split("token=")[1].split()[0]
                assert (await client.get("/users/verify", params={"token": token})).status_code in (
                    200,
                    400,
                )
                confirmed = await client.post("/users/verify", json={"token": token})
                answers.append(confirmed.status_code)
            assert sorted(answers) == [200, 400]
    finally:
        await web_engine.dispose()
        await relay_engine.dispose()


@pytest.mark.parametrize(
    ("role", "sql"),
    [
        ("outbox_web", "SELECT payload FROM outbox"),
        ("outbox_web", "UPDATE outbox SET sent_at = now()"),
        ("outbox_web", "DELETE FROM outbox"),
        ("outbox_web", "SELECT password_hash FROM users"),
        ("outbox_web", "DELETE FROM users"),
        ("outbox_relay", "SELECT email FROM users"),
        ("outbox_relay", "INSERT INTO outbox (topic, payload) VALUES ('x', '{}')"),
    ],
)
def test_least_privilege_roles_are_refused_what_they_do_not_need(
    roles: tuple[str, str], role: str, sql: str
) -> None:
    url = roles[0] if role == "outbox_web" else roles[1]
    with (
        psycopg.connect(libpq_url(url)) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(sql.encode())
