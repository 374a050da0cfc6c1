"""Take the README's dashboard screenshots: ``python -m tests.acceptance.dashboard_screenshots``.

Needs ``OUTBOX_TEST_DATABASE_URL`` (an admin URL, as for the tests) and Debian's chromium. It
fills a throwaway database with an hour of traffic (sent, retried and dead messages), starts a
real ``outbox admin``, logs in with headless Chromium and writes ``docs/dashboard-*.png``.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Literal

import psycopg

from outbox import migrate
from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import cli_env, start_cli, wait_healthy
from tests.conftest import _database_url
from web.capture import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "screenshot-password"


def _fill(db_url: str) -> int:
    """An hour of traffic on two topics; returns the id of a dead message to show."""
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload, created_at, available_at, sent_at, attempts,"
            " result)"
            " SELECT CASE WHEN g % 7 = 0 THEN 'welcome' ELSE 'email' END,"
            "  jsonb_build_object('to', 'user' || g || '@example.com', 'subject',"
            "   'Congratulations, you are a member of Outbox Demo now.', 'text', 'Click ...'),"
            "  t, t, t + interval '40 ms', 1, '250 2.0.0 Ok: queued as ' || g"
            " FROM generate_series(1, 6000) g,"
            "  LATERAL (SELECT now() - (g * g % 3557) * interval '1 s' AS t) s"
        )
        conn.execute(
            "INSERT INTO outbox (topic, payload, attempts, available_at, last_error)"
            " SELECT 'email', jsonb_build_object('to', 'slow' || g || '@example.net'), g % 4 + 1,"
            "  now() + g * interval '20 s',"
            "  'TransientSendError: SMTP 451 4.7.1 greylisted, try again later'"
            " FROM generate_series(1, 12) g"
        )
        conn.execute(
            "INSERT INTO outbox (topic, payload, available_at)"
            " SELECT 'email', jsonb_build_object('to', 'new' || g || '@example.org'),"
            "  now() - interval '95 s' FROM generate_series(1, 4) g"
        )
        row = conn.execute(
            "INSERT INTO outbox (topic, payload, created_at, attempts, dead_at, last_error)"
            " SELECT 'email', jsonb_build_object('to', 'nobody' || g || '@example.com',"
            "  'subject', 'Congratulations, you are a member of Outbox Demo now.',"
            "  'text', 'Open this link to confirm your address: https://example.com/users/verify"
            "?token=...'),"
            "  now() - g * interval '3 min', 1, now() - g * interval '3 min',"
            "  'PermanentSendError: SMTP 550 5.1.1 <nobody' || g || '@example.com>:"
            " Recipient address rejected: User unknown'"
            " FROM generate_series(1, 3) g RETURNING id"
        ).fetchone()
    assert row is not None
    return int(row[0])


def main() -> int:
    admin_url = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    chromium = shutil.which("chromium")
    if not admin_url or not chromium:
        print("needs OUTBOX_TEST_DATABASE_URL and chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from tests.acceptance.test_browser import CHROMIUM_FLAGS

    name = f"shots_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # a generated name, never input
    db_url = _database_url(admin_url, name)
    port = free_port()
    proc = None
    try:
        migrate.upgrade_url(db_url)
        dead_id = _fill(db_url)
        env = cli_env(DATABASE_URL=db_url, ADMIN_PASSWORD=PASSWORD)
        proc = start_cli("admin", "--port", str(port), env=env)
        base = f"http://127.0.0.1:{port}/admin"
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=60)
        docs = ROOT / "docs"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            schemes: tuple[tuple[Literal["light", "dark"], str], ...] = (
                ("light", ""),
                ("dark", "-dark"),
            )
            for scheme, suffix in schemes:
                page = browser.new_page(
                    viewport={"width": 1000, "height": 760}, color_scheme=scheme
                )
                page.goto(f"{base}/")
                if not suffix:
                    page.screenshot(path=docs / "dashboard-login.png")
                page.get_by_label("Dashboard password").fill(PASSWORD)
                page.get_by_role("button", name="Log in").click()
                page.wait_for_url(f"{base}/")
                page.screenshot(path=docs / f"dashboard-overview{suffix}.png", full_page=True)
                if suffix:
                    continue
                page.goto(f"{base}/messages?state=dead")
                page.screenshot(path=docs / "dashboard-messages.png")
                page.goto(f"{base}/messages/{dead_id}")
                page.screenshot(path=docs / "dashboard-message.png", full_page=True)
                page.goto(f"{base}/dead/discard")
                page.screenshot(path=docs / "dashboard-confirm.png")
            browser.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        with psycopg.connect(libpq_url(admin_url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
