"""The operator dashboard against a real database, through httpx's ASGI transport.

Rows are written with plain SQL in the states the relay leaves them in; every action goes
through the real form posts (CSRF token and session cookie included).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from outbox import admin
from outbox.dashboard import create_dashboard
from outbox.dashboard.auth import LoginThrottle

PASSWORD = "correct horse battery"


_SETTLE = {
    "pending": None,
    "retrying": text(
        "UPDATE outbox SET attempts = 2, last_error = :error, "
        "available_at = now() + interval '1 hour' WHERE id = :id"
    ),
    "dead": text(
        "UPDATE outbox SET attempts = 15, dead_at = now(), last_error = :error WHERE id = :id"
    ),
    "sent": text(
        "UPDATE outbox SET attempts = 1, sent_at = now(), result = '250 2.0.0 Ok: queued' "
        "WHERE id = :id"
    ),
}
_INSERT = text("INSERT INTO outbox (topic, payload) VALUES (:topic, :payload) RETURNING id")


async def _insert(
    engine: AsyncEngine,
    count: int = 1,
    *,
    state: str = "pending",
    topic: str = "email",
    payload: Any = None,
    error: str = "PermanentSendError: SMTP 550",
) -> list[int]:
    """Insert ``count`` messages in ``state``, as the relay would have left them."""
    body = payload if payload is not None else {"to": "ann@example.com", "subject": "hi"}
    ids: list[int] = []
    async with engine.begin() as conn:
        for _ in range(count):
            params = {"topic": topic, "payload": json.dumps(body)}
            row_id = int((await conn.execute(_INSERT, params)).scalar_one())
            settle = _SETTLE[state]
            if settle is not None:
                await conn.execute(settle, {"id": row_id, "error": error})
            ids.append(row_id)
    return ids


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver", follow_redirects=False
    )


def _mounted(engine: AsyncEngine, *, prefix: str = "/admin", **options: Any) -> Starlette:
    return Starlette(routes=[Mount(prefix, create_dashboard(engine, **options))])


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(_mounted(engine, password=None)) as c:
        yield c


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def _state(engine: AsyncEngine, row_id: int) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    text("SELECT attempts, dead_at, sent_at FROM outbox WHERE id = :id"),
                    {"id": row_id},
                )
            )
            .mappings()
            .one_or_none()
        )
    return dict(row) if row else None


def _ids(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'href="/admin/messages/(\d+)"', html)]


async def test_dashboard_overview_shows_the_status_counts_topics_and_chart(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    await _insert(engine, 3, state="pending")
    await _insert(engine, 2, state="retrying", topic="welcome")
    await _insert(engine, 4, state="dead")
    await _insert(engine, 5, state="sent")
    async with engine.begin() as conn:  # the oldest due message has waited ten minutes
        await conn.execute(
            text("UPDATE outbox SET available_at = now() - interval '10 minutes' WHERE id = 1")
        )
    counts = await admin.status(engine)

    page = await client.get("/admin/")

    assert page.status_code == 200
    html = page.text
    for state in ("pending", "retrying", "dead", "sent"):
        assert re.search(rf'id="count-{state}">{int(counts[state])}<', html), state
    assert counts == {**counts, "pending": 3, "retrying": 2, "dead": 4, "sent": 5}
    assert re.search(r'id="oldest-due">10 min<', html)
    assert ">welcome</a>" in html and ">email</a>" in html
    assert html.count('class="sent"') >= 1 and html.count('class="dead"') >= 1  # chart bars
    assert "Last hour: 5 sent, 4 dead" in html
    assert '<meta http-equiv="refresh"' in html
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    css = await client.get("/admin/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


async def test_dashboard_lists_each_state_and_searches_recipient_message_id_and_error(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    pending = await _insert(engine, state="pending", payload={"to": "zoe@example.com"})
    listed = await _insert(
        engine, state="pending", payload={"to": ["a@example.com", "bob@example.org"]}
    )
    dead = await _insert(engine, state="dead", error="PermanentSendError: SMTP 550 mailbox gone")
    sent = await _insert(engine, state="sent", topic="welcome")

    async def ids(**params: str) -> list[int]:
        page = await client.get("/admin/messages", params=params)
        assert page.status_code == 200
        return _ids(page.text)

    assert await ids(state="pending") == pending + listed
    assert await ids(state="dead") == dead
    assert await ids(state="sent") == sent
    assert await ids(state="retrying") == []
    assert await ids() == sorted(pending + listed + dead + sent, reverse=True)
    assert await ids(q="bob@example") == listed  # one address of a list
    assert await ids(q="ZOE@") == pending  # case-insensitive
    assert await ids(q="mailbox gone") == dead  # error text
    assert await ids(q="100%_") == []  # LIKE wildcards are taken literally
    assert await ids(topic="welcome") == sent
    assert await ids(state="pending", topic="welcome") == []
    async with engine.connect() as conn:
        message_id = (
            await conn.execute(
                text("SELECT message_id FROM outbox WHERE id = :id"), {"id": dead[0]}
            )
        ).scalar_one()
    assert await ids(q=f"<{message_id}@example.com>") == dead
    assert await ids(q=f"#{sent[0]}") == sent
    bad = await client.get("/admin/messages", params={"state": "lost"})
    assert bad.status_code == 400


async def test_dashboard_pages_through_rows_that_share_a_timestamp(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    """A batch settles with one ``now``: the keyset must not skip or repeat rows of a tie."""
    sent = await _insert(engine, 120, state="sent")
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE outbox SET sent_at = '2026-01-01T00:00:00Z'"))

    seen: list[int] = []
    url: str | None = "/admin/messages?state=sent"
    pages = 0
    while url:
        page = await client.get(url)
        seen += _ids(page.text)
        pages += 1
        found = re.search(r'href="([^"]+)" rel="next"', page.text)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert pages == 3
    assert seen == sorted(sent, reverse=True)


async def test_dashboard_message_page_shows_everything_and_retry_makes_it_due(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    [row_id] = await _insert(
        engine, state="dead", error="PermanentSendError: SMTP 550 no such user"
    )
    page = await client.get(f"/admin/messages/{row_id}")
    assert page.status_code == 200
    for shown in ("no such user", "ann@example.com", ">15<", "&#34;subject&#34;", "Discard"):
        assert shown in page.text, shown

    retried = await client.post(
        f"/admin/messages/{row_id}/retry", data={"csrf_token": _csrf(page.text)}
    )

    assert retried.status_code == 303
    assert retried.headers["location"] == f"/admin/messages/{row_id}?notice=retried"
    assert await _state(engine, row_id) == {"attempts": 0, "dead_at": None, "sent_at": None}
    after = await client.get(retried.headers["location"])
    # Requeued with its last error kept: it failed and will be tried again, so it is retrying.
    assert "Retried" in after.text and 'class="state retrying"' in after.text
    assert "/discard" not in after.text  # only a dead message has the buttons


async def test_dashboard_discard_deletes_a_dead_message_and_nothing_else(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    [dead] = await _insert(engine, state="dead")
    [pending] = await _insert(engine, state="pending")
    token = _csrf((await client.get(f"/admin/messages/{dead}")).text)

    gone = await client.post(f"/admin/messages/{dead}/discard", data={"csrf_token": token})
    kept = await client.post(f"/admin/messages/{pending}/discard", data={"csrf_token": token})

    assert gone.status_code == 303 and "notice=discarded" in gone.headers["location"]
    assert await _state(engine, dead) is None
    assert kept.headers["location"].endswith("notice=not-dead")
    assert await _state(engine, pending) is not None
    assert (await client.get(f"/admin/messages/{dead}")).status_code == 404


async def test_dashboard_bulk_actions_ask_first_and_then_act(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    dead = await _insert(engine, 3, state="dead")
    [sent] = await _insert(engine, state="sent")

    confirm = await client.get("/admin/dead/discard")
    assert confirm.status_code == 200 and "Discard all 3 dead messages?" in confirm.text
    assert all([await _state(engine, i) for i in dead])  # looking changed nothing

    retry_page = await client.get("/admin/dead/retry")
    await client.post("/admin/dead/retry", data={"csrf_token": _csrf(retry_page.text)})
    assert [(await _state(engine, i) or {}).get("dead_at") for i in dead] == [None] * 3

    shown = await _insert(engine, 2, state="dead")
    confirm = await client.get("/admin/dead/discard")
    assert "Discard all 2 dead messages?" in confirm.text
    [died_since] = await _insert(engine, state="dead")  # dies while the operator reads
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE outbox SET dead_at = now() + interval '1 s' WHERE id = :id"),
            {"id": died_since},
        )
    token = _csrf(confirm.text)
    unconfirmed = await client.post("/admin/dead/discard", data={"csrf_token": token})
    assert unconfirmed.headers["location"] == "/admin/dead/discard"  # asked again
    assert all([await _state(engine, i) for i in shown])
    until = re.search(r'name="dead_until" value="([^"]+)"', confirm.text)
    assert until
    done = await client.post(
        "/admin/dead/discard", data={"csrf_token": token, "dead_until": until.group(1)}
    )
    assert done.status_code == 303
    assert [await _state(engine, i) for i in shown] == [None, None]
    assert (await admin.status(engine))["dead"] == 1  # the one that died after the page
    assert await _state(engine, died_since) is not None
    assert await _state(engine, sent) is not None and await _state(engine, dead[0]) is not None


async def test_dashboard_refuses_a_post_without_the_sessions_csrf_token(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    [row_id] = await _insert(engine, state="dead")
    await client.get(f"/admin/messages/{row_id}")  # the browser has a session cookie now

    missing = await client.post(f"/admin/messages/{row_id}/discard", data={})
    forged = await client.post(f"/admin/messages/{row_id}/discard", data={"csrf_token": "x" * 43})
    async with _client(_mounted(engine, password=None)) as stranger:  # another site's browser
        cross = await stranger.post(
            f"/admin/messages/{row_id}/retry", data={"csrf_token": "x" * 43}
        )
        bulk = await stranger.post("/admin/dead/discard", data={})

    assert [r.status_code for r in (missing, forged, cross, bulk)] == [403, 403, 403, 403]
    assert (await _state(engine, row_id) or {}).get("dead_at") is not None


async def test_dashboard_with_a_password_requires_login_and_throttles_wrong_ones(
    engine: AsyncEngine,
) -> None:
    clock = [1000.0]
    throttle = LoginThrottle(limit=3, window_s=60, clock=lambda: clock[0])
    app = _mounted(engine, password=PASSWORD, throttle=throttle)
    [row_id] = await _insert(engine, state="dead")
    async with _client(app) as c:
        first = await c.get("/admin/messages?state=dead")
        assert first.status_code == 303
        assert first.headers["location"] == "/admin/login?next=%2Fmessages%3Fstate%3Ddead"
        login = await c.get(first.headers["location"])
        token = _csrf(login.text)
        refused = await c.post(f"/admin/messages/{row_id}/discard", data={"csrf_token": token})
        assert refused.status_code == 403 and await _state(engine, row_id) is not None

        wrong = [
            await c.post("/admin/login", data={"csrf_token": token, "password": "guess"})
            for _ in range(3)
        ]
        assert [r.status_code for r in wrong] == [401, 401, 401]
        blocked = await c.post("/admin/login", data={"csrf_token": token, "password": PASSWORD})
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) == 60
        assert (await c.get("/admin/")).status_code == 303  # the right password did not count

        clock[0] += 61
        ok = await c.post(
            "/admin/login?next=/messages", data={"csrf_token": token, "password": PASSWORD}
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/admin/messages"
        overview = await c.get("/admin/")
        assert overview.status_code == 200 and "Log out" in overview.text
        token = _csrf(overview.text)  # logging in starts a new session with a new token
        out = await c.post("/admin/logout", data={"csrf_token": token})
        assert out.status_code == 303
        assert (await c.get("/admin/")).status_code == 303


async def test_dashboard_login_is_refused_for_a_tampered_session_cookie(
    engine: AsyncEngine,
) -> None:
    async with _client(_mounted(engine, password=PASSWORD)) as c:
        login = await c.get("/admin/login")
        token = _csrf(login.text)
        await c.post("/admin/login", data={"csrf_token": token, "password": PASSWORD})
        cookie = c.cookies["outbox_admin"]
        c.cookies.clear()
        c.cookies.set("outbox_admin", cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB"))
        assert (await c.get("/admin/")).status_code == 303


async def test_dashboard_works_under_any_mount_prefix(engine: AsyncEngine) -> None:
    [row_id] = await _insert(engine, state="dead")
    async with _client(_mounted(engine, prefix="/ops/queue", password=None)) as c:
        page = await c.get("/ops/queue/messages?state=dead")
        assert f'href="/ops/queue/messages/{row_id}"' in page.text
        assert 'href="/ops/queue/dashboard.css"' in page.text
        assert "path=/ops/queue/;" in page.headers["set-cookie"].lower()
        detail = await c.get(f"/ops/queue/messages/{row_id}")
        assert f'action="/ops/queue/messages/{row_id}/retry"' in detail.text
        done = await c.post(
            f"/ops/queue/messages/{row_id}/retry", data={"csrf_token": _csrf(detail.text)}
        )
        assert done.headers["location"].startswith(f"/ops/queue/messages/{row_id}")


async def test_dashboard_unknown_message_is_a_404_page(client: httpx.AsyncClient) -> None:
    assert (await client.get("/admin/messages/424242")).status_code == 404
    assert (await client.get(f"/admin/messages/{2**70}")).status_code == 404


async def test_admin_discard_deletes_only_dead_messages(engine: AsyncEngine) -> None:
    dead = await _insert(engine, 2, state="dead")
    [retrying] = await _insert(engine, state="retrying")
    [sent] = await _insert(engine, state="sent")

    assert await admin.discard(engine, ids=[dead[0], retrying, sent], all_dead=False) == [dead[0]]
    assert await admin.discard(engine, ids=[], all_dead=True) == [dead[1]]
    assert await _state(engine, retrying) is not None and await _state(engine, sent) is not None


def test_dashboard_cursor_refuses_what_it_did_not_write() -> None:
    from outbox.dashboard.queries import Cursor

    assert Cursor.decode("2026-01-01T00:00:00+00:00~42") is not None
    assert Cursor.decode("7") == Cursor(None, 7)
    for bad in ("", "x", "2026-01-01T00:00:00~4", "~-1", f"{2**64}", str(uuid.uuid4())):
        assert Cursor.decode(bad) is None, bad


async def test_dashboard_login_sends_only_to_its_own_pages(engine: AsyncEngine) -> None:
    """Served at the root, ``next=//evil.example`` would be another site: it goes home."""
    async with _client(create_dashboard(engine, password=PASSWORD)) as c:
        token = _csrf((await c.get("/login")).text)
        for target, expected in (
            ("//evil.example/x", "/"),
            ("/\\evil.example", "/"),
            ("https://evil.example", "/"),
            ("/messages?state=dead", "/messages?state=dead"),
        ):
            ok = await c.post(
                "/login", params={"next": target}, data={"csrf_token": token, "password": PASSWORD}
            )
            assert ok.headers["location"] == expected, target
            token = _csrf((await c.get("/")).text)


async def test_dashboard_says_when_the_database_is_down_or_not_migrated(
    empty_db_url: str,
) -> None:
    from outbox.db import create_engine as create_async_engine
    from web.capture import free_port

    down = create_async_engine(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", application_name="t"
    )
    bare = create_async_engine(empty_db_url, application_name="t")
    try:
        async with _client(_mounted(down, password=None)) as c:
            page = await c.get("/admin/")
            assert page.status_code == 503 and "does not answer" in page.text
        async with _client(_mounted(bare, password=None)) as c:
            page = await c.get("/admin/messages")
            assert page.status_code == 503 and "outbox migrate" in page.text
    finally:
        await down.dispose()
        await bare.dispose()


async def test_dashboard_message_on_its_first_try_is_pending_and_said_to_be_in_flight(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    """The attempt is counted at claim: a first try in flight has attempts = 1 and no error.
    It is pending (nothing failed), and its page says a relay is on it rather than "due in
    30 s" (its available_at is the claim's lease)."""
    [row_id] = await _insert(engine, state="pending")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE outbox SET attempts = 1, claimed_by = gen_random_uuid(),"
                " available_at = now() + interval '30 s' WHERE id = :id"
            ),
            {"id": row_id},
        )

    page = await client.get(f"/admin/messages/{row_id}")

    assert 'class="state pending"' in page.text
    assert "A relay is trying it now (attempt 1)." in page.text
    assert "Not tried yet" not in page.text
    listed = await client.get("/admin/messages", params={"state": "pending"})
    assert _ids(listed.text) == [row_id]
    assert _ids((await client.get("/admin/messages?state=retrying")).text) == []
