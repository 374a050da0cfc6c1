"""The seed's signup with Flask and sync SQLAlchemy, the verification mail in the same transaction.

Compare the seed's two versions: here the handler never talks to the mail server or a broker.
It writes the user row and an ``email`` outbox row in one transaction; ``outbox relay`` delivers
the mail after the commit, and a signup that rolls back (say, a duplicate address) leaves no mail.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import sqlalchemy as sa
from flask import Flask, redirect, request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from werkzeug.wrappers import Response

import outbox


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.Text, unique=True)
    password_hash: Mapped[str] = mapped_column(sa.Text)
    verify_token: Mapped[str] = mapped_column(sa.Text)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def create_app(database_url: str | None = None) -> Flask:
    app = Flask(__name__)
    url = database_url or os.environ["DATABASE_URL"]
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    site_name = os.environ.get("SITE_NAME", "Flask Example")
    base_url = os.environ.get("BASE_URL", "http://127.0.0.1:5000")

    @app.get("/users/register")
    def register_form() -> str:
        return (
            '<form method="post"><input name="email" type="email">'
            '<input name="password" type="password"><button>Sign up</button></form>'
        )

    @app.post("/users/register")
    def register() -> Response | tuple[str, int]:
        email = request.form.get("email", "").strip()
        password = request.form.get("password", "")
        if "@" not in email or len(password) < 8:
            return "an email address and a password of 8+ characters, please", 400
        token = secrets.token_urlsafe(16)
        try:
            with Session(engine) as session, session.begin():
                session.add(
                    User(email=email, password_hash=hash_password(password), verify_token=token)
                )
                session.flush()  # a duplicate address fails here, before anything is enqueued
                outbox.enqueue(
                    session,
                    topic="email",
                    payload={
                        "to": email,
                        "subject": f"Congratulations, you are a member of {site_name} now.",
                        "text": f"Please click the link: {base_url}/users/verify?token={token}",
                    },
                )
        except IntegrityError:
            return "that address is already registered", 409
        return redirect("/users/register/success", code=303)

    @app.get("/users/register/success")
    def register_success() -> str:
        return "Check your inbox for the verification link."

    return app
