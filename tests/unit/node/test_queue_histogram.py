"""QueueHistogram exports what prometheus-client's Histogram exports for the same values."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from raftq.cluster.metrics import _JOB_BUCKETS, QueueHistogram

_CREATED = re.compile(rb"^(\w+_created\{[^}]*\}) \S+$", re.MULTILINE)


def _exposition(registry: CollectorRegistry) -> bytes:
    """The text format with the `_created` timestamps blanked (they are the clock at first use)."""
    return _CREATED.sub(rb"\1 T", generate_latest(registry))


def test_the_scrape_matches_prometheus_clients_histogram_value_for_value():
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("raftq_job_latency_seconds", "Job latency.", labelnames=["queue"], buckets=_JOB_BUCKETS,
                          registry=theirs)
    histogram = QueueHistogram("raftq_job_latency_seconds", "Job latency.", buckets=_JOB_BUCKETS, registry=ours)
    draw = random.Random(16)
    # Every bound exactly (le is inclusive), just above each, zero, beyond the last, and a spread.
    values = [*_JOB_BUCKETS, *(bound + 1e-9 for bound in _JOB_BUCKETS), 0.0, 1e6,
              *(draw.expovariate(4.0) for _ in range(500))]
    for index, value in enumerate(values):
        queue = ("emails", "reports.daily", 'odd "name"')[index % 3]
        reference.labels(queue).observe(value)
        histogram.observe(queue, value)
    assert _exposition(ours) == _exposition(theirs)


def test_a_histogram_nothing_was_observed_in_exports_no_series():
    registry = CollectorRegistry()
    QueueHistogram("raftq_job_queue_wait_seconds", "Wait.", buckets=_JOB_BUCKETS, registry=registry)
    assert b"raftq_job_queue_wait_seconds_bucket" not in generate_latest(registry)
