"""One ``outbox dev`` per data folder, and nothing left behind by one that was killed.

Two instances on one data folder would share one database and read each other's mail (each has
its own capture server, but both relays claim from the same table), so the second refuses, in
one line naming the first. The claim is an advisory ``flock`` on ``<data>/dev.lock``: the kernel
drops it when its process ends, however it ends, so a ``kill -9`` leaves no stale lock to clean.

``kill -9`` does leave the embedded PostgreSQL running: pgserver stops the server when the last
process that registered in ``<pgdata>/.handle_pids.json`` exits through ``atexit``, which a
killed process never does, and from then on that dead pid keeps every later ``outbox dev`` from
stopping it. Whoever holds the lock is the only ``outbox dev`` on that folder, so it can forget
those registrations: pgserver then finds the running server, reuses it, and stops it on exit.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from outbox.errors import ConfigError

LOCK_NAME = "dev.lock"
# pgserver's list of the processes using a data folder (see the module docstring).
PGSERVER_HANDLES = ".handle_pids.json"


def claim_data_dir(data: Path, *, url: str) -> IO[str]:
    """Lock ``data`` for this process and record who holds it; ``ConfigError`` naming the holder
    when another ``outbox dev`` has it. Keep the returned file open for as long as you run."""
    path = data / LOCK_NAME
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _holder(handle.read())
        handle.close()
        raise ConfigError(
            f"{data} is in use by another outbox dev ({holder}): stop it first (Ctrl-C where it "
            "runs), or give this one its own --data-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "url": url}))
    handle.flush()
    return handle


def _holder(text: str) -> str:
    try:
        found = json.loads(text)
        return f"pid {int(found['pid'])}, {found['url']}"
    except (ValueError, KeyError, TypeError):
        return "still starting"  # it holds the lock but has not written its pid yet


def check_port_free(host: str, port: int) -> None:
    """``ConfigError`` when ``host:port`` cannot be bound, before anything is started: the web
    server would otherwise fail only after PostgreSQL, the migrations and the relay are up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise ConfigError(f"--host {host}: {exc.strerror or exc}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): another server has it; "
                "choose another port (outbox dev --port N, or make dev PORT=N)"
            ) from None


def orphaned_postgres(pgdata: Path) -> int | None:
    """Forget pgserver's registrations in ``pgdata`` (call with the data folder locked) and
    return the pid of a PostgreSQL still running there from an ``outbox dev`` that was killed."""
    (pgdata / PGSERVER_HANDLES).unlink(missing_ok=True)
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale pid file: pg_ctl copes with it
    except PermissionError:
        pass  # running as another user (pgserver runs it as "pgserver" under root)
    return pid
