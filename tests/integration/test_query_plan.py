"""The claims must use the partial "due" index, whatever the number of sent rows kept."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from outbox import queries


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
                "FROM generate_series(1, 50)"
            )
        )
        conn.execute(text("ANALYZE outbox"))
        explain = text("EXPLAIN " + queries.CLAIM_DUE.text)
        plan = "\n".join(r[0] for r in conn.execute(explain, {"now": None, "limit": 100}))
        explain_after = text("EXPLAIN " + queries.CLAIM_DUE_AFTER.text)
        params = {"now": None, "limit": 100, "after_at": "2030-01-01T00:00:00Z", "after_id": 7}
        plan_after = "\n".join(r[0] for r in conn.execute(explain_after, params))
    engine.dispose()
    assert "ix_outbox_due" in plan, plan
    assert "Seq Scan" not in plan, plan
    # The resume point must be where the index scan starts, not a filter over the rows before.
    index_cond = next(line for line in plan_after.splitlines() if "Index Cond" in line)
    assert "ix_outbox_due" in plan_after, plan_after
    assert "ROW(available_at, id) >" in index_cond, plan_after
