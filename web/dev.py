"""``outbox dev``: the whole service on one machine with nothing set up.

Fills in what the environment leaves unset: an embedded PostgreSQL (pgserver) whose data lives in
``.outbox/pgdata`` and is reused on the next start, a generated SECRET_KEY kept in
``.outbox/secret_key``, and a capture SMTP server whose mails /dev/mail shows. Then it migrates,
and runs the web app and a relay in one process until Ctrl-C, which stops all of it (the embedded
PostgreSQL included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp

from outbox import settings as outbox_settings
from outbox.dashboard import create_dashboard
from outbox.db import create_engine
from outbox.relay import RelayConfig
from outbox.runner import open_relay
from outbox.signals import on_stop
from web import devlock, migrate
from web.app import create_app
from web.capture import CaptureServer, free_port
from web.devmail import dev_mail_routes
from web.settings import Settings

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``outbox dev`` stops web and relay together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _secret_key(data: Path) -> str:
    path = data / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _embedded_postgres(data: Path) -> Any:
    # platformdirs warns when XDG_RUNTIME_DIR is unset (as for root); pgserver copes without it.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # its INFO lines are for debugging
    pgdata = data / "pgdata"
    orphan = devlock.orphaned_postgres(pgdata) if pgdata.exists() else None
    if orphan is not None:
        print(
            f"found the embedded PostgreSQL (pid {orphan}) of an outbox dev that did not stop; "
            "using it, and stopping it on exit",
            file=sys.stderr,
        )
    else:
        print("starting embedded PostgreSQL in", pgdata, "...", file=sys.stderr)
    return pgserver.get_server(str(pgdata.resolve()), cleanup_mode="stop")


async def _serve(settings: Settings, capture: CaptureServer | None, host: str, port: int) -> None:
    assert settings.database_url is not None
    # The operator dashboard at /admin, without a login: dev binds 127.0.0.1 and is one person's.
    dashboard_engine = create_engine(
        settings.database_url, application_name="outbox-dashboard", pool_size=2
    )
    try:
        extra: list[BaseRoute] = [
            Mount("/admin", app=create_dashboard(dashboard_engine, password=None))
        ]
        extra += dev_mail_routes(capture) if capture is not None else []
        await _serve_app(create_app(settings, extra_routes=extra), settings, capture, host, port)
    finally:
        await dashboard_engine.dispose()


async def _serve_app(
    app: ASGIApp, settings: Settings, capture: CaptureServer | None, host: str, port: int
) -> None:
    server = _Server(uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on"))
    config = RelayConfig(poll_interval=2.0, backoff_base=1.0, backoff_cap=60.0)
    relay_settings = outbox_settings.Settings(
        database_url=settings.database_url, smtp_url=settings.smtp_url, mail_from=settings.mail_from
    )
    async with open_relay(relay_settings, config) as relay:

        def stop() -> None:
            print("\nstopping ...", file=sys.stderr)
            server.should_exit = True
            relay.stop()

        with on_stop(stop):
            web_task = asyncio.create_task(server.serve())
            relay_task = asyncio.create_task(relay.run())
            while not server.started and not web_task.done():
                await asyncio.sleep(0.05)
            if server.started:
                print(f"\n  outbox dev is running: {settings.base_url}/users/register", flush=True)
                if capture is not None:
                    print(f"  captured mail:         {settings.base_url}/dev/mail", flush=True)
                print(f"  the queue (dashboard): {settings.base_url}/admin", flush=True)
                database_url = outbox_settings.libpq_url(settings.database_url or "")
                print(
                    f"  database:              export DATABASE_URL='{database_url}'\n"
                    "                         then, in that shell: outbox status (dead, show ...)",
                    flush=True,
                )
                print("  press Ctrl-C to stop\n", flush=True)
            done, _ = await asyncio.wait(
                {web_task, relay_task}, return_when=asyncio.FIRST_COMPLETED
            )
            stop()
            await asyncio.gather(web_task, relay_task, return_exceptions=True)
            for task in done:
                task.result()


def run_dev(settings: Settings, *, host: str, port: int, data_dir: str) -> int:
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    lock = devlock.claim_data_dir(data, url=f"http://{host}:{port}")
    pg = None
    capture = None
    try:
        devlock.check_port_free(host, port)
        if settings.database_url is None:
            pg = _embedded_postgres(data)
            settings = settings.with_overrides(database_url=pg.get_uri())
        if settings.secret_key is None:
            settings = settings.with_overrides(secret_key=_secret_key(data))
        if settings.base_url is None:  # not configured: point links at this server
            settings = settings.with_overrides(base_url=f"http://{host}:{port}")
        if settings.smtp_url is None:
            capture = CaptureServer(port=free_port()).start()
            settings = settings.with_overrides(smtp_url=capture.url)
        assert settings.database_url is not None
        migrate.upgrade_url(settings.database_url)
        asyncio.run(_serve(settings, capture, host, port))
        return 0
    finally:
        if capture is not None:
            capture.stop()
        if pg is not None:
            pg.cleanup()
        lock.close()  # only now: a next outbox dev must not find our PostgreSQL still stopping
