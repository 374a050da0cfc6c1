"""The signup app through HTTP, against a real PostgreSQL (and a real SMTP server at the end).

Each test gets its own migrated database (``db_url``/``engine`` from conftest). The app runs with
its lifespan driven by ``lifespan_running`` (see web_fixtures.py) and is called in-process by
httpx's ASGITransport; the test's engine is passed to ``create_app`` so the test and the app
look at the same database.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import HandlerRegistry, Relay
from outbox.errors import ConfigError
from outbox.mail import SmtpSender
from outbox.settings import SmtpConfig
from tests.integration.web_fixtures import lifespan_running
from web import routes
from web.app import create_app
from web.capture import CaptureServer, free_port
from web.settings import Settings

BASE = "http://testserver"
SECRET = "test-secret-key"
SITE = "Test <Site>"
SUBJECT = f"Congratulations, you are a member of {SITE} now."
MAIL_FROM = "noreply@example.test"
PASSWORD = "correct horse battery staple"
LINK = re.compile(r"http://testserver/users/verify\?token=([A-Za-z0-9_.\-]+)")
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
JSON_CT = {"Content-Type": "application/json"}
FORM_CT = {"Content-Type": "application/x-www-form-urlencoded"}


def make_settings(db_url: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "secret_key": SECRET,
        "site_name": SITE,
        "base_url": BASE,
        "mail_from": MAIL_FROM,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serve(
    settings: Settings, engine: AsyncEngine | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to a freshly built app whose lifespan is running."""
    app = create_app(settings, engine=engine)
    async with (
        lifespan_running(app) as asgi,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=BASE) as client,
    ):
        yield client


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url)


@pytest.fixture
async def client(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings, engine) as client:
        yield client


async def rows(engine: AsyncEngine, sql: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql))).mappings()]


async def mails(engine: AsyncEngine) -> list[dict[str, Any]]:
    """The payloads of all outbox rows with topic "email", oldest first."""
    found = await rows(engine, "SELECT topic, payload FROM outbox ORDER BY id")
    assert all(r["topic"] == "email" for r in found)
    return [r["payload"] for r in found]


async def users(engine: AsyncEngine) -> list[dict[str, Any]]:
    return await rows(engine, "SELECT id, email, password_hash, verified_at FROM users ORDER BY id")


def token_in(mail_text: str) -> str:
    match = LINK.search(mail_text)
    assert match, mail_text
    return match.group(1)


async def csrf_token(client: httpx.AsyncClient) -> str:
    """Load the form (which sets the cookie) and return the hidden field's token."""
    page = await client.get("/users/register")
    match = CSRF_FIELD.search(page.text)
    assert match
    return match.group(1)


async def signup_json(client: httpx.AsyncClient, email: str) -> httpx.Response:
    return await client.post("/users/register", json={"email": email, "password": PASSWORD})


async def confirm(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """What a person does with the link: open the page, press Confirm (a form post with the
    page's CSRF token). A page that is not the confirm page (400) is returned as it is."""
    page = await client.get("/users/verify", params={"token": token})
    if page.status_code != 200:
        return page
    match = CSRF_FIELD.search(page.text)
    assert match and 'action="/users/verify"' in page.text
    return await client.post("/users/verify", data={"token": token, "csrf_token": match.group(1)})


# --- the app factory and its lifespan ---------------------------------------------------------


def test_create_app_refuses_to_build_without_secret_key() -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app(make_settings("postgresql://u:p@127.0.0.1:1/x", secret_key=None))


async def test_create_app_needs_database_url_unless_given_an_engine(engine: AsyncEngine) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        create_app(make_settings(None))
    async with serve(make_settings(None), engine) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_lifespan_leaves_a_passed_engine_open(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with serve(settings, engine) as client:
        assert (await client.get("/healthz")).status_code == 200
    assert await rows(engine, "SELECT 1 AS one") == [{"one": 1}]


async def test_lifespan_creates_its_own_engine_from_database_url(settings: Settings) -> None:
    async with serve(settings) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}


# --- GET pages ----------------------------------------------------------------------------------


async def test_register_page_is_an_accessible_form_with_a_csrf_cookie(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/users/register")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    body = page.text
    assert '<html lang="en">' in body and 'name="viewport"' in body
    assert '<label for="email">' in body and '<label for="password">' in body
    assert 'action="/users/verify/resend"' in body
    assert "Test &lt;Site&gt;" in body and "Test <Site>" not in body  # autoescaped
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    assert client.cookies["csrftoken"] == CSRF_FIELD.search(body).group(1)  # type: ignore[union-attr]
    assert "strict-transport-security" not in page.headers  # http: no HSTS


async def test_success_page_says_check_your_inbox(client: httpx.AsyncClient) -> None:
    page = await client.get("/users/register/success")
    assert page.status_code == 200
    assert "Check your inbox" in page.text


# --- POST /users/register ---------------------------------------------------------------------


async def test_register_form_post_redirects_and_enqueues_one_verification_mail(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    token = await csrf_token(client)

    response = await client.post(
        "/users/register",
        data={"email": "Ann@Example.COM", "password": PASSWORD, "csrf_token": token},
    )

    assert response.status_code == 303
    assert response.headers["location"] == "/users/register/success"
    [user] = await users(engine)
    assert user["email"] == "Ann@example.com"  # normalised: the domain is lower-cased
    assert user["password_hash"].startswith("$argon2id$")
    assert user["verified_at"] is None
    [mail] = await mails(engine)
    assert mail["to"] == "Ann@example.com"
    assert mail["subject"] == SUBJECT
    token_in(mail["text"])
    assert "Test &lt;Site&gt;" in mail["html"] and LINK.search(mail["html"])
    assert PASSWORD not in str(mail)


async def test_register_json_post_answers_202_and_enqueues_one_verification_mail(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    response = await signup_json(client, "bob@example.com")

    assert response.status_code == 202
    assert response.json() == {"status": "verification_sent"}
    [user] = await users(engine)
    [mail] = await mails(engine)
    assert (mail["to"], mail["subject"]) == ("bob@example.com", SUBJECT)
    token_in(mail["text"])


async def test_register_known_unverified_address_replaces_password_and_voids_earlier_links(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """DESIGN.md: whoever registered first cannot keep an account on someone else's address."""
    first = await signup_json(client, "carol@example.com")
    [before] = await users(engine)
    again = await client.post(
        "/users/register", json={"email": "CAROL@EXAMPLE.com", "password": "another password"}
    )
    token = await csrf_token(client)
    form = await client.post(
        "/users/register",
        data={"email": "Carol@example.com", "password": PASSWORD, "csrf_token": token},
    )

    assert (first.status_code, first.json()) == (again.status_code, again.json())
    assert form.status_code == 303
    [user] = await users(engine)
    assert user["id"] == before["id"]
    assert user["email"] == "Carol@example.com"  # the latest spelling of the one account
    assert user["password_hash"] != before["password_hash"]  # the latest signup's password
    links = [token_in(m["text"]) for m in await mails(engine)]
    assert len(links) == 3
    assert all(m["subject"] == SUBJECT for m in await mails(engine))
    assert "another password" not in str(await mails(engine))
    for old in links[:2]:
        assert (await client.get("/users/verify", params={"token": old})).status_code == 400
        assert (await confirm(client, old)).status_code == 400
    assert (await users(engine))[0]["verified_at"] is None
    assert (await confirm(client, links[2])).status_code == 200
    assert (await users(engine))[0]["verified_at"] is not None


async def test_register_known_verified_address_changes_nothing_and_mails_a_notice(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await signup_json(client, "dan@example.com")
    [mail] = await mails(engine)
    assert (await confirm(client, token_in(mail["text"]))).status_code == 200
    [before] = await users(engine)

    again = await client.post(
        "/users/register", json={"email": "DAN@example.com", "password": "another password"}
    )

    assert again.status_code == 202
    assert await users(engine) == [before]
    _, notice = await mails(engine)
    assert notice["to"] == "dan@example.com"
    assert notice["subject"] != SUBJECT
    assert "already has an account" in notice["text"]
    assert not LINK.search(notice["text"])


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"email": "not-an-address", "password": PASSWORD}, "email", "valid email"),
        ({"email": "", "password": PASSWORD}, "email", "Enter your email"),
        ({"password": PASSWORD}, "email", "Enter your email"),
        ({"email": 5, "password": PASSWORD}, "email", "must be a string"),
        ({"email": "eve@example.com", "password": "short"}, "password", "at least 8"),
        ({"email": "eve@example.com", "password": "x" * 1025}, "password", "at most 1024"),
        ({"email": "eve@example.com"}, "password", "Enter a password"),
        ({"email": "eve@example.com", "password": ["a list"]}, "password", "must be a string"),
        (["not", "an", "object"], None, "must be an object"),
        ("a string", None, "must be an object"),
    ],
)
async def test_register_json_bad_input_is_400_with_field(
    client: httpx.AsyncClient, engine: AsyncEngine, body: Any, field: str | None, message: str
) -> None:
    response = await client.post("/users/register", json=body)

    assert response.status_code == 400
    answer = response.json()
    assert answer["field"] == field
    assert message in answer["error"]
    assert await users(engine) == [] and await mails(engine) == []


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe\x00", b"[" * 50_000, b'{"email": 1' + b"0" * 5000 + b"}"],
    ids=["syntax", "encoding", "deeply-nested", "huge-integer"],
)
async def test_register_unreadable_json_is_400_not_500(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    response = await client.post("/users/register", content=raw, headers=JSON_CT)

    assert response.status_code == 400
    assert response.json()["field"] is None


async def test_register_form_bad_input_rerenders_form_without_the_password(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    token = await csrf_token(client)

    response = await client.post(
        "/users/register",
        data={"email": "frank@example.com", "password": "secret7", "csrf_token": token},
    )

    assert response.status_code == 400
    assert "at least 8 characters" in response.text
    assert 'value="frank@example.com"' in response.text
    assert "secret7" not in response.text
    assert 'aria-invalid="true"' in response.text
    assert await users(engine) == []


async def test_register_form_post_without_valid_csrf_token_is_400(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    token = await csrf_token(client)
    form = {"email": "gina@example.com", "password": PASSWORD}

    missing = await client.post("/users/register", data=form)
    wrong = await client.post("/users/register", data={**form, "csrf_token": token[::-1]})
    client.cookies.clear()
    no_cookie = await client.post("/users/register", data={**form, "csrf_token": token})

    for response in (missing, wrong, no_cookie):
        assert response.status_code == 400
        assert "This form has expired. Please try again." in response.text
    assert await users(engine) == [] and await mails(engine) == []


async def test_register_body_over_64_kib_is_413_whatever_the_header_says(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    big = b'{"email": "h@example.com", "password": "' + b"x" * 70_000 + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    declared = await client.post("/users/register", content=big, headers=JSON_CT)
    streamed = await client.post("/users/register", content=chunked(), headers=JSON_CT)
    lying = await client.post(
        "/users/register", content=big, headers={**JSON_CT, "Content-Length": "10"}
    )
    form = await client.post("/users/register", content=b"email=" + b"a" * 70_000, headers=FORM_CT)

    assert "content-length" not in {k.lower() for k in streamed.request.headers}
    assert lying.request.headers["content-length"] == "10"
    for response in (declared, streamed, lying):
        assert response.status_code == 413
        assert response.json()["error"].startswith("The request body is larger than 64 KiB")
    assert form.status_code == 413
    assert await users(engine) == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "multipart/form-data; boundary=x", "application/xml", None]
)
async def test_register_other_content_types_are_415(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}

    response = await client.post("/users/register", content=b"email=a", headers=headers)

    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


async def test_register_json_with_charset_parameter_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/users/register",
        content=b'{"email": "ivy@example.com", "password": "' + PASSWORD.encode() + b'"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202


# --- GET /users/verify ------------------------------------------------------------------------


async def test_verify_get_and_head_change_nothing_the_confirm_post_verifies_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A mail scanner or link preview fetching the link (GET, HEAD) must not verify."""
    await signup_json(client, "jack@example.com")
    [mail] = await mails(engine)
    token = token_in(mail["text"])

    page = await client.get("/users/verify", params={"token": token})
    head = await client.head("/users/verify", params={"token": token})
    [untouched] = await users(engine)
    first = await confirm(client, token)
    [user] = await users(engine)
    second = await confirm(client, token)
    api = await client.post("/users/verify", json={"token": token})

    assert page.status_code == 200 and head.status_code == 200
    assert "jack@example.com" in page.text and "Confirm" in page.text
    assert untouched["verified_at"] is None
    assert first.status_code == 200 and "confirmed" in first.text
    assert user["verified_at"] is not None
    assert second.status_code == 200
    assert (api.status_code, api.json()) == (200, {"status": "verified"})
    [again] = await users(engine)
    assert again["verified_at"] == user["verified_at"]  # the first time is kept


async def test_verify_post_form_needs_the_csrf_token(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await signup_json(client, "jill@example.com")
    [mail] = await mails(engine)

    answer = await client.post("/users/verify", data={"token": token_in(mail["text"])})

    assert answer.status_code == 400
    assert (await users(engine))[0]["verified_at"] is None


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature changed
        lambda t: "x" + t,  # payload changed
        lambda t: "garbage",
        lambda t: "",
        lambda t: "a" * 5000,
    ],
    ids=["signature", "payload", "garbage", "empty", "huge"],
)
async def test_verify_tampered_or_malformed_token_is_400_page(
    client: httpx.AsyncClient, engine: AsyncEngine, mangle: Any
) -> None:
    await signup_json(client, "kate@example.com")
    [mail] = await mails(engine)

    bad = mangle(token_in(mail["text"]))
    response = await client.get("/users/verify", params={"token": bad})
    posted = await client.post("/users/verify", json={"token": bad})

    assert response.status_code == 400
    assert "not valid" in response.text
    assert 'action="/users/verify/resend"' in response.text
    assert posted.status_code == 400 and posted.json()["field"] == "token"
    [user] = await users(engine)
    assert user["verified_at"] is None


async def test_verify_without_token_is_400_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/users/verify")
    assert response.status_code == 400


class _SignedLongAgo(TimestampSigner):
    """Signs with a timestamp three days in the past (no sleeping, no clock patching)."""

    def get_timestamp(self) -> int:
        return int(time.time()) - 3 * 24 * 3600


async def test_verify_expired_token_is_400_page(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await signup_json(client, "liam@example.com")
    [user] = await rows(engine, "SELECT id, token_nonce FROM users")
    old = URLSafeTimedSerializer(SECRET, salt="verify-email", signer=_SignedLongAgo)
    token = old.dumps({"uid": user["id"], "n": user["token_nonce"].hex})

    response = await client.get("/users/verify", params={"token": token})
    posted = await client.post("/users/verify", json={"token": token})

    assert response.status_code == 400
    assert "expired" in response.text
    assert posted.status_code == 400
    [user] = await users(engine)
    assert user["verified_at"] is None


async def test_verify_accepts_a_token_signed_with_a_rotated_old_key(
    db_url: str, engine: AsyncEngine
) -> None:
    async with serve(make_settings(db_url, secret_key="old-key"), engine) as before:
        await signup_json(before, "mia@example.com")
    [mail] = await mails(engine)
    rotated = make_settings(db_url, secret_key="new-key", old_secret_keys=("old-key",))
    forgotten = make_settings(db_url, secret_key="new-key")

    async with serve(forgotten, engine) as client:
        refused = await client.get("/users/verify", params={"token": token_in(mail["text"])})
    async with serve(rotated, engine) as client:
        accepted = await confirm(client, token_in(mail["text"]))

    assert refused.status_code == 400
    assert accepted.status_code == 200
    [user] = await users(engine)
    assert user["verified_at"] is not None


# --- POST /users/verify/resend ----------------------------------------------------------------


async def test_resend_unknown_address_same_answer_and_nothing_enqueued(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    token = await csrf_token(client)

    form = await client.post(
        "/users/verify/resend", data={"email": "nobody@example.com", "csrf_token": token}
    )
    api = await client.post("/users/verify/resend", json={"email": "nobody@example.com"})

    assert form.status_code == 303
    assert form.headers["location"] == "/users/register/success"
    assert (api.status_code, api.json()) == (202, {"status": "verification_sent"})
    assert await mails(engine) == []


async def test_resend_unverified_account_enqueues_one_fresh_link(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await signup_json(client, "noah@example.com")
    token = await csrf_token(client)

    response = await client.post(
        "/users/verify/resend", data={"email": "NOAH@example.com", "csrf_token": token}
    )

    assert response.status_code == 303
    first, fresh = await mails(engine)
    assert (fresh["to"], fresh["subject"]) == ("noah@example.com", SUBJECT)
    assert (await confirm(client, token_in(fresh["text"]))).status_code == 200


async def test_resend_verified_account_same_answer_and_nothing_enqueued(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await signup_json(client, "olga@example.com")
    [mail] = await mails(engine)
    assert (await confirm(client, token_in(mail["text"]))).status_code == 200

    response = await client.post("/users/verify/resend", json={"email": "olga@example.com"})

    assert response.status_code == 202
    assert len(await mails(engine)) == 1


async def test_resend_bad_input_and_missing_csrf_are_400(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await signup_json(client, "pia@example.com")

    api = await client.post("/users/verify/resend", json={"email": "nope"})
    no_csrf = await client.post("/users/verify/resend", data={"email": "pia@example.com"})

    assert api.status_code == 400 and api.json()["field"] == "email"
    assert no_csrf.status_code == 400 and "expired" in no_csrf.text
    assert len(await mails(engine)) == 1


# --- /healthz and /metrics --------------------------------------------------------------------


async def test_healthz_ok_when_database_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_healthz_503_when_database_refuses_connections() -> None:
    port = free_port()
    settings = make_settings(f"postgresql://u:p@127.0.0.1:{port}/none")

    async with serve(settings) as client:
        response = await client.get("/healthz")

    assert (response.status_code, response.json()["status"]) == (503, "unavailable")
    assert response.json()["reason"].startswith("database unreachable")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung database)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_healthz_503_within_its_timeout_when_database_hangs(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "HEALTHZ_TIMEOUT_S", 0.3)
    settings = make_settings(f"postgresql://u:p@127.0.0.1:{silent_server}/none")

    async with serve(settings) as client:
        started = time.monotonic()
        async with asyncio.timeout(5):
            response = await client.get("/healthz")
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert elapsed < 2


async def test_metrics_is_prometheus_text_from_the_apps_own_registry(
    client: httpx.AsyncClient,
) -> None:
    await signup_json(client, "quinn@example.com")
    await client.post("/users/register", json=[])

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'web_signups_total{result="accepted"} 1.0' in response.text
    assert 'web_signups_total{result="invalid"} 1.0' in response.text
    assert 'route="/users/register"' in response.text
    assert "web_request_duration_seconds_bucket" in response.text
    assert "python_gc_objects_collected_total" not in response.text  # not the global registry


# --- the whole path ---------------------------------------------------------------------------


async def test_signup_relay_smtp_link_verifies_the_account(
    client: httpx.AsyncClient, engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    token = await csrf_token(client)
    signup = await client.post(
        "/users/register",
        data={"email": "ruth@example.test", "password": PASSWORD, "csrf_token": token},
    )
    assert signup.status_code == 303
    sender = SmtpSender(SmtpConfig.from_url(smtp_server.url), mail_from=MAIL_FROM, timeout=5.0)
    registry = HandlerRegistry()
    registry.register("email", sender)

    try:
        result = await Relay(engine, registry).drain()
    finally:
        await sender.aclose()

    assert result.sent == 1
    [captured] = smtp_server.mails
    message = captured.message
    assert message["To"] == "ruth@example.test"
    assert message["From"] == MAIL_FROM
    assert message["Subject"] == SUBJECT
    body = message.get_body(("plain",))
    assert body is not None
    verified = await confirm(client, token_in(body.get_content()))
    assert verified.status_code == 200
    [user] = await users(engine)
    assert user["verified_at"] is not None
