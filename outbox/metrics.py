"""Prometheus metrics of a relay process (served on ``outbox relay --metrics-port``).

A registry of its own rather than the global one, so several relays in one process (tests,
``outbox dev``) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.settled = Counter(
            "outbox_messages_settled",
            "Messages settled, by outcome (sent, retry, dead) and topic.",
            ["outcome", "topic"],
            registry=r,
        )
        self.ambiguous = Counter(
            "outbox_ambiguous_sends",
            "Sends that failed after the message body went out (the server may have it).",
            registry=r,
        )
        self.claim_seconds = Histogram(
            "outbox_claim_duration_seconds",
            "Time to claim one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.send_seconds = Histogram(
            "outbox_send_duration_seconds",
            "Time one handler took, success or not.",
            ["topic"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "outbox_batch_size",
            "Messages per claimed batch.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.due = Gauge(
            "outbox_due_messages", "Messages due now and not yet sent or dead.", registry=r
        )
        self.oldest_due_age = Gauge(
            "outbox_oldest_due_age_seconds",
            "How long the oldest due message has been waiting (0 when none).",
            registry=r,
        )
        self.slow_sends = Gauge(
            "outbox_slow_sends",
            "Sends running longer than --slow-after now (they no longer count against "
            "--concurrency, up to --max-slow of them).",
            registry=r,
        )
        self.dead = Gauge("outbox_dead_messages", "Messages in the dead state.", registry=r)
        self.listen_connected = Gauge(
            "outbox_listen_connected", "1 while the LISTEN connection is up.", registry=r
        )
        self.listen_drops = Counter(
            "outbox_listen_disconnects", "Times the LISTEN connection was lost.", registry=r
        )
        self.db_reconnects = Counter(
            "outbox_database_reconnects",
            "Retries after losing the database connection.",
            registry=r,
        )

    def on_listen_state(self, connected: bool) -> None:
        self.listen_connected.set(1 if connected else 0)
        if not connected:
            self.listen_drops.inc()
