"""Read a POST body (form or JSON) safely, and turn it into validated input or field errors.

Everything a client sends is checked here, before any database or hashing work, so a bad request
is always a 400/413/415 with a message and never a 500. The body is read with a hard byte limit
that is enforced while streaming: the ``Content-Length`` header is only used to refuse early, never
trusted, since a chunked body has none and a client can lie.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from email_validator import EmailNotValidError, validate_email
from starlette.requests import ClientDisconnect, Request

MAX_BODY_BYTES = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
PASSWORD_MIN = 8
# Long enough for any passphrase, short enough that hashing cannot be used to burn CPU.
PASSWORD_MAX = 1024
# A signup form has a handful of fields; refuse bodies built to make the parser work hard.
_MAX_FORM_FIELDS = 20


class BodyError(Exception):
    """The body cannot be read as a form or a JSON object; ``status`` is the HTTP answer.

    ``is_json`` says how to answer: with a JSON error or by re-rendering the HTML form.
    """

    def __init__(self, status: int, message: str, *, is_json: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.is_json = is_json


class DisconnectedError(Exception):
    """The client went away (or was cut off by the body deadline) before the body was complete.

    Nobody is left to answer: the route answers a bare 400 for the metrics and logs nothing
    (a client that hangs up is not a server error, and it used to log a full traceback).
    """


@dataclass(frozen=True, slots=True)
class Submission:
    """A decoded body: form values are strings, JSON values are whatever the client sent."""

    is_json: bool
    fields: Mapping[str, object]

    def text(self, name: str) -> str | None:
        """The field as a string; ``None`` when absent or (in JSON) not a string."""
        value = self.fields.get(name)
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class FieldError:
    """What is wrong, and with which field (``None`` when it is the body as a whole)."""

    field: str | None
    message: str


@dataclass(frozen=True, slots=True)
class SignupInput:
    """Validated signup data. The password is kept out of ``repr`` so it never reaches a log."""

    email: str
    password: str = field(repr=False)


def media_type(request: Request[Any]) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_submission(request: Request[Any]) -> Submission:
    """Check the content type and size, read the body, decode it; raise ``BodyError`` if bad."""
    kind = media_type(request)
    if kind not in (FORM_TYPE, JSON_TYPE):
        # Answered in JSON: a browser posting our own form never gets here.
        raise BodyError(415, f"Send the body as {JSON_TYPE} or {FORM_TYPE}.", is_json=True)
    is_json = kind == JSON_TYPE
    body = await _read_limited(request, is_json=is_json)
    if is_json:
        return Submission(is_json=True, fields=_decode_json(body))
    return Submission(is_json=False, fields=_decode_form(body))


async def _read_limited(request: Request[Any], *, is_json: bool) -> bytes:
    too_large = BodyError(413, "The request body is larger than 64 KiB.", is_json=is_json)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise BodyError(400, "The Content-Length header is not a number.", is_json=is_json)
        if int(declared) > MAX_BODY_BYTES:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise DisconnectedError() from None
    return b"".join(chunks)


def _decode_json(body: bytes) -> Mapping[str, object]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad syntax, bad encodings and oversized integers; RecursionError a
        # body of deeply nested brackets. Both are the client's mistake, so a 400, not a 500.
        raise BodyError(400, "The body is not valid JSON.", is_json=True) from None
    if not isinstance(value, dict):
        raise BodyError(400, "The JSON body must be an object.", is_json=True)
    return value


def _decode_form(body: bytes) -> Mapping[str, object]:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
        )
    except ValueError:  # not UTF-8, or too many fields
        raise BodyError(
            400, "The form could not be read; please try again.", is_json=False
        ) from None
    fields: dict[str, object] = {}
    for name, value in pairs:
        fields.setdefault(name, value)  # the first value wins if a field is repeated
    return fields


def _string_field(submission: Submission, name: str, missing: str) -> str | FieldError:
    value = submission.fields.get(name)
    if value is None or value == "":
        return FieldError(name, missing)
    if not isinstance(value, str):
        return FieldError(name, f"The field {name!r} must be a string.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone surrogate ("\ud800"); no text holds one, and hashing or storing
        # it fails (it was a 500).
        return FieldError(name, f"The field {name!r} contains characters that are not text.")
    return value


def parse_email(submission: Submission) -> str | FieldError:
    """The normalised address (domain lower-cased, Unicode NFC), or why it is not valid.

    ``test_environment=True`` accepts ``*.test`` addresses (RFC 2606), which local set-ups and
    test suites use; other special-use domains (localhost, .local, .invalid) are still refused.
    Deliverability (DNS) is not checked: the verification mail itself is that check.
    """
    raw = _string_field(submission, "email", "Enter your email address.")
    if isinstance(raw, FieldError):
        return raw
    try:
        checked = validate_email(raw.strip(), check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        return FieldError("email", f"Enter a valid email address. {exc}")
    return checked.normalized


def parse_signup(submission: Submission) -> SignupInput | list[FieldError]:
    """Validate email and password; every problem is reported, in the form's field order.

    Both fields are always checked, so a person who got both wrong sees both messages at once
    instead of fixing one, submitting again and only then learning about the other.
    """
    errors: list[FieldError] = []
    email = parse_email(submission)
    if isinstance(email, FieldError):
        errors.append(email)
    password = _string_field(submission, "password", "Enter a password.")
    if isinstance(password, FieldError):
        errors.append(password)
    elif len(password) < PASSWORD_MIN:
        errors.append(
            FieldError("password", f"Use at least {PASSWORD_MIN} characters for your password.")
        )
    elif len(password) > PASSWORD_MAX:
        errors.append(
            FieldError("password", f"Use at most {PASSWORD_MAX} characters for your password.")
        )
    if errors or isinstance(email, FieldError) or isinstance(password, FieldError):
        return errors
    return SignupInput(email=email, password=password)


__all__ = [
    "MAX_BODY_BYTES",
    "BodyError",
    "DisconnectedError",
    "FieldError",
    "SignupInput",
    "Submission",
    "media_type",
    "parse_email",
    "parse_signup",
    "read_submission",
]
