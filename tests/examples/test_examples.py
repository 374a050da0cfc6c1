"""The examples as their users would run them: sign up through the framework's own test client,
then a real `outbox relay` process delivers the mail to a real SMTP server on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from examples.fastapi_app.app import create_app as create_fastapi_app, setup_database
from examples.flask_app.app import create_app as create_flask_app
from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import cli_env, run_cli
from web.capture import CaptureServer

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def count(db_url: str, sql: str) -> int:
    with psycopg.connect(libpq_url(db_url)) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def relay_once(db_url: str, smtp: CaptureServer) -> None:
    result = run_cli("relay", "--once", env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp.url))
    assert result.returncode == 0, result.stderr


def test_flask_example_signup_mails_the_link_and_a_duplicate_mails_nothing(
    empty_db_url: str, smtp_server: CaptureServer
) -> None:
    migrated = subprocess.run(
        [ALEMBIC, "-c", "examples/flask_app/alembic.ini", "upgrade", "head"],
        cwd=ROOT,
        env=cli_env(DATABASE_URL=empty_db_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    client = create_flask_app(empty_db_url).test_client()

    signup = client.post(
        "/users/register", data={"email": "ann@example.test", "password": "correct horse"}
    )
    duplicate = client.post(
        "/users/register", data={"email": "ann@example.test", "password": "another one"}
    )

    assert signup.status_code == 303 and signup.headers["Location"] == "/users/register/success"
    assert duplicate.status_code == 409
    assert count(empty_db_url, "SELECT count(*) FROM outbox") == 1  # the rollback left nothing
    relay_once(empty_db_url, smtp_server)
    [mail] = smtp_server.mails
    assert mail.rcpt_tos == ("ann@example.test",)
    assert "/users/verify?token=" in mail.message.get_content()


def test_fastapi_example_signup_mails_the_link(
    empty_db_url: str, smtp_server: CaptureServer
) -> None:
    setup_database(empty_db_url)
    with TestClient(create_fastapi_app(empty_db_url, admin_password="pw")) as client:
        signup = client.post(
            "/users/register", data={"email": "bo@example.test"}, follow_redirects=False
        )
        duplicate = client.post(
            "/users/register", data={"email": "bo@example.test"}, follow_redirects=False
        )
        login = client.get("/admin/", follow_redirects=True)  # the mounted dashboard
    assert login.status_code == 200 and 'type="password"' in login.text
    assert signup.status_code == 303
    assert duplicate.status_code == 409
    assert count(empty_db_url, "SELECT count(*) FROM outbox") == 1
    relay_once(empty_db_url, smtp_server)
    [mail] = smtp_server.mails
    assert mail.rcpt_tos == ("bo@example.test",)
    assert mail.message["Subject"] == "Congratulations, you are a member of FastAPI Example now."
