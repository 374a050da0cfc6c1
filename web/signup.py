"""The signup and resend use cases: database writes and the mail, in the caller's one transaction.

Both functions take an open connection and never commit: the route wraps each call in
``engine.begin()``, so the user row and its outbox message are committed together or not at all
(a message exists if and only if the transaction commits).

No account enumeration: the caller answers the same whatever happens here, and the password was
hashed before the call on every path, so all paths cost the same.

No pre-registration (issue 11, finding 3): a signup for an address whose account is not verified
yet replaces that account's password and token nonce and mails a fresh link, which voids every
earlier link. Whoever registered first without owning the inbox loses the account to the owner,
who is the only one who can read the link. A signup for a verified address changes nothing and
mails the owner a notice.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.enqueue import enqueue
from outbox.message import EmailPayload
from web.mails import already_registered_mail, verification_mail
from web.settings import Settings
from web.tokens import make_token
from web.users import User, create_user, find_user, replace_unverified

logger = logging.getLogger(__name__)

TOPIC = "email"


async def _enqueue_mail(conn: AsyncConnection, mail: EmailPayload, settings: Settings) -> None:
    await enqueue(conn, topic=TOPIC, payload=mail, notify=settings.notify)


def _verification(settings: Settings, user: User) -> EmailPayload:
    token = make_token(settings, user_id=user.id, nonce=user.token_nonce)
    return verification_mail(settings, to=user.email, token=token)


async def register(
    conn: AsyncConnection, *, email: str, password_hash: str, settings: Settings
) -> None:
    """Create the account (or take over its unverified one) and enqueue its verification mail;
    for a verified address, enqueue the owner's notice instead."""
    user = await create_user(conn, email=email, password_hash=password_hash)
    if user is not None:
        await _enqueue_mail(conn, _verification(settings, user), settings)
        logger.info("signup created", extra={"action": "create_user", "user_id": user.id})
        return
    replaced = await replace_unverified(conn, email=email, password_hash=password_hash)
    if replaced is not None:
        await _enqueue_mail(conn, _verification(settings, replaced), settings)
        logger.info(
            "signup replaced an unverified account",
            extra={"action": "replace_unverified_user", "user_id": replaced.id},
        )
        return
    existing = await find_user(conn, email=email)
    if existing is None:  # deleted between the statements: nobody to tell
        return
    mail = already_registered_mail(settings, to=existing.email)
    await _enqueue_mail(conn, mail, settings)
    logger.info("signup for a registered address", extra={"action": "notify_existing_user"})


async def resend(conn: AsyncConnection, *, email: str, settings: Settings) -> None:
    """Mail a fresh verification link to an unverified account; otherwise do nothing."""
    user = await find_user(conn, email=email)
    if user is None or user.verified_at is not None:
        return
    await _enqueue_mail(conn, _verification(settings, user), settings)


__all__ = ["TOPIC", "register", "resend"]
