"""The operator's paths through the ``outbox`` command, each as an operator meets it: an
unmigrated database, a busy metrics port, a duration without its unit, one message in full, dead
messages with their recipients, missing variables, a database outage in the logs, --version and
--help. Real processes, a real PostgreSQL and a real SMTP server."""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import psycopg
import pytest

from outbox import cli
from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import OUTBOX, cli_env, run_cli, start_cli
from tests.acceptance.test_cli import insert_emails
from web.capture import CaptureServer, free_port

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = str(Path(sys.executable).with_name("alembic"))
# Where nothing listens: a database that is down.
DOWN_URL = "postgresql://postgres@127.0.0.1:9/outbox"
NOT_MIGRATED = "database not migrated"


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The error is exactly one line on stderr, with no traceback, and names ``expected``."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("dead",),
        ("show", "1"),
        ("retry", "--all-dead"),
        ("retry", "1"),
        ("purge", "--older-than", "7d"),
        ("relay", "--once"),
        ("relay",),
    ],
)
def test_an_unmigrated_database_is_one_line_naming_outbox_migrate(
    empty_db_url: str, args: tuple[str, ...]
) -> None:
    # SMTP_URL is never contacted: the relay refuses before it claims anything.
    env = cli_env(DATABASE_URL=empty_db_url, SMTP_URL="smtp://127.0.0.1:9")

    result = run_cli(*args, env=env)

    assert_one_line(result, NOT_MIGRATED, "outbox migrate", '"outbox"')
    assert result.returncode == 1


def test_a_schema_older_than_the_code_is_one_line_naming_outbox_migrate(db_url: str) -> None:
    """A deploy that skipped ``outbox migrate``: the relay sees it before claiming anything, the
    other commands when a statement names a column the database lacks."""
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(
            "DELETE FROM outbox_schema_version"
            " WHERE version = (SELECT max(version) FROM outbox_schema_version)"
        )
    env = cli_env(DATABASE_URL=db_url, SMTP_URL="smtp://127.0.0.1:9")

    relay = run_cli("relay", "--once", env=env)

    assert_one_line(relay, "schema is behind", "outbox migrate")
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("ALTER TABLE outbox DROP COLUMN result")
    show = run_cli("show", "1", env=env)
    assert_one_line(show, NOT_MIGRATED, "column outbox.result does not exist", "outbox migrate")


def test_the_schema_checks_pass_under_the_least_privilege_roles(
    db_url: str, smtp_server: CaptureServer
) -> None:
    """The relay's role may not read the version table and the web role may not read outbox:
    neither check may turn that into a refusal or an unhealthy server."""
    from tests.integration.test_least_privilege import SCRIPT, as_role

    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute(SCRIPT.read_text().encode())
    insert_emails(db_url, 2)
    relay_env = cli_env(DATABASE_URL=as_role(db_url, "outbox_relay"), SMTP_URL=smtp_server.url)

    relay = run_cli("relay", "--once", env=relay_env)

    assert relay.returncode == 0, relay.stderr
    assert len(smtp_server.mails) == 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web_env = cli_env(
        DATABASE_URL=as_role(db_url, "outbox_web"), SECRET_KEY="k" * 32, BASE_URL=base
    )
    proc = start_cli("web", "--port", str(port), env=web_env)
    try:
        health = wait_answering(base, proc, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


def wait_answering(base: str, proc: subprocess.Popen[str], *, timeout: float) -> httpx.Response:
    """The first answer of ``base``/healthz, whatever its status."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited early: {proc.communicate()[1][-2000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=3)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_web_on_an_unmigrated_database_is_unhealthy_and_answers_503_not_500(
    empty_db_url: str,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = cli_env(DATABASE_URL=empty_db_url, SECRET_KEY="k" * 32, BASE_URL=base)
    proc = start_cli("web", "--port", str(port), env=env)
    try:
        health = wait_answering(base, proc, timeout=60)
        assert health.status_code == 503
        assert NOT_MIGRATED in health.json()["reason"]
        assert "alembic upgrade head" in health.json()["reason"]

        signup = httpx.post(
            f"{base}/users/register",
            json={"email": "first@example.com", "password": "correct horse"},
            timeout=10,
        )
        assert signup.status_code == 503
        assert "Traceback" not in signup.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr
    assert f"{NOT_MIGRATED} (relation" in stderr  # one line for the operator, naming the table


def test_web_healthz_names_the_reason_when_the_database_is_down() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = cli_env(DATABASE_URL=DOWN_URL, SECRET_KEY="k" * 32, BASE_URL=base)
    proc = start_cli("web", "--port", str(port), env=env)
    try:
        health = wait_answering(base, proc, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert health.status_code == 503
    assert "database unreachable" in health.json()["reason"]


def test_alembic_without_database_url_is_one_line() -> None:
    result = subprocess.run(
        [ALEMBIC, "upgrade", "head"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert_one_line(result, "DATABASE_URL is required")


def test_alembic_with_the_database_down_is_one_line() -> None:
    result = subprocess.run(
        [ALEMBIC, "upgrade", "head"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": DOWN_URL},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert_one_line(result, "cannot reach the database")


def test_a_busy_metrics_port_is_one_line(db_url: str, smtp_server: CaptureServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_server.url)

        result = run_cli("relay", "--metrics-port", str(port), env=env)

    assert_one_line(result, f"--metrics-port {port}", "in use")


def test_a_duration_without_its_unit_is_refused_and_deletes_nothing(db_url: str) -> None:
    insert_emails(db_url, 1)
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("UPDATE outbox SET sent_at = now() - interval '1 hour', attempts = 1")
    env = cli_env(DATABASE_URL=db_url, SMTP_URL="smtp://127.0.0.1:9")

    purge = run_cli("purge", "--older-than", "7", env=env)
    relay = run_cli("relay", "--once", "--retention", "7", env=env)

    assert_one_line(purge, "needs its unit", "7d")
    assert_one_line(relay, "needs its unit")
    assert json.loads(run_cli("status", "--json", env=env).stdout)["sent"] == 1
    # With its unit, the same number means what it says: seven days keep the hour-old row.
    kept = run_cli("purge", "--older-than", "7d", env=env)
    assert kept.returncode == 0 and "deleted 0 sent message(s) older than 7d" in kept.stdout
    purged = run_cli("purge", "--older-than", "30m", env=env)
    assert purged.returncode == 0 and "deleted 1" in purged.stdout


def make_dead(db_url: str) -> list[str]:
    """Two dead messages, one to a list of addresses; returns their UUIDs (ids 1 and 2)."""
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(
            "INSERT INTO outbox (topic, payload, attempts, dead_at, last_error) VALUES "
            """('email', '{"to": "one@example.test", "subject": "S1", "text": "T1"}', 15, """
            "now() - interval '1 minute', 'PermanentSendError: SMTP 550 no such user'), "
            """('email', '{"to": ["two@example.test", "cc@example.test"], "subject": "S2", """
            """"text": "T2"}', 3, now(), 'TransientSendError: SMTP 451 try later')"""
        )
        rows = conn.execute("SELECT message_id FROM outbox ORDER BY id").fetchall()
    return [str(row[0]) for row in rows]


def test_dead_lists_each_messages_recipient(db_url: str) -> None:
    make_dead(db_url)
    env = cli_env(DATABASE_URL=db_url)

    table = run_cli("dead", env=env)
    listed = json.loads(run_cli("dead", "--json", env=env).stdout)

    assert table.returncode == 0, table.stderr
    header, newest, oldest = table.stdout.splitlines()
    assert "RECIPIENT" in header
    assert "two@example.test" in newest and "cc@example.test" not in newest
    assert "one@example.test" in oldest and "SMTP 550 no such user" in oldest
    assert [(r["id"], r["recipient"]) for r in listed] == [
        (2, "two@example.test"),
        (1, "one@example.test"),
    ]


def test_show_prints_one_message_in_full(db_url: str) -> None:
    uuids = make_dead(db_url)
    env = cli_env(DATABASE_URL=db_url, MAIL_FROM="noreply@shop.example")

    text = run_cli("show", "1", env=env)
    by_uuid = run_cli("show", uuids[0], "--json", env=env)
    by_header = run_cli("show", f"<{uuids[1]}@shop.example>", "--json", env=env)
    missing = run_cli("show", "99", env=env)

    assert text.returncode == 0, text.stderr
    fields = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1)
        for line in text.stdout.splitlines()
        if re.match(r"^\w+\s{2,}\S", line)
    )
    assert fields["id"] == "1" and fields["state"] == "dead" and fields["attempts"] == "15"
    assert fields["recipient"] == "one@example.test"
    assert fields["last_error"] == "PermanentSendError: SMTP 550 no such user"
    assert fields["message_id"] == uuids[0]
    assert fields["message_id_header"] == f"<{uuids[0]}@shop.example>"
    assert fields["result"] == "-" and fields["sent_at"] == "-"
    assert fields["created_at"].startswith("20") and fields["dead_at"].startswith("20")
    assert '"subject": "S1"' in text.stdout  # the payload, printed as JSON below the fields

    shown = json.loads(by_uuid.stdout)
    assert shown["id"] == 1 and shown["payload"]["subject"] == "S1"
    assert {"created_at", "available_at", "sent_at", "dead_at", "result"} <= set(shown)
    assert json.loads(by_header.stdout)["id"] == 2
    assert missing.returncode == 1 and "no message 99" in missing.stderr


def test_show_a_sent_message_gives_its_result(db_url: str) -> None:
    insert_emails(db_url, 1)
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("UPDATE outbox SET sent_at = now(), attempts = 1, result = '250 2.0.0 Ok'")

    shown = json.loads(run_cli("show", "1", "--json", env=cli_env(DATABASE_URL=db_url)).stdout)

    assert shown["state"] == "sent" and shown["result"] == "250 2.0.0 Ok"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("relay",), {}, "DATABASE_URL and SMTP_URL are required"),
        (("relay", "--once"), {"DATABASE_URL": DOWN_URL}, "SMTP_URL is required"),
        # A handler module is enough to run without SMTP_URL: only DATABASE_URL is missing.
        (("relay", "--import", "tests.fault.poison_handlers"), {}, "DATABASE_URL is required"),
        (("web",), {}, "SECRET_KEY and BASE_URL and DATABASE_URL are required"),
    ],
)
def test_missing_variables_are_named_all_at_once(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [OUTBOX, *args],
        cwd=ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = assert_one_line(result, message)
    if message.startswith("DATABASE_URL is"):
        assert "SMTP_URL" not in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_database_outage_logs_one_line_per_event(log_format: str) -> None:
    proc = start_cli(
        "relay",
        "--log-format",
        log_format,
        env=cli_env(DATABASE_URL=DOWN_URL, SMTP_URL="smtp://127.0.0.1:9"),
    )
    deadline = time.monotonic() + 30
    lines: list[str] = []
    assert proc.stderr is not None
    while time.monotonic() < deadline:  # the relay retries; wait for a few reconnect lines
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if sum("database unreachable" in x for x in lines) >= 3:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    lines += rest.splitlines()

    assert proc.returncode == 0
    reconnects = [x for x in lines if "database unreachable" in x]
    assert len(reconnects) >= 3
    for line in lines:
        if log_format == "json":
            json.loads(line)  # each line is a whole event
        else:
            assert re.match(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR)\s", line), line
    # The line still says what happened and what the relay does next.
    assert "Connection refused" in reconnects[0] and "retrying in" in reconnects[0]


def test_version_names_the_installed_package() -> None:
    result = run_cli("--version", env=cli_env())

    assert result.returncode == 0
    assert result.stdout.strip() == f"outbox {version('outbox')}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_flag_of_every_command_has_help_and_its_default() -> None:
    parser = cli._build_parser(cli._app_commands())
    commands = _subcommands(parser)
    assert {"relay", "migrate", "status", "dead", "show", "retry", "purge", "web", "dev"} <= set(
        commands
    )
    for name, command in commands.items():
        text = command.format_help()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"outbox {name} {action.dest}: no help text"
            default = action.default
            if action.option_strings and default not in (None, False, []):
                shown = re.sub(r"\s+", " ", text)
                assert f"(default: {default})" in shown, f"outbox {name} {action.dest}"


def test_relay_help_from_the_console_script_shows_meanings_and_defaults() -> None:
    result = run_cli("relay", "--help", env=cli_env())

    assert result.returncode == 0
    help_text = re.sub(r"\s+", " ", result.stdout)
    assert "messages claimed per transaction (default: 100)" in help_text
    assert "(default: 16)" in help_text and "--send-timeout SECONDS" in help_text
