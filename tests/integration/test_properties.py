"""Property-based attack on every endpoint: arbitrary bodies, content types, unicode (lone
surrogates included), empty and huge fields, and made-up HTTP methods. Never a 5xx, never a
partial write, the metrics' labels stay a fixed set, and the app keeps serving afterwards."""

from __future__ import annotations

import asyncio
import json
import re
import string
from collections.abc import Iterator
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import text

from outbox.db import create_engine
from tests.integration.test_web import BASE, CSRF_FIELD, make_settings
from tests.integration.web_fixtures import lifespan_running
from web.app import create_app
from web.metrics import KNOWN_METHODS

POSTS = ["/users/register", "/users/verify/resend", "/users/verify"]
GETS = ["/users/register", "/users/register/success", "/users/verify", "/healthz", "/metrics"]
# RFC 9110 token characters: h11 accepts any such word as a method.
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
methods = st.sampled_from(sorted(KNOWN_METHODS)) | st.text(TOKEN_CHARS, min_size=1, max_size=24)
# Lone surrogates: JSON can spell them ("\ud800"), no text can hold them.
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=latin-1",
    "multipart/form-data; boundary=x",
    "text/plain",
    "",
]
HUGE = "x" * 70_000

field_text = st.one_of(
    st.text(max_size=60),
    st.emails().map(str),
    st.tuples(st.text(max_size=10), surrogates, st.text(max_size=10)).map("".join),
    st.sampled_from(["", " ", "\x00", "a@b.c\r\nBcc: x@y.z", "ö@ü.de", "用户@例子.广告", HUGE]),
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | field_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
signup_object = st.fixed_dictionaries(
    {}, optional={"email": json_value, "password": json_value, "extra": json_value}
)


@st.composite
def bodies(draw: st.DrawFn, csrf: str) -> tuple[str, bytes]:
    content_type = draw(st.sampled_from(CONTENT_TYPES) | st.text(max_size=30))
    kind = draw(st.sampled_from(["plausible", "json", "form", "bytes"]))
    if kind == "plausible":  # well-formed enough to reach the database and the outbox
        content_type = "application/json"
        body = json.dumps(
            {
                "email": draw(st.emails()),
                "password": draw(
                    st.text(min_size=8, max_size=40)
                    | st.tuples(st.text(min_size=8, max_size=20), surrogates).map("".join)
                ),
            }
        ).encode()  # st.text may draw lone surrogates: json.dumps escapes them
    elif kind == "json":
        body = json.dumps(draw(signup_object | json_value)).encode()
    elif kind == "form":
        fields = {k: v for k, v in draw(signup_object).items() if isinstance(v, str)}
        if draw(st.booleans()):
            fields["csrf_token"] = csrf
        # A surrogate goes out as the bytes UTF-8 would give it (invalid UTF-8 on the wire).
        body = urlencode(fields, errors="surrogatepass").encode()
    else:
        body = draw(st.binary(max_size=300))
    return content_type, body


@pytest.fixture
def app_client(db_url: str) -> Iterator[tuple[asyncio.Runner, httpx.AsyncClient, str]]:
    """One app for the whole property run, driven from a runner hypothesis can call into."""
    runner = asyncio.Runner()
    engine = create_engine(db_url, application_name="outbox-web")
    app = create_app(
        make_settings(db_url, rate_limit_per_ip="off", rate_limit_per_email="off"),
        engine=engine,
    )
    lifespan = lifespan_running(app)
    asgi = runner.run(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=BASE)
    page = runner.run(client.get("/users/register"))
    match = CSRF_FIELD.search(page.text)
    assert match
    try:
        yield runner, client, match.group(1)
    finally:
        runner.run(client.aclose())
        runner.run(lifespan.__aexit__(None, None, None))
        runner.run(engine.dispose())
        runner.close()


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_properties_no_input_gives_a_5xx_or_a_partial_write(
    app_client: tuple[asyncio.Runner, httpx.AsyncClient, str], db_url: str
) -> None:
    runner, client, csrf = app_client
    statuses: set[int] = set()

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        path=st.sampled_from(POSTS),
        body=bodies(csrf),
        get_path=st.sampled_from(GETS),
        query=st.dictionaries(st.sampled_from(["token", "x"]), field_text, max_size=2),
        method=methods,
    )
    def attack(
        path: str, body: tuple[str, bytes], get_path: str, query: dict[str, str], method: str
    ) -> None:
        content_type, content = body
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            posted = runner.run(client.post(path, content=content, headers=headers))
            got = runner.run(client.get(get_path, params=query))
            odd = runner.run(client.request(method, get_path, content=content, headers=headers))
        except (UnicodeEncodeError, httpx.InvalidURL):
            return  # httpx itself refuses to send it (non-ASCII header, a 64 KiB query)
        statuses.update((posted.status_code, got.status_code))
        assert posted.status_code < 500, (path, body, posted.text[:500])
        assert got.status_code < 500, (get_path, query, got.text[:500])
        assert odd.status_code < 500, (method, get_path, odd.text[:500])

    attack()

    # Both kinds of outcome were reached: accepted signups and refused input.
    assert statuses & {202, 303} and statuses & {400, 413, 415}
    # The app still serves, and a normal signup still works.
    assert runner.run(client.get("/healthz")).status_code == 200
    # Whatever methods were invented, the metrics' method label kept to a fixed set.
    exposition = runner.run(client.get("/metrics")).text
    labels = set(re.findall(r'method="([^"]*)"', exposition))
    assert labels <= KNOWN_METHODS | {"other"}, labels
    ok = runner.run(
        client.post("/users/register", json={"email": "after@example.com", "password": "x" * 12})
    )
    assert ok.status_code == 202

    async def orphans() -> tuple[int, int]:
        engine = create_engine(db_url, application_name="check")
        try:
            async with engine.connect() as conn:
                users_without_mail = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM outbox o"
                            " WHERE lower(o.payload->>'to') = lower(u.email))"
                        )
                    )
                ).scalar_one()
                mail_without_user = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM users u"
                            " WHERE lower(u.email) = lower(o.payload->>'to'))"
                        )
                    )
                ).scalar_one()
                return int(users_without_mail), int(mail_without_user)
        finally:
            await engine.dispose()

    assert runner.run(orphans()) == (0, 0)
