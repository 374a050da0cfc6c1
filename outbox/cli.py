"""The ``outbox`` command: relay, migrate, status, dead, show, retry, purge, discard, admin;
and web and dev from the signup app.

User mistakes (a missing variable, a bad flag, a database that does not answer or was never
migrated) end in one line on stderr and a non-zero exit, never a traceback. ``--help`` of every
command gives each flag's meaning and default.

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
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any, NoReturn, Protocol, TypeVar

from outbox import admin, logs
from outbox.errors import ConfigError, NotMigratedError, OutboxError, one_line
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
from outbox.settings import Settings, missing_error

T = TypeVar("T")


class UsageError(OutboxError):
    """The command line is invalid."""


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none worth printing (unset, off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "%(default)" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and a pointer to --help), not a usage dump, and
    every command's --help shows defaults (subcommands inherit this class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _duration(value: str) -> timedelta:
    try:
        return admin.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _message_ref(value: str) -> int | uuid.UUID:
    """A message's id (``42``) or its UUID, bare or as the Message-ID header (``<uuid@host>``)."""
    if value.isdigit():
        return int(value)
    try:
        return uuid.UUID(value.strip().strip("<>").partition("@")[0])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a message id or Message-ID: {value!r} (use e.g. 42 or the UUID)"
        ) from None


def _package_version() -> str:
    try:
        return version("outbox")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name in sorted({*APP_COMMANDS, *app_commands}):
        command = app_commands.get(name)
        if command is None:
            missing = sub.add_parser(name, help=APP_COMMANDS[name])
            missing.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        else:
            command.configure(sub.add_parser(name, help=command.help))

    relay = sub.add_parser(
        "relay",
        help="deliver due messages (run several for more throughput)",
        description="Deliver due messages: email (when SMTP_URL is set) and the topics of every "
        "@outbox.handler in the --import modules. Needs DATABASE_URL.",
    )
    relay.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_BATCH_SIZE,
        help="messages claimed per transaction",
    )
    relay.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_CONCURRENCY,
        help="sends in flight at once, besides slow ones (see --slow-after, --max-slow)",
    )
    relay.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        metavar="SECONDS",
        help="look for due messages this often when no NOTIFY wakes the relay",
    )
    relay.add_argument(
        "--send-timeout",
        type=float,
        default=DEFAULT_SEND_TIMEOUT,
        metavar="SECONDS",
        help="give up on one send after this long (it is retried later)",
    )
    relay.add_argument(
        "--slow-after",
        type=float,
        metavar="SECONDS",
        help="a send running this long stops counting against --concurrency and another send "
        "starts beside it (default: an eighth of --send-timeout)",
    )
    relay.add_argument(
        "--max-slow",
        type=int,
        metavar="N",
        help="slow sends that may run beside --concurrency at once; past that a slow send keeps "
        "its worker (default: as many as --concurrency; 0: never more than --concurrency sends)",
    )
    relay.add_argument(
        "--max-attempts",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_MAX_ATTEMPTS,
        help="attempts before a message is dead",
    )
    relay.add_argument(
        "--backoff-base",
        type=float,
        default=DEFAULT_BACKOFF_BASE,
        metavar="SECONDS",
        help="first retry delay; it doubles with each attempt, with jitter",
    )
    relay.add_argument(
        "--backoff-cap",
        type=float,
        default=DEFAULT_BACKOFF_CAP,
        metavar="SECONDS",
        help="longest retry delay",
    )
    relay.add_argument(
        "--stop-grace",
        type=float,
        default=DEFAULT_STOP_GRACE,
        metavar="SECONDS",
        help="on SIGTERM, wait this long beyond --send-timeout for the batch in flight",
    )
    relay.add_argument(
        "--once", action="store_true", help="deliver everything due now, then exit 0"
    )
    relay.add_argument(
        "--max-bytes-in-flight",
        type=_positive_int,
        metavar="BYTES",
        default=DEFAULT_MAX_BYTES_IN_FLIGHT,
        help="payload bytes claimed and not yet handled, at most (plus one message)",
    )
    relay.add_argument(
        "--lease",
        type=float,
        metavar="SECONDS",
        default=DEFAULT_LEASE,
        help="how long a claim lasts unrenewed: a frozen relay's messages wait this long",
    )
    relay.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so its @outbox.handler(...) functions are registered",
    )
    relay.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (default: none served)",
    )
    relay.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server binds",
    )
    relay.add_argument(
        "--retention",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="delete sent messages older than this (30s, 15m, 12h, 7d) every 5 minutes, in "
        "small batches (default: keep them)",
    )
    relay.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines for people, JSON lines for log pipelines",
    )

    sub.add_parser(
        "migrate",
        help="create or upgrade the outbox table (the library's own history; "
        "your other tables and your alembic_version are left alone)",
    )

    status = sub.add_parser("status", help="count pending, retrying, dead and sent messages")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    dead = sub.add_parser("dead", help="list dead messages: for whom, and why they died")
    dead.add_argument(
        "--limit",
        type=_positive_int,
        default=50,
        metavar="N",
        help="show at most this many, newest first",
    )
    dead.add_argument("--json", action="store_true", help="print JSON for scripts")

    show = sub.add_parser(
        "show",
        help="one message: payload, attempts, last error, result, Message-ID, timestamps",
    )
    show.add_argument(
        "ref",
        type=_message_ref,
        metavar="ID",
        help="the message's id (as outbox dead lists it) or its UUID / Message-ID",
    )
    show.add_argument("--json", action="store_true", help="print JSON for scripts")

    retry = sub.add_parser("retry", help="make dead messages due again")
    retry.add_argument(
        "ids", nargs="*", type=_positive_int, metavar="ID", help="ids of dead messages"
    )
    retry.add_argument("--all-dead", action="store_true", help="every dead message")

    purge = sub.add_parser("purge", help="delete sent messages older than a duration")
    purge.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="DURATION",
        help="delete those sent longer ago than this; with its unit: 30s, 15m, 12h or 7d "
        "(a plain number is refused)",
    )

    discard = sub.add_parser("discard", help="delete dead messages (and nothing else)")
    discard.add_argument("ids", nargs="*", type=_positive_int, metavar="ID", help="dead messages")
    discard.add_argument("--all-dead", action="store_true", help="every dead message")

    admin_cmd = sub.add_parser(
        "admin", help="serve the operator dashboard (needs ADMIN_PASSWORD) at /admin"
    )
    admin_cmd.add_argument("--host", default="127.0.0.1", help="address to bind")
    admin_cmd.add_argument("--port", type=int, default=8001, help="port to bind")
    for listed in sub._choices_actions:  # each command's --help opens with what it does
        command_parser = sub.choices[listed.dest]
        if command_parser.description is None and listed.help:
            command_parser.description = listed.help[0].upper() + listed.help[1:] + "."
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
    async def read(engine: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        counts = await admin.status(engine)
        return counts, ([] if args.json else await admin.by_topic(engine))

    counts, topics = _run(lambda: _with_engine(settings, read))
    if args.json:
        print(json.dumps(counts))
        return 0
    for key, value in counts.items():
        print(f"{key:<22}{value}")
    if topics:
        # Per topic: a topic whose pending count only grows has no relay serving it (each
        # relay's start-up line names the topics it serves).
        print()
        _print_table(topics, ["topic", "pending", "retrying", "dead", "sent_last_hour"])
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
        _print_table(rows, ["id", "topic", "recipient", "attempts", "dead_at", "last_error"])
    return 0


# The order `outbox show` prints a message in: what and for whom, where it stands, why, when.
_SHOW_FIRST = (
    "id",
    "state",
    "topic",
    "recipient",
    "message_id",
    "message_id_header",
    "attempts",
    "last_error",
    "result",
    "created_at",
    "available_at",
    "sent_at",
    "dead_at",
)


def _cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from outbox.mail import message_id_header

    found = _run(lambda: _with_engine(settings, lambda e: admin.show(e, args.ref)))
    if found is None:
        print(f"outbox show: no message {args.ref}", file=sys.stderr)
        return 1
    if found["topic"] == "email":  # the header a receiver sees, to find it in a mail log
        found["message_id_header"] = message_id_header(found["message_id"], settings.mail_from)
    if args.json:
        print(json.dumps(found, default=str, indent=2))
        return 0
    payload = found.pop("payload")
    keys = [k for k in _SHOW_FIRST if k in found]
    keys += [k for k in found if k not in keys]
    for key in keys:
        value = found[key]
        if value is None:
            value = "-"
        elif hasattr(value, "isoformat"):
            value = value.isoformat(timespec="seconds")
        print(f"{key:<20}{value}")
    print("payload")
    for line in json.dumps(payload, indent=2, ensure_ascii=False).splitlines():
        print(f"  {line}")
    return 0


def _on_dead(
    settings: Settings,
    args: argparse.Namespace,
    action: Callable[..., Coroutine[Any, Any, list[int]]],
    done: str,
) -> int:
    """``retry`` and ``discard``: IDs or ``--all-dead``; say what was done and which IDs were not
    dead (exit 1 then: a mistyped ID is said, not silently ignored)."""
    if bool(args.ids) == bool(args.all_dead):
        raise UsageError("give message IDs or --all-dead (one of them)")
    changed = _run(
        lambda: _with_engine(settings, lambda e: action(e, ids=args.ids, all_dead=args.all_dead))
    )
    missing = sorted(set(args.ids) - set(changed))
    print(done.format(len(changed)) + (f": {changed}" if changed else ""))
    if missing:
        print(f"not dead or not found (left alone): {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    return _on_dead(settings, args, admin.retry, "requeued {} message(s)")


def _cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    deleted = _run(
        lambda: _with_engine(settings, lambda e: admin.purge(e, older_than=args.older_than))
    )
    print(f"deleted {deleted} sent message(s) older than {admin.format_duration(args.older_than)}")
    return 0


def _cmd_discard(settings: Settings, args: argparse.Namespace) -> int:
    return _on_dead(settings, args, admin.discard, "discarded {} dead message(s)")


def _cmd_admin(settings: Settings, args: argparse.Namespace) -> int:
    """The dashboard on its own server: ``/admin`` behind a login, ``/healthz``, ``/`` -> /admin.

    ADMIN_PASSWORD is read here, by the process, rather than kept in ``Settings``: only this
    command uses it.
    """
    import os

    missing = [] if os.environ.get("ADMIN_PASSWORD") else ["ADMIN_PASSWORD"]
    missing += [] if settings.database_url else ["DATABASE_URL"]
    if missing:
        raise missing_error(missing)
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
        slow_after=args.slow_after,
        max_slow=args.max_slow,
        max_attempts=args.max_attempts,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        stop_grace=args.stop_grace,
        lease=args.lease,
        max_bytes_in_flight=args.max_bytes_in_flight,
    )
    sys.path.insert(0, ".")
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"--import {module}: {exc}") from None
    _require_relay_settings(settings)
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


def _require_relay_settings(settings: Settings) -> None:
    """Name everything the relay lacks in one line: DATABASE_URL, and SMTP_URL when no
    ``--import`` brought a handler (such a relay would serve no topic and deliver nothing)."""
    from outbox.registry import default_registry

    missing = ["DATABASE_URL"] if settings.database_url is None else []
    if settings.smtp_url is None and not default_registry.topics:
        missing.append("SMTP_URL")
    if not missing:
        return
    if "SMTP_URL" in missing:
        raise missing_error(
            missing, "or --import a module with @outbox.handler functions instead of SMTP_URL"
        )
    raise missing_error(missing)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "relay": _cmd_relay,
    "migrate": _cmd_migrate,
    "status": _cmd_status,
    "dead": _cmd_dead,
    "show": _cmd_show,
    "retry": _cmd_retry,
    "purge": _cmd_purge,
    "discard": _cmd_discard,
    "admin": _cmd_admin,
}


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
        print(f"outbox {args.command}: {one_line(exc)}", file=sys.stderr)
        return 2
    except NotMigratedError as exc:
        print(f"outbox {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        missing_table = _missing_schema(exc)
        if missing_table is not None:
            print(
                f"outbox {args.command}: database not migrated ({missing_table}): "
                "run `outbox migrate`",
                file=sys.stderr,
            )
            return 1
        if _is_database_unreachable(exc):
            print(
                f"outbox {args.command}: cannot reach the database: {one_line(exc)}",
                file=sys.stderr,
            )
            return 1
        raise


def _is_database_unreachable(exc: BaseException) -> bool:
    from outbox.dberrors import is_connection_error

    return is_connection_error(exc)


def _missing_schema(exc: BaseException) -> str | None:
    from outbox.dberrors import missing_schema

    return missing_schema(exc)


def entrypoint() -> None:
    """The console script: exit with ``main``'s status."""
    sys.exit(main())
