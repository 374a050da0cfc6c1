"""The users table and the few statements the signup app runs on it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.schema import NAMING_CONVENTION

metadata = MetaData(naming_convention=NAMING_CONVENTION)

users_table = Table(
    "users",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("email", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("verified_at", DateTime(timezone=True)),
)
# Unique case-insensitively: Ann@Example.com and ann@example.com are one account.
Index("uq_users_lower_email", func.lower(users_table.c.email), unique=True)


async def create_user(conn: AsyncConnection, *, email: str, password_hash: str) -> int | None:
    """Insert a user; ``None`` when the address is already registered (no error, no abort).

    ON CONFLICT keeps the caller's transaction usable, so the caller can enqueue the "already
    registered" notice in the same transaction instead.
    """
    stmt = (
        pg_insert(users_table)
        .values(email=email, password_hash=password_hash)
        .on_conflict_do_nothing(index_elements=[func.lower(users_table.c.email)])
        .returning(users_table.c.id)
    )
    user_id: int | None = (await conn.execute(stmt)).scalar_one_or_none()
    return user_id


@dataclass(frozen=True, slots=True)
class User:
    """The columns the signup flow needs (never the password hash)."""

    id: int
    email: str
    verified_at: datetime | None


async def find_user(conn: AsyncConnection, *, email: str) -> User | None:
    """The account for ``email``, matched case-insensitively like the unique index."""
    row = (
        await conn.execute(
            select(users_table.c.id, users_table.c.email, users_table.c.verified_at).where(
                func.lower(users_table.c.email) == email.lower()
            )
        )
    ).first()
    return User(id=row.id, email=row.email, verified_at=row.verified_at) if row else None


async def mark_verified(
    conn: AsyncConnection,
    *,
    user_id: int,
    email: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Set verified_at once; a second click keeps the first time. False if no such user.

    With ``email`` the row must also still have that address (case-insensitively), so a token
    issued for one address can never verify another.
    """
    conditions = [users_table.c.id == user_id]
    if email is not None:
        conditions.append(func.lower(users_table.c.email) == email.lower())
    stmt = (
        update(users_table)
        .where(*conditions)
        .values(verified_at=func.coalesce(users_table.c.verified_at, now or func.now()))
        .returning(users_table.c.id)
    )
    return (await conn.execute(stmt)).first() is not None


__all__ = [
    "User",
    "create_user",
    "find_user",
    "mark_verified",
    "metadata",
    "users_table",
]
