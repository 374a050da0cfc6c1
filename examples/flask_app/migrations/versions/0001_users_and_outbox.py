"""The app's users, and the outbox table, in one revision of the app's own history.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import outbox.migrate

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "example_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.Text, nullable=False, unique=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("verify_token", sa.Text, nullable=False),
    )
    # The one call: the outbox table (and its own version table), in this migration's transaction.
    outbox.migrate.upgrade(op.get_bind())


def downgrade() -> None:
    outbox.migrate.uninstall(op.get_bind())
    op.drop_table("example_users")
