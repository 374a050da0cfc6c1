"""The users table and the few statements the signup app runs on it."""

from __future__ import annotations

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


async def find_by_email(conn: AsyncConnection, email: str) -> dict[str, object] | None:
    row = (
        await conn.execute(
            select(users_table).where(func.lower(users_table.c.email) == email.lower())
        )
    ).mappings().first()
    return dict(row) if row else None


async def mark_verified(conn: AsyncConnection, *, user_id: int, now: datetime | None = None) -> bool:
    """Set verified_at once; a second click keeps the first time. False if no such user."""
    stmt = (
        update(users_table)
        .where(users_table.c.id == user_id)
        .values(verified_at=func.coalesce(users_table.c.verified_at, now or func.now()))
        .returning(users_table.c.id)
    )
    return (await conn.execute(stmt)).first() is not None


__all__ = ["create_user", "find_by_email", "mark_verified", "metadata", "users_table"]
