"""Render the signup mails into complete ``email`` payloads, at enqueue time.

The relay only hands a payload over (render once, where the data is), so everything the
reader sees is decided here: recipient, subject, a plain-text body with the link, and an HTML
alternative in which every piece of user or configuration data is escaped. From and Message-ID
are stamped by the relay.

The bodies are a few lines each, so they are plain Python strings rather than template files.
"""

from __future__ import annotations

from html import escape
from urllib.parse import urlencode

from outbox.message import EmailPayload
from web.settings import Settings

# An automatic message: tells auto-responders not to answer (RFC 3834).
_HEADERS = {"Auto-Submitted": "auto-generated"}


def verify_link(settings: Settings, token: str) -> str:
    """``{BASE_URL}/users/verify?token=...``"""
    return f"{settings.link_base}/users/verify?{urlencode({'token': token})}"


def resend_link(settings: Settings) -> str:
    """The page with the "send the link again" form."""
    return f"{settings.link_base}/users/register#resend"


# The subject (the seed's) congratulates; the body's first line says what is still missing, so
# nobody reads the subject, takes the account as done and never opens the link.
FIRST_LINE = "One more step: confirm your email address to activate your account."


def verification_subject(settings: Settings) -> str:
    """The subject the seed gives, word for word."""
    return f"Congratulations, you are a member of {settings.site_name} now."


def _html(settings: Settings, paragraphs: list[str]) -> str:
    """The HTML alternative. ``overflow-wrap: anywhere``: a link with its token has no place to
    break, and unwrapped it makes the mail wider than a phone's screen."""
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(settings.site_name)}</title></head>\n"
        '<body style="font-family: sans-serif; line-height: 1.5; overflow-wrap: anywhere">\n'
        f"{body}\n</body></html>\n"
    )


def _hours(settings: Settings) -> str:
    hours = max(1, settings.token_max_age_s // 3600)
    return f"{hours} hour{'s' if hours != 1 else ''}"


def verification_mail(settings: Settings, *, to: str, token: str) -> EmailPayload:
    """The mail with the verification link, for a new account or a resend."""
    link = verify_link(settings, token)
    site = settings.site_name
    text = (
        f"{FIRST_LINE}\n\n"
        f"Open this link to confirm it and finish signing up at {site}:\n\n{link}\n\n"
        f"The link works for {_hours(settings)}. If it has expired, ask for a new one at\n"
        f"{resend_link(settings)}\n\n"
        f"If you did not sign up at {site}, ignore this mail; nothing happens without a click.\n"
    )
    html = _html(
        settings,
        [
            f"<strong>{escape(FIRST_LINE)}</strong>",
            f"Open this link to confirm it and finish signing up at {escape(site)}:",
            f'<a href="{escape(link)}">Confirm my email address</a>',
            f"Or copy this link into your browser: {escape(link)}",
            f"The link works for {_hours(settings)}. If you did not sign up at "
            f"{escape(site)}, ignore this mail; nothing happens without a click.",
        ],
    )
    return {
        "to": to,
        "subject": verification_subject(settings),
        "text": text,
        "html": html,
        "headers": dict(_HEADERS),
    }


def already_registered_subject(settings: Settings) -> str:
    return f"Someone tried to sign up at {settings.site_name} with your address"


def already_registered_mail(settings: Settings, *, to: str) -> EmailPayload:
    """The notice for a signup with an address whose account is verified already.

    The web page gave the usual answer (no account enumeration), so this mail is where the owner
    learns what happened. (A signup on an unverified address gets a fresh verification mail
    instead: web.signup.)
    """
    site = settings.site_name
    lines = [
        f"Someone, probably you, just tried to sign up at {site} with this address ({to}).",
        "This address already has an account, so no new account was created and nothing "
        "about your account has changed.",
    ]
    html_lines = [escape(line) for line in lines]
    lines.append("If this was not you, you can ignore this mail.")
    html_lines.append(escape(lines[-1]))
    return {
        "to": to,
        "subject": already_registered_subject(settings),
        "text": "\n\n".join(lines) + "\n",
        "html": _html(settings, html_lines),
        "headers": dict(_HEADERS),
    }


__all__ = [
    "FIRST_LINE",
    "already_registered_mail",
    "already_registered_subject",
    "resend_link",
    "verification_mail",
    "verification_subject",
    "verify_link",
]
