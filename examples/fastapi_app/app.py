"""The seed's signup with FastAPI and async SQLAlchemy; the mail commits with the user row.

``await outbox.enqueue(session, ...)`` takes the request's ``AsyncSession``: the user row and the
mail commit together or not at all, and ``outbox relay`` delivers the mail after the commit.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import outbox
import outbox.migrate
from outbox.dashboard import create_dashboard


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "example_members"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.Text, unique=True)
    verify_token: Mapped[str] = mapped_column(sa.Text)


def setup_database(database_url: str) -> None:
    """The schema: the outbox table from the library (what `outbox migrate` does), then ours."""
    outbox.migrate.upgrade_url(database_url)
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    Base.metadata.create_all(engine)
    engine.dispose()


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session (module level: FastAPI resolves the annotations by name here)."""
    async with request.app.state.sessions() as s:
        yield s


def create_app(database_url: str | None = None, *, admin_password: str | None = None) -> FastAPI:
    url = (database_url or os.environ["DATABASE_URL"]).replace(
        "postgresql://", "postgresql+psycopg://", 1
    )
    admin_password = admin_password or os.environ.get("ADMIN_PASSWORD")
    engine = create_async_engine(url)  # connects on first use
    site_name = os.environ.get("SITE_NAME", "FastAPI Example")
    base_url = os.environ.get("BASE_URL", "http://127.0.0.1:8000")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    if admin_password:  # the queue's dashboard, behind a login (pip install 'outbox[dashboard]')
        app.mount("/admin", create_dashboard(engine, password=admin_password))

    @app.post("/users/register")
    async def register(
        email: Annotated[str, Form()],
        db: Annotated[AsyncSession, Depends(session)],
    ) -> RedirectResponse:
        token = secrets.token_urlsafe(16)
        try:
            async with db.begin():
                db.add(Member(email=email, verify_token=token))
                await db.flush()
                await outbox.enqueue(
                    db,
                    topic="email",
                    payload={
                        "to": email,
                        "subject": f"Congratulations, you are a member of {site_name} now.",
                        "text": f"Please click the link: {base_url}/users/verify?token={token}",
                    },
                )
        except IntegrityError:
            raise HTTPException(409, "that address is already registered") from None
        return RedirectResponse("/users/register/success", status_code=303)

    @app.get("/users/register/success")
    async def register_success() -> dict[str, str]:
        return {"status": "verification_sent"}

    return app
