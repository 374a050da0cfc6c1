"""Record the relay's claim on the row: its owner, with ``available_at`` as the lease.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_by", postgresql.UUID(as_uuid=True)))
    op.create_index(
        "ix_outbox_claimed",
        "outbox",
        ["id"],
        postgresql_where=sa.text("claimed_by IS NOT NULL AND sent_at IS NULL AND dead_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_claimed", table_name="outbox")
    op.drop_column("outbox", "claimed_by")
