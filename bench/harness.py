"""What every scenario shares: sizes, throwaway databases, relay processes, the machine line."""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import TextClause

# The one import of the library's internals for SQL: the SQL ceiling (item 3) and the NOTIFY cost
# (item 7) must run the relay's and enqueue's own statements, not copies that could drift.
from outbox import queries

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# The channel relays LISTEN on and enqueue NOTIFYs (outbox.schema.NOTIFY_CHANNEL): part of the
# wire contract between writers and relays, so it is spelt here rather than imported.
NOTIFY_CHANNEL = "outbox"


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is. ``full`` is the published run (about 40 minutes); ``quick``
    runs the same code at small sizes in a few minutes (Celery's throughput left out);
    ``smoke`` only proves the code runs (the test suite)."""

    name: str
    runs: int  # timed runs per figure (after one warm-up)
    smtp_total: int  # mails per item-2 run (and per item-4 run)
    relay_procs: tuple[int, ...]  # item 2
    queue_total: int  # messages per item-3 run
    batch_sizes: tuple[int, ...]  # item 3
    queue_procs: int  # processes for items 3 and 4 (ours and every peer)
    latency_seconds: float  # item 5, per rate
    latency_rates: tuple[int, ...]
    scale_rows: tuple[int, ...]  # item 6
    scale_sent_kept: int
    notify_seconds: float  # item 7, per run
    web_seconds: float  # item 1, per window (paced, and saturated if web_saturated)
    peers: bool = True
    charts: bool = True
    target_s: float = 3.0  # each timed drain is sized from its warm-up to last about this long
    warm: int = 1000  # messages in a warm-up drain
    celery_throughput: bool = True  # items 3-4: Celery's workers start per drain (slow)
    web_runs: int = 0  # item 1: timed runs per variant (0: ``runs``)
    web_warm_s: float = 1.0  # item 1: back-to-back window (the warm-up, and saturated runs)
    web_saturated: bool = False  # item 1: a back-to-back window per run (else: the warm-up's)
    web_outage_s: float = 0.0  # item 1: the RabbitMQ outage window (0: not measured)
    # Items 3-4 sweeps: every system tried at each setting of a small grid (one short drain
    # each, workers started once per setting), then its best setting timed ``runs`` times.
    sweep_procs: tuple[int, ...] = (1, 2, 4)  # worker / relay processes
    sweep_wide: bool = True  # the grid's second values (batch, concurrency, pool, prefetch)
    sweep_target_s: float = 1.0  # each sweep drain is sized to last about this long
    # Item 8: the 2,000-message drain with hung sends (bench/stall.py), drains per case.
    stall_rounds: int = 3
    stall_messages: int = 2000
    # Item 9: a drain on a cluster of the bench's own while a snapshot is held open.
    snapshot_base_s: float = 120.0  # rounds without the snapshot (shorter: the time budget)
    snapshot_hold_s: float = 600.0  # rounds while the snapshot is held
    snapshot_fill: int = 10_000  # messages per round

    def size_for(
        self, rate: float, cap: int, floor: int = 200, target_s: float | None = None
    ) -> int:
        """Messages for a timed drain at ``rate``/s (from the warm-up) to last ``target_s``
        (the size's own ``target_s`` unless given)."""
        if rate != rate or rate <= 0:  # NaN: the warm-up was too short to tell
            return min(cap, max(floor, self.warm))
        return int(min(cap, max(floor, rate * (target_s or self.target_s))))


SIZES = {
    "smoke": Sizes(
        "smoke",
        runs=1,
        smtp_total=200,
        relay_procs=(1,),
        queue_total=600,
        batch_sizes=(10, 100),
        queue_procs=1,
        latency_seconds=1.0,
        latency_rates=(50,),
        scale_rows=(500,),
        scale_sent_kept=500,
        notify_seconds=0.5,
        web_seconds=1.0,
        web_runs=1,
        web_warm_s=0.5,
        peers=False,
        charts=False,
        target_s=0.3,
        warm=200,
        sweep_procs=(1,),
        sweep_wide=False,
        sweep_target_s=0.2,
        stall_rounds=1,
        stall_messages=400,
        snapshot_base_s=3.0,
        snapshot_hold_s=4.0,
        snapshot_fill=500,
    ),
    "quick": Sizes(
        "quick",
        runs=3,
        smtp_total=5000,
        relay_procs=(1, 2),
        queue_total=20000,
        batch_sizes=(10, 100),
        queue_procs=2,
        latency_seconds=1.2,
        latency_rates=(100, 1000),
        scale_rows=(5_000, 20_000),
        scale_sent_kept=20_000,
        notify_seconds=0.7,
        web_seconds=1.5,
        target_s=0.4,
        warm=300,
        celery_throughput=False,
        web_runs=2,
        web_warm_s=0.5,
        sweep_procs=(1, 2),
        sweep_target_s=0.3,
        stall_rounds=1,
        snapshot_base_s=20.0,
        snapshot_hold_s=40.0,
        snapshot_fill=5_000,
    ),
    "full": Sizes(
        "full",
        runs=5,
        smtp_total=20000,
        relay_procs=(1, 2, 4),
        queue_total=100000,
        batch_sizes=(10, 100, 1000),
        queue_procs=2,
        latency_seconds=10.0,
        latency_rates=(100, 1000),
        scale_rows=(10_000, 100_000, 1_000_000),
        scale_sent_kept=1_000_000,
        notify_seconds=3.0,
        web_seconds=8.0,
        target_s=2.0,
        warm=2000,
        web_warm_s=3.0,
        web_saturated=True,
        web_outage_s=30.0,
    ),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    admin_url: str
    sizes: Sizes
    _dbs: list[str] = field(default_factory=list)

    # --- databases ---------------------------------------------------------------------------

    def _url_for(self, name: str) -> str:
        return libpq_url(
            make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
        )

    def create_db(self, label: str, *, migrated: bool = True) -> str:
        name = f"outbox_bench_{label}_{uuid.uuid4().hex[:8]}"
        create_database(self.admin_url, name)
        self._dbs.append(name)
        url = self._url_for(name)
        if migrated:
            migrate_service(url)
        return url

    def drop_db(self, url: str) -> None:
        name = make_url(url).database
        assert name is not None, url
        drop_database(self.admin_url, name)
        if name in self._dbs:
            self._dbs.remove(name)

    def drop_all(self) -> None:
        for name in list(self._dbs):
            try:
                drop_database(self.admin_url, name)
            except psycopg.Error as exc:
                log(f"could not drop {name}: {exc}")
        self._dbs.clear()

    # --- the machine line --------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        with connect(self.admin_url) as conn:
            version = fetch_value(conn, "SHOW server_version")
            settings = {
                name: fetch_value(conn, f"SHOW {name}")
                for name in (
                    "shared_buffers",
                    "synchronous_commit",
                    "fsync",
                    "max_connections",
                    "work_mem",
                    "max_wal_size",
                )
            }
        cpu = "?"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return {
            "cores": os.cpu_count(),
            "cpu": cpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(),
            "postgresql": version,
            "pg_settings": settings,
            "platform": platform.platform(),
        }


# --- databases (psycopg, sync) -----------------------------------------------------------------


def libpq_url(url: str) -> str:
    """``url`` spelt for libpq (``postgresql://``), whichever SQLAlchemy driver it names."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(url), **kw)


def create_database(admin_url: str, name: str) -> None:
    with connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_url: str, name: str) -> None:
    with connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def migrate_service(url: str) -> None:
    """The whole service's schema: the app's tables (items 1 and 7 write users) and the outbox
    table, from the app's Alembic history, as ``outbox dev`` and the tests build it."""
    from web.migrate import upgrade_url

    upgrade_url(url)


def free_port(host: str = "127.0.0.1") -> int:
    """A port to serve on that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def fetch_value(conn: psycopg.Connection[Any], query: str) -> Any:
    """The first column of the first row ``query`` returns (a count, a setting)."""
    row = conn.execute(query).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {query!r}")
    return row[0]


def pg_sql(statement: TextClause) -> str:
    """An ``outbox.queries`` statement spelt for psycopg (``:name`` -> ``%(name)s``)."""
    return re.sub(r"(?<!:):(\w+)", r"%(\1)s", str(statement))


CLAIM_SQL = pg_sql(queries.CLAIM_DUE)
CLAIM_AFTER_SQL = pg_sql(queries.CLAIM_DUE_AFTER)
SETTLE_SQL = pg_sql(queries.SETTLE_MANY)
INSERT_SQL = pg_sql(queries.INSERT_MESSAGE)
INSERT_NOTIFY_SQL = pg_sql(queries.INSERT_MESSAGE_NOTIFY)
DUE_EXISTS_SQL = "SELECT EXISTS (SELECT 1 FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL)"


def fill_outbox(
    url: str, n: int, *, topic: str, email: bool, notify: bool = False, sent: bool = False
) -> None:
    """Insert ``n`` due rows in one transaction (``sent``: rows already sent, kept as history)."""
    from bench.smtpload import SUBJECT, TEXT

    if email:
        payload = (
            "jsonb_build_object('to', 'user' || g || '@example.com', 'subject', %(subject)s::text,"
            " 'text', %(text)s::text)"
        )
    else:
        payload = "'{}'::jsonb"
    cols, extra = "topic, payload", ""
    if sent:
        cols += ", sent_at, attempts, created_at, available_at"
        extra = ", now() - interval '1 day', 1, now() - interval '1 day', now() - interval '1 day'"
    with connect(url) as conn:
        conn.execute(
            f"INSERT INTO outbox ({cols}) SELECT %(topic)s, {payload}{extra} "
            "FROM generate_series(1, %(n)s) AS g",
            {"topic": topic, "n": n, "subject": SUBJECT, "text": TEXT},
        )
    with connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox" if n >= 50_000 else "ANALYZE outbox")
        if notify:  # only now: the relays start on fresh statistics, with nothing else running
            conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))


def wait_drained(url: str, *, timeout: float, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    with connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if not fetch_value(conn, DUE_EXISTS_SQL):
                return True
            time.sleep(every)
    return False


def sent_times(
    url: str,
    table_sql: str = "SELECT extract(epoch FROM sent_at)::float8 FROM outbox "
    "WHERE sent_at IS NOT NULL AND sent_at > now() - interval '1 hour'",
) -> list[float]:
    with connect(url) as conn:
        return [r[0] for r in conn.execute(table_sql)]


def truncate_outbox(url: str) -> None:
    with connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")


# --- relay processes ---------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM all at once (so they stop in parallel), then SIGKILL whatever outlives ``grace``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Relays:
    """``n`` real ``outbox relay`` processes (the CLI, as deployed), stderr to a log file."""

    def __init__(
        self,
        url: str,
        smtp_url: str,
        n: int = 1,
        *,
        batch_size: int = 100,
        concurrency: int = 16,
        imports: tuple[str, ...] = (),
        poll_interval: float = 5.0,
        python: str | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.url, self.n = url, n
        self.cmd = [
            python or sys.executable,
            "-m",
            "outbox",
            "relay",
            "--batch-size",
            str(batch_size),
            "--concurrency",
            str(concurrency),
            "--poll-interval",
            str(poll_interval),
        ]
        for module in imports:
            self.cmd += ["--import", module]
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "SMTP_URL": smtp_url,
            "MAIL_FROM": "noreply@example.com",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_dir = log_dir or (ROOT / "bench" / "results")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._logs: list[BinaryIO] = []

    def start(self, *, wait_listening: bool = True, timeout: float = 30.0) -> Relays:
        for i in range(self.n):
            logf = open(self.log_dir / f"relay-{i}.log", "ab")
            self._logs.append(logf)
            self.procs.append(
                subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=logf, stderr=logf)
            )
        if wait_listening:
            self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                for p in self.procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"relay exited with {p.returncode}; see {self.log_dir}")
                listening = fetch_value(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-listen'"
                    " AND datname = current_database()",
                )
                if listening >= self.n:
                    return
                time.sleep(0.05)
        raise TimeoutError("relays did not start listening")

    def rss_kib(self) -> list[int]:
        return [_rss_kib(p.pid) for p in self.procs]

    def stop(self) -> None:
        stop_processes(self.procs)
        for f in self._logs:
            f.close()
        self.procs, self._logs = [], []

    def __enter__(self) -> Relays:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
