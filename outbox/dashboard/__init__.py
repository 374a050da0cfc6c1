"""The operator dashboard, an optional extra: ``pip install 'outbox[dashboard]'``.

Mount it in any Starlette or FastAPI app with one line::

    app.mount("/admin", create_dashboard(engine, password=os.environ["ADMIN_PASSWORD"]))

or run it on its own with ``outbox admin``. It imports nothing from the signup app; it needs
starlette, jinja2, python-multipart and itsdangerous, which the core library does not.
"""

from __future__ import annotations

from outbox.dashboard.app import create_dashboard

__all__ = ["create_dashboard"]
