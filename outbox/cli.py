"""The ``outbox`` command: dev, web, relay, migrate, status, dead, retry, purge.

User mistakes (a missing variable, a bad flag, a database that does not answer) end in one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from outbox import admin, logs
from outbox.errors import ConfigError, OutboxError
from outbox.relay import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BYTES_IN_FLIGHT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_STOP_GRACE,
    RelayConfig,
)
from outbox.settings import Settings

T = TypeVar("T")


class UsageError(OutboxError):
    """The command line is invalid."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and a pointer to --help), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _duration(value: str) -> timedelta:
    try:
        return admin.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox",
        description="A transactional outbox on PostgreSQL: web app, relay and operator tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dev = sub.add_parser("dev", help="run everything locally: embedded PostgreSQL, mail capture")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--data-dir", default=".outbox", help="where dev keeps its data (.outbox)")

    web = sub.add_parser("web", help="serve the signup app with uvicorn")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    web.add_argument("--workers", type=_positive_int, default=1)

    relay = sub.add_parser("relay", help="deliver due messages (run several for more throughput)")
    relay.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    relay.add_argument("--concurrency", type=_positive_int, default=DEFAULT_CONCURRENCY)
    relay.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    relay.add_argument("--send-timeout", type=float, default=DEFAULT_SEND_TIMEOUT)
    relay.add_argument("--max-attempts", type=_positive_int, default=DEFAULT_MAX_ATTEMPTS)
    relay.add_argument("--backoff-base", type=float, default=DEFAULT_BACKOFF_BASE)
    relay.add_argument("--backoff-cap", type=float, default=DEFAULT_BACKOFF_CAP)
    relay.add_argument("--stop-grace", type=float, default=DEFAULT_STOP_GRACE)
    relay.add_argument(
        "--max-bytes-in-flight",
        type=_positive_int,
        default=DEFAULT_MAX_BYTES_IN_FLIGHT,
        help="payload bytes claimed and not yet handled, at most (plus one message)",
    )
    relay.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        help="seconds a claim lasts unrenewed: a frozen or cut-off relay's messages wait this long",
    )
    relay.add_argument("--once", action="store_true", help="deliver everything due now, exit 0")
    relay.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so its @outbox.handler(...) functions are registered",
    )
    relay.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    relay.add_argument("--metrics-host", default="127.0.0.1")
    relay.add_argument(
        "--retention",
        type=_duration,
        default=None,
        help="delete sent messages older than this (e.g. 7d), in small batches",
    )
    relay.add_argument("--log-format", choices=["text", "json"], default="text")

    sub.add_parser("migrate", help="create or upgrade the schema (= alembic upgrade head)")

    status = sub.add_parser("status", help="count pending, retrying, dead and sent messages")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    dead = sub.add_parser("dead", help="list dead messages and why they died")
    dead.add_argument("--limit", type=_positive_int, default=50)
    dead.add_argument("--json", action="store_true", help="print JSON for scripts")

    retry = sub.add_parser("retry", help="make dead messages due again")
    retry.add_argument("ids", nargs="*", type=_positive_int, metavar="ID")
    retry.add_argument("--all-dead", action="store_true")

    purge = sub.add_parser("purge", help="delete sent messages older than a duration")
    purge.add_argument("--older-than", type=_duration, required=True, metavar="DURATION")
    return parser


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(coro_fn())


async def _with_engine(settings: Settings, use: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    from outbox.db import create_engine

    settings.require("database_url")
    assert settings.database_url is not None
    engine = create_engine(settings.database_url, application_name="outbox-cli", pool_size=1)
    try:
        return await use(engine)
    finally:
        await engine.dispose()


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [
        [str(row.get(c, "") if row.get(c) is not None else "") for c in columns] for row in rows
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    counts = _run(lambda: _with_engine(settings, admin.status))
    if args.json:
        print(json.dumps(counts))
    else:
        for key, value in counts.items():
            print(f"{key:<22}{value}")
    return 0


def _cmd_dead(settings: Settings, args: argparse.Namespace) -> int:
    rows = _run(lambda: _with_engine(settings, lambda e: admin.list_dead(e, limit=args.limit)))
    if args.json:
        print(json.dumps(rows, default=str))
    elif not rows:
        print("no dead messages")
    else:
        for row in rows:
            row["dead_at"] = row["dead_at"].isoformat(timespec="seconds")
        _print_table(rows, ["id", "topic", "attempts", "dead_at", "last_error"])
    return 0


def _cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_dead):
        raise UsageError("give message IDs or --all-dead (one of them)")
    requeued = _run(
        lambda: _with_engine(
            settings, lambda e: admin.retry(e, ids=args.ids, all_dead=args.all_dead)
        )
    )
    missing = sorted(set(args.ids) - set(requeued))
    print(f"requeued {len(requeued)} message(s)" + (f": {requeued}" if requeued else ""))
    if missing:
        print(f"not dead or not found: {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    deleted = _run(
        lambda: _with_engine(settings, lambda e: admin.purge(e, older_than=args.older_than))
    )
    print(f"deleted {deleted} sent message(s) older than {args.older_than}")
    return 0


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from outbox import migrate

    settings.require("database_url")
    assert settings.database_url is not None
    migrate.upgrade_url(settings.database_url)
    print("database schema is up to date")
    return 0


def _cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.signals import hold_stop_signals

    hold_stop_signals()  # a SIGTERM while still starting stops the relay cleanly, not by death
    from outbox.runner import serve_relay

    config = RelayConfig(
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        poll_interval=args.poll_interval,
        send_timeout=args.send_timeout,
        max_attempts=args.max_attempts,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        stop_grace=args.stop_grace,
        lease=args.lease,
        max_bytes_in_flight=args.max_bytes_in_flight,
    )
    settings.require("database_url", "smtp_url")
    sys.path.insert(0, ".")
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"--import {module}: {exc}") from None
    logs.configure(args.log_format)
    _run(
        lambda: serve_relay(
            settings,
            config,
            once=args.once,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            retention=args.retention,
            log_format=args.log_format,
        )
    )
    return 0


def _cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from web.app import create_app

    settings.require("secret_key", "database_url")
    app = create_app(settings)
    logs.configure()
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    return 0


def _cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.dev import run_dev

    logs.configure()
    return run_dev(settings, host=args.host, port=args.port, data_dir=args.data_dir)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "dev": _cmd_dev,
    "web": _cmd_web,
    "relay": _cmd_relay,
    "migrate": _cmd_migrate,
    "status": _cmd_status,
    "dead": _cmd_dead,
    "retry": _cmd_retry,
    "purge": _cmd_purge,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return COMMANDS[args.command](settings, args)
    except (ConfigError, UsageError) as exc:
        print(f"outbox {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _is_database_unreachable(exc):
            print(
                f"outbox {args.command}: cannot reach the database: {_one_line(exc)}",
                file=sys.stderr,
            )
            return 1
        raise


def _is_database_unreachable(exc: BaseException) -> bool:
    from outbox.dberrors import is_connection_error

    return is_connection_error(exc)


def entrypoint() -> None:
    """The console script: exit with ``main``'s status."""
    sys.exit(main())
