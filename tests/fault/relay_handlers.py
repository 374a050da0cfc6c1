"""Handlers the relay-model fault tests load into relay processes with ``--import``.

Each in-process handler appends ``start``/``done`` lines to the ledger file named by
``OUTBOX_TEST_LEDGER`` (one ``write`` of a short line, append mode: atomic between processes), so
a test knows which process ran which message, when, and how many times.
"""

from __future__ import annotations

import asyncio
import os
import time

import outbox
from outbox.message import OutboxMessage


def _note(event: str, message: OutboxMessage) -> None:
    path = os.environ.get("OUTBOX_TEST_LEDGER")
    if path:
        with open(path, "a") as ledger:
            ledger.write(f"{event} {message.id} {os.getpid()} {time.time():.3f}\n")


@outbox.handler("crash")
async def crash(message: OutboxMessage) -> str | None:
    """Kills the whole relay process, as a segfault or the OOM killer would."""
    _note("start", message)
    await asyncio.sleep(0.05)  # its batch-mates are in flight meanwhile
    os._exit(1)


@outbox.handler("sleep")
async def sleep(message: OutboxMessage) -> str | None:
    """A long job (image or video work): runs ``payload["seconds"]``."""
    _note("start", message)
    await asyncio.sleep(float(message.payload["seconds"]))
    _note("done", message)
    return "slept"


@outbox.handler("odd")  # type: ignore[arg-type]  # returning a dict is the point of the test
async def odd(message: OutboxMessage) -> object:
    """Outcomes that could not be stored as they are, or that used to end the relay."""
    _note("start", message)
    kind = message.payload["kind"]
    if kind == "system_exit":
        raise SystemExit(3)
    if kind == "keyboard_interrupt":
        raise KeyboardInterrupt
    if kind == "nul_error":
        raise ValueError("bad\x00byte")
    if kind == "nul_result":
        return "ok\x00then more"
    if kind == "dict_result":
        return {"status": "ok", "nul": "\x00"}
    if kind == "surrogate_error":
        raise ValueError("broken \udcff text")
    return None
