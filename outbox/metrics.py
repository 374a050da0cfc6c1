"""Prometheus metrics of a relay process (served on ``outbox relay --metrics-port``).

A registry of its own rather than the global one, so several relays in one process (tests,
``outbox dev``) do not collide.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString

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
        self.send_seconds = TopicHistogram(
            "outbox_send_duration_seconds",
            "Time one handler took, success or not.",
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


class TopicHistogram(Collector):
    """A histogram by ``topic`` for one observation per message, at the cost of a list update.

    ``prometheus_client.Histogram.observe`` takes a lock for the sum and another for the bucket:
    profiled at about a tenth of a relay's CPU on no-op messages. Here only the event loop's
    thread writes (the relay is single-threaded), so an observation is a ``bisect`` and two
    additions; the metrics server's thread reads a copy, which may be one observation behind in
    either the sum or a bucket. The exposition is a histogram's (``_bucket``, ``_count``,
    ``_sum``), without ``_created``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(buckets)
        # The "le" labels, spelt as prometheus_client spells them ("0.001", "+Inf").
        self._le = [floatToGoString(b) for b in [*self._bounds, INF]]  # type: ignore[no-untyped-call]
        self._counts: dict[str, list[int]] = {}  # per topic, per bucket (not cumulative), +Inf last
        self._sums: dict[str, float] = {}
        registry.register(self)

    def observe(self, topic: str, seconds: float) -> None:
        counts = self._counts.get(topic)
        if counts is None:
            counts = self._counts[topic] = [0] * (len(self._bounds) + 1)
            self._sums[topic] = 0.0
        counts[bisect_left(self._bounds, seconds)] += 1  # the first bound >= seconds ("le")
        self._sums[topic] += seconds

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=["topic"])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["topic"])
        for topic, counts in list(self._counts.items()):
            total = 0
            buckets = []
            for le, n in zip(self._le, list(counts), strict=True):
                total += n
                buckets.append((le, float(total)))
            family.add_metric([topic], buckets, sum_value=self._sums[topic])
        yield family
