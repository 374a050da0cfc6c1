"""A real PgBouncer in transaction pooling mode in front of a test database, for the tests.

Started as a subprocess on a free 127.0.0.1 port with a configuration of its own; ``*`` in its
``[databases]`` maps every database name to the same name on the server of the given URL, so it
serves the throwaway test databases as they come. Transaction pooling is PgBouncer's mode that
breaks session state (startup ``options``, prepared statements, LISTEN), hence the one tested.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from outbox.settings import libpq_url
from web.capture import free_port


def binary() -> str | None:
    """The pgbouncer program (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


class PgBouncer:
    """``start()`` / ``stop()``; ``url(db_url)`` is ``db_url`` routed through it."""

    def __init__(self, server_url: str, *, pool_size: int = 5) -> None:
        info = conninfo_to_dict(libpq_url(server_url))
        self.user = str(info.get("user") or "postgres")
        self.password = str(info.get("password") or "")
        self.port = free_port()
        # Root may not run PgBouncer ("PgBouncer should not run as root"): CI runs as root, so
        # it drops to another user, who must be able to read the files: a world-readable folder.
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
        self.dir.chmod(0o755)
        host = str(info.get("host") or "127.0.0.1")
        target = f"host={host} port={info.get('port') or 5432}"
        # As root it runs as a user who can reach the server: the owner of its socket folder
        # (the embedded server keeps its socket in its data folder, mode 0700), else nobody.
        self.run_as = (
            pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "nobody"
        )
        if self.password:
            target += f" password={self.password}"
        auth = self.dir / "users.txt"
        auth.write_text(f'"{self.user}" "{self.password}"\n')
        self.ini = self.dir / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"* = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {auth}\n"
            f"admin_users = {self.user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
        )
        for path in (auth, self.ini):
            path.chmod(0o644)
        self.log_path = self.dir / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> PgBouncer:
        path = binary()
        assert path is not None, "pgbouncer is not installed"
        command = [path, str(self.ini)]
        if os.geteuid() == 0:
            command[1:1] = ["-u", self.run_as]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited at start:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pgbouncer did not listen:\n{self.log()}") from None
                time.sleep(0.05)

    def url(self, db_url: str, *, marker: bool = True) -> str:
        """``db_url``'s database through PgBouncer, with ``?pgbouncer=true`` unless told not to."""
        return self._url(str(conninfo_to_dict(libpq_url(db_url))["dbname"]), marker=marker)

    def _url(self, database: str, *, marker: bool) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        query = "?pgbouncer=true" if marker else ""
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}{query}"

    def admin(self, command: str) -> str:
        """A command on PgBouncer's admin console (simple query protocol only: psql)."""
        return subprocess.run(
            ["psql", "-XAt", "-c", command, self._url("pgbouncer", marker=False)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
