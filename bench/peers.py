"""The peers in items 3-5: procrastinate and pgqueuer (PostgreSQL queues) and Celery (RabbitMQ).

Each is driven the same way as the relay: the queue is filled in one go, workers drain it, and
the rate is taken over the 10-90 % window of completion times (the queue's own completion
timestamps for no-op jobs, the sink's acceptance times for mail). Workers are separate processes.
procrastinate and pgqueuer workers keep running across fills (a batch insert is one statement,
so they wake at its commit, like the relays on NOTIFY); Celery's are started after the queue is
filled, since publishing is one message at a time.

Items 3 and 4 sweep each peer over the settings its documentation names for throughput
(``grid``; see ``bench.sweep``): worker processes for all; procrastinate's per-worker
``concurrency`` (its docs: async jobs run concurrently within one worker); pgqueuer's dequeue
``batch_size`` (its benchmark tool and docs tune workers and batch size); Celery's prefork
concurrency and prefetch multiplier (its "Optimizing" guide: a large multiplier for many short
tasks); and for the email job the SMTP connection pool of the async peers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from functools import partial
from typing import TYPE_CHECKING, Any

from bench import smtpload
from bench.harness import ROOT, Bench, Sizes, connect, fetch_value, log, stop_processes
from bench.runner import Committed, latency_run, median_runs, open_loop
from bench.sink import Sink
from bench.stats import rate_10_90
from bench.sweep import Setting, sweep

if TYPE_CHECKING:  # in .venv-bench only; mypy skips them (pyproject.toml)
    import asyncpg
    from pgqueuer import Queries

PEERS = ["procrastinate", "pgqueuer", "celery"]


def _mail(i: int, message_id: str | None = None) -> dict[str, str]:
    return {**smtpload.email_payload(i), "message_id": message_id or str(uuid.uuid4())}


class Peer(ABC):
    """One peer's workers and queue, driven like the relays: fill in one go, time the drain.

    ``setting`` is one point of the peer's sweep (``grid``); keys it leaves out take the
    peer's ``defaults``."""

    name = ""
    persistent = True
    defaults: Setting = {"procs": 1}

    def __init__(self, url: str, sink: Sink, setting: Setting) -> None:
        self.url, self.sink = url, sink
        self.setting = {**self.defaults, **setting}
        self.procs = self.setting["procs"]
        self.workers: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "BENCH_DATABASE_URL": url,
            "BENCH_SMTP_URL": sink.url,
            "BENCH_MAIL_POOL": str(self.setting.get("pool", 16)),
        }
        self.logf = open(ROOT / "bench" / "results" / f"peer-{self.name}.log", "ab")

    @staticmethod
    @abstractmethod
    def grid(s: Sizes, email: bool) -> list[Setting]:
        """The settings the sweep tries (items 3 and 4)."""

    @abstractmethod
    def worker_cmds(self) -> list[list[str]]:
        """The command lines of this peer's worker processes."""

    def start(self) -> None:
        for cmd in self.worker_cmds():
            self.workers.append(
                subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=self.logf, stderr=self.logf)
            )
        time.sleep(0.5)

    def stop(self) -> None:
        stop_processes(self.workers)
        self.workers = []

    def setup(self) -> None:
        """Install the peer's schema in its fresh database (nothing to do for a broker)."""
        return None

    @abstractmethod
    def reset(self) -> None:
        """Empty the queue, so a drain counts only its own jobs."""

    @abstractmethod
    def fill(self, n: int, email: bool) -> None:
        """Enqueue ``n`` jobs (no-op or email) as fast as the peer's own API allows."""

    @abstractmethod
    def done_times(self, n: int, timeout: float) -> list[float]:
        """Wait until ``n`` jobs are done; their completion times (epoch seconds)."""

    def drain(self, n: int, email: bool, timeout: float = 600) -> float:
        self.reset()
        self.sink.reset()
        self.fill(n, email)
        if not self.persistent:
            self.start()
        try:
            if email:
                if not self.sink.wait_count(n, timeout):
                    raise TimeoutError(f"{self.name}: {self.sink.count()} of {n} mails")
                times, _ = self.sink.records()
            else:
                times = self.done_times(n, timeout)
        finally:
            if not self.persistent:
                self.stop()
        return rate_10_90(times)

    def close(self) -> None:
        self.stop()
        self.logf.close()


def _poll_sql_times(url: str, done_sql: str, times_sql: str, n: int, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    with connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if fetch_value(conn, done_sql) >= n:
                return [r[0] for r in conn.execute(times_sql)]
            time.sleep(0.25)
    raise TimeoutError(done_sql)


def _analyze(url: str) -> None:
    """Fresh planner statistics after a fill, as the relay's fills get (fair to everyone)."""
    with connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


class Procrastinate(Peer):
    name = "procrastinate"
    defaults: Setting = {"procs": 1, "concurrency": 16}

    @staticmethod
    def grid(s: Sizes, email: bool) -> list[Setting]:
        # One SMTP connection per concurrent job: the pool follows the concurrency.
        concurrency = (16, 64) if s.sweep_wide else (16,)
        return [
            {"procs": p, "concurrency": c, **({"pool": c} if email else {})}
            for p in s.sweep_procs
            for c in concurrency
        ]

    def worker_cmds(self) -> list[list[str]]:
        concurrency = str(self.setting["concurrency"])
        return [
            [sys.executable, "-m", "bench.peer_apps", "procrastinate", "--concurrency", concurrency]
            for _ in range(self.procs)
        ]

    def setup(self) -> None:
        from bench.peer_apps import procrastinate_app

        async def go() -> None:
            app = procrastinate_app()
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        os.environ["BENCH_DATABASE_URL"] = self.url
        asyncio.run(go())

    def reset(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            conn.execute("TRUNCATE procrastinate_jobs CASCADE")

    def fill(self, n: int, email: bool) -> None:
        from bench.peer_apps import procrastinate_app

        async def go() -> None:
            app = procrastinate_app()
            async with app.open_async():
                task = app.tasks["send_mail" if email else "noop"]
                kwargs = [_mail(i) for i in range(n)] if email else [{}] * n
                for k in range(0, n, 20000):
                    await task.batch_defer_async(*kwargs[k : k + 20000])

        os.environ["BENCH_DATABASE_URL"] = self.url
        asyncio.run(go())
        _analyze(self.url)

    def done_times(self, n: int, timeout: float) -> list[float]:
        return _poll_sql_times(
            self.url,
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
            "SELECT extract(epoch FROM at)::float8 FROM procrastinate_events"
            " WHERE type = 'succeeded'",
            n,
            timeout,
        )


class PgQueuer(Peer):
    name = "pgqueuer"
    defaults: Setting = {"procs": 1, "batch": 100}

    @staticmethod
    def grid(s: Sizes, email: bool) -> list[Setting]:
        # pgqueuer runs every job it dequeued at once, so its batch size is its concurrency;
        # for mail, the connection pool is the other bound.
        if email:
            pairs = [(10, 16), (100, 16), (100, 64)] if s.sweep_wide else [(100, 16)]
            return [{"procs": p, "batch": b, "pool": c} for p in s.sweep_procs for b, c in pairs]
        batches = (10, 100, 1000) if s.sweep_wide else (100,)
        return [{"procs": p, "batch": b} for p in s.sweep_procs for b in batches]

    def worker_cmds(self) -> list[list[str]]:
        batch = str(self.setting["batch"])
        return [
            [sys.executable, "-m", "bench.peer_apps", "pgqueuer", "--batch-size", batch]
            for _ in range(self.procs)
        ]

    async def _queries(self) -> tuple[asyncpg.Connection, Queries]:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(self.url)
        return conn, Queries(AsyncpgDriver(conn))

    def setup(self) -> None:
        async def go() -> None:
            conn, q = await self._queries()
            await q.install()
            await conn.close()

        asyncio.run(go())

    def reset(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    def fill(self, n: int, email: bool) -> None:
        async def go() -> None:
            conn, q = await self._queries()
            for k in range(0, n, 20000):
                m = min(20000, n - k)
                if email:
                    payloads = [json.dumps(_mail(k + i)).encode() for i in range(m)]
                    await q.enqueue(["send_mail"] * m, payloads, [0] * m)
                else:
                    await q.enqueue(["noop"] * m, [None] * m, [0] * m)
            await conn.close()

        asyncio.run(go())
        _analyze(self.url)

    def done_times(self, n: int, timeout: float) -> list[float]:
        return _poll_sql_times(
            self.url,
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
            "SELECT extract(epoch FROM created)::float8 FROM pgqueuer_log"
            " WHERE status = 'successful'",
            n,
            timeout,
        )


class Celery(Peer):
    name = "celery"
    persistent = False
    # One child where no sweep says otherwise (item 5 gives every peer one worker process);
    # 4 messages prefetched per child is Celery's own default.
    defaults: Setting = {"procs": 1, "prefetch": 4}

    @staticmethod
    def grid(s: Sizes, email: bool) -> list[Setting]:
        # Prefork children are Celery's processes; one worker node holds them all.
        children = (2, 4, 8) if s.sweep_wide else (2,)
        prefetch = (4, 64) if s.sweep_wide else (4,)
        return [{"procs": c, "prefetch": m} for c in children for m in prefetch]

    def __init__(self, url: str, sink: Sink, setting: Setting) -> None:
        super().__init__(url, sink, setting)
        self.env["BENCH_CELERY"] = "1"
        os.environ["BENCH_CELERY"] = "1"
        from bench.peer_apps import celery_app

        self.app = celery_app()

    def worker_cmds(self) -> list[list[str]]:
        return [
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.peer_apps",
                "worker",
                "-Q",
                "bench",
                "--pool=prefork",
                "-c",
                str(self.procs),
                "--prefetch-multiplier",
                str(self.setting["prefetch"]),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "warning",
                "-n",
                f"bench{uuid.uuid4().hex[:6]}@%h",
            ]
        ]

    def depth(self) -> int:
        with self.app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare("bench", passive=True).message_count)

    def reset(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_declare("bench", durable=True, auto_delete=False)
            conn.default_channel.queue_purge("bench")

    def fill(self, n: int, email: bool) -> None:
        task = self.app.tasks["send_mail" if email else "noop"]
        with self.app.producer_or_acquire() as producer:
            for i in range(n):
                if email:
                    task.apply_async(kwargs=_mail(i), producer=producer)
                else:
                    task.apply_async(producer=producer)

    def done_times(self, n: int, timeout: float) -> list[float]:
        # No completion timestamps without a result backend: sample the queue depth instead and
        # turn it into completion times (10-90 % window as for the others).
        samples = []
        deadline = time.monotonic() + timeout
        with self.app.connection_for_write() as conn:
            ch = conn.default_channel
            while time.monotonic() < deadline:
                left = int(ch.queue_declare("bench", passive=True).message_count)
                samples.append((time.time(), n - left))
                if left == 0:
                    break
                time.sleep(0.02)
        times: list[float] = []
        prev_t, prev_done = samples[0][0], 0
        for t, done in samples:
            k = done - prev_done
            times += [prev_t + (t - prev_t) * (j + 1) / k for j in range(k)] if k > 0 else []
            prev_t, prev_done = t, done
        return times


CLASSES: dict[str, type[Peer]] = {
    "procrastinate": Procrastinate,
    "pgqueuer": PgQueuer,
    "celery": Celery,
}


def throughput(b: Bench, sink: Sink, *, email: bool) -> dict[str, Any]:
    """Each peer swept over its ``grid`` (``bench.sweep``): its best setting and rate, and the
    whole grid."""
    s = b.sizes
    out: dict[str, Any] = {}
    n = s.smtp_total if email else s.queue_total
    for name in PEERS:
        if name == "celery" and not s.celery_throughput:
            out[name] = {"error": "left out of --quick (worker start-up per drain)"}
            continue
        cls = CLASSES[name]
        cap = min(n, 20000) if name == "celery" else n
        url = b.create_db(f"peer_{name}")

        def measure(
            setting: Setting,
            drains: int,
            target_s: float,
            cls: type[Peer] = cls,
            url: str = url,
            cap: int = cap,
            seen: list[float] = [],  # noqa: B006 - the rates this peer drained so far
        ) -> list[float]:
            peer = cls(url, sink, setting)
            try:
                if peer.persistent:
                    peer.start()
                # Big batches complete in big steps (pgqueuer logs a batch at once): enough of
                # them for the 10-90 % window to mean something, as for the relay's batches.
                floor = min(cap, max(200, 20 * setting.get("batch", 0)))
                if peer.persistent or not seen:
                    # A warm-up drain: the workers connect and warm up, and its rate sizes the
                    # timed drains. Celery's workers start afresh for every drain, so after
                    # its first setting the last rate seen sizes them instead (a warm-up
                    # would only add a fill and a start-up per setting).
                    seen.append(peer.drain(max(s.warm, floor), email))
                m = s.size_for(seen[-1], cap, floor, target_s=target_s)
                rates = [peer.drain(m, email) for _ in range(drains)]
                seen.extend(r for r in rates if r == r)
                return rates
            finally:
                peer.close()

        try:
            first = cls(url, sink, {})
            try:
                first.setup()
            finally:
                first.close()
            out[name] = sweep(
                f"{name} {'email' if email else 'no-op'}",
                cls.grid(s, email),
                measure,
                runs=s.runs,
                sweep_s=s.sweep_target_s,
                timed_s=s.target_s,
            )
        except Exception as exc:
            log(f"peer {name} failed: {exc!r}")
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            b.drop_db(url)
    return out


# --- item 5: latency ---------------------------------------------------------------------------


def produce(kind: str, url: str, rate: float, seconds: float) -> Committed:
    """In a producer process: offer email jobs at ``rate``; return (message id, enqueued at).
    ``functools.partial(produce, kind)`` is the peer's ``bench.runner.Producer``."""
    done: Committed = []
    os.environ["BENCH_DATABASE_URL"] = url

    if kind == "procrastinate":
        from bench.peer_apps import procrastinate_app

        async def go() -> None:
            app = procrastinate_app()
            async with app.open_async():
                task = app.tasks["send_mail"]

                async def one(i: int) -> None:
                    mid = str(uuid.uuid4())
                    await task.defer_async(**_mail(i, mid))
                    done.append((mid, time.time()))

                await open_loop(one, rate, seconds)

    elif kind == "pgqueuer":

        async def go() -> None:
            import asyncpg
            from pgqueuer import AsyncpgPoolDriver, Queries

            pool = await asyncpg.create_pool(url, min_size=4, max_size=16)
            q = Queries(AsyncpgPoolDriver(pool))

            async def one(i: int) -> None:
                mid = str(uuid.uuid4())
                await q.enqueue("send_mail", json.dumps(_mail(i, mid)).encode())
                done.append((mid, time.time()))

            await open_loop(one, rate, seconds)
            await pool.close()

    else:
        os.environ["BENCH_CELERY"] = "1"
        from bench.peer_apps import celery_app

        app = celery_app()
        task = app.tasks["send_mail"]

        async def go() -> None:
            async def one(i: int) -> None:
                mid = str(uuid.uuid4())
                task.delay(**_mail(i, mid))
                done.append((mid, time.time()))

            await open_loop(one, rate, seconds)

    asyncio.run(go())
    return done


def latency(b: Bench, sink: Sink) -> dict[str, Any]:
    s = b.sizes
    rate = min(s.latency_rates)
    out: dict[str, Any] = {}
    for name in PEERS:
        url = b.create_db(f"lat_{name}")
        peer = CLASSES[name](url, sink, {"procs": 1})
        try:
            peer.setup()
            peer.reset()
            peer.start()
            time.sleep(1.5 if name == "celery" else 0.5)
            producer = partial(produce, name)
            latency_run(name, producer, url, sink, 50, 1.0)  # warm-up
            runs = [
                latency_run(name, producer, url, sink, rate, s.latency_seconds / s.runs * 2)
                for _ in range(max(1, s.runs // 2 + 1))
            ]
            out[name] = median_runs(runs)
            log(
                f"peer {name} at {rate}/s: p50 {out[name]['p50']:.1f} ms, "
                f"p99 {out[name]['p99']:.1f} ms"
            )
        except Exception as exc:
            log(f"peer {name} latency failed: {exc!r}")
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            peer.close()
            b.drop_db(url)
    return out


__all__ = ["latency", "produce", "throughput"]
