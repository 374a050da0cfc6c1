"""The pages in a real browser at a phone's width (390 px), in the light and the dark scheme.

Headless Chromium (driven as in test_browser.py) against the app served by uvicorn in a thread,
with /dev/mail mounted on a capture server that real SMTP delivers to. It checks what only a
browser can: that nothing is wider than the phone (``scrollWidth <= 390``, also read off the
screenshot), that the colours the browser computes meet WCAG AA against the background the text
actually sits on, and that the HTML part of a mail is shown without its script running.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
import uvicorn

from tests.acceptance.test_browser import CHROMIUM_FLAGS, _chromium
from tests.integration.dev_mail_fixtures import (
    HOSTILE_HTML,
    LONG_LINK,
    SCRIPT_MARK,
    deliver,
)
from tests.unit.test_contrast import AA_NORMAL_TEXT, contrast_ratio
from web.app import create_app
from web.capture import CaptureServer, free_port
from web.devmail import dev_mail_routes
from web.mails import FIRST_LINE, verification_mail
from web.settings import Settings

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

pytestmark = pytest.mark.browser

PHONE: ViewportSize = {"width": 390, "height": 844}

# The colour of an element's text and of the first opaque background behind it.
_COLOURS = """el => {
  const rgb = s => s.match(/[\\d.]+/g).map(Number);
  let bg = el, back = [0, 0, 0, 0];
  while (bg) {
    back = rgb(getComputedStyle(bg).backgroundColor);
    if (back.length < 4 || back[3] > 0) break;
    bg = bg.parentElement;
  }
  return [rgb(getComputedStyle(el).color), back];
}"""


@contextmanager
def serving(settings: Settings, capture: CaptureServer, port: int) -> Iterator[str]:
    """The app with /dev/mail, served by uvicorn on 127.0.0.1 in a thread of this process."""
    app = create_app(settings, extra_routes=dev_mail_routes(capture))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _hex(rgb: list[float]) -> str:
    return "#" + "".join(f"{round(c):02x}" for c in rgb[:3])


def _check_contrast(page: Any, selectors: list[str], failures: list[str], where: str) -> None:
    for selector in selectors:
        element = page.locator(selector).first
        assert element.count(), f"{where}: no {selector}"
        fg, bg = element.evaluate(_COLOURS)
        ratio = contrast_ratio(_hex(fg), _hex(bg))
        if ratio < AA_NORMAL_TEXT:
            failures.append(f"{where} {selector}: {_hex(fg)} on {_hex(bg)} = {ratio:.2f}")


def _fits(page: Any, shot: Path) -> None:
    """No horizontal scroll at 390 px, in the DOM and in the full-page screenshot."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{page.url} is {width}px wide"
    page.screenshot(path=str(shot), full_page=True)
    png_width = struct.unpack(">I", shot.read_bytes()[16:20])[0]  # the IHDR chunk's width
    assert png_width == PHONE["width"], shot


def _page_background_is(page: Any, scheme: str) -> None:
    [r, g, b] = page.evaluate(
        "getComputedStyle(document.body).backgroundColor.match(/\\d+/g).map(Number)"
    )[:3]
    lightness = (r + g + b) / 3
    assert (lightness < 64) if scheme == "dark" else (lightness > 192), (page.url, r, g, b)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_pages_fit_a_phone_follow_the_scheme_and_meet_aa(
    db_url: str, tmp_path: Path, scheme: Literal["light", "dark"]
) -> None:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    port = free_port()
    settings = Settings(
        database_url=db_url,
        secret_key="browser-pages-secret",
        site_name="Outbox Demo",
        base_url=f"http://127.0.0.1:{port}",
        mail_from="noreply@example.test",
    )
    # A host the mail's pixel and script point at, listening: any fetch would be a connection.
    tracker = socket.create_server(("127.0.0.1", 0))
    tracker.setblocking(False)
    tracked = f"http://127.0.0.1:{tracker.getsockname()[1]}/"
    hostile = HOSTILE_HTML.replace("http://127.0.0.1:9/", tracked)
    capture = CaptureServer().start()
    real = verification_mail(settings, to="reader@example.test", token="t0k3n." * 40)
    deliver(capture, subject=real["subject"], text=real["text"], html=real["html"])
    deliver(capture, subject="Hostile", text=f"Open {LONG_LINK}\n", html=hostile)
    failures: list[str] = []
    try:
        with serving(settings, capture, port) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport=PHONE, color_scheme=scheme)

                # Sign-up with two mistakes: both messages at once, each under its field.
                page.goto(f"{base}/users/register")
                page.locator("#email").fill("not-an-address")
                page.locator("#password").fill("short")
                page.get_by_role("button", name="Sign up").click()
                page.locator("#password-error").wait_for()
                assert "valid email address" in page.locator("#email-error").inner_text()
                assert "at least 8" in page.locator("#password-error").inner_text()
                _page_background_is(page, scheme)
                _check_contrast(
                    page,
                    ["h1", "#email", "button[type=submit]", "button.secondary", ".error", ".hint"],
                    failures,
                    "register",
                )
                _fits(page, tmp_path / f"register-{scheme}.png")

                missing = page.goto(f"{base}/no/such/page")
                assert missing is not None and missing.status == 404
                assert page.get_by_role("heading", name="Page not found").is_visible()
                _check_contrast(page, ["h1", "main p", "main a"], failures, "404")
                _fits(page, tmp_path / f"404-{scheme}.png")

                page.goto(f"{base}/dev/mail")
                _page_background_is(page, scheme)
                _check_contrast(page, ["td a", "td"], failures, "/dev/mail")
                _fits(page, tmp_path / f"dev-mail-{scheme}.png")

                page.goto(f"{base}/dev/mail/0")  # the real verification mail
                frame = page.frame_locator("iframe.mail-html")
                assert FIRST_LINE in frame.locator("p").first.inner_text()
                # The mail's own HTML wraps its long link too: no sideways scroll in the frame.
                mail_html = page.frame_locator("iframe.mail-html").locator("html")
                assert mail_html.evaluate("e => e.scrollWidth <= e.clientWidth")
                page.locator("iframe.mail-html").scroll_into_view_if_needed()  # painted in shot
                _page_background_is(page, scheme)
                _check_contrast(page, ["pre", "pre a", ".meta th", ".meta td"], failures, "mail")
                _fits(page, tmp_path / f"dev-mail-0-{scheme}.png")

                page.goto(f"{base}/dev/mail/1")  # the hostile one
                frame = page.frame_locator("iframe.mail-html")
                assert frame.locator("#status").inner_text() == "no script ran"
                page.locator("iframe.mail-html").scroll_into_view_if_needed()
                assert SCRIPT_MARK not in page.locator("body").inner_text()
                assert page.url == f"{base}/dev/mail/1"  # its script did not move the page
                _fits(page, tmp_path / f"dev-mail-1-{scheme}.png")
            finally:
                browser.close()
        # Nothing was fetched from the mail's host: the pixel and the "stolen" page stay unloaded.
        with pytest.raises(BlockingIOError):
            tracker.accept()
    finally:
        capture.stop()
        tracker.close()
    assert not failures, failures
