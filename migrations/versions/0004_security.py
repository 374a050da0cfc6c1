"""Security, second round (issue 11): the canonical email key, token nonces, hashed rate limits.

- ``users.email_key``: the address's canonical key (``web.identity.email_key``), unique, in place
  of the unique index on SQL ``lower(email)`` (which disagreed with Python's ``lower`` and
  depended on the database's locale). Existing rows are keyed here, in Python, in batches. Rows
  that the new key makes one account (``Straße``/``strasse``, Gmail dot variants: the old index
  let them coexist) keep their data: the verified (else the oldest) row owns the key, the others
  get a key no address can have (``" duplicate <id> <key>"``, with a leading space) and are
  listed in the log for the operator to merge or delete.
- ``users.token_nonce``: what a verification link is bound to; a new one voids every earlier
  link. Existing rows get a fresh one, so links mailed before this upgrade stop working (they
  also named the address in clear); "send the link again" mails a new one.
- ``rate_limits``: buckets are now HMAC digests, not plain addresses, and rows carry
  ``expires_at`` (indexed) so the cleanup deletes expired windows in small batches. The old rows
  (plain-text keys, counted under the old rules) are dropped: at worst a client gets one fresh
  window.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from web.identity import email_key

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

logger = logging.getLogger("alembic.runtime.migration")
_BATCH = 1000


def _key_existing_users() -> None:
    conn = op.get_bind()
    owners: set[str] = set()
    last_id = 0
    # The verified row, else the oldest, keeps the key: rows come in that order, batch by batch.
    order = sa.text(
        "SELECT id, email FROM users WHERE id > :last ORDER BY id LIMIT :batch"
    ).bindparams(batch=_BATCH)
    verified = {
        row.id
        for row in conn.execute(sa.text("SELECT id FROM users WHERE verified_at IS NOT NULL"))
    }
    keys: dict[int, str] = {}
    while True:
        rows = conn.execute(order, {"last": last_id}).all()
        if not rows:
            break
        for row in rows:
            keys[row.id] = email_key(row.email)
        last_id = rows[-1].id
    ranked = sorted(keys, key=lambda uid: (uid not in verified, uid))
    update = sa.text("UPDATE users SET email_key = :key WHERE id = :id")
    batch: list[dict[str, object]] = []
    for uid in ranked:
        key = keys[uid]
        if key in owners:
            logger.warning("users.id=%s shares its address with another account; keyed aside", uid)
            key = f" duplicate {uid} {key}"
        else:
            owners.add(key)
        batch.append({"key": key, "id": uid})
        if len(batch) >= _BATCH:
            conn.execute(update, batch)
            batch = []
    if batch:
        conn.execute(update, batch)


def upgrade() -> None:
    op.add_column("users", sa.Column("email_key", sa.Text(), nullable=True))
    op.add_column(
        "users",
        sa.Column(
            "token_nonce",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
    )
    _key_existing_users()
    op.alter_column("users", "email_key", nullable=False)
    op.drop_index("uq_users_lower_email", table_name="users")
    op.create_unique_constraint("uq_users_email_key", "users", ["email_key"])

    op.execute("DELETE FROM rate_limits")
    op.add_column(
        "rate_limits", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False)
    )
    op.create_index("ix_rate_limits_expires_at", "rate_limits", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_rate_limits_expires_at", table_name="rate_limits")
    op.drop_column("rate_limits", "expires_at")
    op.execute("DELETE FROM rate_limits")
    op.drop_constraint("uq_users_email_key", "users", type_="unique")
    op.create_index("uq_users_lower_email", "users", [sa.text("lower(email)")], unique=True)
    op.drop_column("users", "token_nonce")
    op.drop_column("users", "email_key")
