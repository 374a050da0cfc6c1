"""``outbox web`` and ``outbox dev``: the signup app's commands, added to the ``outbox`` CLI
through the ``outbox.commands`` entry points in ``web/pyproject.toml``.

Each reads the app's settings from the environment once; a missing variable is a
``ConfigError``, which the ``outbox`` CLI prints as one line.
"""

from __future__ import annotations

import argparse

from outbox import logs
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

    def run(self, args: argparse.Namespace) -> int:
        import uvicorn

        from web.app import create_app

        settings = Settings.from_env()
        app = create_app(settings)
        logs.configure()
        uvicorn.run(app, host=args.host, port=args.port, log_config=None)
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
