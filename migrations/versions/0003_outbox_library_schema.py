"""Bring the library's outbox table to its newest schema (dedupe_key, and what follows).

Databases made before the library had its own history (at 0002) have the table but no
``outbox_schema_version``: ``outbox.migrate.upgrade`` adopts the table as it is and applies the
steps after it. On a database 0001 made just now it finds nothing to do.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

import outbox.migrate

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox.migrate.upgrade(op.get_bind())


def downgrade() -> None:
    """Nothing: the outbox table keeps its newer columns until 0001's downgrade drops it."""
