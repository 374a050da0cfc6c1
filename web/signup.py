"""The signup and resend use cases: database writes and the mail, in the caller's one transaction.

Both functions take an open connection and never commit: the route wraps each call in
``engine.begin()``, so the user row and its outbox message are committed together or not at all
(a message exists if and only if the transaction commits).

No account enumeration: the caller answers the same whatever happens here. A signup for an
address that is already registered creates nothing and mails the owner a notice instead; the
password was hashed before the call either way, so both paths cost the same.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.enqueue import enqueue
from outbox.message import EmailPayload
from web.mails import already_registered_mail, verification_mail
from web.settings import Settings
from web.tokens import make_token
from web.users import User, create_user, find_user

logger = logging.getLogger(__name__)

TOPIC = "email"


async def _enqueue_mail(conn: AsyncConnection, mail: EmailPayload, settings: Settings) -> None:
    await enqueue(conn, topic=TOPIC, payload=mail, notify=settings.notify)


def _verification(settings: Settings, user: User) -> EmailPayload:
    token = make_token(settings, user_id=user.id, email=user.email)
    return verification_mail(settings, to=user.email, token=token)


async def register(
    conn: AsyncConnection, *, email: str, password_hash: str, settings: Settings
) -> None:
    """Create the account and enqueue its verification mail, or enqueue the notice instead."""
    user_id = await create_user(conn, email=email, password_hash=password_hash)
    if user_id is not None:
        await _enqueue_mail(conn, _verification(settings, User(user_id, email, None)), settings)
        logger.info("signup created", extra={"action": "create_user", "user_id": user_id})
        return
    existing = await find_user(conn, email=email)
    if existing is None:  # deleted between the two statements: nobody to tell
        return
    token = None
    if existing.verified_at is None:
        token = make_token(settings, user_id=existing.id, email=existing.email)
    mail = already_registered_mail(settings, to=existing.email, token=token)
    await _enqueue_mail(conn, mail, settings)
    logger.info("signup for a registered address", extra={"action": "notify_existing_user"})


async def resend(conn: AsyncConnection, *, email: str, settings: Settings) -> None:
    """Mail a fresh verification link to an unverified account; otherwise do nothing."""
    user = await find_user(conn, email=email)
    if user is None or user.verified_at is not None:
        return
    await _enqueue_mail(conn, _verification(settings, user), settings)


__all__ = ["TOPIC", "register", "resend"]
