"""The signup app: users, the verification mail through the outbox, and the verify link."""

from __future__ import annotations
