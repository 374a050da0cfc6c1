"""Start ``outbox dev`` in a subprocess, in a folder of the test's own, and stop it with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.acceptance.cli_helpers import OUTBOX, cli_env, wait_healthy
from web.capture import free_port


@contextmanager
def running_dev(cwd: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = cli_env()
    for name in ("SECRET_KEY", "BASE_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [OUTBOX, "dev", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=90)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def postgres_running(data_dir: Path) -> bool:
    """True while a postmaster for ``data_dir`` is alive (its pid file names it)."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
