"""A person's path in a real browser: headless Chromium against `outbox dev`.

Runs wherever Chromium is installed; CI (`.ci/run`) installs Debian's chromium, and there a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.acceptance.dev_process import running_dev

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("CI must have Debian's chromium installed (.ci/run installs it)")
    pytest.skip("no chromium on this machine (apt-get install chromium); CI runs this test")


def test_browser_signup_read_mail_and_click_the_link(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with running_dev(tmp_path) as (base, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/users/register")
            page.get_by_label("Email address").first.fill("browser@example.com")
            page.get_by_label("Password").fill("correct horse battery")
            page.get_by_role("button", name="Sign up").click()
            page.wait_for_url(f"{base}/users/register/success")
            assert "inbox" in page.content().lower()

            page.goto(f"{base}/dev/mail")
            mail_link = page.get_by_role("link", name="Congratulations, you are a member of")
            for _ in range(100):  # the relay delivers within a moment; look again until then
                if mail_link.count():
                    break
                page.wait_for_timeout(200)
                page.reload()
            mail_link.first.click()
            page.get_by_role("link", name="/users/verify?token=").first.click()
            page.wait_for_url(f"{base}/users/verify?token=*")
            # The link's page changes nothing (mail scanners fetch links); the button confirms.
            assert page.get_by_role("heading", name="Confirm your email address").is_visible()
            assert "browser@example.com" in page.content()
            page.get_by_role("button", name="Confirm").click()
            page.wait_for_url(f"{base}/users/verify")
            assert page.get_by_role("heading", name="Your email address is confirmed").is_visible()
        finally:
            browser.close()
