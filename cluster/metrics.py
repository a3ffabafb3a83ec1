"""Prometheus metrics of one node, on its own registry.

Job counters and queue depths are read from the applied state machine at scrape time, so every
node exports the same figures for the same applied index and any node can be scraped. What only
the leader knows (workers alive) is exported by the leader alone: absent, not zero, elsewhere.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from typing import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from raftq.cluster.node_view import NodeView
from raftq.cluster.transport.http import DATA_APPEND_HOLD_S, LANE_QUEUE_COUNT_MAX

#: The loop-lag metric's timer: a pause longer than this is seen, short by at most this much. A
#: snapshot capture must pause the loop less than 50 ms, so the sampler must see that; 50 wakeups
#: a second cost a node well under 1 % of a core.
LOOP_LAG_SAMPLE_S = 0.02
#: `raftq_event_loop_lag_max_seconds` is the largest lag of this window: longer than a scrape interval.
LOOP_LAG_WINDOW_S = 30.0

#: State machine counter events -> exported counter names (all by queue).
_JOB_COUNTERS = {
    "submitted": "raftq_jobs_submitted",
    "leased": "raftq_jobs_leased",
    "acked": "raftq_jobs_acked",
    "failed": "raftq_jobs_failed",
    "retried": "raftq_jobs_retried",
    "dead_lettered": "raftq_jobs_dead_lettered",
    "cancelled": "raftq_jobs_cancelled",
    "redriven": "raftq_jobs_redriven",
    "released": "raftq_jobs_released",
}
_REQUEUE_REASONS = {"requeued_expired": "lease_expired", "requeued_worker_lost": "worker_lost"}
_ROLES = ("follower", "pre_candidate", "candidate", "leader")

_FSYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class NodeMetrics:
    """The node's registry and the metrics the shell and the API update directly."""

    def __init__(self, node: NodeView) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(node))
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (from /proc on Linux)
        ProcessCollector(registry=self.registry)
        self.wal_fsync_seconds = LoopHistogram(
            "raftq_wal_fsync_seconds", "Time to write and fsync one batch of log entries.",
            buckets=_FSYNC_BUCKETS, registry=self.registry,
        )
        self.wal_entries_per_fsync = LoopHistogram(
            "raftq_wal_entries_per_fsync", "Log entries made durable by one fsync (group commit size).",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.submit_seconds = LoopHistogram(
            "raftq_submit_seconds", "Submit request latency, receipt to committed answer.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.http_request_seconds = LoopHistogram(
            "raftq_http_request_seconds", "HTTP request latency by route and status.",
            labelnames=["route", "method", "status"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.connections_refused_total = Counter(
            "raftq_connections_refused_total", "Connections the node aborted: over the connection limit, or "
            "no complete request head within the header timeout.", labelnames=["reason"], registry=self.registry,
        )
        self.connections_open = Gauge("raftq_connections_open", "Client and peer connections open now.",
                                      registry=self.registry)
        self.log_entries_read_back_total = Counter(
            "raftq_log_entries_read_back_total", "Log entries read back from the WAL for followers that fell "
            "behind the entries the node keeps in memory (raft/log.py, cold entries).", registry=self.registry,
        )
        self.job_latency_seconds = LoopHistogram(
            "raftq_job_latency_seconds", "Job end-to-end latency, submit to ack, by queue.",
            labelnames=["queue"], buckets=_JOB_BUCKETS, registry=self.registry,
        )
        self.job_queue_wait_seconds = LoopHistogram(
            "raftq_job_queue_wait_seconds", "Time from submit to first lease, by queue.",
            labelnames=["queue"], buckets=_JOB_BUCKETS, registry=self.registry,
        )
        self.event_loop_lag_seconds = Gauge(
            "raftq_event_loop_lag_seconds",
            f"How late the node's event loop woke a {LOOP_LAG_SAMPLE_S:g} s timer, last sample.",
            registry=self.registry,
        )
        self.event_loop_lag_max_seconds = Gauge(
            "raftq_event_loop_lag_max_seconds",
            f"The largest event loop lag sampled in the last {LOOP_LAG_WINDOW_S:g} s: a pause between two "
            "scrapes shows here, where the last sample has moved on.",
            registry=self.registry,
        )
        self._loop_lag_window = WindowMax(LOOP_LAG_WINDOW_S)
        self.proposals_refused = Counter(
            "raftq_proposals_refused", "Proposals refused for backpressure (answered 503).",
            registry=self.registry,
        )

    def observe_loop_lag(self, now: float, lag_s: float) -> None:
        """One sample of the loop lag (`now` in monotonic seconds): the gauge and the window's maximum."""
        self.event_loop_lag_seconds.set(lag_s)
        self.event_loop_lag_max_seconds.set(self._loop_lag_window.add(now, lag_s))

    def observe_samples(self, samples: list[tuple[str, str, int]]) -> None:
        """Latency samples the state machine collected while applying (milliseconds)."""
        latency, wait = self.job_latency_seconds.observe, self.job_queue_wait_seconds.observe
        for kind, queue, ms in samples:
            if kind == "job_latency":
                latency(max(ms, 0) / 1000, (queue,))
            elif kind == "queue_wait":
                wait(max(ms, 0) / 1000, (queue,))

    def observe_persist(self, seconds: float, entry_count: int) -> None:
        self.wal_fsync_seconds.observe(seconds)
        if entry_count:
            self.wal_entries_per_fsync.observe(entry_count)


class LoopHistogram(Collector):
    """A histogram that only the event loop feeds and reads, without prometheus-client's locks.

    prometheus-client's Histogram takes a lock for its sum and one for the bucket a value falls
    in, after walking the bounds, and, with labels, a `labels()` lookup that takes another: per
    job (first lease, ack) on every node, that was 17 % of a follower's CPU and 7 % of the
    leader's with jobs flowing through; per request (its route, the submit, the fsync and group
    commit size), about 25 Python calls of a one-job submit's 1,200 on the leader. Here a series'
    counts are plain lists that only the event loop touches (the scrape runs on it too), a value
    finds its bucket by bisection, and a scrape yields the samples prometheus-client's Histogram
    would (`_bucket` with `le`, `_count`, `_sum`, `_created`, in its order and number format): a
    histogram without labels has its one series, at zero, from the start; one with labels has a
    series per label values observed.
    """

    def __init__(self, name: str, documentation: str, *, labelnames: Sequence[str] = (),
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(float(bound) for bound in buckets)
        self._le = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        #: label values -> [counts per bucket (the last is above every bound), sum, created (Unix time)]
        self._series: dict[tuple[str, ...], list] = {}
        if not self._labelnames:
            self._new_series(())
        registry.register(self)

    def _new_series(self, labels: tuple[str, ...]) -> list:
        series = self._series[labels] = [[0] * len(self._le), 0.0, time.time()]
        return series

    def observe(self, value: float, labels: tuple[str, ...] = ()) -> None:
        """Counts `value` in the series of `labels` (one value per label name, in their order)."""
        series = self._series.get(labels)
        if series is None:
            series = self._new_series(labels)
        series[0][bisect_left(self._bounds, value)] += 1  # le is inclusive: value <= bound
        series[1] += value

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, "histogram")
        name, labelnames = self.name, self._labelnames
        for labels, (counts, total, created) in self._series.items():
            series_labels = dict(zip(labelnames, labels))
            cumulative = 0
            for le, count in zip(self._le, counts):
                cumulative += count
                family.add_sample(f"{name}_bucket", {**series_labels, "le": le}, float(cumulative))
            family.add_sample(f"{name}_count", series_labels, float(cumulative))
            family.add_sample(f"{name}_sum", series_labels, total)
            family.add_sample(f"{name}_created", series_labels, created)
        yield family


class WindowMax:
    """The largest value added in the last `window_s` seconds, in O(1) amortised per value.

    Keeps the values that could still become the maximum (a value followed by a larger one
    never can), oldest first, so they are in decreasing order and the front is the maximum.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._candidates: deque[tuple[float, float]] = deque()  # (at, value), values decreasing

    def add(self, at: float, value: float) -> float:
        """Adds `value` seen at `at` (never before an earlier call's); returns the window's maximum."""
        candidates = self._candidates
        while candidates and candidates[-1][1] <= value:
            candidates.pop()
        candidates.append((at, value))
        while candidates[0][0] < at - self.window_s:
            candidates.popleft()
        return candidates[0][1]


class _StateCollector(Collector):
    """Reads job counters, depths and Raft state at scrape time."""

    def __init__(self, node: NodeView) -> None:
        self._node = node

    def collect(self) -> Iterator:
        node = self._node
        yield from _job_counter_families(node)
        yield _depth_family(node)
        yield _oldest_ready_family(node)
        yield from _flow_families(node)
        yield from _raft_families(node)
        if node.is_leader:
            yield from _leader_families(node)


def _job_counter_families(node: NodeView) -> Iterator:
    families = {
        event: CounterMetricFamily(name, f"Jobs {event.replace('_', ' ')}, by queue.", labels=["queue"])
        for event, name in _JOB_COUNTERS.items()
    }
    requeued = CounterMetricFamily("raftq_jobs_requeued", "Jobs requeued by the broker, by queue and reason.",
                                   labels=["queue", "reason"])
    for (event, queue), value in sorted(node.queue.counters.items()):
        if event in families:
            families[event].add_metric([queue], value)
        elif event in _REQUEUE_REASONS:
            requeued.add_metric([queue, _REQUEUE_REASONS[event]], value)
    yield from families.values()
    yield requeued


def _depth_family(node: NodeView) -> GaugeMetricFamily:
    depth = GaugeMetricFamily("raftq_queue_depth", "Jobs in each queue by state.", labels=["queue", "state"])
    for queue, states in sorted(node.queue.queue_stats().items()):
        for state, count in sorted(states.items()):
            depth.add_metric([queue, state], count)
    return depth


def _oldest_ready_family(node: NodeView) -> GaugeMetricFamily:
    age = GaugeMetricFamily("raftq_queue_oldest_ready_age_seconds",
                            "Age of the oldest ready job (since it became ready), by queue.", labels=["queue"])
    now_ms = node.now_ms()  # the cluster's clock, which ready_at_ms is on (a follower: its applied clock)
    for queue, ready_at_ms in sorted(node.queue.oldest_ready_ms().items()):
        age.add_metric([queue], max(0.0, (now_ms - ready_at_ms) / 1000))
    return age


def _flow_families(node: NodeView) -> Iterator:
    """What limits hold back and what schedules did: from the applied state, on every node."""
    held = GaugeMetricFamily("raftq_jobs_held_back", "Ready jobs a limit holds back now, by queue and limit "
                             "(key: max_running_per_key, fifo: behind their group's head, rate: the bucket is empty).",
                             labels=["queue", "limit"])
    now_ms = node.now_ms()  # the clock the token bucket runs on
    settings = node.queue.queue_settings()
    for queue, values in settings.items():
        if values["rate_per_s"] is None and values["max_running_per_key"] is None and not values["fifo"]:
            continue
        for limit, count in node.queue.held_back(queue, now_ms).items():
            held.add_metric([queue, limit], count)
    yield held
    fires = CounterMetricFamily("raftq_schedule_fires", "Fire times of each schedule, by outcome (created: the "
                                "job was made; skipped: by overlap, catch_up or a full queue).",
                                labels=["schedule", "outcome"])
    for record in node.queue.schedules():
        fires.add_metric([record["name"], "created"], record["created_count"])
        fires.add_metric([record["name"], "skipped"], record["skipped_count"])
    yield fires


def _leader_families(node: NodeView) -> Iterator:
    """What only the leader knows; followers export none of it (absent, not zero)."""
    alive = GaugeMetricFamily("raftq_workers_alive", "Workers heard from within the heartbeat timeout (leader only).")
    alive.add_metric([], node.workers_alive_count())
    yield alive
    pending = GaugeMetricFamily("raftq_proposals_pending",
                                "Proposals waiting for their entry to commit (leader only; 503 past the limit).")
    pending.add_metric([], node.pending_proposals_count)
    yield pending
    waiting = GaugeMetricFamily("raftq_fetches_waiting", "Fetch long polls waiting for a job now (leader only).")
    waiting.add_metric([], node.fetches_waiting())
    yield waiting
    raft = node.raft
    if raft is None:
        return
    lag = GaugeMetricFamily("raftq_raft_follower_lag_entries",
                            "Entries the leader has that a follower has not acknowledged (leader only).",
                            labels=["peer"])
    for peer, match_index in sorted(raft.progress.items()):
        if peer != node.config.node_id:
            lag.add_metric([peer], max(0, raft.last_index - match_index))
    yield lag
    batched = GaugeMetricFamily(
        "raftq_raft_follower_batched",
        f"1 for a follower whose appends wait up to {DATA_APPEND_HOLD_S * 1000:g} ms and go in batches: "
        f"a commit does not need it first (leader only).", labels=["peer"])
    may_wait = raft.appends_may_wait()
    for peer in sorted(raft.progress):
        if peer != node.config.node_id:
            batched.add_metric([peer], 1 if peer in may_wait else 0)
    yield batched


def _raft_families(node: NodeView) -> Iterator:
    raft = node.raft
    if raft is None:
        return
    for name, doc, value in (
        ("raftq_raft_term", "Current Raft term.", raft.term),
        ("raftq_raft_commit_index", "Highest log index known committed.", raft.commit_index),
        ("raftq_raft_applied_index", "Highest log index applied to the queue state machine.", node.queue.last_applied),
        ("raftq_raft_last_index", "Last index in this node's log.", raft.last_index),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge
    role = GaugeMetricFamily("raftq_raft_role", "1 for this node's current role.", labels=["role"])
    current = raft.role.name.lower()
    for name in _ROLES:
        role.add_metric([name], 1 if name == current else 0)
    yield role
    changes = CounterMetricFamily("raftq_raft_leader_changes", "Times this node saw a new leader.")
    changes.add_metric([], node.leader_changes_count)
    yield changes
    send_queue = GaugeMetricFamily("raftq_peer_send_queue_messages",
                                   f"Raft messages queued for a peer, not yet sent (each of its two lanes drops "
                                   f"its oldest past {LANE_QUEUE_COUNT_MAX}).",
                                   labels=["peer"])
    for peer, count in sorted(node.peer_send_queue_counts().items()):
        send_queue.add_metric([peer], count)
    yield send_queue
    if node.wal_bytes is not None:
        wal_bytes = GaugeMetricFamily("raftq_wal_bytes", "Bytes of log segments on disk.")
        wal_bytes.add_metric([], node.wal_bytes)
        yield wal_bytes
    snapshots = node.snapshots
    for name, doc, value in (
        ("raftq_job_records", "Job records held: every unfinished job, finished ones until retention ends.",
         node.queue.job_count()),
        ("raftq_idempotency_keys", "Submit idempotency keys held until their window ends.",
         node.queue.idempotency_key_count()),
        ("raftq_raft_first_index", "First log index held in memory (earlier ones are compacted).", raft.first_index),
        ("raftq_snapshot_index", "Last log index covered by the newest snapshot.", raft.snapshot.index),
        ("raftq_snapshot_bytes", "Size of the last snapshot this node wrote.", snapshots.last_snapshot_bytes),
        ("raftq_snapshot_seconds", "Time the last snapshot took, capture to durable file.",
         snapshots.last_snapshot_seconds),
        ("raftq_snapshot_capture_seconds", "Part of the last snapshot spent on the event loop (the capture).",
         snapshots.last_snapshot_capture_seconds),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge
    for name, doc, value in (
        ("raftq_snapshots_taken", "Snapshots this node wrote of its own state.", snapshots.snapshots_taken_count),
        ("raftq_snapshots_installed", "Snapshots this node installed from a leader.",
         snapshots.snapshots_installed_count),
        ("raftq_snapshot_failures", "Snapshots this node could not write (full or failing disk); it tries again later.",
         snapshots.snapshot_failures_count),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], value)
        yield counter
    if node.snapshot_transfers is not None:
        delivered, failed = node.snapshot_transfers
        transfers = CounterMetricFamily("raftq_snapshot_transfers", "Snapshot transfers this node sent, by result.",
                                        labels=["result"])
        transfers.add_metric(["delivered"], delivered)
        transfers.add_metric(["failed"], failed)
        yield transfers
