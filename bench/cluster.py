"""A throwaway PostgreSQL cluster of the bench's own, with production settings.

The machine's PostgreSQL runs with ``autovacuum = off`` (a test server), so figures about bloat
and long transactions measured there would say nothing about production. ``Cluster`` runs
``initdb`` with its defaults (autovacuum on, default autovacuum settings, fsync and
synchronous_commit on) in a temporary folder, serves it on a free port on 127.0.0.1, and stops
and deletes it on exit, also when the run fails. As root, the server runs as the ``postgres``
user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import connect, fetch_value, free_port, log

# What the page reports about the cluster: the settings that make it "production-like".
SHOWN = (
    "autovacuum",
    "autovacuum_naptime",
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_threshold",
    "shared_buffers",
    "synchronous_commit",
    "fsync",
)


def find_bindir() -> Path:
    """PostgreSQL's server binaries: ``BENCH_PG_BIN``, else Debian's newest under
    /usr/lib/postgresql, else the embedded server's (pgserver, in the bench venv)."""
    if os.environ.get("BENCH_PG_BIN"):
        return Path(os.environ["BENCH_PG_BIN"])
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise RuntimeError("no PostgreSQL server binaries (initdb) found") from None
    return Path(POSTGRES_BIN_PATH)


class Cluster:
    """``with Cluster() as c:`` a running cluster; ``c.admin_url`` is its superuser URL."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-bench-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def start(self) -> Cluster:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        )
        self.started = True
        log(f"cluster on port {self.port} ({self.bindir})")
        return self

    def settings(self) -> dict[str, Any]:
        with connect(self.admin_url) as conn:
            shown = {name: fetch_value(conn, f"SHOW {name}") for name in SHOWN}
            shown["version"] = fetch_value(conn, "SHOW server_version")
        return shown

    def stop(self) -> None:
        try:
            if self.started:
                pg_ctl = str(self.bindir / "pg_ctl")
                try:
                    self._run(pg_ctl, "-D", str(self.data), "-m", "fast", "-t", "30", "stop")
                except subprocess.CalledProcessError:
                    self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        except subprocess.CalledProcessError as exc:
            log(f"cluster stop failed: {exc.stderr!r}")
        finally:
            self.started = False
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
