"""``outbox web`` and ``outbox dev``: the signup app's commands, added to the ``outbox`` CLI
through the ``outbox.commands`` entry points in ``web/pyproject.toml``.

Each reads the app's settings from the environment once; a missing variable is a
``ConfigError``, which the ``outbox`` CLI prints as one line.
"""

from __future__ import annotations

import argparse

from outbox import logs
from outbox.cli import UsageError
from web.settings import Settings


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {value!r}")
    return port


class WebCommand:
    help = "serve the signup app with uvicorn"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind")
        parser.add_argument("--port", type=_port, default=8000, help="port to bind")
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            help="only 1: run one `outbox web` per core behind your proxy instead (README)",
        )
        parser.add_argument(
            "--metrics-port",
            type=_port,
            help="serve /metrics on this port only, not on the app's port (default: the app's)",
        )
        parser.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port")
        parser.add_argument(
            "--client-timeout",
            type=float,
            default=10.0,
            help="seconds a client gets to send its headers, and again its body",
        )

    def run(self, args: argparse.Namespace) -> int:
        if args.workers != 1:
            raise UsageError(
                "--workers: run one `outbox web` per core (each with its own --port, or behind "
                "one proxy) instead of worker processes; see the README's production recipe"
            )
        if args.client_timeout <= 0:
            raise UsageError("--client-timeout must be a positive number of seconds")
        from web.server import serve

        settings = Settings.from_env()
        settings.require("secret_key", "base_url", "database_url")
        logs.configure()
        serve(
            settings,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            client_timeout_s=args.client_timeout,
        )
        return 0


class DevCommand:
    help = "run everything locally: embedded PostgreSQL, mail capture, the app and a relay"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind")
        parser.add_argument("--port", type=_port, default=8000, help="port to bind")
        parser.add_argument(
            "--data-dir",
            default=".outbox",
            help="where dev keeps its database, secret key and lock; one outbox dev at a time",
        )

    def run(self, args: argparse.Namespace) -> int:
        from web.dev import run_dev

        logs.configure()
        return run_dev(Settings.from_env(), host=args.host, port=args.port, data_dir=args.data_dir)


web = WebCommand()
dev = DevCommand()
