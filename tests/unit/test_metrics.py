"""The relay's send-duration histogram exposes what prometheus_client's own Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from outbox.metrics import RelayMetrics, TopicHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
OBSERVED = [("email", 0.0005), ("email", 0.001), ("email", 0.05), ("noop", 3.0), ("email", 0.1)]


def _samples(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)


def test_topic_histogram_matches_prometheus_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = TopicHistogram("send_seconds", "Time.", buckets=BUCKETS, registry=ours)
    reference = Histogram("send_seconds", "Time.", ["topic"], buckets=BUCKETS, registry=theirs)
    for topic, seconds in OBSERVED:
        histogram.observe(topic, seconds)
        reference.labels(topic).observe(seconds)
    assert _samples(ours) == _samples(theirs)
    # A value on a bound counts in that bucket ("le"), as in prometheus_client.
    assert 'send_seconds_bucket{le="0.001",topic="email"} 2.0' in _samples(ours)


def test_relay_metrics_expose_send_duration_by_topic() -> None:
    metrics = RelayMetrics()
    metrics.send_seconds.observe("email", 0.002)
    text = generate_latest(metrics.registry).decode()
    assert 'outbox_send_duration_seconds_count{topic="email"} 1.0' in text
    assert 'outbox_send_duration_seconds_bucket{le="0.0025",topic="email"} 1.0' in text
