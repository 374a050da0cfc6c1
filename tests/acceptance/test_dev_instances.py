"""`outbox dev` started twice, and after a `kill -9`: real processes and the embedded PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.acceptance.cli_helpers import OUTBOX, cli_env, wait_healthy
from tests.acceptance.dev_process import postgres_running, running_dev
from web.capture import free_port


def dev_env() -> dict[str, str]:
    env = cli_env()
    for name in ("SECRET_KEY", "BASE_URL"):
        env.pop(name, None)
    return env


def dev(cwd: Path, port: int) -> subprocess.CompletedProcess[str]:
    """Run a second ``outbox dev`` to completion (it is expected to refuse at once)."""
    return subprocess.run(
        [OUTBOX, "dev", "--port", str(port)],
        cwd=cwd,
        env=dev_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_a_second_dev_refuses_in_one_line_naming_the_first(tmp_path: Path) -> None:
    with running_dev(tmp_path) as (base, first):
        port = int(base.rsplit(":", 1)[1])

        same_port = dev(tmp_path, port)
        other_port = dev(tmp_path, free_port())  # would share the database and the mail
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        other_folder_same_port = dev(elsewhere, port)

        assert httpx.get(f"{base}/healthz").status_code == 200  # the first is unharmed
    assert_refused(same_port, "in use by another outbox dev", f"pid {first.pid}", base)
    assert_refused(other_port, "in use by another outbox dev", f"pid {first.pid}", base)
    assert_refused(other_folder_same_port, f"127.0.0.1:{port}", "--port")
    # The refused one in another folder started nothing there.
    assert not (elsewhere / ".outbox" / "pgdata").exists()


def stop_postgres(pgdata: Path) -> None:
    """Whatever the test's outcome, leave no postmaster behind on the machine (fast shutdown)."""
    if postgres_running(pgdata):
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGINT)


def test_dev_after_kill_9_takes_over_the_orphaned_postgres_and_stops_it(tmp_path: Path) -> None:
    pgdata = tmp_path / ".outbox" / "pgdata"
    try:
        after_kill_9(tmp_path, pgdata)
    finally:
        stop_postgres(pgdata)


def after_kill_9(tmp_path: Path, pgdata: Path) -> None:
    with running_dev(tmp_path) as (_, first):
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert postgres_running(pgdata), "kill -9 leaves the embedded PostgreSQL behind"
    orphan = int((pgdata / "postmaster.pid").read_text().split()[0])

    port = free_port()
    proc = subprocess.Popen(
        [OUTBOX, "dev", "--port", str(port)],
        cwd=tmp_path,
        env=dev_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc, timeout=90)
        signup = httpx.post(
            f"{base}/users/register",
            json={"email": "after-kill@example.com", "password": "correct horse"},
        )
        assert signup.status_code == 202
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"pid {orphan}" in stderr  # it says what it found
    assert not postgres_running(pgdata), "Ctrl-C of the next dev must stop the orphan too"
    deadline = time.monotonic() + 20  # pg_ctl returns once the pid file is gone; the exit follows
    while process_alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(orphan), f"the orphaned postmaster {orphan} is still running"


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; an exited process waiting to be reaped (a zombie, since the
    postmaster's parent is whatever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
