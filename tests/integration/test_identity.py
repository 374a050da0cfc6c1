"""One address, one account: the canonical key (web.identity), whatever the database's locale.

Issue 11, finding 2: the unique index was SQL ``lower(email)`` and lookups used Python's
``lower()``. They disagree on ``İ``, final ``Σ``, ``ß`` and the Kelvin sign, and in a database
whose ``LC_CTYPE`` is ``C`` SQL ``lower`` leaves every non-ASCII letter alone. These tests walk
such addresses through signup, confirm, resend and re-signup on a ``C`` database and a
``C.UTF-8`` one (both made from ``template0`` and migrated by Alembic here).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.db import create_engine as create_async_engine
from outbox.settings import libpq_url, normalise_database_url
from tests.integration.test_web import (
    PASSWORD,
    SUBJECT,
    confirm,
    mails,
    make_settings,
    rows,
    serve,
    token_in,
)
from web import migrate
from web.identity import email_key, mailbox_key


def _database_url(admin_url: str, name: str) -> str:
    url = make_url(normalise_database_url(admin_url)).set(database=name)
    return url.render_as_string(hide_password=False)


def _admin(admin_url: str, sql: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.encode())


@pytest.fixture(params=["C", "C.UTF-8"])
def locale_db_url(request: pytest.FixtureRequest, pg_admin_url: str) -> Iterator[str]:
    """A migrated database whose LC_COLLATE and LC_CTYPE are ``request.param``."""
    name = f"test_loc_{uuid.uuid4().hex[:12]}"
    locale = request.param
    _admin(
        pg_admin_url,
        f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
        f"LC_COLLATE '{locale}' LC_CTYPE '{locale}'",
    )
    url = _database_url(pg_admin_url, name)
    engine = create_engine(url)
    with engine.begin() as connection:
        # The database's own LC_CTYPE (`SHOW lc_ctype` is gone in PostgreSQL 16).
        ctype = "SELECT datctype FROM pg_database WHERE datname = current_database()"
        assert connection.execute(text(ctype)).scalar_one() == locale
        migrate.upgrade(connection)
    engine.dispose()
    yield url
    _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def locale_client(locale_db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    engine = create_async_engine(locale_db_url, application_name="outbox-test")
    settings = make_settings(locale_db_url, rate_limit_per_ip="off", rate_limit_per_email="off")
    try:
        async with serve(settings, engine) as client:
            yield client, engine
    finally:
        await engine.dispose()


async def _signup(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> None:
    answer = await client.post("/users/register", json={"email": email, "password": password})
    assert answer.status_code == 202, answer.text


async def _resend(client: httpx.AsyncClient, email: str) -> None:
    answer = await client.post("/users/verify/resend", json={"email": email})
    assert answer.status_code == 202, answer.text


async def _accounts(engine: AsyncEngine) -> list[dict[str, object]]:
    return await rows(engine, "SELECT id, email, email_key, verified_at FROM users ORDER BY id")


# Pairs of spellings of one mailbox: final sigma, sharp s, the Kelvin sign, upper-case
# non-ASCII letters (which SQL lower() in a C database leaves alone).
SAME_MAILBOX = [
    ("ΣΑΣ@example.com", "σας@example.com"),
    ("STRASSE@example.com", "straße@example.com"),
    ("\u212aelvin@example.com", "kelvin@example.com"),
    ("ÉMILE@Example.COM", "émile@example.com"),
    ("ÇAĞAN@example.com", "çağan@example.com"),
]


async def test_identity_spellings_of_one_mailbox_are_one_account_on_any_locale(
    locale_client: tuple[httpx.AsyncClient, AsyncEngine],
) -> None:
    client, engine = locale_client
    for first, second in SAME_MAILBOX:
        sent = len(await mails(engine))
        await _signup(client, first)  # a new account: the first link
        await _resend(client, second)  # the other spelling finds it: a fresh link
        [account] = [a for a in await _accounts(engine) if a["email_key"] == email_key(first)]
        new = (await mails(engine))[sent:]
        assert [m["subject"] for m in new] == [SUBJECT, SUBJECT], (first, second)
        # Re-signup with the other spelling: the same account, a new password, a new link;
        # the two links mailed before stop working.
        await _signup(client, second, "another password")
        links = [token_in(m["text"]) for m in (await mails(engine))[sent:]]
        assert len(links) == 3
        for old in links[:2]:
            assert (await confirm(client, old)).status_code == 400, (first, old)
        assert (await confirm(client, links[2])).status_code == 200, (first, second)
        # Verified now: a resend mails nothing, a signup only the owner's notice.
        await _resend(client, first)
        await _signup(client, first)
        after = (await mails(engine))[sent + 3 :]
        assert len(after) == 1 and after[0]["subject"] != SUBJECT
        accounts = [a for a in await _accounts(engine) if a["email_key"] == email_key(first)]
        assert [a["id"] for a in accounts] == [account["id"]]
        assert accounts[0]["verified_at"] is not None
    assert len(await _accounts(engine)) == len(SAME_MAILBOX)


async def test_identity_dotted_capital_i_does_not_take_the_plain_address(
    locale_client: tuple[httpx.AsyncClient, AsyncEngine],
) -> None:
    """``İnfo@x`` registered first must not capture ``info@x``: they are two accounts, and the
    owner of ``info@x`` gets their own link and can verify it."""
    client, engine = locale_client
    await _signup(client, "İnfo@example.com", "attacker password")
    await _signup(client, "info@example.com")
    await _resend(client, "info@example.com")

    accounts = await _accounts(engine)
    assert [a["email"] for a in accounts] == ["İnfo@example.com", "info@example.com"]
    to_owner = [m for m in await mails(engine) if m["to"] == "info@example.com"]
    assert [m["subject"] for m in to_owner] == [SUBJECT, SUBJECT]
    assert (await confirm(client, token_in(to_owner[-1]["text"]))).status_code == 200
    verified = {a["email"]: a["verified_at"] is not None for a in await _accounts(engine)}
    assert verified == {"İnfo@example.com": False, "info@example.com": True}


def test_identity_key_folds_case_unicode_and_gmail_variants() -> None:
    assert email_key("ΣΑΣ@example.com") == email_key("σας@example.com") == "σασ@example.com"
    assert email_key("STRASSE@example.com") == email_key("straße@example.com")
    assert email_key("\u212a@example.com") == email_key("k@example.com")
    assert email_key("İnfo@example.com") != email_key("info@example.com")
    assert email_key("Ann@Bücher.example") == "ann@xn--bcher-kva.example"
    assert email_key("A.n.n+news@GoogleMail.com") == email_key("ann@gmail.com")
    assert email_key("ann+1@example.com") != email_key("ann@example.com")  # maybe someone else
    assert mailbox_key("ann+1@example.com") == mailbox_key("ANN@example.com")  # one bucket


def test_identity_migration_keys_existing_rows_and_keeps_colliding_ones(
    empty_db_url: str,
) -> None:
    """Rows written under revision 0002 get their key; two rows the new key makes one account
    (the old index let ``STRASSE`` and ``straße`` coexist) both survive, the verified one
    owning the key."""
    engine = create_engine(empty_db_url)
    with engine.begin() as connection:
        migrate.upgrade(connection, "0002")
        connection.execute(
            text(
                "INSERT INTO users (email, password_hash, verified_at) VALUES"
                " ('STRASSE@example.com', 'h', NULL), ('straße@example.com', 'h', now()),"
                " ('Ann@Example.com', 'h', NULL)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO rate_limits (bucket, window_start, hits)"
                " VALUES ('signup:email:ann@example.com', now(), 3)"
            )
        )
        migrate.upgrade(connection)
        keyed = connection.execute(text("SELECT email, email_key FROM users ORDER BY id")).all()
        limits = connection.execute(text("SELECT count(*) FROM rate_limits")).scalar_one()
    engine.dispose()
    assert keyed[1:] == [
        ("straße@example.com", "strasse@example.com"),
        ("Ann@Example.com", "ann@example.com"),
    ]
    assert keyed[0][1].startswith(" duplicate ")  # kept, but no address can reach it
    assert limits == 0  # plain-text keys are gone
