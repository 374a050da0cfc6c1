"""The users table and the few statements the signup app runs on it.

Identity is ``email_key`` (``web.identity.email_key``, computed in Python, unique): the database
never folds case itself, so its locale cannot change who owns an address. ``email`` keeps the
address as the user typed it (normalised), for the mail's ``To``.

``token_nonce`` is what a verification link is bound to. A new signup for an address whose
account is not verified yet replaces the password and draws a new nonce, so every link mailed
before stops working: whoever registered an address first cannot keep an account on someone
else's inbox (issue 11, finding 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import UUID as PG_UUID, insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.schema import NAMING_CONVENTION
from web.identity import email_key

metadata = MetaData(naming_convention=NAMING_CONVENTION)

users_table = Table(
    "users",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("email", Text, nullable=False),
    Column("email_key", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column(
        "token_nonce",
        PG_UUID(as_uuid=True),
        nullable=False,
        server_default=text("gen_random_uuid()"),
    ),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("verified_at", DateTime(timezone=True)),
    # One account per canonical address (web.identity), whatever the database's locale.
    UniqueConstraint("email_key", name="uq_users_email_key"),
)


@dataclass(frozen=True, slots=True)
class User:
    """The columns the signup flow needs (never the password hash)."""

    id: int
    email: str
    token_nonce: UUID
    verified_at: datetime | None


_USER_COLUMNS = (
    users_table.c.id,
    users_table.c.email,
    users_table.c.token_nonce,
    users_table.c.verified_at,
)


def _user(row: object) -> User:
    return User(
        id=row.id,  # type: ignore[attr-defined]
        email=row.email,  # type: ignore[attr-defined]
        token_nonce=row.token_nonce,  # type: ignore[attr-defined]
        verified_at=row.verified_at,  # type: ignore[attr-defined]
    )


async def create_user(conn: AsyncConnection, *, email: str, password_hash: str) -> User | None:
    """Insert a user; ``None`` when the address is already registered (no error, no abort).

    ON CONFLICT keeps the caller's transaction usable, so the caller can deal with the existing
    account in the same transaction instead.
    """
    stmt = (
        pg_insert(users_table)
        .values(email=email, email_key=email_key(email), password_hash=password_hash)
        .on_conflict_do_nothing(index_elements=[users_table.c.email_key])
        .returning(*_USER_COLUMNS)
    )
    row = (await conn.execute(stmt)).first()
    return _user(row) if row else None


async def replace_unverified(
    conn: AsyncConnection, *, email: str, password_hash: str
) -> User | None:
    """Give the not-yet-verified account of ``email`` this spelling, password and token nonce.

    Returns the account, or ``None`` when it is verified (or gone): then nothing changed. The
    row lock this UPDATE takes orders it with a concurrent confirm, which matches the nonce.
    """
    stmt = (
        update(users_table)
        .where(users_table.c.email_key == email_key(email), users_table.c.verified_at.is_(None))
        .values(email=email, password_hash=password_hash, token_nonce=func.gen_random_uuid())
        .returning(*_USER_COLUMNS)
    )
    row = (await conn.execute(stmt)).first()
    return _user(row) if row else None


async def find_user(conn: AsyncConnection, *, email: str) -> User | None:
    """The account for ``email``, matched by its canonical key like the unique index."""
    stmt = select(*_USER_COLUMNS).where(users_table.c.email_key == email_key(email))
    row = (await conn.execute(stmt)).first()
    return _user(row) if row else None


async def find_by_token(conn: AsyncConnection, *, user_id: int, nonce: UUID) -> User | None:
    """The account a verification link names, if that link is still its current one."""
    stmt = select(*_USER_COLUMNS).where(
        users_table.c.id == user_id, users_table.c.token_nonce == nonce
    )
    row = (await conn.execute(stmt)).first()
    return _user(row) if row else None


async def mark_verified(
    conn: AsyncConnection,
    *,
    user_id: int,
    nonce: UUID,
) -> User | None:
    """Set verified_at once; a second confirm keeps the first time. ``None`` if no such user,
    or if the row no longer carries the link's ``nonce``: a link mailed before the account's
    password was replaced (a later signup) can never verify it.
    """
    stmt = (
        update(users_table)
        .where(users_table.c.id == user_id, users_table.c.token_nonce == nonce)
        .values(verified_at=func.coalesce(users_table.c.verified_at, func.now()))
        .returning(*_USER_COLUMNS)
    )
    row = (await conn.execute(stmt)).first()
    return _user(row) if row else None


__all__ = [
    "User",
    "create_user",
    "find_by_token",
    "find_user",
    "mark_verified",
    "metadata",
    "replace_unverified",
    "users_table",
]
