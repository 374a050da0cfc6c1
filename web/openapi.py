"""The OpenAPI description of the app's JSON endpoints, served at /openapi.json.

Written by hand, beside the routes it describes: the app has five endpoints, and a document kept
as data is easier to review than one derived from docstrings. ``tests/acceptance/test_openapi.py``
runs schemathesis against a live server with it, so a route that drifts from it fails CI.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error", "field"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, for a person to read."},
        "field": {
            "type": ["string", "null"],
            "description": "The input field at fault, or null for the request as a whole.",
        },
        "errors": {
            "type": "array",
            "description": "Every problem found, the first being the one in error and field.",
            "items": {
                "type": "object",
                "required": ["error", "field"],
                "properties": {
                    "error": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                },
            },
        },
    },
}
_ACCEPTED = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"const": "verification_sent"}},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_post(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    too_many = _json(_ERROR, "Too many requests from this client or for this address.")
    too_many["headers"] = {
        "Retry-After": {
            "description": "Seconds until the limit resets.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body}},
        },
        "responses": {
            "202": _json(
                _ACCEPTED, "Accepted; the same answer whether or not the address is known."
            ),
            "400": _json(_ERROR, "Invalid input."),
            "413": _json(_ERROR, "The body is larger than 64 KiB."),
            "415": _json(_ERROR, "The body is neither JSON nor a form."),
            "429": too_many,
        },
    }


def _busy(operation: dict[str, Any]) -> dict[str, Any]:
    """``operation`` with the 503 a signup gets when every password-hashing place is taken."""
    busy = _json(_ERROR, "Every password-hashing place is taken; try again shortly.")
    busy["headers"] = {
        "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
    }
    operation["responses"]["503"] = busy
    return operation


_EMAIL = {"type": "string", "format": "email", "maxLength": 254}
_HTML = {"text/html": {"schema": {"type": "string"}}}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "outbox signup app",
        "version": "1.0.0",
        "description": (
            "Sign up, verify the address through the mailed link, ask for the link again. "
            "The POST endpoints also take HTML form posts (with a CSRF token), not described "
            "here."
        ),
    },
    "paths": {
        "/users/register": {
            "get": {
                "summary": "The sign-up form (HTML)",
                "responses": {"200": {"description": "The form.", "content": _HTML}},
            },
            "post": _busy(
                _json_post(
                    "Create an account and mail its verification link",
                    {
                        "type": "object",
                        "required": ["email", "password"],
                        "properties": {
                            "email": _EMAIL,
                            "password": {"type": "string", "minLength": 8, "maxLength": 1024},
                        },
                    },
                )
            ),
        },
        "/users/verify/resend": {
            "post": _json_post(
                "Mail a fresh verification link to an unverified account",
                {"type": "object", "required": ["email"], "properties": {"email": _EMAIL}},
            )
        },
        "/users/verify": {
            "get": {
                "summary": "Follow the mailed link: a page with a Confirm button (changes nothing)",
                "parameters": [
                    {"name": "token", "in": "query", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "The confirm page.", "content": _HTML},
                    "400": {
                        "description": "Tampered, malformed, expired or superseded.",
                        "content": _HTML,
                    },
                },
            },
            "post": {
                "summary": "Confirm the address (the Confirm button; forms also send CSRF)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "verified"}},
                        },
                        "Verified (again, if it already was).",
                    ),
                    "400": _json(_ERROR, "Tampered, malformed, expired or superseded."),
                    "413": _json(_ERROR, "The body is larger than 64 KiB."),
                    "415": _json(_ERROR, "The body is neither JSON nor a form."),
                },
            },
        },
        "/healthz": {
            "get": {
                "summary": "Whether the database answers",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"status": {"const": "ok"}}}, "Healthy."
                    ),
                    "503": _json(
                        {"type": "object", "properties": {"status": {"const": "unavailable"}}},
                        "The database does not answer.",
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    },
}
