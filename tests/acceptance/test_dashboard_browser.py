"""An operator's path through the dashboard in a real browser, against a real `outbox admin`.

Headless Chromium logs in (after a wrong password is refused), finds a dead message, opens it,
retries it, watches it show as sent once `outbox relay --once` has delivered it to a real SMTP
server, and discards another dead message.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import cli_env, run_cli, start_cli, wait_healthy
from tests.acceptance.test_browser import CHROMIUM_FLAGS, _chromium
from web.capture import CaptureServer, free_port

pytestmark = pytest.mark.browser

PASSWORD = "dashboard-test-password"


def insert_dead(db_url: str, to: str, error: str) -> int:
    with psycopg.connect(libpq_url(db_url)) as conn:
        row = conn.execute(
            "INSERT INTO outbox (topic, payload, attempts, dead_at, last_error)"
            " VALUES ('email', jsonb_build_object('to', %s::text, 'subject', 'Hello',"
            " 'text', 'Body'), 15, now(), %s) RETURNING id",
            (to, error),
        ).fetchone()
    assert row is not None
    return int(row[0])


def row_exists(db_url: str, row_id: int) -> bool:
    with psycopg.connect(libpq_url(db_url)) as conn:
        return conn.execute("SELECT 1 FROM outbox WHERE id = %s", (row_id,)).fetchone() is not None


@contextmanager
def running_admin(db_url: str) -> Iterator[str]:
    port = free_port()
    proc = start_cli(
        "admin", "--port", str(port), env=cli_env(DATABASE_URL=db_url, ADMIN_PASSWORD=PASSWORD)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=60)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dashboard_browser_login_retry_until_sent_and_discard(
    db_url: str, smtp_server: CaptureServer
) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = _chromium()
    retried = insert_dead(db_url, "retry-me@example.com", "PermanentSendError: SMTP 550 try later")
    discarded = insert_dead(db_url, "drop-me@example.com", "PermanentSendError: SMTP 550 gone")

    with running_admin(db_url) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/admin/")
            page.wait_for_url(f"{base}/admin/login?next=*")
            page.get_by_label("Dashboard password").fill("not the password")
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("alert")).to_have_text("Wrong password.")
            page.get_by_label("Dashboard password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(f"{base}/admin/")
            expect(page.locator("#count-dead")).to_have_text("2")

            page.get_by_role("link", name="Dead").first.click()
            page.wait_for_url(f"{base}/admin/messages?state=dead")
            page.get_by_role("link", name=str(retried), exact=True).click()
            expect(page.get_by_text("SMTP 550 try later")).to_be_visible()
            page.get_by_role("button", name="Retry").click()
            expect(page.get_by_role("status")).to_contain_text("Retried")
            expect(page.locator("h1 .state")).to_have_text("retrying")

            relay = run_cli(
                "relay", "--once", env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_server.url)
            )
            assert relay.returncode == 0, relay.stderr
            page.reload()
            expect(page.locator("h1 .state")).to_have_text("sent")
            expect(page.get_by_text("250")).to_be_visible()  # the server's reply
            assert [m.rcpt_tos for m in smtp_server.mails] == [("retry-me@example.com",)]

            page.goto(f"{base}/admin/messages/{discarded}")
            page.get_by_role("button", name="Discard").click()
            expect(page.get_by_role("status")).to_contain_text("Discarded")
            expect(page.get_by_role("link", name=str(discarded), exact=True)).to_have_count(0)
            assert not row_exists(db_url, discarded)
            assert row_exists(db_url, retried)
        finally:
            browser.close()
