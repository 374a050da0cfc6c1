"""Which claim the relay runs next: from the start of the due index, or where it last stopped.

Draining a backlog from the start of ix_outbox_due costs more with every batch, until VACUUM
runs (see CLAIM_DUE_AFTER in ``outbox.queries``), so while a relay is taking full batches it
resumes where the previous one stopped. Rows can appear *behind* that point: a row committed by a
transaction that began earlier (``available_at`` defaults to the transaction's start), rows a stop
or a dead relay released, rows another relay skipped past. Two rules keep them from waiting:

- a claim from the resume point that finds nothing is followed at once by a claim from the
  start, so "nothing due" is only ever the answer of a full claim; a short batch from the resume
  point drops it, so the next claim is a full one;
- a full claim is made at least every ``rescan_every`` seconds (1 s) whatever else happens, so
  under a backlog that never ends a row behind the resume point waits about a second more.

``exhausted`` says when the last claim was a full one that took every row it could see (fewer
than asked, none left out for the byte budget): the relay then waits for a NOTIFY (or its poll)
instead of asking again at once, a claim that at low rates found nothing half the time while a
handler ran. Rows committed after that claim's snapshot NOTIFY after it, and the relay clears its
wake-up flag before claiming, so none waits for the poll.

Delivery order is therefore oldest-due-first within a second, as it was only ever best-effort
with several relays skipping each other's locked rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from outbox import queries
from outbox.queries import Claimed, ClaimOwner, ClaimPosition

RESCAN_EVERY_S = 1.0


class ClaimCursor:
    """One relay's resume point in the due index, and when its next full claim is due."""

    def __init__(
        self, rescan_every: float = RESCAN_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rescan_every = rescan_every
        self._clock = clock
        self._position: ClaimPosition | None = None
        self._rescan_at = 0.0
        self.exhausted = False

    @property
    def position(self) -> ClaimPosition | None:
        """Where the next claim starts (``None``: from the start of the index)."""
        if self._position is not None and self._clock() < self._rescan_at:
            return self._position
        return None

    async def claim(
        self,
        conn: AsyncConnection,
        *,
        limit: int,
        now: datetime | None,
        claimer: ClaimOwner,
        clock: datetime | None = None,
        budget: int = 2**62,
    ) -> list[Claimed]:
        """Claim up to ``limit`` due rows (see the module's docstring for where from)."""
        after = self.position
        self.exhausted = False
        if after is not None:
            rows = await queries.claim_due(
                conn, limit=limit, now=now, claimer=claimer, after=after, clock=clock, budget=budget
            )
            if rows:
                self._position = rows[-1].position if len(rows) == limit else None
                return rows
        rows = await queries.claim_due(
            conn, limit=limit, now=now, claimer=claimer, clock=clock, budget=budget
        )
        self._position = rows[-1].position if len(rows) == limit else None
        self._rescan_at = self._clock() + self._rescan_every
        # A row is left out for the budget only when the bytes before it reach it (CLAIM_DUE).
        self.exhausted = len(rows) < limit and sum(c.size for c in rows) < budget
        return rows
