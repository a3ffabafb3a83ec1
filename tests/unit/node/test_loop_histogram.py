"""LoopHistogram exports what prometheus-client's Histogram exports for the same values."""

from __future__ import annotations

import random
import re

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from raftq.cluster.metrics import _FSYNC_BUCKETS, _JOB_BUCKETS, _LATENCY_BUCKETS, LoopHistogram

_CREATED = re.compile(rb"^(\w+_created(?:\{.*\})?) \S+$", re.MULTILINE)


def _exposition(registry: CollectorRegistry) -> bytes:
    """The text format with the `_created` timestamps blanked (they are the clock at first use)."""
    return _CREATED.sub(rb"\1 T", generate_latest(registry))


def _values(buckets, seed: int) -> list[float]:
    """Every bound exactly (le is inclusive), just above each, zero, beyond the last, and a spread."""
    draw = random.Random(seed)
    return [*buckets, *(bound + 1e-9 for bound in buckets), 0.0, 1e6, *(draw.expovariate(4.0) for _ in range(500))]


@pytest.mark.parametrize("labelnames, label_values, buckets", [
    ((), [()], _FSYNC_BUCKETS),
    (("queue",), [("emails",), ("reports.daily",), ('odd "name"',)], _JOB_BUCKETS),
    (("route", "method", "status"), [("/v1/queues/{queue}/jobs", "POST", "201"), ("/v1/ack", "POST", "200"),
                                     ("unmatched", "GET", "404")], _LATENCY_BUCKETS),
], ids=["no labels", "by queue", "by route, method and status"])
def test_the_scrape_matches_prometheus_clients_histogram_value_for_value(labelnames, label_values, buckets):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("raftq_some_seconds", "Some latency.", labelnames=labelnames, buckets=buckets,
                          registry=theirs)
    histogram = LoopHistogram("raftq_some_seconds", "Some latency.", labelnames=labelnames, buckets=buckets,
                              registry=ours)
    assert _exposition(ours) == _exposition(theirs), "before any value"
    for index, value in enumerate(_values(buckets, seed=16)):
        labels = label_values[index % len(label_values)]
        (reference.labels(*labels) if labels else reference).observe(value)
        histogram.observe(value, labels)
    assert _exposition(ours) == _exposition(theirs)


def test_a_labelled_histogram_nothing_was_observed_in_exports_no_series():
    registry = CollectorRegistry()
    LoopHistogram("raftq_job_queue_wait_seconds", "Wait.", labelnames=["queue"], buckets=_JOB_BUCKETS,
                  registry=registry)
    assert b"raftq_job_queue_wait_seconds_bucket" not in generate_latest(registry)
