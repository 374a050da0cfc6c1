"""`outbox discard` and `outbox admin` as an operator types them."""

from __future__ import annotations

import httpx
import psycopg

from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import cli_env, run_cli
from tests.acceptance.test_dashboard_browser import PASSWORD, insert_dead, row_exists, running_admin


def test_cli_help_lists_discard_and_admin() -> None:
    result = run_cli("--help", env=cli_env())
    assert "discard" in result.stdout and "admin" in result.stdout


def test_cli_discard_deletes_dead_messages_only(db_url: str) -> None:
    dead = [
        insert_dead(db_url, f"d{i}@example.com", "PermanentSendError: SMTP 550") for i in (1, 2, 3)
    ]
    with psycopg.connect(libpq_url(db_url)) as conn:
        row = conn.execute(
            "INSERT INTO outbox (topic, payload) VALUES ('email', '{}') RETURNING id"
        ).fetchone()
    assert row is not None
    pending = int(row[0])
    env = cli_env(DATABASE_URL=db_url)

    one = run_cli("discard", str(dead[0]), str(pending), env=env)
    assert one.returncode == 1
    assert one.stdout.strip() == f"discarded 1 dead message(s): [{dead[0]}]"
    assert one.stderr.strip() == f"not dead or not found (left alone): [{pending}]"
    rest = run_cli("discard", "--all-dead", env=env)
    assert rest.returncode == 0 and "discarded 2 dead message(s)" in rest.stdout
    assert [row_exists(db_url, i) for i in (*dead, pending)] == [False, False, False, True]

    both = run_cli("discard", "1", "--all-dead", env=env)
    neither = run_cli("discard", env=env)
    for result in (both, neither):
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "--all-dead" in result.stderr


def test_cli_admin_refuses_to_start_without_a_password(db_url: str) -> None:
    env = cli_env(DATABASE_URL=db_url)
    env.pop("ADMIN_PASSWORD", None)
    result = run_cli("admin", env=env, timeout=30)
    assert result.returncode == 2
    assert result.stderr == "outbox admin: ADMIN_PASSWORD is required (set in the environment)\n"


def test_cli_admin_serves_the_dashboard_behind_its_login(db_url: str) -> None:
    with running_admin(db_url) as base:
        home = httpx.get(f"{base}/", follow_redirects=True)
        assert home.url.path == "/admin/login" and "Dashboard password" in home.text
        token = home.text.split('name="csrf_token" value="')[1].split('"')[0]
        ok = httpx.post(
            f"{base}/admin/login",
            data={"csrf_token": token, "password": PASSWORD},
            cookies=home.cookies,
        )
        assert ok.status_code == 303
        overview = httpx.get(f"{base}/admin/", cookies=ok.cookies)
        assert overview.status_code == 200 and 'id="count-dead">0<' in overview.text
