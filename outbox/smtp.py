"""The built-in ``email`` topic, as public API: a handler factory and the payload it takes.

``outbox relay`` registers it by itself when ``SMTP_URL`` is set; an app that runs a ``Relay``
of its own registers it with one line::

    registry.register(outbox.smtp.EMAIL_TOPIC,
                      outbox.smtp.email_handler("smtp://mail:587?starttls=true",
                                                mail_from="noreply@example.com"))

The payload is the whole mail (``EmailPayload``), rendered by the app where its data is; the
relay adds ``From``, ``Date`` and a ``Message-ID`` made from the row's UUID.
"""

from __future__ import annotations

from outbox.mail import EMAIL_TOPIC, SmtpSender, render_email
from outbox.message import EmailPayload
from outbox.relay import DEFAULT_CONCURRENCY, DEFAULT_SEND_TIMEOUT  # a relay passes its own
from outbox.settings import SmtpConfig


def email_handler(
    smtp: str | SmtpConfig,
    *,
    mail_from: str,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    pool_size: int = 2 * DEFAULT_CONCURRENCY,
) -> SmtpSender:
    """A handler for ``email`` messages that sends them through ``smtp`` (an ``SMTP_URL`` or a
    parsed ``SmtpConfig``), keeping up to ``pool_size`` connections open.

    ``pool_size`` should be the most sends the relay runs at once,
    ``config.concurrency + config.slow_cap`` (a relay's own workers plus its parked slow sends;
    the default is that for the default config): with fewer, a send that starts beside hung ones
    waits for a connection, and is timed while it waits. Connections open only when needed.

    ``send_timeout`` should be the relay's: the sender gives up at 90 % of it, so a slow server
    is reported by the sender (which knows whether the body went out) rather than cut off blind
    by the relay. Close it with ``await handler.aclose()`` when the relay is done.
    """
    config = SmtpConfig.from_url(smtp) if isinstance(smtp, str) else smtp
    return SmtpSender(config, mail_from=mail_from, timeout=send_timeout * 0.9, pool_size=pool_size)


__all__ = [
    "DEFAULT_SEND_TIMEOUT",
    "EMAIL_TOPIC",
    "EmailPayload",
    "SmtpConfig",
    "SmtpSender",
    "email_handler",
    "render_email",
]
