"""Defences of the signup app, each proved against the real database."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.db import create_engine
from outbox.errors import ConfigError
from tests.integration.test_web import (
    PASSWORD,
    SECRET,
    confirm,
    csrf_token,
    mails,
    make_settings,
    rows,
    serve,
    users,
)
from web import passwords
from web.ratelimit import RateLimit

ROOT = Path(__file__).resolve().parents[2]


def signup(email: str, password: str = PASSWORD) -> dict[str, str]:
    return {"email": email, "password": password}


# --- rate limits ------------------------------------------------------------------------------


async def test_rate_limit_per_email_answers_429_with_retry_after(
    db_url: str, engine: AsyncEngine
) -> None:
    settings = make_settings(db_url, rate_limit_per_email="2/hour", rate_limit_per_ip="off")
    async with serve(settings, engine) as client:
        answers = [
            await client.post("/users/register", json=signup("ann@example.com")) for _ in range(3)
        ]
        other = await client.post("/users/register", json=signup("bob@example.com"))

    assert [a.status_code for a in answers] == [202, 202, 429]
    assert 0 < int(answers[2].headers["Retry-After"]) <= 3600
    assert answers[2].json()["error"].startswith("Too many requests")
    assert other.status_code == 202  # another address is not affected
    # The refused request wrote nothing: one account, and one mail per accepted request.
    assert len(await users(engine)) == 2
    assert len(await mails(engine)) == 3


async def test_rate_limit_per_client_address_covers_resend_and_form(
    db_url: str, engine: AsyncEngine
) -> None:
    settings = make_settings(db_url, rate_limit_per_ip="2/10m", rate_limit_per_email="off")
    async with serve(settings, engine) as client:
        codes = [
            (
                await client.post("/users/verify/resend", json={"email": f"u{n}@example.com"})
            ).status_code
            for n in range(3)
        ]
        token = await csrf_token(client)
        form = await client.post(
            "/users/verify/resend", data={"email": "x@example.com", "csrf_token": token}
        )
    assert codes == [202, 202, 429]
    assert form.status_code == 429
    assert "Retry-After" in form.headers
    assert "Too many requests" in form.text


async def test_rate_limit_holds_across_two_web_processes(db_url: str) -> None:
    """Two apps with their own engines (as two processes would have) share one counter."""
    settings = make_settings(db_url, rate_limit_per_email="3/hour", rate_limit_per_ip="off")
    engines = [create_engine(db_url, application_name=f"web-{n}") for n in range(2)]
    try:
        async with serve(settings, engines[0]) as first, serve(settings, engines[1]) as second:
            codes = []
            for n in range(5):
                client = (first, second)[n % 2]
                answer = await client.post("/users/register", json=signup("cas@example.com"))
                codes.append(answer.status_code)
    finally:
        for eng in engines:
            await eng.dispose()
    assert codes == [202, 202, 202, 429, 429]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("20/hour", RateLimit(20, 3600)),
        ("5/10m", RateLimit(5, 600)),
        ("100/1d", RateLimit(100, 86400)),
        ("3/s", RateLimit(3, 1)),
        ("off", None),
    ],
)
def test_rate_limit_spec_parses(spec: str, expected: RateLimit | None) -> None:
    assert RateLimit.parse(spec, name="X") == expected


def test_rate_limit_bad_spec_fails_at_start_up(db_url: str) -> None:
    from web.app import create_app

    with pytest.raises(ConfigError, match="RATE_LIMIT_PER_IP"):
        create_app(make_settings(db_url, rate_limit_per_ip="lots"))


# --- passwords --------------------------------------------------------------------------------


async def test_password_is_hashed_exactly_once_on_new_and_registered_paths(
    db_url: str, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same work on both paths, so the answer's timing does not tell whether an address has an
    account (the measured difference of medians is in bench/signup_timing.py)."""
    calls: list[str] = []
    real_hash = passwords.hash_password

    async def counting_hash(password: str, **options: Any) -> str:
        calls.append("hash")
        return await real_hash(password, **options)

    monkeypatch.setattr("web.routes.hash_password", counting_hash)
    settings = make_settings(db_url, rate_limit_per_email="off", rate_limit_per_ip="off")
    async with serve(settings, engine) as client:
        await client.post("/users/register", json=signup("same@example.com"))
        new_path = len(calls)
        await client.post("/users/register", json=signup("same@example.com"))
        registered_path = len(calls) - new_path
    assert new_path == registered_path == 1


async def test_password_never_stored_logged_or_echoed(
    db_url: str, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Sup3r-secret-p4ssword"
    caplog.set_level(logging.DEBUG)
    settings = make_settings(db_url)
    async with serve(settings, engine) as client:
        token = await csrf_token(client)
        answers = [
            await client.post("/users/register", json=signup("pw@example.com", secret)),
            await client.post("/users/register", json=signup("not-an-email", secret)),
            await client.post(
                "/users/register",
                data={"email": "bad", "password": secret, "csrf_token": token},
            ),
        ]
    for answer in answers:
        assert secret not in answer.text
    stored = await rows(engine, "SELECT password_hash FROM users")
    assert stored[0]["password_hash"].startswith("$argon2id$")
    assert secret not in str(await rows(engine, "SELECT * FROM users"))
    assert secret not in str(await rows(engine, "SELECT payload FROM outbox"))
    assert secret not in caplog.text


@pytest.mark.parametrize(("length", "status"), [(7, 400), (8, 202), (1024, 202), (1025, 400)])
async def test_password_length_bounds(
    db_url: str, engine: AsyncEngine, length: int, status: int
) -> None:
    async with serve(make_settings(db_url), engine) as client:
        answer = await client.post(
            "/users/register", json=signup(f"len{length}@example.com", "p" * length)
        )
    assert answer.status_code == status
    if status == 400:
        assert answer.json()["field"] == "password"


# --- tokens -----------------------------------------------------------------------------------


async def test_token_from_another_purpose_is_refused(db_url: str, engine: AsyncEngine) -> None:
    """Same key, other salt (say, a password-reset token): not a verification token."""
    other = URLSafeTimedSerializer(SECRET, salt="reset-password").dumps(
        {"uid": 1, "email": "ann@example.com"}
    )
    async with serve(make_settings(db_url), engine) as client:
        await client.post("/users/register", json=signup("ann@example.com"))
        answer = await client.get("/users/verify", params={"token": other})
    assert answer.status_code == 400
    assert (await users(engine))[0]["verified_at"] is None


async def test_token_truncated_is_refused(db_url: str, engine: AsyncEngine) -> None:
    from web.tokens import make_token

    settings = make_settings(db_url)
    async with serve(settings, engine) as client:
        await client.post("/users/register", json=signup("ann@example.com"))
        [user] = await rows(engine, "SELECT id, token_nonce FROM users")
        token = make_token(settings, user_id=user["id"], nonce=user["token_nonce"])
        for cut in (1, len(token) // 2, len(token) - 1):
            answer = await client.get("/users/verify", params={"token": token[:cut]})
            assert answer.status_code == 400
            assert (await confirm(client, token[:cut])).status_code == 400
        assert (await confirm(client, token)).status_code == 200
        # Reused after verifying: still the friendly page, and the first time is kept.
        first = (await users(engine))[0]["verified_at"]
        assert (await confirm(client, token)).status_code == 200
        assert (await users(engine))[0]["verified_at"] == first


# --- SQL --------------------------------------------------------------------------------------


def _sql_built_from_strings(path: Path) -> list[str]:
    """Calls to text()/execute()/exec_driver_sql() whose SQL is an f-string, a concatenation or
    a .format() call: the shapes that splice values into SQL instead of binding them."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in ("text", "execute", "exec_driver_sql"):
            continue
        sql = node.args[0]
        spliced = (
            isinstance(sql, ast.JoinedStr)
            or (isinstance(sql, ast.BinOp) and isinstance(sql.op, ast.Add | ast.Mod))
            or (
                isinstance(sql, ast.Call)
                and isinstance(sql.func, ast.Attribute)
                and sql.func.attr == "format"
            )
        )
        if spliced:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


# Each allowed site splices a validated identifier, never request data.
_ALLOWED = {"outbox/listener.py"}  # LISTEN <channel>, checked with str.isidentifier()


def test_sql_no_statement_is_built_from_strings() -> None:
    sources = [p for d in ("outbox", "web", "migrations") for p in (ROOT / d).rglob("*.py")]
    offenders = [
        hit
        for path in sources
        for hit in _sql_built_from_strings(path)
        if hit.split(":")[0] not in _ALLOWED
    ]
    assert offenders == []


def test_sql_lint_catches_an_f_string() -> None:
    """The check above can fail: it flags the shapes it looks for."""
    sample = ROOT / "tests" / "integration" / "_sql_sample_tmp.py"
    sample.write_text(
        "def f(conn, name):\n"
        "    conn.execute(f\"SELECT * FROM users WHERE email = '{name}'\")\n"
        "    conn.execute('SELECT ' + name)\n"
        "    text('SELECT {}'.format(name))\n"
    )
    try:
        assert len(_sql_built_from_strings(sample)) == 3
    finally:
        sample.unlink()
