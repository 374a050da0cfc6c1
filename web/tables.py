"""Every table of the signup app, on one ``MetaData``: what the app's Alembic history targets."""

from __future__ import annotations

from web.ratelimit import rate_limits_table
from web.users import metadata, users_table

__all__ = ["metadata", "rate_limits_table", "users_table"]
