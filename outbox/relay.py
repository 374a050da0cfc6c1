"""The relay: claim due messages, run their handlers, settle the outcomes.

One transaction per batch: ``CLAIM_DUE`` locks the rows (``FOR UPDATE SKIP LOCKED``), the
handlers run concurrently while the locks are held, and one UPDATE per outcome kind settles them
before the commit. A relay that dies at any point loses nothing: its connection drops, PostgreSQL
rolls the transaction back, and the rows are due again for any relay. The price is that messages
in flight at a crash may be delivered twice (at-least-once), which the stable Message-ID lets a
receiver detect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from outbox import queries
from outbox.claim import ClaimCursor
from outbox.db import is_connection_error
from outbox.errors import AmbiguousSendError, ConfigError, SendError
from outbox.listener import Listener
from outbox.message import OutboxMessage
from outbox.metrics import RelayMetrics
from outbox.outcome import Dead, Outcome, Retry, Sent, classify, describe
from outbox.registry import HandlerRegistry
from outbox.settlelog import LoggingSettleLog, SettledLine, SettleLog
from outbox.watchdog import SendWatchdog

logger = logging.getLogger(__name__)

T = TypeVar("T")

_OUTCOME_LABEL: dict[type, str] = {Sent: "sent", Retry: "retry", Dead: "dead"}

DEFAULT_BATCH_SIZE = 100
DEFAULT_CONCURRENCY = 16
DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 15
DEFAULT_BACKOFF_BASE = 2.0
DEFAULT_BACKOFF_CAP = 3600.0
DEFAULT_STOP_GRACE = 5.0


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

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.poll_interval > 0, "--poll-interval must be positive"),
            (self.send_timeout > 0, "--send-timeout must be positive"),
            (self.max_attempts >= 1, "--max-attempts must be at least 1"),
            (self.backoff_base > 0, "--backoff-base must be positive"),
            (self.backoff_cap >= self.backoff_base, "--backoff-cap must be >= --backoff-base"),
            (self.stop_grace >= 0, "--stop-grace must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def stop_bound(self) -> float:
        """Seconds from SIGTERM to exit, at most: after a stop no new send starts, so only the
        sends already running (each bounded by ``send_timeout``) finish, then the settle."""
        return self.send_timeout + self.stop_grace

    @property
    def idle_in_transaction_timeout(self) -> float:
        """How long PostgreSQL lets a relay sit idle inside a batch transaction before ending it.

        A batch is idle between the claim and the settle: sends start within ``send_timeout``
        of the claim and each lasts at most ``send_timeout`` (see ``Relay._send_all``), so at
        most ``2 * send_timeout``. Ten seconds more absorb scheduling noise. A relay frozen or
        cut off for longer loses its session and its locks, and its batch is due for the others.
        """
        return 2 * self.send_timeout + 10.0


@dataclass
class BatchResult:
    """What one ``run_once`` (or a drain of several) did: the test handle on the relay."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead: int = 0
    released: int = 0  # claimed but not attempted (stop, or the start deadline): due again

    def __iadd__(self, other: BatchResult) -> BatchResult:
        self.claimed += other.claimed
        self.sent += other.sent
        self.retried += other.retried
        self.dead += other.dead
        self.released += other.released
        return self


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: Outcome
    seconds: float


@dataclass
class _Settlement:
    sent_ids: list[int] = field(default_factory=list)
    sent_results: list[str | None] = field(default_factory=list)
    retry_ids: list[int] = field(default_factory=list)
    retry_delays: list[float] = field(default_factory=list)
    retry_errors: list[str] = field(default_factory=list)
    dead_ids: list[int] = field(default_factory=list)
    dead_errors: list[str] = field(default_factory=list)

    released: int = 0
    lines: list[SettledLine] = field(default_factory=list)

    @classmethod
    def of(cls, rows: Sequence[OutboxMessage], attempts: Sequence[_Attempt | None]) -> _Settlement:
        s = cls()
        for row, attempt in zip(rows, attempts, strict=True):
            if attempt is None:
                s.released += 1
                continue
            outcome = attempt.outcome
            s.lines.append(
                SettledLine(
                    outbox_id=row.id,
                    topic=row.topic,
                    attempt=row.attempts + 1,
                    outcome=_OUTCOME_LABEL[type(outcome)],
                    duration_ms=attempt.seconds * 1000,
                    error=None if isinstance(outcome, Sent) else outcome.error,
                )
            )
            match outcome:
                case Sent(result):
                    s.sent_ids.append(row.id)
                    s.sent_results.append(result)
                case Retry(delay, error):
                    s.retry_ids.append(row.id)
                    s.retry_delays.append(delay)
                    s.retry_errors.append(error)
                case Dead(error):
                    s.dead_ids.append(row.id)
                    s.dead_errors.append(error)
        return s

    def result(self) -> BatchResult:
        return BatchResult(
            claimed=len(self.sent_ids) + len(self.retry_ids) + len(self.dead_ids) + self.released,
            sent=len(self.sent_ids),
            retried=len(self.retry_ids),
            dead=len(self.dead_ids),
            released=self.released,
        )


class Relay:
    """Deliver due outbox messages with the handlers of ``registry``.

    ``clock`` returns the time the queries use; ``None`` (the default) means the database's own
    clock. ``rng`` drives the backoff jitter. Both are injectable so tests never sleep.
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
        metrics: RelayMetrics | None = None,
        settle_log: SettleLog | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.config = config or RelayConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._listen_dsn = listen_dsn
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.listener: Listener | None = None
        self.metrics = metrics or RelayMetrics()
        self.settle_log: SettleLog = settle_log or LoggingSettleLog()
        self._send_seconds_by_topic: dict[str, Any] = {}
        self._cursor = ClaimCursor()

    def _now(self) -> datetime | None:
        return self._clock() if self._clock is not None else None

    # --- one batch ---------------------------------------------------------------------------

    async def run_once(self, *, due_before: datetime | None = None) -> BatchResult:
        """Claim one batch, deliver it, settle it, commit. Returns what happened."""
        async with self.engine.connect() as conn:
            now = due_before or self._now()
            with self.metrics.claim_seconds.time():
                rows = await self._cursor.claim(conn, limit=self.config.batch_size, now=now)
            if not rows:
                await conn.rollback()
                return BatchResult()
            self.metrics.batch_size.observe(len(rows))
            attempts = await self._send_all(rows)
            # Rows never started (stop requested, or the batch's start deadline passed) are not
            # written at all: the commit releases their locks and they are due again at once.
            settlement = _Settlement.of(rows, attempts)
            # Shielded: a cancel (shutdown) while settling must not leave the batch half-written
            # or, worse, sent but unmarked. If we are cancelled, wait for the settle to finish.
            settle = asyncio.ensure_future(self._settle(conn, settlement))
            try:
                await asyncio.shield(settle)
            except asyncio.CancelledError:
                await settle
                raise
            return settlement.result()

    def _report(self, settlement: _Settlement) -> None:
        """After the commit: one line per settled message, and the counters."""
        self.settle_log.write(settlement.lines)
        counts: dict[tuple[str, str], int] = {}
        for line in settlement.lines:
            key = (line.outcome, line.topic)
            counts[key] = counts.get(key, 0) + 1
        for (outcome, topic), n in counts.items():
            self.metrics.settled.labels(outcome, topic).inc(n)

    async def _send_all(self, rows: Sequence[OutboxMessage]) -> list[_Attempt | None]:
        """Run the batch's handlers, at most ``concurrency`` at a time.

        ``concurrency`` workers take the rows in claim order, one after the other, so a batch
        larger than that sends in waves without a task or a semaphore per message (both are
        measurable on the no-op path). A send may only *start* within ``send_timeout`` of the
        claim, and runs for at most ``send_timeout``, so a batch holds its locks for at most
        twice that, whatever the batch size and however slow the mail server
        (``RelayConfig.idle_in_transaction_timeout`` relies on this bound). Rows that could not
        start in time, or whose turn came after a stop was requested, come back as ``None``.
        """
        start_deadline = time.monotonic() + self.config.send_timeout
        attempts: list[_Attempt | None] = [None] * len(rows)
        turns = iter(enumerate(rows))
        watchdog = SendWatchdog(self.config.send_timeout)

        async def worker() -> None:
            task = asyncio.current_task()
            assert task is not None
            for index, row in turns:
                if self._stopping.is_set() or time.monotonic() > start_deadline:
                    return  # this row and those nobody took stay None: released
                attempts[index] = await self._attempt(row, watchdog, task)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.config.concurrency, len(rows))):
                    group.create_task(worker())
        finally:
            watchdog.close()
        return attempts

    async def _attempt(
        self, row: OutboxMessage, watchdog: SendWatchdog, task: asyncio.Task[Any]
    ) -> _Attempt:
        """Run one handler and turn whatever happens into exactly one outcome.

        Raises only a cancellation that is not the watchdog's (the relay is being shut down).
        """
        started = time.perf_counter()
        watchdog.start(task)
        try:
            handler = self.registry.get(row.topic)
            outcome: Outcome = Sent(await handler(row))
        except asyncio.CancelledError:
            if not watchdog.timed_out(task):
                raise
            outcome = self._failed(row, TimeoutError())
        except Exception as exc:
            outcome = self._failed(row, exc)
        finally:
            watchdog.finish(task)
        elapsed = time.perf_counter() - started
        self._send_seconds(row.topic).observe(elapsed)
        return _Attempt(outcome, elapsed)

    def _failed(self, row: OutboxMessage, exc: Exception) -> Outcome:
        """The outcome of a send that raised ``exc``: retry or dead, logged when unexpected."""
        outcome = classify(
            exc,
            attempts=row.attempts + 1,
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

    def _send_seconds(self, topic: str) -> Any:
        """The histogram child for ``topic``, cached: ``labels()`` costs a lock and a lookup."""
        child = self._send_seconds_by_topic.get(topic)
        if child is None:
            child = self._send_seconds_by_topic[topic] = self.metrics.send_seconds.labels(topic)
        return child

    async def _settle(self, conn: AsyncConnection, s: _Settlement) -> None:
        now = self._now()
        await queries.mark_sent_many(conn, ids=s.sent_ids, results=s.sent_results, now=now)
        await queries.mark_retry_many(
            conn, ids=s.retry_ids, delays=s.retry_delays, errors=s.retry_errors, now=now
        )
        await queries.mark_dead_many(conn, ids=s.dead_ids, errors=s.dead_errors, now=now)
        await conn.commit()
        self._report(s)

    # --- loops -------------------------------------------------------------------------------

    async def _database_now(self) -> datetime:
        async with self.engine.connect() as conn:
            now: datetime = (await conn.execute(queries.SELECT_NOW)).scalar_one()
            return now

    async def drain(self) -> BatchResult:
        """Deliver everything due now, batch after batch, then return (``outbox relay --once``).

        "Now" is fixed when the drain starts, so a message that fails and is rescheduled is not
        picked up again by the same drain.
        """
        total = BatchResult()
        due_before = self._now() or await self._with_reconnect(self._database_now)
        while not self._stopping.is_set():
            result = await self._with_reconnect(lambda: self.run_once(due_before=due_before))
            total += result
            if result.claimed == 0:
                break
        return total

    async def _with_reconnect(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func``, retrying with backoff while the database is unreachable.

        Only connection-level errors are retried (the server restarted, the connection was
        terminated, the network blipped); anything else is a bug and propagates. Retrying stops
        when the relay is asked to stop, so a relay cut off from its database still exits on
        SIGTERM.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_connection_error),
            wait=wait_exponential(multiplier=0.2, max=10.0) + wait_random(0, 0.3),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._sleep_unless_stopping,
            before_sleep=self._log_reconnect,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await func()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Deliver until ``stop()``: drain while there is work, then wait for NOTIFY or a poll.

        On stop no new batch is claimed; the batch in flight gets ``config.stop_bound`` seconds
        to finish and settle, after which it is cancelled and rolled back (its rows are simply
        due again).
        """
        listener_task = None
        if self._listen_dsn is not None:
            self.listener = Listener(
                self._listen_dsn, self._wake, on_state=self.metrics.on_listen_state
            )
            listener_task = asyncio.create_task(self.listener.run(), name="outbox-listener")
        loop_task = asyncio.create_task(self._loop(), name="outbox-relay-loop")
        stop_task = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not loop_task.done():
                try:
                    async with asyncio.timeout(self.config.stop_bound):
                        await asyncio.shield(loop_task)
                except TimeoutError:
                    logger.warning(
                        "in-flight batch did not finish within %.0fs; rolling it back",
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

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # a NOTIFY during this batch makes us look again at once
            try:
                result = await self._with_reconnect(self.run_once)
            except Exception as exc:
                if self._stopping.is_set() and is_connection_error(exc):
                    return
                raise
            if result.claimed:
                continue
            try:
                async with asyncio.timeout(self.config.poll_interval):
                    await _first(self._wake.wait(), self._stopping.wait())
            except TimeoutError:
                pass

    def stop(self) -> None:
        """Ask the relay to stop (what SIGTERM does); safe to call from a signal handler."""
        if not self._stopping.is_set():
            logger.info("stopping: no new batches", extra={"action": "stop_relay"})
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _log_reconnect(self, state: RetryCallState) -> None:
        self.metrics.db_reconnects.inc()
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "database unreachable (%s); reconnecting in %.1fs (attempt %d)",
            describe(exc) if exc else "?",
            delay,
            state.attempt_number,
            extra={"action": "reconnect_database"},
        )

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
