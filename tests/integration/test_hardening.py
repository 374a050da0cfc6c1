"""Issue 11 in-process: rate-limit storage, hashing bound, metrics labels, CSRF, headers, input.

Each test names the finding it guards; the live-server ones (slow clients, proxies, memory) are
in tests/acceptance/test_web_server.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import string
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.test_web import (
    BASE,
    CSRF_FIELD,
    PASSWORD,
    csrf_token,
    make_settings,
    rows,
    serve,
    users,
)
from tests.integration.web_fixtures import lifespan_running
from web import metrics as web_metrics
from web.app import create_app
from web.passwords import HashGate
from web.ratelimit import sweep
from web.settings import Settings


@asynccontextmanager
async def serve_from(
    settings: Settings, engine: AsyncEngine, **options: Any
) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """One app, and a client per peer address named in ``options["peers"]``."""
    peers: list[str] = options.pop("peers")
    app = create_app(settings, engine=engine, **options)
    async with lifespan_running(app) as asgi:
        clients = {
            peer: httpx.AsyncClient(
                transport=httpx.ASGITransport(app=asgi, client=(peer, 40000)), base_url=BASE
            )
            for peer in peers
        }
        try:
            yield clients
        finally:
            for client in clients.values():
                await client.aclose()


@pytest.fixture
async def client(db_url: str, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(make_settings(db_url), engine) as client:
        yield client


def signup(email: str, password: str = PASSWORD) -> dict[str, str]:
    return {"email": email, "password": password}


async def limit_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    return await rows(engine, "SELECT bucket, hits, window_start FROM rate_limits ORDER BY bucket")


# --- rate limits (findings 6 and 7) -----------------------------------------------------------


async def test_rate_limit_refused_requests_write_nothing(engine: AsyncEngine, db_url: str) -> None:
    """A client over its limit sending new addresses grew the table by a row per address."""
    settings = make_settings(db_url, rate_limit_per_ip="2/hour", rate_limit_per_email="5/hour")
    async with serve_from(settings, engine, peers=["203.0.113.7"]) as clients:
        client = clients["203.0.113.7"]
        accepted = [
            await client.post("/users/register", json=signup(f"a{n}@example.com")) for n in range(2)
        ]
        before = await limit_rows(engine)
        refused = [
            await client.post("/users/register", json=signup(f"new{n}@example.com"))
            for n in range(20)
        ]
        after = await limit_rows(engine)
    assert [a.status_code for a in accepted] == [202, 202]
    assert {r.status_code for r in refused} == {429}
    assert after == before  # not a row, not a hit
    assert len(before) == 3  # one client bucket, two address buckets


async def test_rate_limit_refused_requests_do_not_spend_the_addresss_allowance(
    engine: AsyncEngine, db_url: str
) -> None:
    """Twelve refused requests an hour used to keep any address out of signup and resend."""
    settings = make_settings(db_url, rate_limit_per_ip="2/hour", rate_limit_per_email="5/hour")
    peers = ["198.51.100.66", "192.0.2.10"]
    async with serve_from(settings, engine, peers=peers) as clients:
        attacker, owner = clients[peers[0]], clients[peers[1]]
        flood = [
            (await attacker.post("/users/register", json=signup("victim@example.com"))).status_code
            for _ in range(12)
        ]
        mine = await owner.post("/users/register", json=signup("victim@example.com"))
    assert flood == [202, 202] + [429] * 10
    assert mine.status_code == 202


async def test_rate_limit_keys_are_digests_not_addresses(engine: AsyncEngine, db_url: str) -> None:
    settings = make_settings(db_url, rate_limit_per_ip="5/hour", rate_limit_per_email="5/hour")
    async with serve_from(settings, engine, peers=["203.0.113.9", "x" * 6000]) as clients:
        await clients["203.0.113.9"].post("/users/register", json=signup("ann@example.com"))
        huge = await clients["x" * 6000].post("/users/register", json=signup("bo@example.com"))
    assert huge.status_code == 202  # a 6 KB client address was a 500 (btree row too big)
    buckets = [r["bucket"] for r in await limit_rows(engine)]
    assert len(buckets) == 4
    assert all(re.fullmatch(r"[0-9a-f]{64}", b) for b in buckets), buckets


async def test_rate_limit_ipv6_clients_are_counted_per_64(engine: AsyncEngine, db_url: str) -> None:
    settings = make_settings(db_url, rate_limit_per_ip="1/hour", rate_limit_per_email="off")
    peers = ["2001:db8:0:7::1", "2001:db8:0:7:ffff::2", "2001:db8:0:8::1"]
    async with serve_from(settings, engine, peers=peers) as clients:
        codes = [
            (
                await clients[p].post("/users/register", json=signup(f"v6{n}@example.com"))
            ).status_code
            for n, p in enumerate(peers)
        ]
    assert codes == [202, 429, 202]  # the same /64 shares a bucket; another /64 does not


async def test_rate_limit_cleanup_deletes_expired_windows_in_batches(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO rate_limits (bucket, window_start, hits, expires_at)"
                " SELECT 'old' || n, now() - interval '2 hours', 1, now() - interval '1 hour'"
                " FROM generate_series(1, 2500) AS n"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO rate_limits (bucket, window_start, hits, expires_at)"
                " SELECT 'live' || n, now(), 1, now() + interval '1 hour'"
                " FROM generate_series(1, 10) AS n"
            )
        )
    calls: list[int] = []
    event.listen(engine.sync_engine, "begin", lambda conn: calls.append(1))
    deleted = await sweep(engine, batch=1000)
    assert deleted == 2500
    assert len(calls) == 3  # 1,000 + 1,000 + 500: each batch its own short transaction
    left = await rows(engine, "SELECT bucket FROM rate_limits")
    assert sorted(r["bucket"] for r in left) == sorted(f"live{n}" for n in range(1, 11))


async def test_rate_limit_cleanup_uses_the_expires_at_index(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO rate_limits (bucket, window_start, hits, expires_at)"
                " SELECT 'b' || n, now(), 1, now() + n * interval '1 second'"
                " FROM generate_series(1, 50000) AS n"
            )
        )
        await conn.execute(text("ANALYZE rate_limits"))
        plan = (
            await conn.execute(
                text(
                    "EXPLAIN SELECT bucket FROM rate_limits"
                    " WHERE expires_at < statement_timestamp()"
                    " ORDER BY expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED"
                )
            )
        ).scalars()
        assert "ix_rate_limits_expires_at" in "\n".join(plan)


async def test_rate_limit_is_not_swept_inside_requests(
    engine: AsyncEngine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-request 1 % sweep scanned the whole table (0.2-0.44 s at a million rows)."""
    monkeypatch.setattr(random, "random", lambda: 0.0)  # the old sweep's dice, always rolled
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO rate_limits (bucket, window_start, hits, expires_at)"
                " VALUES ('old', now() - interval '3 days', 1, now() - interval '3 days')"
            )
        )
    settings = make_settings(db_url, rate_limit_per_ip="50/hour", rate_limit_per_email="off")
    async with serve(settings, engine) as client:
        for n in range(5):
            await client.post("/users/verify/resend", json={"email": f"r{n}@example.com"})
    assert {"bucket": "old"} in await rows(engine, "SELECT bucket FROM rate_limits")


# --- password hashing (finding 5) -------------------------------------------------------------


async def test_hashing_beyond_the_gate_is_503_with_retry_after_and_counts_nothing(
    engine: AsyncEngine, db_url: str
) -> None:
    settings = make_settings(db_url, rate_limit_per_ip="100/hour", rate_limit_per_email="off")
    gate = HashGate(concurrency=1, queue=1)
    async with serve_from(settings, engine, peers=["192.0.2.1"], hash_gate=gate) as clients:
        client = clients["192.0.2.1"]
        answers = await asyncio.gather(
            *(client.post("/users/register", json=signup(f"h{n}@example.com")) for n in range(12))
        )
    codes = sorted(a.status_code for a in answers)
    busy = [a for a in answers if a.status_code == 503]
    assert set(codes) == {202, 503} and codes.count(202) >= 2
    assert all(int(a.headers["Retry-After"]) >= 1 for a in busy)
    assert all(a.json()["error"].startswith("The server is busy") for a in busy)
    [limit] = await limit_rows(engine)
    assert limit["hits"] == codes.count(202)  # a refused (503) request spent no allowance
    assert len(await users(engine)) == codes.count(202)


# --- /metrics (finding 1) ---------------------------------------------------------------------


def _series(exposition: str) -> int:
    return sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))


async def test_metrics_made_up_methods_do_not_add_series(
    client: httpx.AsyncClient,
) -> None:
    await client.get("/healthz")
    await client.request("BREW", "/healthz")
    await client.get("/metrics")  # its own series exist before the count
    before = _series((await client.get("/metrics")).text)
    rng = random.Random(11)
    for _ in range(1000):
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
        answer = await client.request(method, "/healthz")
        assert answer.status_code == 405
    after = (await client.get("/metrics")).text
    assert _series(after) == before
    assert 'method="other"' in after and "BREW" not in after


async def test_metrics_text_is_built_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = web_metrics.generate_latest  # type: ignore[attr-defined]

    def noting(registry: Any) -> bytes:
        threads.append(threading.get_ident())
        return real(registry)

    monkeypatch.setattr(web_metrics, "generate_latest", noting)
    assert (await client.get("/metrics")).status_code == 200
    assert threads and threads[0] != threading.get_ident()  # the test runs on the loop thread


async def test_metrics_route_can_be_left_off_the_app(engine: AsyncEngine, db_url: str) -> None:
    app = create_app(make_settings(db_url), engine=engine, metrics_route=False)
    async with (
        lifespan_running(app) as asgi,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=BASE) as client,
    ):
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200


# --- input (finding 7) ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["email", "password"])
async def test_lone_surrogate_in_json_is_400_not_500(
    client: httpx.AsyncClient, engine: AsyncEngine, field: str
) -> None:
    body = {"email": "sur@example.com", "password": "long enough password"}
    raw = body | {field: "abc\\ud800defghij"}
    content = "{" + ", ".join(f'"{k}": "{v}"' for k, v in raw.items()) + "}"
    answer = await client.post(
        "/users/register", content=content, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["field"] == field
    assert await users(engine) == []


async def test_client_gone_mid_body_is_not_a_server_error(
    engine: AsyncEngine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = create_app(make_settings(db_url), engine=engine)
    sent: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"email": "gone@exam', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/users/register",
        "raw_path": b"/users/register",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    async with lifespan_running(app) as asgi:
        await asgi(scope, receive, send)  # type: ignore[arg-type]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url=BASE
        ) as client:
            exposition = (await client.get("/metrics")).text
    assert sent[0]["status"] == 400
    assert 'status="500"' not in exposition
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]
    assert await users(engine) == []


# --- CSRF, cookies, headers, redirects (finding 8) --------------------------------------------


async def test_csrf_planted_cookie_is_refused(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Whoever can set a cookie for the host picks a value and submits the same one."""
    planted = "A" * 43
    client.cookies.set("csrftoken", planted)
    answer = await client.post(
        "/users/register",
        data={"email": "plant@example.com", "password": PASSWORD, "csrf_token": planted},
    )
    assert answer.status_code == 400
    assert await users(engine) == []


async def test_csrf_token_signed_with_another_key_is_refused(
    engine: AsyncEngine, db_url: str
) -> None:
    async with serve(make_settings(db_url, secret_key="another key"), engine) as other:
        foreign = await csrf_token(other)
    async with serve(make_settings(db_url), engine) as client:
        client.cookies.set("csrftoken", foreign)
        answer = await client.post(
            "/users/register",
            data={"email": "plant@example.com", "password": PASSWORD, "csrf_token": foreign},
        )
        own = await csrf_token(client)  # a token we did not sign is replaced, not reused
    assert answer.status_code == 400
    assert own != foreign


async def test_https_site_uses_host_prefixed_secure_cookie_and_hsts(
    engine: AsyncEngine, db_url: str
) -> None:
    settings = make_settings(db_url, base_url="https://signup.example")
    app = create_app(settings, engine=engine)
    async with (
        lifespan_running(app) as asgi,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="https://testserver"
        ) as client,
    ):
        page = await client.get("/users/register")
        token = CSRF_FIELD.search(page.text).group(1)  # type: ignore[union-attr]
        posted = await client.post(
            "/users/register",
            data={"email": "tls@example.com", "password": PASSWORD, "csrf_token": token},
        )
        json_answer = await client.post("/users/register", json=[])
        missing = await client.get("/nope")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("__Host-csrftoken=")
    assert "secure" in cookie.lower() and "path=/" in cookie.lower()
    assert "domain" not in cookie.lower()
    assert posted.status_code == 303
    for answer in (page, posted, json_answer, missing):
        assert answer.headers["strict-transport-security"].startswith("max-age=")


async def test_security_headers_on_json_404_and_405(client: httpx.AsyncClient) -> None:
    answers = [
        await client.post("/users/register", json=[]),
        await client.get("/healthz"),
        await client.get("/no/such/page"),
        await client.delete("/users/register"),
        await client.get("/metrics"),
    ]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-frame-options"] == "DENY"
        assert "server" not in answer.headers


async def test_trailing_slash_is_not_redirected_to_the_host_header(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.get("/users/register/", headers={"Host": "evil.example"})
    assert answer.status_code == 404
    assert "evil.example" not in answer.headers.get("location", "")
