"""The peers' apps and worker entry points: procrastinate, pgqueuer and Celery, each with a
no-op job and the email job. Run as ``python -m bench.peer_apps KIND [--concurrency N]`` with
``BENCH_DATABASE_URL`` and ``BENCH_SMTP_URL`` (and ``BENCH_MAIL_POOL``, SMTP connections per
process, 16 unless set) in the environment (a worker of that kind until SIGTERM); the harness in
``bench.peers`` starts and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import TYPE_CHECKING

from bench import peer_mail

# The peers are installed in .venv-bench only and mypy skips them (pyproject.toml), so they type
# as Any: their task decorators are untyped to mypy, hence the narrow ignores on them below.
if TYPE_CHECKING:
    import procrastinate
    from celery import Celery
    from pgqueuer.models import Job

QUEUE = "bench"
# SMTP connections per worker process of the async peers (the email sweep's "pool").
MAIL_POOL = int(os.environ.get("BENCH_MAIL_POOL", "16"))
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

# --- procrastinate -----------------------------------------------------------------------------


def procrastinate_app() -> procrastinate.App:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=os.environ.get("BENCH_DATABASE_URL", ""),
            kwargs={"application_name": "bench-procrastinate"},
        )
    )
    pool = peer_mail.AsyncMailPool(MAIL_POOL)

    @app.task(name="noop", queue=QUEUE)  # type: ignore[untyped-decorator]
    async def noop() -> None:
        return None

    @app.task(name="send_mail", queue=QUEUE)  # type: ignore[untyped-decorator]
    async def send_mail(to: str, subject: str, text: str, message_id: str) -> None:
        await pool.send(to, subject, text, message_id)

    return app


async def run_procrastinate(concurrency: int) -> None:
    app = procrastinate_app()
    async with app.open_async():
        await app.run_worker_async(
            queues=[QUEUE], concurrency=concurrency, install_signal_handlers=True
        )


# --- pgqueuer ----------------------------------------------------------------------------------


async def run_pgqueuer(batch_size: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, PgQueuer

    conn = await asyncpg.connect(os.environ["BENCH_DATABASE_URL"])
    pgq = PgQueuer(AsyncpgDriver(conn))
    pool = peer_mail.AsyncMailPool(MAIL_POOL)

    @pgq.entrypoint("noop")  # type: ignore[untyped-decorator]
    async def noop(job: Job) -> None:
        return None

    @pgq.entrypoint("send_mail")  # type: ignore[untyped-decorator]
    async def send_mail(job: Job) -> None:
        mail = json.loads(job.payload)
        await pool.send(mail["to"], mail["subject"], mail["text"], mail["message_id"])

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pgq.shutdown.set)
    await pgq.run(batch_size=batch_size)
    await conn.close()


# --- Celery -----------------------------------------------------------------------------------


def celery_app() -> Celery:
    from celery import Celery

    app = Celery("bench", broker=AMQP_URL)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="noop")  # type: ignore[untyped-decorator]
    def noop() -> None:
        return None

    @app.task(name="send_mail")  # type: ignore[untyped-decorator]
    def send_mail(to: str, subject: str, text: str, message_id: str) -> None:
        peer_mail.send_sync(to, subject, text, message_id)

    return app


app = celery_app() if os.environ.get("BENCH_CELERY") else None  # celery -A bench.peer_apps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["procrastinate", "pgqueuer"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    if args.kind == "procrastinate":
        asyncio.run(run_procrastinate(args.concurrency))
    else:
        asyncio.run(run_pgqueuer(args.batch_size))


if __name__ == "__main__":
    main()
