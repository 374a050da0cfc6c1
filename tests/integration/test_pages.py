"""The pages a person sees (issue 12, "Pages"): the 404/405 page, every form error at once, the
verification mail's first line and /dev/mail's HTML part.

Driven in-process through the app's own test client (httpx over ASGI) with its lifespan running,
against a throwaway PostgreSQL database. Colours are checked in tests/unit/test_contrast.py and
the 390 px layout in a real browser in tests/acceptance/test_pages_browser.py.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.dev_mail_fixtures import HOSTILE_HTML, LONG_LINK, SCRIPT_MARK, deliver
from tests.integration.test_web import (
    BASE,
    SITE,
    SUBJECT,
    csrf_token,
    mails,
    make_settings,
    serve,
    users,
)
from tests.integration.web_fixtures import lifespan_running
from web.app import create_app
from web.capture import CaptureServer
from web.devmail import dev_mail_routes
from web.mails import FIRST_LINE
from web.settings import Settings

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
API = {"Accept": "application/json"}


@pytest.fixture
async def client(db_url: str, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(make_settings(db_url), engine) as client:
        yield client


# --- 404 and 405 ------------------------------------------------------------------------------


async def test_unknown_page_is_a_404_page_in_the_apps_style_for_a_browser(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.get("/no/such/page", headers=BROWSER)

    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")
    assert "<h1>Page not found</h1>" in answer.text
    # The app's own page: its header with the site name, its stylesheet, a way back.
    assert f'<header><a href="/users/register">{html.escape(SITE)}</a></header>' in answer.text
    assert "prefers-color-scheme: dark" in answer.text
    assert 'href="/users/register">Go to the sign-up page</a>' in answer.text
    # The page's CSP allows its inline style; the other security headers are kept.
    assert "style-src 'unsafe-inline'" in answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["cache-control"] == "no-store"


async def test_wrong_method_is_a_405_page_for_a_browser_and_keeps_allow(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.delete("/users/register", headers=BROWSER)

    assert answer.status_code == 405
    assert answer.headers["content-type"].startswith("text/html")
    assert "<h1>This page cannot be used that way</h1>" in answer.text
    # Starlette's Allow header (the route's methods) is passed on, as the plain answer has it.
    plain = await client.delete("/users/register")
    assert answer.headers["allow"] == plain.headers["allow"] and "GET" in answer.headers["allow"]


async def test_json_clients_get_json_errors_and_others_the_short_text(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.get("/no/such/page", headers=API)
    both = await client.get("/no/such/page", headers={"Accept": "application/json, text/html"})
    wrong = await client.put("/users/verify/resend", headers=API)
    plain = await client.get("/no/such/page")  # httpx sends Accept: */*, as curl does

    assert missing.status_code == 404
    assert missing.json() == {"error": "Not Found", "field": None}
    assert both.status_code == 404 and both.json()["error"] == "Not Found"
    assert wrong.status_code == 405
    assert wrong.json() == {"error": "Method Not Allowed", "field": None}
    assert wrong.headers["allow"] == "POST"
    assert plain.status_code == 404
    assert plain.headers["content-type"].startswith("text/plain")
    assert plain.text == "Not Found"


# --- every form error at once -----------------------------------------------------------------


async def test_register_form_shows_every_error_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    token = await csrf_token(client)

    answer = await client.post(
        "/users/register",
        data={"email": "not-an-address", "password": "short", "csrf_token": token},
    )

    assert answer.status_code == 400
    page = answer.text
    assert "Enter a valid email address." in page
    assert "Use at least 8 characters for your password." in page
    # Each message sits under its field and is tied to it for a screen reader.
    email_input = re.search(r'<input type="email" id="email"[^>]*>', page)
    password_input = re.search(r'<input type="password" id="password"[^>]*>', page)
    assert email_input and password_input
    assert 'aria-invalid="true"' in email_input.group(0)
    assert 'aria-describedby="email-error"' in email_input.group(0)
    assert 'aria-invalid="true"' in password_input.group(0)
    assert "password-error" in password_input.group(0)
    assert 'id="email-error"' in page and 'id="password-error"' in page
    assert 'value="not-an-address"' in page and "short" not in page.replace("shortly", "")
    assert await users(engine) == []


async def test_register_form_with_one_error_marks_only_that_field(
    client: httpx.AsyncClient,
) -> None:
    token = await csrf_token(client)

    answer = await client.post(
        "/users/register",
        data={"email": "", "password": "long enough password", "csrf_token": token},
    )

    password_input = re.search(r'<input type="password" id="password"[^>]*>', answer.text)
    assert answer.status_code == 400 and password_input
    assert "Enter your email address." in answer.text
    assert "aria-invalid" not in password_input.group(0)
    assert 'id="password-error"' not in answer.text


async def test_register_json_lists_every_error_and_keeps_the_first_in_error_and_field(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    answer = await client.post("/users/register", json={"email": 5, "password": "short"})

    assert answer.status_code == 400
    body = answer.json()
    assert body["field"] == "email" and "must be a string" in body["error"]
    assert [e["field"] for e in body["errors"]] == ["email", "password"]
    assert body["errors"][0]["error"] == body["error"]
    assert "at least 8" in body["errors"][1]["error"]
    assert await mails(engine) == []


# --- the verification mail --------------------------------------------------------------------


async def test_verification_mail_keeps_the_subject_and_opens_with_the_missing_step(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    answer = await client.post(
        "/users/register", json={"email": "ida@example.com", "password": "long enough password"}
    )

    assert answer.status_code == 202
    [mail] = await mails(engine)
    assert mail["subject"] == SUBJECT
    assert mail["text"].splitlines()[0] == FIRST_LINE
    first_paragraph = re.search(r"<body[^>]*>\s*<p>(.*?)</p>", mail["html"], re.S)
    assert first_paragraph and FIRST_LINE in first_paragraph.group(1)
    assert "confirm" in FIRST_LINE and "activate" in FIRST_LINE


# --- /dev/mail --------------------------------------------------------------------------------


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def dev_client(
    db_url: str, engine: AsyncEngine, capture: CaptureServer
) -> AsyncIterator[httpx.AsyncClient]:
    settings: Settings = make_settings(db_url)
    app = create_app(settings, engine=engine, extra_routes=dev_mail_routes(capture))
    async with (
        lifespan_running(app) as asgi,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=BASE) as client,
    ):
        yield client


async def test_dev_mail_shows_the_html_part_in_a_sandboxed_frame_beside_the_text(
    dev_client: httpx.AsyncClient, capture: CaptureServer
) -> None:
    deliver(capture, subject="Hostile", text=f"Open {LONG_LINK}\n", html=HOSTILE_HTML)

    page = (await dev_client.get("/dev/mail/0", headers=BROWSER)).text

    frame = re.search(r"<iframe [^>]*>", page)
    assert frame, page
    # The HTML part is the frame's document, escaped into the attribute, never the page's own.
    assert f'srcdoc="{html.escape(HOSTILE_HTML, quote=True)}' in frame.group(0).replace(
        "&#34;", "&quot;"
    ).replace("&#39;", "&#x27;")
    assert re.search(r"\ssandbox[\s>]", frame.group(0))  # empty sandbox: no scripts, no forms
    assert "allow-scripts" not in frame.group(0) and "allow-same-origin" not in frame.group(0)
    assert "<script>" not in page and SCRIPT_MARK not in page.replace(html.escape(SCRIPT_MARK), "")
    # The text part is there too, with its link clickable.
    assert f'<a href="{LONG_LINK}">{LONG_LINK}</a>' in page
    assert "Text part" in page and "HTML part" in page


async def test_dev_mail_without_an_html_part_says_so(
    dev_client: httpx.AsyncClient, capture: CaptureServer
) -> None:
    deliver(capture, subject="Plain <only>", text="Just text.\n", html=None)

    index = (await dev_client.get("/dev/mail")).text
    page = (await dev_client.get("/dev/mail/0")).text
    missing = await dev_client.get("/dev/mail/7")

    assert 'href="/dev/mail/0">Plain &lt;only&gt;</a>' in index
    assert "This mail has no HTML part." in page and "<iframe" not in page
    assert re.search(r"<pre>Just text\.\s*</pre>", page)
    assert missing.status_code == 404 and "No such mail" in missing.text
