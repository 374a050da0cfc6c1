"""The relay: claim due messages, run their handlers outside any transaction, settle the outcomes.

Three parts share one process, River-style:

- the **producer** claims ``min(batch_size, free slots)`` rows in one statement that commits on
  its own (``CLAIM_DUE``: attempt counted, owner and lease stamped) as soon as workers free up,
  so one hung send occupies one slot, never the relay;
- the **executor** is ``concurrency`` workers; a send is cut off at ``send_timeout``. A send
  still running after ``slow_after`` seconds stops counting against ``concurrency``: its worker
  is *parked* (it keeps the send until the send ends or is cut off, then exits) and a new worker
  takes its place, so hung sends cost the relay ``slow_after`` each, not ``send_timeout``. At most
  ``max_slow`` workers are parked at once (``concurrency`` by default), so at most
  ``concurrency + max_slow`` sends run at once; past that a slow send keeps its worker;
- the **completer** settles outcomes in batches (when ``concurrency`` outcomes wait, or a few
  milliseconds after the first), each row fenced by owner and attempt: a relay whose rows were
  taken over records nothing for them. A settle that fails is retried on its own; nothing is
  ever sent again because a settle failed.

Beside them, a **heartbeat** extends the lease of the rows in flight every ``lease / 3`` seconds
(one UPDATE), and a **rescuer** probes once a second whether the owners of other rows in flight
still hold their advisory lock (``outbox.ownership``): a dead relay's rows are due again within
about a second, a frozen one's when their lease runs out (``lease``, 30 s by default). A row that
was in flight in two relays that died is claimed and run alone, with nothing else in flight, so a
message that kills relays takes no batch-mate down with it a third time; after ``max_attempts``
claims it is dead with "relay died while handling it". No transaction is open while a handler
runs.

Database errors that are the infrastructure's (``outbox.dberrors``: connection lost, read-only,
admin shutdown, serialization, disk full) spend no attempt and never end the relay: the short
transaction rolls back, the relay waits (``outbox.backoff``) and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import RetryCallState

from outbox import queries
from outbox.backoff import database_delay
from outbox.claim import ClaimCursor
from outbox.db import engine_libpq_url
from outbox.dberrors import drops_session, is_infrastructure_error, sqlstate
from outbox.errors import AmbiguousSendError, ConfigError, SendError
from outbox.listener import Listener
from outbox.metrics import RelayMetrics
from outbox.outcome import Dead, Outcome, Retry, Sent, classify, describe, stored_result
from outbox.ownership import LeaseOnlyOwner, OwnerSession
from outbox.queries import Claimed, ClaimOwner
from outbox.reconnect import retry_database
from outbox.registry import HandlerRegistry
from outbox.settlelog import LoggingSettleLog, SettledLine, SettleLog
from outbox.watchdog import SendWatchdog

logger = logging.getLogger(__name__)

# One vocabulary with `outbox status`: a message that failed and will be tried again is "retrying".
_OUTCOME_LABEL: dict[type, str] = {Sent: "sent", Retry: "retrying", Dead: "dead"}

DEFAULT_BATCH_SIZE = 100
DEFAULT_CONCURRENCY = 16
DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 15
DEFAULT_BACKOFF_BASE = 2.0
DEFAULT_BACKOFF_CAP = 3600.0
DEFAULT_STOP_GRACE = 5.0
DEFAULT_LEASE = 30.0
DEFAULT_MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
# A send is slow after this share of send_timeout (``RelayConfig.slow_after`` unset): see there.
SLOW_AFTER_SHARE = 1 / 8

# How often a relay looks for the rows of dead relays: the crash take-over bound is about this.
RESCUE_EVERY_S = 1.0
# The completer writes when this many milliseconds passed since the first outcome waiting.
SETTLE_AFTER_S = 0.005


@dataclass(frozen=True)
class RelayConfig:
    """Relay tuning, filled from CLI flags. Validated up front so a typo fails at start."""

    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    poll_interval: float = DEFAULT_POLL_INTERVAL
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    stop_grace: float = DEFAULT_STOP_GRACE
    lease: float = DEFAULT_LEASE
    # Payload bytes (stored size) claimed and not yet through a handler; a claim may pass it by
    # one message. Memory then follows bytes in flight, not rows.
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    # Seconds after which a running send stops counting against ``concurrency`` (its worker is
    # parked and replaced); ``None``: ``send_timeout * SLOW_AFTER_SHARE``. See ``slow_threshold``.
    slow_after: float | None = None
    # Parked (slow) sends at once beyond ``concurrency``; ``None``: as many as ``concurrency``;
    # 0: a slow send keeps its worker until it ends (a hard cap of ``concurrency`` sends).
    max_slow: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size (--batch-size) must be at least 1"),
            (self.concurrency >= 1, "concurrency (--concurrency) must be at least 1"),
            (self.poll_interval > 0, "poll_interval (--poll-interval) must be positive"),
            (self.send_timeout > 0, "send_timeout (--send-timeout) must be positive"),
            (self.max_attempts >= 1, "max_attempts (--max-attempts) must be at least 1"),
            (self.backoff_base > 0, "backoff_base (--backoff-base) must be positive"),
            (
                self.backoff_cap >= self.backoff_base,
                "backoff_cap (--backoff-cap) must be >= backoff_base",
            ),
            (self.stop_grace >= 0, "stop_grace (--stop-grace) must not be negative"),
            (self.lease >= 3, "lease (--lease) must be at least 3 seconds"),
            (self.max_bytes_in_flight >= 1, "max_bytes_in_flight must be positive"),
            (
                self.slow_after is None or self.slow_after > 0,
                "slow_after (--slow-after) must be positive",
            ),
            (self.max_slow is None or self.max_slow >= 0, "max_slow (--max-slow) must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def stop_bound(self) -> float:
        """Seconds from SIGTERM to exit, at most: no claim and no send starts after a stop, so
        only the sends already running (each bounded by ``send_timeout``) finish; ``stop_grace``
        covers settling them and releasing the claims that never started."""
        return self.send_timeout + self.stop_grace

    @property
    def slow_threshold(self) -> float:
        """Seconds after which a send is slow and no longer holds a worker slot.

        Each hung send costs the relay this many worker-seconds instead of ``send_timeout``.
        Measured with bench/stall.py (2,000 x 5 ms handlers, batch 100, concurrency 16, send
        timeout 2 s, one send in 100 hung, so 20 hung; medians of 3, interleaved in one run on 2
        shared cores): no hang 0.90 s; hard cap of 16 sends (``max_slow=0``, as before) 4.6 s;
        slow after 1 s: 3.7 s, 0.5 s: 3.3 s, 0.25 s (an eighth): 3.2 s, 0.1 s: 2.9 s. The floor
        is about 2.8 s: the last hung send starts near the end and runs its 2 s. The target
        (1.5 x no hang + one send timeout, 3.35 s) is met from about a quarter of the timeout
        down; an eighth keeps a margin without taking ordinary slow mail servers (a second or
        two, against the default 30 s timeout's 3.75 s) for hung ones.
        """
        if self.slow_after is not None:
            return self.slow_after
        return self.send_timeout * SLOW_AFTER_SHARE

    @property
    def slow_cap(self) -> int:
        """Slow sends that may run beyond ``concurrency``: a relay runs at most
        ``concurrency + slow_cap`` sends (and keeps as many SMTP connections) at once."""
        return self.concurrency if self.max_slow is None else self.max_slow

    @property
    def heartbeat_every(self) -> float:
        """Leases are renewed three times per lease: two renewals may fail before one lapses."""
        return self.lease / 3

    @property
    def idle_in_transaction_timeout(self) -> float:
        """The relay runs each statement in autocommit: none of its sessions should ever sit
        idle in a transaction.

        Kept as a safety net (a bug, a frozen process inside one): PostgreSQL ends such a
        session, and its row locks with it, after this long.
        """
        return 10.0


@dataclass
class BatchResult:
    """What a ``run_once`` or a ``drain`` did: the test handle on the relay."""

    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    dead: int = 0
    released: int = 0  # claimed but never started (a stop): the attempt was given back
    refused: int = 0  # outcomes the fence refused: the row had been taken over meanwhile


@dataclass(slots=True)
class _Job:
    """One claimed row on its way through the relay."""

    claimed: Claimed
    owner: uuid.UUID


@dataclass(slots=True)
class _Done:
    """What the completer writes for a job: an outcome, or ``None`` to release the claim."""

    job: _Job
    outcome: Outcome | None
    seconds: float = 0.0


def _settle_columns(group: Sequence[_Done]) -> dict[str, dict[str, list[Any]]]:
    """``group`` as SETTLE_MANY's parallel arrays, by kind, in one pass over it."""
    columns: dict[str, dict[str, list[Any]]] = {
        kind: {name: [] for name in ("ids", "owners", "attempts", *own)}
        for kind, own in queries.SETTLE_KINDS.items()
    }
    for done in group:
        claimed = done.job.claimed
        match done.outcome:
            case None:
                c = columns["release"]
                c["available_ats"].append(claimed.available_at)
            case Sent(result=result):
                c = columns["sent"]
                c["results"].append(result)
            case Retry(delay=delay, error=error):
                c = columns["retry"]
                c["delays"].append(delay)
                c["errors"].append(error)
            case Dead(error=error):
                c = columns["dead"]
                c["errors"].append(error)
        c["ids"].append(claimed.message.id)
        c["owners"].append(done.job.owner)
        c["attempts"].append(claimed.attempt)
    return columns


class Relay:
    """Deliver due outbox messages with the handlers of ``registry``.

    ``clock`` returns the time the queries use; ``None`` (the default) means the database's own
    clock. ``rng`` drives the backoff jitter. Both are injectable so tests never sleep.
    ``listen_dsn`` is a direct (not pooled) libpq URL for LISTEN and for the owner lock; without
    it the relay takes the engine's URL for the owner lock and polls. ``pooled``: the engine goes
    through PgBouncer's transaction pooling, where a session lock means nothing (the server
    session that took it serves other clients and outlives ours, and another relay's probe may
    even run in it and take it again): without ``listen_dsn`` the relay then holds no owner lock,
    and the messages of a relay that died come back when their lease runs out.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        registry: HandlerRegistry,
        config: RelayConfig | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        rng: random.Random | None = None,
        listen_dsn: str | None = None,
        pooled: bool = False,
        metrics: RelayMetrics | None = None,
        settle_log: SettleLog | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.config = config or RelayConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._listen_dsn = listen_dsn
        self._pooled = pooled
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.listener: Listener | None = None
        self.metrics = metrics or RelayMetrics()
        self.settle_log: SettleLog = settle_log or LoggingSettleLog()
        self._cursor = ClaimCursor()
        # The state of one run (``_serving``); a Relay runs one at a time.
        self._owner: uuid.UUID | None = None
        self._owner_ready = asyncio.Event()
        self._held: dict[int, _Job] = {}  # claimed and not yet settled, by row id
        self._active = 0  # claimed and not yet through a worker (parked sends included)
        self._workers: set[asyncio.Task[Any]] = set()
        self._parked: set[asyncio.Task[Any]] = set()  # slow: no longer counted as running
        self._slow_waiting: dict[asyncio.Task[Any], None] = {}  # slow, not parked (cap), in order
        self._cap_logged_at = -3600.0
        self._bytes = 0  # payload bytes of those
        self._slot_freed = asyncio.Event()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._done: list[_Done] = []
        self._done_ready = asyncio.Event()
        self._settled = asyncio.Event()  # set whenever nothing waits to be written
        self._abandoned_due = False
        self._result = BatchResult()
        self._watchdog: SendWatchdog | None = None
        self._conns: dict[str, AsyncConnection] = {}  # kept between transactions, by role
        self._background: list[asyncio.Task[None]] = []

    def _now(self) -> datetime | None:
        return self._clock() if self._clock is not None else None

    # --- entry points ------------------------------------------------------------------------

    async def run_once(self, *, due_before: datetime | None = None) -> BatchResult:
        """Claim one batch (up to ``batch_size``), deliver it, settle it. Returns what happened."""
        return await self._serve(due_before or self._now(), "once")

    async def drain(self) -> BatchResult:
        """Deliver everything due now, then return (``outbox relay --once``).

        "Now" is fixed when the drain starts, so a message that fails and is rescheduled is not
        picked up again by the same drain.
        """
        return await self._serve(None, "drain")  # "now" is read after the first rescue

    async def run(self) -> None:
        """Deliver until ``stop()``: claim while workers are free, else wait for NOTIFY or a poll.

        On stop no new claim is made and no send starts; the sends running get
        ``config.stop_bound`` seconds in all to finish and be settled, and claims that never
        started are released. Past that bound the rest is cancelled: those rows stay claimed
        until this relay's lock session ends with the process, and another relay rescues them.
        """
        listener_task = None
        if self._listen_dsn is not None:
            self.listener = Listener(
                self._listen_dsn, self._wake, on_state=self.metrics.on_listen_state
            )
            listener_task = asyncio.create_task(self.listener.run(), name="outbox-listener")
        loop_task = asyncio.create_task(self._serve(None, "forever"), name="outbox-relay")
        stop_task = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not loop_task.done():
                try:
                    async with asyncio.timeout(self.config.stop_bound):
                        await asyncio.shield(loop_task)
                except TimeoutError:
                    logger.warning(
                        "sends in flight did not finish within %.0fs; leaving them to be rescued",
                        self.config.stop_bound,
                        extra={"action": "abort_batch"},
                    )
                    loop_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await loop_task
            else:
                loop_task.result()
        finally:
            for task in (stop_task, listener_task, loop_task):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def stop(self) -> None:
        """Ask the relay to stop (what SIGTERM does); safe to call from a signal handler."""
        if not self._stopping.is_set():
            logger.info("stopping: no new claims", extra={"action": "stop_relay"})
        self._stopping.set()
        self._slot_freed.set()
        self._wake.set()

    # --- one run: the parts around the producer ----------------------------------------------

    async def _serve(
        self, due_before: datetime | None, mode: Literal["once", "drain", "forever"]
    ) -> BatchResult:
        self._result = BatchResult()
        async with self._serving():
            await self._produce(due_before, mode)
            await self._wind_down()
        return self._result

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """Owner lock, workers, completer, heartbeat and rescuer, for the length of a run."""
        self._held.clear()
        self._active = 0
        self._bytes = 0
        self._done.clear()
        self._settled.set()
        self._abandoned_due = False
        self._parked.clear()
        self._slow_waiting.clear()
        self._watchdog = watchdog = SendWatchdog(
            self.config.send_timeout,
            slow_after=self.config.slow_threshold if self.config.slow_cap else None,
            on_slow=self._on_slow,
        )
        background = self._background = [
            asyncio.create_task(self._keep_owner(), name="outbox-owner"),
            asyncio.create_task(self._complete(), name="outbox-completer"),
            asyncio.create_task(self._heartbeat(), name="outbox-heartbeat"),
        ]
        for _ in range(self.config.concurrency):
            self._add_worker()
        try:
            yield
        finally:
            watchdog.close()  # no more parking, so no worker starts from here on
            tasks = [*self._workers, *background]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            watchdog.close()
            self._parked.clear()
            self._slow_waiting.clear()
            self._metrics_slow()
            self._owner_ready.clear()
            await self._close_connections()

    async def _wind_down(self) -> None:
        """After the producer: let every claimed job finish (or be released), write them all."""
        while self._active:
            await self._slot_wait()
        await self._flushed()

    # --- producer ----------------------------------------------------------------------------

    def _claimer(self) -> ClaimOwner:
        assert self._owner is not None
        return ClaimOwner(self._owner, self.config.lease, self.registry.topics)

    async def _produce(
        self, due_before: datetime | None, mode: Literal["once", "drain", "forever"]
    ) -> None:
        """Claim as workers free up (River's "max workers minus active") until told to stop.

        "Active" counts the rows running and the rows claimed and waiting for a worker; up to
        ``batch_size`` may wait, so the next claim's round trips overlap the
        sends instead of idling the workers (measured with bench/stall.py, 20,000 no-op
        messages: 2.6-5.1k/s with ``concurrency`` waiting, 9-12k/s with ``batch_size``; with none
        waiting, 2,000 5 ms handlers took 3.0 s instead of 0.8 s). A claim waits until a quarter
        of that capacity is free (or all of it), so a busy relay claims in groups rather than
        one row per transaction. A hung send holds one worker, and only for ``slow_threshold``
        seconds while parking places are free (see the executor); the waiting rows go to the
        others.
        """
        capacity = self.config.concurrency + self.config.batch_size
        threshold = max(1, min(self.config.batch_size, capacity) // 4)
        # Parked (slow) sends do not count: their workers were replaced (``_on_slow``).
        while not self._stopping.is_set():
            self._check_background()
            if mode == "drain" and due_before is None and self._owner_ready.is_set():
                # After the first rescue, so rows it made due (a dead relay's) are in the drain.
                due_before = self._now() or await self._retrying(
                    "read the clock", self._database_now
                )
            if not self._owner_ready.is_set():
                try:
                    async with asyncio.timeout(1.0):
                        await _first(self._owner_ready.wait(), self._stopping.wait())
                except TimeoutError:
                    pass
                continue
            if self._abandoned_due and mode != "once":
                await self._run_abandoned()
                continue
            counted = self._active - len(self._parked)
            free = capacity - counted
            if mode == "once":
                free = self.config.batch_size
            elif free <= 0 or (counted and free < threshold):
                await self._slot_wait()
                continue
            elif self._active and self._bytes >= self.config.max_bytes_in_flight:
                await self._slot_wait()
                continue
            self._wake.clear()  # a NOTIFY during this claim makes us look again at once
            claimed = await self._claim(min(self.config.batch_size, free), due_before)
            if claimed:
                self._dispatch(claimed)
                if mode == "once":
                    return
                if mode == "drain" or not self._cursor.exhausted:
                    continue
                # It took all there was: wait for a NOTIFY instead (see ClaimCursor.exhausted).
            elif mode == "once" or (mode == "drain" and not self._active):
                return
            elif mode == "drain":
                await self._slot_wait()
                continue
            await self._idle()

    def _check_background(self) -> None:
        """A part that ended by itself ended on a bug: let it end the run, loudly."""
        for task in self._background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"{task.get_name()} failed") from task.exception()

    async def _slot_wait(self) -> None:
        """Until a worker frees a slot (or ``stop()``, which sets the same event). One event,
        not a race of several: this runs once per finished send on a busy relay."""
        self._slot_freed.clear()
        await self._slot_freed.wait()

    async def _idle(self) -> None:
        """Nothing due: until a NOTIFY, the poll interval, a stop or abandoned rows.

        One event (``_wake``, which ``stop()`` and the rescuer set too), no race of tasks: a
        NOTIFY reaches the next claim in one turn of the event loop.
        """
        if self._stopping.is_set() or self._abandoned_due:
            return
        try:
            async with asyncio.timeout(self.config.poll_interval):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _dispatch(self, claimed: Sequence[Claimed]) -> None:
        assert self._owner is not None
        self.metrics.batch_size.observe(len(claimed))
        self._result.claimed += len(claimed)
        for c in claimed:
            job = _Job(c, self._owner)
            self._held[c.message.id] = job
            self._active += 1
            self._bytes += c.size
            self._queue.put_nowait(job)

    async def _claim(self, limit: int, due_before: datetime | None) -> list[Claimed]:
        now = due_before or self._now()

        async def claim() -> list[Claimed]:
            async with self._connection("claim") as conn:
                with self.metrics.claim_seconds.time():
                    rows: list[Claimed] = await self._cursor.claim(
                        conn,
                        limit=limit,
                        now=now,
                        claimer=self._claimer(),
                        clock=self._now(),
                        budget=max(1, self.config.max_bytes_in_flight - self._bytes),
                    )
                return rows

        claimed: list[Claimed] = await self._retrying(
            "claim", claim, give_up_on_stop=True, default=[]
        )
        return claimed

    async def _run_abandoned(self) -> None:
        """Run suspect rows one at a time, each with nothing else in flight in this relay.

        A suspect was in flight in two relays that died (see RESCUE_ABANDONED): it may be what
        kills relays. Run alone, another crash costs no other message a duplicate, and it is
        dead after ``max_attempts`` crashes. The wait for the sends in flight to finish is at
        most ``send_timeout``.
        """
        while self._active and not self._stopping.is_set():
            await self._slot_wait()
        await self._flushed()
        while not self._stopping.is_set():

            async def claim() -> Claimed | None:
                now = self._now()  # rescued rows became due after a drain's "now"
                async with self._connection("claim") as conn:
                    return await queries.claim_abandoned(
                        conn,
                        now=now,
                        claimer=self._claimer(),
                        max_attempts=self.config.max_attempts,
                        held=list(self._held),
                    )

            claimed = await self._retrying(
                "claim an abandoned message", claim, give_up_on_stop=True, default=None
            )
            if claimed is None:
                self._abandoned_due = False
                return
            logger.warning(
                "running abandoned message id=%s alone (attempt %d)",
                claimed.message.id,
                claimed.attempt,
                extra={"action": "claim_abandoned", "outbox_id": claimed.message.id},
            )
            self._dispatch([claimed])
            while self._active:
                await self._slot_wait()
            await self._flushed()

    # --- executor ----------------------------------------------------------------------------

    def _add_worker(self) -> None:
        task = asyncio.create_task(self._work(), name="outbox-worker")
        self._workers.add(task)

    async def _work(self) -> None:
        """Run jobs until the relay ends, or, once parked, until the slow send is over."""
        task = asyncio.current_task()
        assert task is not None
        try:
            while task not in self._parked:
                job = await self._queue.get()
                try:
                    if self._stopping.is_set():
                        self._finish(_Done(job, None))  # never started: release the claim
                    else:
                        self._finish(await self._attempt(job, task))
                finally:
                    self._active -= 1
                    self._bytes -= job.claimed.size
                    self._slow_waiting.pop(task, None)
                    self._slot_freed.set()
        finally:
            self._workers.discard(task)
        # Parked: a replacement took this worker's place; the parking place frees up.
        self._parked.discard(task)
        self._park_waiting()
        self._metrics_slow()

    def _on_slow(self, task: asyncio.Task[Any]) -> None:
        """The watchdog saw ``task``'s send pass ``slow_threshold``: park it if there is room,
        else it keeps its worker slot and waits (oldest first) for a parking place."""
        if task not in self._workers or task in self._parked:
            return
        if len(self._parked) < self.config.slow_cap:
            self._park(task)
            return
        self._slow_waiting[task] = None
        now = time.monotonic()
        if now - self._cap_logged_at >= 60:
            self._cap_logged_at = now
            logger.warning(
                "%d slow sends (over %gs) already run beside --concurrency %d "
                "(--max-slow); further slow sends keep their worker",
                len(self._parked),
                self.config.slow_threshold,
                self.config.concurrency,
                extra={"action": "slow_cap_reached"},
            )
        self._metrics_slow()

    def _park(self, task: asyncio.Task[Any]) -> None:
        self._parked.add(task)
        self._add_worker()
        self._slot_freed.set()  # the producer may claim for the new worker
        self._metrics_slow()

    def _park_waiting(self) -> None:
        """Park the oldest slow sends that were waiting, while there is room."""
        while self._slow_waiting and len(self._parked) < self.config.slow_cap:
            task = next(iter(self._slow_waiting))
            del self._slow_waiting[task]
            self._park(task)

    def _metrics_slow(self) -> None:
        self.metrics.slow_sends.set(len(self._parked) + len(self._slow_waiting))

    async def _attempt(self, job: _Job, task: asyncio.Task[Any]) -> _Done:
        """Run one handler and turn whatever happens into exactly one outcome.

        Anything a handler raises is that message's failure, ``BaseException`` included: a
        handler that calls ``sys.exit()`` or raises ``KeyboardInterrupt`` fails its message, it
        does not end the relay. Raises only a cancellation that is not the watchdog's (the relay
        is being shut down past its stop bound).
        """
        watchdog = self._watchdog
        assert watchdog is not None
        row = job.claimed.message
        started = time.perf_counter()
        watchdog.start(task)
        try:
            handler = self.registry.get(row.topic)
            outcome: Outcome = Sent(stored_result(await handler(row)))
        except asyncio.CancelledError:
            if not watchdog.timed_out(task):
                raise
            outcome = self._failed(job, TimeoutError())
        except BaseException as exc:  # a handler's SystemExit too: see the docstring
            outcome = self._failed(job, exc)
        finally:
            watchdog.finish(task)
        elapsed = time.perf_counter() - started
        self.metrics.send_seconds.observe(row.topic, elapsed)
        return _Done(job, outcome, elapsed)

    def _failed(self, job: _Job, exc: BaseException) -> Outcome:
        """The outcome of a send that raised ``exc``: retry or dead, logged when unexpected."""
        row = job.claimed.message
        outcome = classify(
            exc,
            attempts=job.claimed.attempt,
            max_attempts=self.config.max_attempts,
            backoff_base=self.config.backoff_base,
            backoff_cap=self.config.backoff_cap,
            rng=self._rng,
        )
        if isinstance(exc, AmbiguousSendError):
            self.metrics.ambiguous.inc()
            logger.warning(
                "ambiguous send id=%s: %s",
                row.id,
                exc,
                extra={"action": "ambiguous_send", "outbox_id": row.id},
            )
        elif not isinstance(exc, SendError | TimeoutError):
            logger.warning("handler raised %s", describe(exc), exc_info=exc)
        return outcome

    # --- completer ---------------------------------------------------------------------------

    def _finish(self, done: _Done) -> None:
        self._done.append(done)
        self._settled.clear()
        self._done_ready.set()

    async def _flushed(self) -> None:
        """Wait until every outcome handed to the completer is written."""
        await self._settled.wait()

    async def _complete(self) -> None:
        """Write outcomes in groups: when ``concurrency`` wait, or ``SETTLE_AFTER_S`` after the
        first. Each group is one statement of fenced UPDATEs (``SETTLE_MANY``)."""
        while True:
            await self._done_ready.wait()
            if len(self._done) < self.config.batch_size and self._active:
                await asyncio.sleep(SETTLE_AFTER_S)
            self._done_ready.clear()
            group, self._done = self._done, []
            if group:
                await self._write(group)
            if not self._done:
                self._settled.set()

    async def _write(self, group: list[_Done]) -> None:
        """Settle ``group``, retrying while the database is unavailable; never re-sends.

        Any other error (a bug, a value PostgreSQL refuses that ``storable`` missed) is retried
        one outcome at a time, so one bad outcome cannot hold the others back; one that fails on
        its own is logged and left claimed (its lease runs out and it is retried, counted).
        """
        try:
            await self._retrying("settle", lambda: self._settle(group))
            return
        except Exception as exc:
            if len(group) == 1:
                logger.error(
                    "could not store the outcome of id=%s: %s",
                    group[0].job.claimed.message.id,
                    describe(exc),
                    exc_info=exc,
                    extra={"action": "settle_failed"},
                )
                self._held.pop(group[0].job.claimed.message.id, None)
                return
        for done in group:
            await self._write([done])

    async def _settle(self, group: Sequence[_Done]) -> None:
        columns = _settle_columns(group)
        async with self._connection("settle") as conn:
            written = await queries.settle_many(conn, now=self._now(), **columns)
        self._report(group, written)

    def _report(self, group: Sequence[_Done], written: set[int]) -> None:
        """After the commit: one line per settled message, the counters, the refusals."""
        lines = []
        counts: dict[tuple[str, str], int] = {}
        r = self._result
        for done in group:
            row = done.job.claimed.message
            self._held.pop(row.id, None)
            if row.id not in written:
                r.refused += 1
                logger.warning(
                    "outcome of id=%s attempt %d refused: the message was taken over meanwhile",
                    row.id,
                    done.job.claimed.attempt,
                    extra={"action": "settle_refused", "outbox_id": row.id},
                )
                continue
            outcome = done.outcome
            if outcome is None:
                r.released += 1
                continue
            label = _OUTCOME_LABEL[type(outcome)]
            if label == "sent":
                r.sent += 1
            elif label == "retrying":
                r.retrying += 1
            else:
                r.dead += 1
            error = None if isinstance(outcome, Sent) else outcome.error
            line = SettledLine(
                row.id, row.topic, done.job.claimed.attempt, label, done.seconds * 1000, error
            )
            lines.append(line)
            key = (label, row.topic)
            counts[key] = counts.get(key, 0) + 1
        self.settle_log.write(lines)
        for (label, topic), n in counts.items():
            self.metrics.settled.labels(label, topic).inc(n)

    # --- heartbeat and rescuer ---------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Extend the lease of every row this relay holds, every ``lease / 3`` seconds."""
        failures = 0  # in a row, for the log line's "try N"
        while True:
            await asyncio.sleep(self.config.heartbeat_every)
            jobs = list(self._held.values())
            if not jobs:
                continue
            try:
                async with self._connection() as conn:
                    await queries.heartbeat(
                        conn,
                        ids=[j.claimed.message.id for j in jobs],
                        owners=[j.owner for j in jobs],
                        attempts=[j.claimed.attempt for j in jobs],
                        lease=self.config.lease,
                        now=self._now(),
                    )
                failures = 0
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    logger.error("renewing leases failed: %s", describe(exc), exc_info=exc)
                    continue
                failures += 1
                self._log_database("renew leases", exc, failures, self.config.heartbeat_every)

    async def _keep_owner(self) -> None:
        """Hold an owner lock (a new owner id per session), and rescue once a second."""
        failures = 0
        dsn = self._listen_dsn or (None if self._pooled else engine_libpq_url(self.engine))
        while True:
            session: OwnerSession | LeaseOnlyOwner | None = None
            try:
                session = await OwnerSession.open(dsn) if dsn is not None else LeaseOnlyOwner()
                self._owner = session.owner
                if failures:
                    logger.info("owner lock taken again", extra={"action": "owner_lock_up"})
                failures = 0
                while True:
                    await self._rescue(session)
                    self._owner_ready.set()  # after a first rescue: a drain sees its rows too
                    await asyncio.sleep(RESCUE_EVERY_S)
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                self._owner_ready.clear()
                failures += 1
                delay = database_delay(failures, self._rng)
                self._log_database("hold the owner lock", exc, failures, delay)
                await asyncio.sleep(delay)
            finally:
                self._owner_ready.clear()
                if session is not None:
                    with contextlib.suppress(Exception):
                        await session.close()

    async def _rescue(self, session: OwnerSession | LeaseOnlyOwner) -> None:
        """One rescuer tick: rows of dead owners due now, rows out of attempts dead, and the
        producer told when abandoned rows wait. Raises if the lock session itself is lost."""
        mine = {session.owner} | {job.owner for job in self._held.values()}
        try:
            async with self._connection() as conn:
                owners = await queries.owners_in_flight(conn)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            await session.dead([])  # is it the lock session too?
            return
        dead = await session.dead([o for o in owners if o not in mine])
        if not owners:
            return
        held = list(self._held)
        try:
            async with self._connection() as conn:
                rescued, buried = await queries.rescue_abandoned(
                    conn,
                    dead=dead,
                    held=held,
                    max_attempts=self.config.max_attempts,
                    now=self._now(),
                )
                # Already known (the producer has not run them yet): no need to ask again.
                due = self._abandoned_due or await queries.abandoned_due(
                    conn,
                    topics=self.registry.topics,
                    held=held,
                    max_attempts=self.config.max_attempts,
                    now=self._now(),
                )
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            return
        if rescued or buried:
            logger.warning(
                "rescued %d message(s) of %d dead relay(s); %d out of attempts are dead",
                rescued,
                len(dead),
                buried,
                extra={"action": "rescue_abandoned", "rescued": rescued, "buried": buried},
            )
        if due and not self._abandoned_due:
            self._abandoned_due = True
            self._slot_freed.set()
            self._wake.set()

    # --- the database ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, role: str = "misc") -> AsyncIterator[AsyncConnection]:
        """A connection kept for ``role``, in autocommit (``_connect``): each statement run on it
        is a short transaction of its own.

        The producer (``claim``) and the completer (``settle``) each keep a connection checked
        out between transactions: a pool checkout pings the server first, a round trip that
        measured as a third of a claim's time. A connection that met an error after which it is
        useless (read-only, shut down, dropped) is thrown away, never reused or pooled.
        """
        conn = self._conns.pop(role, None) or await self._connect(role)
        keep = True
        try:
            yield conn
            await conn.commit()
        except BaseException as exc:
            keep = not drops_session(exc) and not isinstance(exc, asyncio.CancelledError)
            if keep:
                try:
                    await conn.rollback()
                except Exception:
                    keep = False
            if not keep:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
            raise
        finally:
            if keep and role not in self._conns:
                self._conns[role] = conn
            else:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _connect(self, role: str) -> AsyncConnection:
        """A new connection for ``role``, in autocommit.

        Every statement the relay runs is a transaction of its own: a claim (``CLAIM_DUE``), a
        settle (``SETTLE_MANY``), a lease renewal, a rescue, a look-up. BEGIN and COMMIT would
        be two round trips more each, for nothing: between a NOTIFY and the handler for a claim,
        and, for the rescuer's ticks once a second, beside the sends of a relay at a low rate.
        """
        conn = await self.engine.connect()
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    async def _close_connections(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _retrying(
        self,
        what: str,
        func: Callable[[], Awaitable[Any]],
        *,
        give_up_on_stop: bool = False,
        default: Any = None,
    ) -> Any:
        """Run ``func`` until it succeeds, waiting out infrastructure errors (``outbox.dberrors``)
        with tenacity (``outbox.reconnect``); other errors propagate. With ``give_up_on_stop``
        (claims: nothing is lost by not claiming) it returns ``default`` once the relay stops;
        settles never give up."""
        failures = 0

        def before_sleep(state: RetryCallState) -> None:
            nonlocal failures
            failures = state.attempt_number
            error = state.outcome.exception() if state.outcome is not None else None
            assert error is not None  # tenacity sleeps only after a failed try
            self._log_database(what, error, failures, state.upcoming_sleep)

        result: Any = await retry_database(
            func,
            before_sleep=before_sleep,
            give_up=self._stopping.is_set if give_up_on_stop else None,
            default=default,
        )
        if failures:
            logger.info(
                "database available again (%s) after %d tries",
                what,
                failures,
                extra={"action": "database_back"},
            )
        return result

    def _log_database(self, what: str, exc: BaseException, failures: int, delay: float) -> None:
        """One line per try while the database is unavailable."""
        self.metrics.db_reconnects.inc()
        state = sqlstate(exc)
        logger.warning(
            "database unreachable or not writable (%s%s) to %s; retrying in %.1fs (try %d)",
            f"SQLSTATE {state}: " if state else "",
            describe(exc).splitlines()[0][:200],
            what,
            delay,
            failures,
            extra={"action": "reconnect_database", "sqlstate": state},
        )

    async def _database_now(self) -> datetime:
        async with self.engine.connect() as conn:
            now: datetime = (await conn.execute(queries.SELECT_NOW)).scalar_one()
            return now

    async def sample_queue(self, every: float = 10.0) -> None:
        """Keep the due-depth, oldest-due-age and dead gauges fresh until cancelled."""
        while True:
            try:
                async with self.engine.connect() as conn:
                    depth = await queries.due_depth(conn, now=self._now())
                self.metrics.due.set(depth["due"])
                self.metrics.oldest_due_age.set(depth["oldest_due_age_s"])
                self.metrics.dead.set(depth["dead"])
            except Exception as exc:
                logger.debug("queue sample failed: %s", exc)
            await asyncio.sleep(every)


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of ``aws`` finishes, cancelling the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
