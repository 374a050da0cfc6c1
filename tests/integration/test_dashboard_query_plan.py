"""The dashboard's reads must walk an index and stop, not scan a table of 1,000,000 kept rows.

One database per module holds a million sent messages (spread over a week, so the last hour has
a few thousand), plus dead, pending and retrying ones, analysed as autovacuum would. Each test
reads the planner's choice with EXPLAIN (no timing: the plan shape is what holds on any machine).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, TextClause, create_engine, text

from outbox import queries as outbox_queries
from outbox.dashboard import queries
from outbox.settings import libpq_url
from tests.conftest import _database_url

SENT_ROWS = 1_000_000
FIRST_PAGE_DESC = {"after_at": "infinity", "after_id": queries.MAX_ID}
NO_FILTER = {"topic": None, "pattern": None, "limit": queries.PAGE_SIZE + 1}


@pytest.fixture(scope="module")
def big_engine(pg_admin_url: str, template_db: str) -> Iterator[Engine]:
    name = f"test_plan_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    engine = create_engine(_database_url(pg_admin_url, name))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload, created_at, available_at, sent_at, attempts)"
                " SELECT CASE WHEN g % 10 = 0 THEN 'welcome' ELSE 'email' END,"
                "  jsonb_build_object('to', 'user' || g || '@example.com', 'subject', 'hi'),"
                "  now() - g * interval '600 ms', now() - g * interval '600 ms',"
                "  now() - g * interval '600 ms', 1"
                " FROM generate_series(1, :n) g"
            ),
            {"n": SENT_ROWS},
        )
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload, attempts, dead_at, last_error)"
                " SELECT 'email', jsonb_build_object('to', 'dead' || g || '@example.com'), 15,"
                "  now() - g * interval '1 s', 'PermanentSendError: SMTP 550'"
                " FROM generate_series(1, 2000) g"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (topic, payload, attempts, available_at, last_error)"
                " SELECT 'email', jsonb_build_object('to', 'p' || g || '@example.com'),"
                "  g % 2, now() + (g % 3) * interval '1 minute',"
                "  CASE WHEN g % 2 = 1 THEN 'TransientSendError: SMTP 451' END"
                " FROM generate_series(1, 800) g"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE outbox"))
    yield engine
    engine.dispose()
    with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _plan(engine: Engine, statement: TextClause, params: dict[str, Any]) -> str:
    with engine.connect() as conn:
        rows = conn.execute(text("EXPLAIN " + statement.text), params)
        return "\n".join(row[0] for row in rows)


def _walks(plan: str, index: str) -> None:
    assert index in plan, plan
    assert "Seq Scan" not in plan, plan


def test_query_plan_dashboard_pending_and_retrying_lists_walk_the_due_index(
    big_engine: Engine,
) -> None:
    for failed in (False, True):  # pending, retrying
        params = {
            **NO_FILTER,
            "failed": failed,
            "after_at": "-infinity",
            "after_id": 0,
        }
        plan = _plan(big_engine, queries.LIST_UNSENT, params)
        _walks(plan, "ix_outbox_due")
        index_cond = next(line for line in plan.splitlines() if "Index Cond" in line)
        assert "ROW(available_at, id) >" in index_cond, plan  # the cursor is where it starts


def test_query_plan_dashboard_sent_and_dead_lists_walk_their_timestamp_index_backwards(
    big_engine: Engine,
) -> None:
    now = datetime.now(UTC)
    for statement, index, column, middle in (
        (queries.LIST_SENT, "ix_outbox_sent_at", "sent_at", now - timedelta(days=3)),
        (queries.LIST_DEAD, "ix_outbox_dead_at", "dead_at", now - timedelta(seconds=1000)),
    ):
        # The first page, and a page half-way down the list.
        for cursor in (FIRST_PAGE_DESC, {"after_at": middle, "after_id": queries.MAX_ID}):
            for filters in (NO_FILTER, {**NO_FILTER, "topic": "email", "pattern": "%user1%"}):
                plan = _plan(big_engine, statement, {**filters, **cursor})
                _walks(plan, f"Index Scan Backward using {index}")
                # Only the rows that share a timestamp are sorted, never a million sent ones
                # (the planner may sort a few thousand dead ones outright: that is cheap too).
                if column == "sent_at":
                    assert plan.splitlines()[1].lstrip(" ->").startswith("Incremental Sort"), plan
                assert f"Index Cond: ({column} <=" in plan, plan


def test_query_plan_dashboard_all_states_list_walks_the_primary_key(big_engine: Engine) -> None:
    for topic in (None, "welcome"):
        params = {**NO_FILTER, "topic": topic, "after_id": queries.MAX_ID}
        _walks(_plan(big_engine, queries.LIST_ALL, params), "Index Scan Backward using pk_outbox")


def test_query_plan_dashboard_search_by_message_id_and_one_message_use_unique_indexes(
    big_engine: Engine,
) -> None:
    by_uuid = {"message_id": str(uuid.uuid4()), "id": None}
    _walks(_plan(big_engine, queries.FIND_BY_KEY, by_uuid), "uq_outbox_message_id")
    _walks(_plan(big_engine, queries.FIND_BY_KEY, {"message_id": None, "id": 7}), "pk_outbox")
    _walks(_plan(big_engine, queries.GET_MESSAGE, {"id": 7, "now": None}), "pk_outbox")


def test_query_plan_dashboard_chart_reads_only_the_last_hour_of_both_indexes(
    big_engine: Engine,
) -> None:
    """The per-minute aggregate ranges over ix_outbox_sent_at / ix_outbox_dead_at from an hour
    ago: its cost follows the last hour's traffic, not the million rows kept."""
    plan = _plan(big_engine, queries.SETTLED_PER_MINUTE, {"now": None})
    _walks(plan, "ix_outbox_sent_at")
    assert "ix_outbox_dead_at" in plan, plan
    assert plan.count("Index Cond: (sent_at >=") == 1, plan
    assert plan.count("Index Cond: (dead_at >=") == 1, plan


def test_query_plan_status_counts_read_each_state_through_its_own_index(
    big_engine: Engine,
) -> None:
    """`outbox status` and the dashboard's cards: pending and retrying from ix_outbox_due, dead
    from ix_outbox_dead_at; the million sent rows are read only to count the sent ones (through
    ix_outbox_sent_at, or a scan when the planner finds the heap as cheap, as with these small
    rows), never to find the few unsent ones (one pass for everything: 92 ms per million)."""
    plan = _plan(big_engine, outbox_queries.COUNT_BY_STATUS, {"now": None})
    lines = plan.splitlines()
    assert "ix_outbox_due" in plan and "Index Only Scan using ix_outbox_dead_at" in plan, plan
    for i, line in enumerate(lines):
        if "Seq Scan" in line:
            assert lines[i + 1].strip() == "Filter: (sent_at IS NOT NULL)", plan


def test_query_plan_dashboard_topic_counts_use_the_partial_indexes(big_engine: Engine) -> None:
    plan = _plan(big_engine, outbox_queries.COUNT_BY_TOPIC, {"now": None})
    _walks(plan, "ix_outbox_due")
    assert "ix_outbox_dead_at" in plan and "Index Cond: (sent_at >" in plan, plan


def test_query_plan_discard_finds_dead_rows_through_their_index(big_engine: Engine) -> None:
    every = {"ids": [], "all_dead": True, "dead_until": None}
    until = {**every, "dead_until": datetime.now(UTC)}
    some = {"ids": [1, 2], "all_dead": False, "dead_until": None}
    _walks(_plan(big_engine, outbox_queries.DELETE_DEAD, every), "ix_outbox_dead_at")
    _walks(_plan(big_engine, outbox_queries.DELETE_DEAD, until), "ix_outbox_dead_at")
    _walks(_plan(big_engine, outbox_queries.DELETE_DEAD, some), "pk_outbox")
    _walks(_plan(big_engine, queries.DEAD_SUMMARY, {}), "ix_outbox_dead_at")
