"""The declared schema of the outbox table, for SQLAlchemy (``outbox.migrate`` is its history).

Status is derived, not stored: a row is *sent* when ``sent_at`` is set, *dead* when ``dead_at``
is set, otherwise *retrying* when it has failed before (``last_error`` set) and *pending* when it
has not (see "The four states" in ``outbox.queries``). Two nullable timestamps cost nothing to
keep right, and the partial index below only ever holds rows that are neither.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

outbox_table = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    # Stamped as the mail's Message-ID by the relay, so every retry carries the same one.
    Column(
        "message_id",
        UUID(as_uuid=True),
        nullable=False,
        unique=True,
        server_default=text("gen_random_uuid()"),
    ),
    Column("topic", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    # What the handler reported on success, e.g. the SMTP server's final reply.
    Column("result", Text),
    Column("sent_at", DateTime(timezone=True)),
    Column("dead_at", DateTime(timezone=True)),
    # enqueue(..., dedupe_key=...): at most one message per key while the row exists.
    Column("dedupe_key", Text),
    # The relay that claimed the row and has not settled it yet (NULL otherwise). While it is
    # set, ``available_at`` is the claim's lease: the row is not due again until the lease runs
    # out or the owner is known dead (see CLAIM and RESCUE in ``outbox.queries``).
    Column("claimed_by", UUID(as_uuid=True)),
)

# "Due and unsent": the claim walks this index in (available_at, id) order and stops at LIMIT,
# so its cost depends on the batch size, not on how many sent or dead rows the table keeps.
Index(
    "ix_outbox_due",
    outbox_table.c.available_at,
    outbox_table.c.id,
    postgresql_where=text("sent_at IS NULL AND dead_at IS NULL"),
)
# Claimed and unsettled: only the rows in flight (a few per relay), for the rescue of a dead
# relay's rows and the claim of abandoned rows, whatever the backlog behind them. Keyed by id,
# not by claimed_by: keyed by owner, the fenced settles (``o.id = u.id AND o.claimed_by =
# u.owner``) were planned as a nested loop over "every row of this owner" per outcome, which
# made a settle of 9,000 outcomes take 16 s (measured); by id, every plan is a lookup by id.
Index(
    "ix_outbox_claimed",
    outbox_table.c.id,
    postgresql_where=text("claimed_by IS NOT NULL AND sent_at IS NULL AND dead_at IS NULL"),
)
# Purge and `outbox status` look sent rows up by age.
Index(
    "ix_outbox_sent_at",
    outbox_table.c.sent_at,
    postgresql_where=text("sent_at IS NOT NULL"),
)
Index(
    "ix_outbox_dead_at",
    outbox_table.c.dead_at,
    postgresql_where=text("dead_at IS NOT NULL"),
)

Index(
    "uq_outbox_dedupe_key",
    outbox_table.c.dedupe_key,
    unique=True,
    postgresql_where=text("dedupe_key IS NOT NULL"),
)

NOTIFY_CHANNEL = "outbox"
