"""The ``outbox`` command: relay, migrate, status, dead, retry, purge, discard, admin; and web
and dev from the signup app.

User mistakes (a missing variable, a bad flag, a database that does not answer) end in one line
on stderr and a non-zero exit, never a traceback.

``outbox web`` and ``outbox dev`` belong to the signup app, which is a distribution of its own:
it adds them through the ``outbox.commands`` entry-point group (an object with ``help``,
``configure(parser)`` and ``run(args)``), so this module never imports it. Without the app the
two names are still listed, and say in one line how to install it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any, NoReturn, Protocol, TypeVar

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


class AppCommand(Protocol):
    """What a distribution registers under the ``outbox.commands`` entry-point group."""

    help: str

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# The signup app's commands, listed even when the app is not installed (to say how to get it).
APP_COMMANDS = {
    "dev": "run everything locally: embedded PostgreSQL, mail capture (needs the signup app)",
    "web": "serve the signup app with uvicorn (needs the signup app)",
}
APP_MISSING = "the signup app is not installed; from a checkout: pip install -e ./web"


def _app_commands() -> dict[str, AppCommand]:
    found: dict[str, AppCommand] = {}
    for entry in entry_points(group="outbox.commands"):
        try:
            found[entry.name] = entry.load()
        except ImportError:
            continue  # a half-installed app: the command then says how to install it
    return found


def _build_parser(app_commands: dict[str, AppCommand]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox",
        description="A transactional outbox on PostgreSQL: relay and operator tools "
        "(and, with the signup app installed, its web server and dev mode).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name in sorted({*APP_COMMANDS, *app_commands}):
        command = app_commands.get(name)
        if command is None:
            missing = sub.add_parser(name, help=APP_COMMANDS[name])
            missing.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        else:
            command.configure(sub.add_parser(name, help=command.help))

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

    sub.add_parser(
        "migrate",
        help="create or upgrade the outbox table (the library's own history; "
        "your other tables and your alembic_version are left alone)",
    )

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

    discard = sub.add_parser("discard", help="delete dead messages (and nothing else)")
    discard.add_argument("ids", nargs="*", type=_positive_int, metavar="ID")
    discard.add_argument("--all-dead", action="store_true", help="every dead message")

    admin_cmd = sub.add_parser(
        "admin", help="serve the operator dashboard (needs ADMIN_PASSWORD) at /admin"
    )
    admin_cmd.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    admin_cmd.add_argument("--port", type=int, default=8001, help="port to bind (8001)")
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


def _cmd_discard(settings: Settings, args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_dead):
        raise UsageError("give message IDs or --all-dead (one of them)")
    deleted = _run(
        lambda: _with_engine(
            settings, lambda e: admin.discard(e, ids=args.ids, all_dead=args.all_dead)
        )
    )
    missing = sorted(set(args.ids) - set(deleted))
    print(f"discarded {len(deleted)} dead message(s)" + (f": {deleted}" if deleted else ""))
    if missing:
        print(f"not dead or not found (left alone): {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_admin(settings: Settings, args: argparse.Namespace) -> int:
    """The dashboard on its own server: ``/admin`` behind a login, ``/healthz``, ``/`` -> /admin.

    ADMIN_PASSWORD is read here, by the process, rather than kept in ``Settings``: only this
    command uses it.
    """
    import os

    missing = [] if os.environ.get("ADMIN_PASSWORD") else ["ADMIN_PASSWORD"]
    missing += [] if settings.database_url else ["DATABASE_URL"]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"{' and '.join(missing)} {verb} required (set in the environment)")
    assert settings.database_url is not None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, not {args.port}")
    try:
        import uvicorn

        from outbox.dashboard.server import create_admin_server
    except ImportError as exc:
        raise UsageError(
            f"the dashboard needs its extra ({exc.name} is missing): "
            "pip install 'outbox[dashboard]'"
        ) from None
    app = create_admin_server(settings.database_url, password=os.environ["ADMIN_PASSWORD"])
    logs.configure()
    print(f"outbox admin: http://{args.host}:{args.port}/admin", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    return 0


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from outbox import migrate

    settings.require("database_url")
    assert settings.database_url is not None
    applied = migrate.upgrade_url(settings.database_url)
    steps = ", ".join(f"{s.version} ({s.name})" for s in migrate.STEPS if s.version in applied)
    print(f"applied {steps}" if applied else "the outbox schema is up to date")
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
    settings.require("database_url")
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


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "relay": _cmd_relay,
    "migrate": _cmd_migrate,
    "status": _cmd_status,
    "dead": _cmd_dead,
    "retry": _cmd_retry,
    "purge": _cmd_purge,
    "discard": _cmd_discard,
    "admin": _cmd_admin,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    app_commands = _app_commands()
    args = _build_parser(app_commands).parse_args(argv)
    try:
        if args.command in app_commands:
            return app_commands[args.command].run(args)
        if args.command in APP_COMMANDS:
            raise UsageError(APP_MISSING)
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
