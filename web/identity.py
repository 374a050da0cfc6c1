"""Who an address belongs to: the one canonical key of an email address, computed here only.

Why a key of our own, computed in Python and stored (``users.email_key``, unique): the first
version compared SQL ``lower(email)`` (the unique index) with Python ``email.lower()`` (every
lookup). The two disagree: PostgreSQL's ``lower`` follows the database's ``LC_CTYPE`` (in a ``C``
database it leaves every non-ASCII letter alone; elsewhere it maps ``İ`` to ``i``), Python maps
``İ`` to ``i̇`` and neither folds a final ``ς``, ``ß`` or the Kelvin sign. One signup as
``İnfo@x`` then took ``info@x`` for good (issue 11, finding 2). Now the database only compares
strings this function produced, so the locale of the database no longer matters.

The key (Unicode caseless matching, UAX #15/#44 ``NFKC_Casefold`` as Python can spell it):

- local part: NFKC, ``casefold()``, NFKC again (case folding can un-normalise), so ``ΣΑΣ`` and
  ``σας``, ``STRASSE`` and ``straße``, the Kelvin sign ``K`` and ``k``, fullwidth and plain
  letters are one key. Mail servers may treat case as significant; none we know of does.
- domain: the same folding, then IDNA (UTS #46) to its ASCII form, so ``bücher.example`` and
  ``xn--bcher-kva.example`` are one key.
- Gmail (``gmail.com``, ``googlemail.com``): dots and a ``+tag`` in the local part do not change
  the mailbox, so they do not change the key either.

``mailbox_key`` is the key without any ``+tag``, for the per-address rate-limit buckets only:
most providers deliver ``ann+1@x`` to ``ann@x``, so a flood of tagged variants is one mailbox's
flood. Accounts keep the tag (at a provider without sub-addressing ``ann+1`` is someone else).
"""

from __future__ import annotations

import unicodedata

import idna

# Providers whose dots and +tags are documented not to change the mailbox.
_GMAIL = frozenset({"gmail.com", "googlemail.com"})


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _domain(domain: str) -> str:
    folded = _fold(domain)
    try:
        return idna.encode(folded, uts46=True).decode("ascii")
    except idna.IDNAError:  # already checked by email_validator; keep the folded text then
        return folded


def email_key(email: str) -> str:
    """The canonical key of a (validated, normalised) address; equal keys are one account."""
    local, _, domain = email.rpartition("@")
    local, domain = _fold(local), _domain(domain)
    if domain in _GMAIL:
        local = local.partition("+")[0].replace(".", "")
        domain = "gmail.com"
    return f"{local}@{domain}"


def mailbox_key(email: str) -> str:
    """``email_key`` without a ``+tag``: the rate-limit bucket of one mailbox."""
    local, _, domain = email_key(email).rpartition("@")
    return f"{local.partition('+')[0] or local}@{domain}"


__all__ = ["email_key", "mailbox_key"]
