"""The ``outbox`` command end to end: real processes, real PostgreSQL, real SMTP."""

from __future__ import annotations

import json
import signal
import time

import httpx
import psycopg
import pytest

from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import cli_env, run_cli, start_cli
from web.capture import CaptureServer


def insert_emails(db_url: str, count: int) -> None:
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload) SELECT 'email', jsonb_build_object("
            "'to', 'user' || g || '@example.test', 'subject', 'S' || g, 'text', 'T')"
            " FROM generate_series(1, %s) AS g",
            (count,),
        )


def test_cli_help_lists_every_command() -> None:
    result = run_cli("--help", env=cli_env())
    assert result.returncode == 0
    for command in ("dev", "web", "relay", "migrate", "status", "dead", "retry", "purge"):
        assert command in result.stdout


def test_cli_relay_once_delivers_everything_due_and_exits_zero(
    db_url: str, smtp_server: CaptureServer
) -> None:
    insert_emails(db_url, 30)

    result = run_cli("relay", "--once", env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_server.url))

    assert result.returncode == 0, result.stderr
    assert len({m.message_id for m in smtp_server.mails}) == 30
    status = run_cli("status", "--json", env=cli_env(DATABASE_URL=db_url))
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert set(counts) == {"pending", "retrying", "dead", "sent", "oldest_pending_age_s"}
    assert counts["sent"] == 30 and counts["pending"] == 0


def test_cli_status_counts_each_state(db_url: str) -> None:
    insert_emails(db_url, 4)
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("UPDATE outbox SET sent_at = now(), attempts = 1 WHERE id = 1")
        conn.execute(
            "UPDATE outbox SET dead_at = now(), attempts = 1, last_error = 'x' WHERE id = 2"
        )
        conn.execute(
            "UPDATE outbox SET attempts = 2, last_error = 'SMTP 451',"
            " available_at = now() + interval '1 h' WHERE id = 3"
        )
        conn.execute("UPDATE outbox SET available_at = now() - interval '100 s' WHERE id = 4")

    result = run_cli("status", "--json", env=cli_env(DATABASE_URL=db_url))

    counts = json.loads(result.stdout)
    assert (counts["pending"], counts["retrying"], counts["dead"], counts["sent"]) == (1, 1, 1, 1)
    assert 99 <= counts["oldest_pending_age_s"] < 200
    human = run_cli("status", env=cli_env(DATABASE_URL=db_url))
    assert "pending" in human.stdout and "{" not in human.stdout


def test_cli_dead_retry_and_purge(db_url: str) -> None:
    insert_emails(db_url, 3)
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(
            "UPDATE outbox SET dead_at = now(), attempts = 5, last_error = 'SMTP 550 no' "
            "WHERE id IN (1, 2)"
        )
        conn.execute("UPDATE outbox SET sent_at = now() - interval '8 days' WHERE id = 3")
    env = cli_env(DATABASE_URL=db_url)

    dead = run_cli("dead", "--json", env=env)
    assert [row["id"] for row in json.loads(dead.stdout)] == [2, 1]
    assert "SMTP 550 no" in run_cli("dead", env=env).stdout

    retried = run_cli("retry", "1", env=env)
    assert retried.returncode == 0 and "requeued 1" in retried.stdout
    assert run_cli("retry", "3", env=env).returncode == 1  # not dead: said, not silently ignored
    assert "requeued 1" in run_cli("retry", "--all-dead", env=env).stdout
    counts = json.loads(run_cli("status", "--json", env=env).stdout)
    # Requeued, they failed and will be tried again: retrying (with fresh attempts), not pending.
    assert counts["dead"] == 0 and counts["retrying"] == 2 and counts["pending"] == 0

    purged = run_cli("purge", "--older-than", "7d", env=env)
    assert purged.returncode == 0 and "deleted 1" in purged.stdout
    assert json.loads(run_cli("status", "--json", env=env).stdout)["sent"] == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("status",), {}, "DATABASE_URL is required"),
        (("web",), {}, "SECRET_KEY and BASE_URL and DATABASE_URL are required"),
        (("web",), {"SECRET_KEY": "k"}, "BASE_URL and DATABASE_URL are required"),
        (
            ("web",),
            {"SECRET_KEY": "k", "BASE_URL": "https://x.test"},
            "DATABASE_URL is required",
        ),
        (("web", "--port", "70000"), {}, "not a port number"),
        (("status",), {"SMTP_URL": "smtp://mail?tls=true"}, "unknown option"),
        (("relay",), {"SMTP_URL": "smtp://127.0.0.1:25"}, "DATABASE_URL is required"),
        (("relay", "--batch-size", "0"), {}, "must be at least 1"),
        (
            ("relay", "--import", "no_such_module_xyz"),
            {"DATABASE_URL": "postgresql://x@127.0.0.1/x", "SMTP_URL": "smtp://127.0.0.1:25"},
            "no_such_module_xyz",
        ),
        (("status",), {"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL must start with"),
        (("status",), {"DATABASE_URL": "postgresql://postgres@127.0.0.1:9/x"}, "cannot reach"),
        (("retry",), {"DATABASE_URL": "postgresql://x@127.0.0.1/x"}, "--all-dead"),
        (("purge", "--older-than", "soon"), {}, "not a duration"),
    ],
)
def test_cli_user_mistakes_are_one_line_errors(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = run_cli(*args, env=cli_env(**env))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_relay_sigterm_exits_zero_and_leaves_nothing_half_done(
    db_url: str, smtp_server: CaptureServer
) -> None:
    insert_emails(db_url, 200)
    smtp_server.delay = 0.2  # slow enough that SIGTERM lands in the middle of a batch
    proc = start_cli(
        "relay",
        "--batch-size",
        "20",
        "--send-timeout",
        "5",
        "--stop-grace",
        "2",
        env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_server.url),
    )
    deadline = time.monotonic() + 30
    while not smtp_server.mails and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    elapsed = time.monotonic() - started

    assert proc.returncode == 0, stderr
    assert (
        elapsed < 5 + 2 + 3
    )  # the documented bound, send_timeout + stop_grace, plus start-up slack
    with psycopg.connect(libpq_url(db_url)) as conn:
        sent_rows = conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL").fetchone()
    delivered = {m.message_id for m in smtp_server.mails}
    assert sent_rows is not None
    assert 0 < sent_rows[0] < 200, "it stopped claiming: some messages are still due"
    # Every row marked sent was delivered; anything delivered but unmarked would be a duplicate
    # later, which SIGTERM must not cause: the in-flight batch is settled before exit.
    assert sent_rows[0] == len(delivered)


def test_cli_relay_metrics_port_and_json_log_lines(db_url: str, smtp_server: CaptureServer) -> None:
    from web.capture import free_port

    insert_emails(db_url, 5)
    port = free_port()
    proc = start_cli(
        "relay",
        "--metrics-port",
        str(port),
        "--log-format",
        "json",
        "--poll-interval",
        "0.5",
        env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_server.url),
    )
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                text = ""
            if 'outbox_messages_settled_total{outcome="sent",topic="email"} 5.0' in text:
                break
            time.sleep(0.2)
        assert 'outbox_messages_settled_total{outcome="sent",topic="email"} 5.0' in text
        assert "outbox_listen_connected 1.0" in text
        assert "outbox_claim_duration_seconds_count" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    settled = [
        json.loads(line)
        for line in stderr.splitlines()
        if line.startswith("{") and '"settle_message"' in line
    ]
    assert len(settled) == 5
    assert {entry["outcome"] for entry in settled} == {"sent"}
    assert all({"outbox_id", "topic", "attempt", "duration_ms"} <= set(e) for e in settled)


def test_cli_relay_retention_purges_old_sent_rows_in_the_background(
    db_url: str, smtp_server: CaptureServer
) -> None:
    insert_emails(db_url, 3)
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("UPDATE outbox SET sent_at = now() - interval '8 days' WHERE id IN (1, 2)")
    proc = start_cli(
        "relay",
        "--retention",
        "7d",
        env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_server.url),
    )
    try:
        deadline = time.monotonic() + 30
        remaining = None
        while time.monotonic() < deadline:
            with psycopg.connect(libpq_url(db_url)) as conn:
                remaining = conn.execute("SELECT array_agg(id ORDER BY id) FROM outbox").fetchone()
            if remaining is not None and remaining[0] == [3]:
                break
            time.sleep(0.2)
        assert remaining is not None and remaining[0] == [3]  # old sent rows gone, the new one kept
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_cli_relay_serves_only_its_topics_and_status_shows_the_rest(db_url: str) -> None:
    """No SMTP_URL: the relay serves `welcome` only; `email` stays pending with no attempt
    spent, and `outbox status` shows it per topic."""
    insert_emails(db_url, 2)
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("INSERT INTO outbox (topic, payload) VALUES ('welcome', '{\"user_id\": 7}')")

    result = run_cli(
        "relay",
        "--once",
        "--import",
        "tests.acceptance.topic_handlers",
        env=cli_env(DATABASE_URL=db_url),
    )

    assert result.returncode == 0, result.stderr
    with psycopg.connect(libpq_url(db_url)) as conn:
        rows = conn.execute(
            "SELECT topic, attempts, sent_at IS NOT NULL, result FROM outbox ORDER BY id"
        ).fetchall()
    assert rows == [
        ("email", 0, False, None),
        ("email", 0, False, None),
        ("welcome", 1, True, "welcomed 7"),
    ]
    status = run_cli("status", env=cli_env(DATABASE_URL=db_url))
    lines = [line.split() for line in status.stdout.splitlines()]
    assert ["email", "2", "0", "0", "0"] in lines
    assert ["welcome", "0", "0", "0", "1"] in lines
