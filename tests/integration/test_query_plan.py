"""The claims must use the partial indexes, whatever the number of sent rows kept or due."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import create_engine, text

from outbox import queries

OWNER = {
    "owner": uuid.uuid4(),
    "lease": 30.0,
    "topics": ["email"],
    "clock": None,
    "budget": 2**62,
}


def test_query_plan_claim_uses_partial_due_index(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload, sent_at) "
                "SELECT 'email', '{}'::jsonb, now() FROM generate_series(1, 20000)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload) SELECT 'email', '{}'::jsonb "
                "FROM generate_series(1, 20000)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload, claimed_by) SELECT 'email', '{}'::jsonb, "
                "gen_random_uuid() FROM generate_series(1, 20)"
            )
        )
        conn.execute(text("ANALYZE outbox"))

        def plan(statement: object, **params: object) -> str:
            explain = text("EXPLAIN " + str(statement))
            return "\n".join(r[0] for r in conn.execute(explain, {**OWNER, **params}))

        due = plan(queries.CLAIM_DUE, now=None, limit=100)
        after = plan(
            queries.CLAIM_DUE_AFTER,
            now=None,
            limit=100,
            after_at="2030-01-01T00:00:00Z",
            after_id=7,
        )
        abandoned = plan(queries.CLAIM_ABANDONED, now=None, max_attempts=5, held=[1, 2])
        rescue = plan(
            queries.RESCUE_ABANDONED,
            now=None,
            dead=[uuid.uuid4()],
            held=[],
            max_attempts=5,
            relay_died="x",
            lease_expired="y",
        )
    engine.dispose()
    assert "ix_outbox_due" in due, due
    assert "Seq Scan" not in due, due
    # The resume point must be where the index scan starts, not a filter over the rows before.
    index_cond = next(line for line in after.splitlines() if "Index Cond" in line)
    assert "ix_outbox_due" in after, after
    assert "ROW(available_at, id) >" in index_cond, after
    # Abandoned rows are found among the rows in flight, not by walking 20,000 due rows.
    assert "ix_outbox_claimed" in abandoned and "Seq Scan" not in abandoned, abandoned
    assert "ix_outbox_claimed" in rescue and "Seq Scan" not in rescue, rescue


def test_query_plan_settle_looks_rows_up_by_id_even_as_a_generic_plan(db_url: str) -> None:
    """psycopg prepares a statement after five runs, and a prepared statement may get a generic
    plan. Planned over ix_outbox_claimed, the fenced settle scanned every row in flight once per
    outcome (5 s for 4,000 outcomes, measured); it must find rows by id whatever the plan."""
    engine = create_engine(db_url)
    owner = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload, claimed_by, attempts) "
                "SELECT 'email', '{}'::jsonb, :owner, 1 FROM generate_series(1, 4000)"
            ),
            {"owner": owner},
        )
        conn.execute(text("SET plan_cache_mode = force_generic_plan"))
        # SETTLE_MANY as a named prepared statement: each :name a $n of the type its CAST says.
        statement = str(queries.SETTLE_MANY)
        params = sorted(set(re.findall(r"CAST\(:(\w+) AS (\w+(?:\[\])?)\)", statement)))
        for n, (name, _) in enumerate(params, start=1):
            statement = statement.replace(f"CAST(:{name} ", f"CAST(${n} ")
        types = ", ".join(t for _, t in params)
        conn.execute(text(f"PREPARE settle({types}) AS {statement}"))
        # A generic plan does not depend on the values: one outcome stands for thousands, and
        # the kinds left empty cost nothing.
        values = {"bigint[]": "'{1}'", "uuid[]": f"'{{{owner}}}'", "int[]": "'{1}'"}
        args = ", ".join(f"{values.get(t, 'NULL')}::{t}" for _, t in params)
        plan = "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN EXECUTE settle({args})")))
    engine.dispose()
    assert "ix_outbox_claimed" not in plan, plan
    assert plan.count("Index Scan using pk_outbox") == 4, plan  # each kind finds its rows by id
