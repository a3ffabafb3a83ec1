"""Worker runtime: the loop logic against an in-memory fake of the client's worker calls.

The fake holds jobs the way the server does (ready / leased / done / dead, lease tokens,
retry delays, attempts) so burst runs end on their own. Real-node runs are integration tests.
Every wait here polls or blocks on an event with a deadline; nothing sleeps for a condition.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

import pytest

from raftq import AsyncClient, Client, LeasedJob, errors
from raftq.client.worker import (ERROR_TEXT_BYTES_MAX, LEASE_START_MARGIN_S, PREFETCH_BYTES_MAX, PREFETCH_DEFAULT_MAX,
                           Middleware,
                           NonRetryable, PrometheusMiddleware, Reject, Retry, Worker, error_text, outcome_of)
from raftq.client.worker import loops
from raftq.client.worker.core import Outcome
from tests.unit.client.fakes import DEADLINE_S, AsyncFake, FakeCluster, wait_until

#: The error a job still running past the grace period is failed with (its attempt counts).
ABANDONED = "worker shutting down: the job was still running after the grace period"


def make_worker(cluster, handlers, **options) -> Worker:
    options.setdefault("burst", True)
    options.setdefault("worker_id", "w1")
    options.setdefault("heartbeat_s", 0.05)
    options.setdefault("wait_s", 0.5)
    return Worker(cluster, handlers, **options)


# ---------------------------------------------------------------------------- top-level handlers (process pool)


def square(job):
    return job.payload["n"] ** 2


def explode(job):
    raise ValueError(f"bad n {job.payload['n']}")


def die(job):
    os._exit(3)  # a child killed mid-job (OOM killer, segfault)


def hang(job):
    threading.Event().wait(60)  # stuck until shutdown terminates the child


# ---------------------------------------------------------------------------- the basic loop


def test_burst_processes_and_acks_every_job_with_its_result():
    cluster = FakeCluster()
    ids = [cluster.add("math", {"n": n}) for n in range(10)]
    stats = make_worker(cluster, {"math": square}).run()
    assert sorted(cluster.acks) == sorted((job_id, n * n) for n, job_id in enumerate(ids))
    assert all(cluster.state(job_id) == "done" for job_id in ids)
    assert (stats.processed, stats.succeeded, stats.failed, stats.fetched) == (10, 10, 0, 10)


def test_concurrency_bound_and_fetch_never_asks_past_free_slots():
    cluster = FakeCluster()
    concurrency = 3
    for n in range(9):
        cluster.add("q", {"n": n})
    barrier = threading.Barrier(concurrency, timeout=DEADLINE_S)  # proves `concurrency` jobs do run together
    running, running_max, lock = 0, 0, threading.Lock()

    def handler(job):
        nonlocal running, running_max
        with lock:
            running += 1
            running_max = max(running_max, running)
        barrier.wait()
        with lock:
            running -= 1

    stats = make_worker(cluster, {"q": handler}, concurrency=concurrency, prefetch=0).run()
    assert stats.succeeded == 9
    assert running_max == concurrency
    # Handlers never exceed `concurrency`; leases held also count finished jobs whose ack is in
    # flight, bounded at twice the concurrency (with no prefetch buffer).
    assert cluster.held_max <= 2 * concurrency and stats.inflight_max <= 2 * concurrency
    assert all(max_jobs <= concurrency and max_jobs + held <= 2 * concurrency
               for max_jobs, held in cluster.fetches), cluster.fetches


def test_jobs_finishing_together_are_acked_in_one_request():
    cluster = FakeCluster()
    worker = make_worker(cluster, {"q": square})
    flights = worker._take([LeasedJob(f"j{n}", "q", {"n": n}, 1, n, time.time() + 30) for n in range(3)])
    from raftq.client.worker.core import Outcome as _Outcome

    batch = [(flights[0], _Outcome("ok", result=1)), (flights[1], _Outcome("failed", error="boom")),
             (flights[2], _Outcome("ok", result=None))]
    requests = worker._report_requests(batch)
    assert [(method, items) for method, _, items in requests] == [
        ("ack_many", [("j0", 0, 1), ("j2", 2, None)]),
        ("fail_many", [("j1", 1, "boom", True, None)]),
    ]


def test_empty_queue_in_burst_mode_returns_at_once():
    cluster = FakeCluster()
    stats = make_worker(cluster, {"q": square}, wait_s=20.0).run()
    assert stats.processed == 0 and cluster.fetches == [(4, 0)]


# ---------------------------------------------------------------------------- outcomes


def test_retry_fails_the_job_with_its_delay():
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, max_attempts=5)

    def handler(job):
        raise Retry(delay_s=60, reason="rate limited")

    stats = make_worker(cluster, {"q": handler}).run()
    assert cluster.fails == [(job_id, "retry requested in 60 s: rate limited", True, 60)]
    assert stats.retried == 1 and cluster.state(job_id) == "ready"


def test_retry_without_delay_runs_again_in_the_same_burst():
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, max_attempts=3)
    attempts = []

    def handler(job):
        attempts.append(job.attempt)
        if job.attempt < 3:
            raise Retry(delay_s=0)
        return "third time"

    stats = make_worker(cluster, {"q": handler}).run()
    assert attempts == [1, 2, 3] and cluster.acks == [(job_id, "third time")]
    assert (stats.retried, stats.succeeded) == (2, 1)


def test_exception_fails_the_job_with_message_and_traceback():
    cluster = FakeCluster()
    job_id = cluster.add("q", {"n": 7}, max_attempts=1)
    stats = make_worker(cluster, {"q": explode}).run()
    [(failed_id, error, retry, delay_s)] = cluster.fails
    assert (failed_id, retry, delay_s) == (job_id, True, None)
    assert error.startswith("ValueError: bad n 7\n")
    assert "Traceback (most recent call last)" in error and "in explode" in error
    assert stats.failed == 1 and cluster.state(job_id) == "dead"


@pytest.mark.parametrize("exc", [Reject("no such user"), type("Invalid", (NonRetryable,), {})("bad input")])
def test_reject_and_non_retryable_go_straight_to_the_dead_letter_queue(exc):
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, max_attempts=5)

    def handler(job):
        raise exc

    stats = make_worker(cluster, {"q": handler}).run()
    [(failed_id, error, retry, _)] = cluster.fails
    assert (failed_id, retry) == (job_id, False) and str(exc) in error
    assert stats.rejected == 1 and cluster.state(job_id) == "dead"


def test_unserialisable_or_huge_result_is_dropped_and_the_job_still_acked(caplog):
    cluster = FakeCluster()
    first, second = cluster.add("q", {"kind": "object"}), cluster.add("q", {"kind": "huge"})

    def handler(job):
        return object() if job.payload["kind"] == "object" else "x" * (100 << 10)

    with caplog.at_level(logging.WARNING, logger="raftq.worker"):
        make_worker(cluster, {"q": handler}).run()
    assert sorted(cluster.acks) == [(first, None), (second, None)]
    assert caplog.text.count("result dropped") == 2


def test_error_text_is_bounded_and_keeps_head_and_tail():
    try:
        raise RuntimeError("head-marker " + "x" * 20_000 + " tail-marker")
    except RuntimeError as exc:
        text = error_text(exc)
    assert len(text.encode()) <= ERROR_TEXT_BYTES_MAX
    assert text.startswith("RuntimeError: head-marker") and text.rstrip().endswith("tail-marker")
    assert "bytes cut" in text


def test_outcome_labels():
    assert [outcome_of(e) for e in (None, Retry(), Reject("x"), KeyError("k"))] == ["ok", "retried", "rejected",
                                                                                   "failed"]
    with pytest.raises(ValueError):
        Retry(delay_s=-1)


# ---------------------------------------------------------------------------- heartbeats, leases


def test_heartbeat_names_the_jobs_in_flight():
    cluster = FakeCluster()
    job_id = cluster.add("q", {})
    seen = threading.Event()
    cluster.on_heartbeat = lambda ids: seen.set() if job_id in ids else None

    def handler(job):
        assert seen.wait(DEADLINE_S), "no heartbeat named the running job"

    stats = make_worker(cluster, {"q": handler}, heartbeat_s=0.02).run()
    assert stats.succeeded == 1 and [job_id] in cluster.heartbeats


def test_long_job_gets_its_lease_extended():
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, lease_s=1.0)
    extended = threading.Event()
    cluster.on_extend = lambda items: extended.set()

    def handler(job):
        assert extended.wait(DEADLINE_S), "the lease was never extended"
        return "done"

    # Heartbeats are rare here: the extension must come from the lease clock, at about half the lease.
    stats = make_worker(cluster, {"q": handler}, heartbeat_s=30.0).run()
    assert stats.succeeded == 1 and cluster.acks == [(job_id, "done")]
    assert cluster.extends[0] == (job_id, 1, 1.0)


def test_job_reported_lost_is_noted_and_its_refused_ack_handled_calmly(caplog):
    cluster = FakeCluster()
    job_id = cluster.add("q", {})
    worker = make_worker(cluster, {"q": lambda job: None}, heartbeat_s=0.02)

    def handler(job):
        cluster.steal(job.id)  # as if the lease had expired and another worker took the job
        wait_until(lambda: worker.stats.lost == 1, "a heartbeat to report the job lost")

    worker.handlers["q"] = handler
    with caplog.at_level(logging.WARNING, logger="raftq.worker"):
        stats = worker.run()
    assert cluster.acks == [] and (stats.succeeded, stats.lost) == (1, 1)  # counted once, not again at the ack
    assert "no longer holds it" in caplog.text and f"ack of job {job_id} refused" in caplog.text


# ---------------------------------------------------------------------------- shutdown


def run_in_thread(worker: Worker) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["stats"] = worker.run()
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_graceful_shutdown_hands_back_jobs_still_running_after_grace():
    cluster = FakeCluster()
    slow, fast = cluster.add("q", {"slow": True}, max_attempts=5), cluster.add("q", {"slow": False})
    release, started = threading.Event(), threading.Semaphore(0)

    def handler(job):
        started.release()
        if job.payload["slow"]:
            release.wait(DEADLINE_S)
        return "finished"

    worker = make_worker(cluster, {"q": handler}, burst=False, concurrency=2, grace_s=0.2)
    thread, box = run_in_thread(worker)
    try:
        for _ in range(2):
            assert started.acquire(timeout=DEADLINE_S)
        wait_until(lambda: cluster.acks, "the fast job's ack")
        worker.stop()
        thread.join(DEADLINE_S)
        assert not thread.is_alive() and "error" not in box
    finally:
        release.set()
    assert cluster.acks == [(fast, "finished")]
    assert cluster.fails == [(slow, ABANDONED, True, 0.0)]
    assert cluster.state(slow) == "ready" and box["stats"].released == 1


def test_shutdown_does_not_lease_again_the_jobs_it_hands_back():
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, max_attempts=5)
    started, release = threading.Event(), threading.Event()

    def handler(job):
        started.set()
        release.wait(DEADLINE_S)

    # A free slot keeps a long poll out while the job runs; the job, handed back ready at once,
    # must not come back to this worker through that poll.
    worker = make_worker(cluster, {"q": handler}, burst=False, concurrency=2, grace_s=0.05, wait_s=0.3)
    thread, box = run_in_thread(worker)
    try:
        assert started.wait(DEADLINE_S)
        wait_until(lambda: cluster.polling == 1, "the fetcher's long poll")
        worker.stop()
        thread.join(DEADLINE_S)
    finally:
        release.set()
    assert cluster.fails == [(job_id, ABANDONED, True, 0.0)]
    assert box["stats"].released == 1 and cluster.state(job_id) == "ready"


def test_jobs_that_finish_within_grace_are_acked_not_handed_back():
    cluster = FakeCluster()
    job_id = cluster.add("q", {})
    started, release = threading.Event(), threading.Event()

    def handler(job):
        started.set()
        assert release.wait(DEADLINE_S)
        return 1

    worker = make_worker(cluster, {"q": handler}, burst=False, grace_s=DEADLINE_S)
    thread, box = run_in_thread(worker)
    assert started.wait(DEADLINE_S)
    worker.stop()
    release.set()
    thread.join(DEADLINE_S)
    assert cluster.acks == [(job_id, 1)] and cluster.fails == [] and box["stats"].released == 0


def test_first_signal_stops_gracefully_second_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    worker = make_worker(FakeCluster(), {"q": square})
    worker._on_signal(signal.SIGTERM)
    assert worker.stopping and exits == []
    worker._on_signal(signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def test_sigterm_under_run_stops_the_worker():
    cluster = FakeCluster()
    cluster.add("q", {})
    started = threading.Event()

    def handler(job):
        started.set()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, where run() installed its handler
        return "ok"

    before = signal.getsignal(signal.SIGTERM)
    stats = make_worker(cluster, {"q": handler}, burst=False, wait_s=0.05).run()
    assert started.is_set() and stats.succeeded == 1
    assert signal.getsignal(signal.SIGTERM) is before  # run() puts the previous handler back


# ---------------------------------------------------------------------------- through the real client, over HTTP


def test_worker_through_the_real_client_over_http(api):
    cluster = api.cluster
    ok, later, broken = cluster.add("q", {"do": "ok"}), cluster.add("q", {"do": "retry"}, max_attempts=5), \
        cluster.add("q", {"do": "raise"})
    long_one = cluster.add("q", {"do": "long"}, lease_s=1.0)
    extended = threading.Event()
    cluster.on_extend = lambda items: extended.set()

    def handler(job):
        if job.payload["do"] == "retry":
            raise Retry(delay_s=60)
        if job.payload["do"] == "raise":
            raise KeyError("missing")
        if job.payload["do"] == "long":
            assert extended.wait(DEADLINE_S), "the lease was never extended"
        return {"id": job.id, "attempt": job.attempt}

    with Client(api.url, timeout=5.0, deadline=5.0) as client:
        stats = make_worker(client, {"q": handler}).run()
    assert sorted(cluster.acks) == sorted([(ok, {"id": ok, "attempt": 1}), (long_one, {"id": long_one, "attempt": 1})])
    assert {job_id: (retry, delay_s) for job_id, _, retry, delay_s in cluster.fails} == \
        {later: (True, 60), broken: (True, None)}
    assert "KeyError: 'missing'" in next(error for job_id, error, _, _ in cluster.fails if job_id == broken)
    assert (stats.succeeded, stats.retried, stats.failed) == (2, 1, 1) and cluster.extends[0][0] == long_one
    assert any(long_one in ids for ids in cluster.heartbeats)


def test_refused_ack_over_http_is_dropped_calmly(api):
    cluster = api.cluster
    job_id = cluster.add("q", {})

    def handler(job):
        cluster.steal(job.id)

    with Client(api.url, timeout=5.0, deadline=5.0) as client:
        stats = make_worker(client, {"q": handler}, heartbeat_s=30.0).run()
    assert cluster.acks == [] and cluster.state(job_id) == "leased" and (stats.succeeded, stats.lost) == (1, 1)


async def test_asyncio_pool_through_the_real_async_client_over_http(api):
    cluster = api.cluster
    ids = [cluster.add("q", {"n": n}) for n in range(5)]

    async def handler(job):
        await asyncio.sleep(0)
        return job.payload["n"] * 10

    async with AsyncClient(api.url, timeout=5.0, deadline=5.0) as client:
        stats = await make_worker(client, {"q": handler}, pool="asyncio", concurrency=2, prefetch=0).arun()
    assert sorted(cluster.acks) == sorted((job_id, n * 10) for n, job_id in enumerate(ids))
    assert stats.succeeded == 5 and cluster.held_max <= 2


# ---------------------------------------------------------------------------- riding through errors


def test_transient_fetch_and_ack_errors_are_retried():
    cluster = FakeCluster()
    job_id = cluster.add("q", {"n": 3})
    cluster.fetch_errors = [errors.ConnectError("connection refused"), errors.Unavailable("no leader", status=503)]
    cluster.ack_errors = [errors.Timeout("timed out")]
    stats = make_worker(cluster, {"q": square}).run()
    assert cluster.acks == [(job_id, 9)] and stats.succeeded == 1


def test_refused_request_stops_the_worker_with_that_error():
    cluster = FakeCluster()
    cluster.fetch_errors = [errors.Unauthorized("bad token", status=401)]
    with pytest.raises(errors.Unauthorized):
        make_worker(cluster, {"q": square}).run()


def test_a_bug_in_a_worker_loop_stops_the_worker_instead_of_hanging_it():
    cluster = FakeCluster()

    def broken_heartbeat(worker, job_ids):
        raise RuntimeError("bug in the heartbeat path")

    cluster.heartbeat = broken_heartbeat
    with pytest.raises(RuntimeError, match="bug in the heartbeat path"):
        make_worker(cluster, {"q": square}, burst=False).run()


# ---------------------------------------------------------------------------- pools


def test_asyncio_pool_runs_async_handlers():
    cluster = FakeCluster()
    ids = [cluster.add("q", {"n": n}) for n in range(6)]
    running, running_max = 0, 0

    async def handler(job):
        nonlocal running, running_max
        running += 1
        running_max = max(running_max, running)
        await asyncio.sleep(0)  # a yield, so that jobs interleave
        running -= 1
        return job.payload["n"] + 1

    stats = make_worker(AsyncFake(cluster), {"q": handler}, pool="asyncio", concurrency=3, prefetch=0).run()
    assert sorted(cluster.acks) == sorted((job_id, n + 1) for n, job_id in enumerate(ids))
    assert stats.succeeded == 6 and running_max <= 3 and cluster.held_max <= 3


async def test_asyncio_pool_arun_inside_a_loop_and_grace():
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, max_attempts=3)
    started = asyncio.Event()

    async def handler(job):
        started.set()
        await asyncio.Event().wait()  # never finishes on its own

    worker = make_worker(AsyncFake(cluster), {"q": handler}, pool="asyncio", burst=False, grace_s=0.1)
    task = asyncio.create_task(worker.arun())
    await asyncio.wait_for(started.wait(), DEADLINE_S)
    worker.stop()
    stats = await asyncio.wait_for(task, DEADLINE_S)
    assert cluster.fails == [(job_id, ABANDONED, True, 0.0)] and stats.released == 1


def test_processes_pool_runs_top_level_functions():
    cluster = FakeCluster()
    ok = [cluster.add("math", {"n": n}) for n in range(4)]
    bad = cluster.add("bad", {"n": 1})
    stats = make_worker(cluster, {"math": square, "bad": explode}, pool="processes", concurrency=2).run()
    assert sorted(cluster.acks) == sorted((job_id, n * n) for n, job_id in enumerate(ok))
    [(failed_id, error, retry, _)] = cluster.fails
    assert failed_id == bad and "ValueError: bad n 1" in error and "in explode" in error  # the child's traceback
    assert stats.succeeded == 4 and stats.failed == 1


def test_processes_pool_survives_a_dying_child():
    cluster = FakeCluster()
    dead = cluster.add("die", {})
    ok = [cluster.add("math", {"n": n}, max_attempts=3) for n in range(3)]
    stats = make_worker(cluster, {"math": square, "die": die}, pool="processes", concurrency=1).run()
    assert sorted(cluster.acks) == sorted((job_id, n * n) for n, job_id in enumerate(ok))
    assert [(job_id, "PoolProcessDied" in error and "exited with code 3" in error) for job_id, error, _, _ in cluster.fails if job_id == dead] == \
        [(dead, True)]
    assert stats.succeeded == 3


def test_processes_pool_shutdown_terminates_a_stuck_child():
    cluster = FakeCluster()
    job_id = cluster.add("q", {}, max_attempts=3)
    worker = make_worker(cluster, {"q": hang}, pool="processes", concurrency=1, burst=False, grace_s=0.1)
    thread, box = run_in_thread(worker)
    wait_until(lambda: worker.inflight_ids() == [job_id], "the job to start")
    worker.stop()
    thread.join(DEADLINE_S)
    assert not thread.is_alive() and box["stats"].released == 1
    assert cluster.fails == [(job_id, ABANDONED, True, 0.0)]


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_worker_time_limits_apply_to_plain_handlers(pool):
    # pool="processes" is covered against a real node (tests/integration/test_worker_pools.py).
    cluster = FakeCluster()
    soft = cluster.add("q", {"limit": "soft"}, max_attempts=1)
    hard = cluster.add("q", {"limit": "hard"}, max_attempts=1)

    def spins_until_told(job):
        try:
            while True:
                time.sleep(0.005)
        except Exception:
            if job.payload["limit"] == "soft":
                raise
            while True:  # caught the soft limit and went on: the hard one follows
                time.sleep(0.005)

    client = AsyncFake(cluster) if pool == "asyncio" else cluster
    make_worker(client, {"q": spins_until_told}, pool=pool, concurrency=2, soft_time_limit=0.1,
                time_limit=0.4).run()
    errors_by_id = {job_id: error for job_id, error, retry, _ in cluster.fails}
    assert errors_by_id[soft].startswith("SoftTimeLimitExceeded: soft time limit of 0.1 s exceeded"), errors_by_id
    assert errors_by_id[hard].startswith("TimeLimitExceeded: hard time limit of 0.4 s exceeded"), errors_by_id


def test_options_are_checked():
    cluster = FakeCluster()
    with pytest.raises(ValueError, match="pool"):
        Worker(cluster, {"q": square}, pool="gevent")
    with pytest.raises(ValueError, match="no handler"):
        Worker(cluster, {"q": square}, queues=["q", "other"])
    with pytest.raises(ValueError, match="pickle"):
        Worker(cluster, {"q": lambda job: None}, pool="processes")
    with pytest.raises(ValueError, match="concurrency"):
        Worker(cluster, {"q": square}, concurrency=0)
    with pytest.raises(ValueError, match="time_limit must be a positive number"):
        Worker(cluster, {"q": square}, time_limit=-1)


# ---------------------------------------------------------------------------- middleware


class Recorder(Middleware):
    def __init__(self):
        self.events = []

    def before_process(self, worker, job):
        self.events.append(("before", job.id))

    def after_process(self, worker, job, result, exc):
        self.events.append(("after", job.id, result, outcome_of(exc)))

    def on_shutdown(self, worker):
        self.events.append(("shutdown",))


class Broken(Middleware):
    def before_fetch(self, worker):
        raise RuntimeError("metrics backend down")


def test_middleware_hooks_run_and_a_broken_one_is_ignored():
    cluster = FakeCluster()
    job_id = cluster.add("q", {"n": 2})
    recorder = Recorder()
    make_worker(cluster, {"q": square}, middleware=[Broken(), recorder]).run()
    assert recorder.events == [("before", job_id), ("after", job_id, 4, "ok"), ("shutdown",)]


def test_prometheus_middleware_counts_outcomes():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    cluster = FakeCluster()
    cluster.add("math", {"n": 1})
    cluster.add("bad", {"n": 1})
    make_worker(cluster, {"math": square, "bad": explode}, middleware=[PrometheusMiddleware(registry)]).run()
    value = registry.get_sample_value
    assert value("raftq_worker_jobs_processed_total", {"queue": "math", "outcome": "ok"}) == 1
    assert value("raftq_worker_jobs_processed_total", {"queue": "bad", "outcome": "failed"}) == 1
    assert value("raftq_worker_job_duration_seconds_count", {"queue": "math"}) == 1


def test_heartbeat_names_only_buffered_and_running_jobs():
    """A finished job whose ack is in flight is left out, so the server cannot call it lost."""
    from types import SimpleNamespace

    from raftq.client.worker.core import BUFFERED, REPORTING, RUNNING, Flight as _Flight

    worker = Worker(object(), {"q": lambda job: None})
    running = _Flight(job=SimpleNamespace(id="running"), lease_s=30.0, extend_at=0.0, state=RUNNING)
    buffered = _Flight(job=SimpleNamespace(id="buffered"), lease_s=30.0, extend_at=0.0, state=BUFFERED)
    acking = _Flight(job=SimpleNamespace(id="acking"), lease_s=30.0, extend_at=0.0, state=REPORTING)
    gone = _Flight(job=SimpleNamespace(id="gone"), lease_s=30.0, extend_at=0.0, state=RUNNING, lost=True)
    worker.core.flights.update({"running": running, "buffered": buffered, "acking": acking, "gone": gone})
    assert worker._heartbeat_ids() == ["running", "buffered"]


# ---------------------------------------------------------------------------- prefetch buffer


def pool_client(cluster: FakeCluster, pool: str) -> Any:
    return AsyncFake(cluster) if pool == "asyncio" else cluster


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_prefetch_holds_concurrency_plus_prefetch_leases_and_no_more(pool):
    cluster = FakeCluster()
    ids = [cluster.add("q", {"n": n}) for n in range(20)]
    release = threading.Event()

    def handler(job):
        assert release.wait(DEADLINE_S)
        return job.payload["n"]

    worker = make_worker(pool_client(cluster, pool), {"q": handler}, pool=pool, concurrency=2, prefetch=3)
    thread, box = run_in_thread(worker)
    try:
        wait_until(lambda: cluster.held("w1") == 5 and worker._running_count() == 2 and worker._fetch_waiting,
                   "2 running + 3 buffered, and the fetcher waiting for room")
        assert cluster.held_max == 5
        wait_until(lambda: any(len(ids) == 5 for ids in cluster.heartbeats), "a heartbeat naming all five")
    finally:
        release.set()
    thread.join(DEADLINE_S)
    assert "error" not in box and box["stats"].succeeded == 20
    assert sorted(cluster.acks) == sorted((job_id, n) for n, job_id in enumerate(ids))
    # Finished jobs whose ack is on its way hold their leases too: at most as many again.
    assert cluster.held_max <= 2 * (2 + 3) and all(max_jobs + held <= 2 * (2 + 3) for max_jobs, held in cluster.fetches)


def test_short_jobs_come_many_per_fetch_and_go_many_per_ack():
    cluster = FakeCluster()
    ids = [cluster.add("q", {"n": n}) for n in range(300)]
    stats = make_worker(cluster, {"q": square}, concurrency=2, prefetch="auto").run()
    assert sorted(cluster.acks) == sorted((job_id, n * n) for n, job_id in enumerate(ids))
    assert (stats.fetched, stats.succeeded, stats.lost, stats.dropped) == (300, 300, 0, 0)
    # The first fetch asks for free slots only (no handler has run yet to pace the buffer by).
    assert cluster.fetches[0] == (2, 0) and max(max_jobs for max_jobs, _ in cluster.fetches) > 100
    assert len(cluster.fetches) < 20 and len(cluster.ack_calls) < 100


def test_auto_prefetch_buffers_little_of_long_jobs():
    cluster = FakeCluster()
    for _ in range(6):
        cluster.add("q", {})

    def handler(job):
        time.sleep(0.08)  # a long job, as the buffer's pacing sees it (0.1 s of work per slot)

    stats = make_worker(cluster, {"q": handler}, concurrency=1, prefetch="auto").run()
    assert stats.succeeded == 6
    assert Worker(cluster, {"q": handler}, concurrency=1).prefetch == PREFETCH_DEFAULT_MAX  # SPEC: on by default;
    assert Worker(cluster, {"q": handler}, concurrency=1, prefetch=0).prefetch == 0  # off on request; the bound...
    # ... paced to one: running + buffered <= 2 (plus as many whose ack may be on its way).
    assert all(max_jobs <= 2 and max_jobs + held <= 4 for max_jobs, held in cluster.fetches), cluster.fetches


def test_a_fetch_whose_room_is_gone_by_the_time_it_is_sized_waits_again():
    """The paced buffer's bound shrinks when a slot reports a long run time. Between the fetcher's
    wait (room for jobs) and its sizing under the lock a slot may do just that, so that the
    buffer holds more than the new bound: the fetcher must wait again, not ask for max_jobs < 1
    (the server refuses it, and a refusal stops the worker: seen in `raftq bench`, 16 threads
    of CPU jobs)."""
    worker = make_worker(FakeCluster(), {"q": square}, concurrency=4, prefetch="auto")
    core = worker.core
    (fast,) = worker._take([LeasedJob("j0", "q", {"n": 0}, 1, 0, time.time() + 30)])
    with worker._lock:  # 1 ms jobs: a big buffer
        assert core.start(fast, 0.0) and core.finish(fast, Outcome("ok"), 0.001)
    worker._take([LeasedJob(f"b{n}", "q", {"n": n}, 1, 100 + n, time.time() + 30) for n in range(20)])
    steps = loops.fetch_loop(worker, deliver=lambda jobs: pytest.fail(f"fetched {jobs}"))
    assert isinstance(next(steps), loops.Sleep)
    wait = steps.send(None)
    assert isinstance(wait, loops.WaitFor) and wait.predicate(), "room for more, as the wait sees it"
    core.run_s_average = 5.0  # meanwhile a slot finished a 5 s job: the bound drops to nothing
    assert core.fetch_size() < 1
    after = steps.send(None)
    assert not isinstance(after, loops.Call), f"expected the fetcher to wait again, it sent {after}"
    assert isinstance(after, loops.Sleep) and isinstance(steps.send(None), loops.WaitFor)


def test_auto_prefetch_is_bounded_in_bytes():
    cluster = FakeCluster()
    big = "x" * (1 << 20)  # 1 MiB payloads: PREFETCH_BYTES_MAX holds 16 of them, not 256
    for _ in range(60):
        cluster.add("q", big)
    stats = make_worker(cluster, {"q": lambda job: None}, concurrency=2).run()
    assert stats.succeeded == 60
    bound = PREFETCH_BYTES_MAX // len(big)
    assert max(max_jobs for max_jobs, _ in cluster.fetches) <= 2 + bound, cluster.fetches


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_a_buffered_job_whose_lease_runs_out_is_dropped_not_run(pool, caplog):
    cluster = FakeCluster()
    first = cluster.add("q", {"first": True}, lease_s=1.0)
    rest = [cluster.add("q", {"first": False}, lease_s=1.0) for _ in range(2)]
    cluster.extend_error = errors.ConnectError("cluster unreachable")  # so no lease can be extended
    started = []

    def handler(job):
        started.append((job.id, job.lease_expires_at - time.time()))
        if job.payload["first"]:
            time.sleep(0.9)  # a slow job: the buffered ones' leases run out meanwhile

    worker = make_worker(pool_client(cluster, pool), {"q": handler}, pool=pool, concurrency=1, prefetch=2)
    with caplog.at_level(logging.WARNING, logger="raftq.worker"):
        stats = worker.run()
    assert [job_id for job_id, _ in started] == [first]
    assert all(left_s >= LEASE_START_MARGIN_S for _, left_s in started)
    assert (stats.succeeded, stats.dropped, stats.released) == (1, 2, 0)
    assert [cluster.state(job_id) for job_id in rest] == ["leased", "leased"]  # the server requeues them on expiry
    assert all(f"job {job_id}: not started" in caplog.text for job_id in rest)


def test_a_buffered_job_the_server_calls_lost_is_dropped_not_run():
    cluster = FakeCluster()
    first, second = cluster.add("q", {"first": True}), cluster.add("q", {"first": False})
    worker = make_worker(cluster, {"q": square}, concurrency=1, prefetch=1, heartbeat_s=0.02)
    ran = []

    def handler(job):
        ran.append(job.id)
        if job.payload["first"]:
            cluster.steal(second)  # its lease moved on while it waited in the buffer
            wait_until(lambda: worker.stats.dropped == 1, "a heartbeat to report the buffered job lost")

    worker.handlers["q"] = handler
    stats = worker.run()
    assert ran == [first] and cluster.acks == [(first, None)]
    assert (stats.succeeded, stats.lost, stats.dropped) == (1, 1, 1)


def test_buffered_jobs_keep_their_leases_while_they_wait():
    cluster = FakeCluster()
    ids = [cluster.add("q", {}, lease_s=1.0) for _ in range(3)]

    def handler(job):
        time.sleep(0.6)  # the third job waits 1.2 s in the buffer: longer than its first lease

    stats = make_worker(cluster, {"q": handler}, concurrency=1, prefetch=2, heartbeat_s=30.0).run()
    assert (stats.succeeded, stats.dropped, stats.lost) == (3, 0, 0)
    assert sorted(job_id for job_id, _ in cluster.acks) == sorted(ids)
    assert ids[2] in [job_id for job_id, _, _ in cluster.extends]


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_stop_hands_buffered_jobs_back_at_once_and_lets_the_running_one_finish(pool):
    cluster = FakeCluster()
    ids = [cluster.add("q", {"n": n}, max_attempts=5) for n in range(5)]
    started, release = threading.Event(), threading.Event()

    def handler(job):
        started.set()
        assert release.wait(DEADLINE_S)
        return job.payload["n"]

    worker = make_worker(pool_client(cluster, pool), {"q": handler}, pool=pool, burst=False, concurrency=1,
                         prefetch=4, grace_s=DEADLINE_S)
    thread, box = run_in_thread(worker)
    try:
        assert started.wait(DEADLINE_S)
        wait_until(lambda: cluster.held("w1") == 5, "1 running + 4 buffered")
        worker.stop()
        wait_until(lambda: len(cluster.releases) == 4, "the buffered jobs handed back", timeout_s=2.0)
        assert thread.is_alive() and cluster.acks == []  # the running job has the rest of its grace
    finally:
        release.set()
    thread.join(DEADLINE_S)
    assert not thread.is_alive() and "error" not in box
    [(running_id, _)] = cluster.acks
    handed_back = sorted(set(ids) - {running_id})
    assert sorted(cluster.releases) == handed_back and cluster.fails == []  # released: no attempt counted
    assert [(cluster.state(job_id), cluster.jobs[job_id].attempts) for job_id in handed_back] == [("ready", 0)] * 4
    assert (box["stats"].released, box["stats"].succeeded) == (4, 1)


# ---------------------------------------------------------------------------- batched outcomes


def test_outcomes_that_finish_close_together_share_requests_and_all_count():
    cluster = FakeCluster()
    ok = [cluster.add("q", {"n": n}) for n in range(200)]
    bad = [cluster.add("q", {"n": -1}) for _ in range(20)]

    def handler(job):
        if job.payload["n"] < 0:
            raise ValueError("negative")
        return job.payload["n"]

    stats = make_worker(cluster, {"q": handler}, concurrency=4, ack_batch_max=50).run()
    assert sorted(cluster.acks) == sorted((job_id, n) for n, job_id in enumerate(ok))
    assert sorted(job_id for job_id, *_ in cluster.fails) == sorted(bad)
    assert (stats.succeeded, stats.failed, stats.processed, stats.lost) == (200, 20, 220, 0)
    assert max(cluster.ack_calls) <= 50 and len(cluster.ack_calls) < 50


def test_a_lone_outcome_goes_out_without_waiting_for_the_linger():
    cluster = FakeCluster()
    job_id = cluster.add("q", {"n": 2})
    finished_at, acked_at = [], []
    ack_many = cluster.ack_many

    def timed_ack_many(worker, items):
        acked_at.append(time.monotonic())
        return ack_many(worker, items)

    def handler(job):
        finished_at.append(time.monotonic())
        return 4

    cluster.ack_many = timed_ack_many
    make_worker(cluster, {"q": handler}, ack_linger_s=1.0).run()
    assert cluster.acks == [(job_id, 4)]
    assert acked_at[0] - finished_at[0] < 0.5  # no handler running: nothing else is coming to wait for


def test_the_linger_gathers_outcomes_finishing_close_together():
    cluster = FakeCluster()
    cluster.add("q", {"first": True})
    cluster.add("q", {"first": False})
    first_done = threading.Event()

    def handler(job):
        if job.payload["first"]:
            first_done.set()
        else:
            assert first_done.wait(DEADLINE_S)

    stats = make_worker(cluster, {"q": handler}, concurrency=2, ack_linger_s=1.0).run()
    assert stats.succeeded == 2 and cluster.ack_calls == [2]


def test_a_refused_ack_in_a_batch_counts_for_that_job_alone(caplog):
    cluster = FakeCluster()
    ids = [cluster.add("q", {"n": n}) for n in range(3)]
    together = threading.Barrier(3, timeout=DEADLINE_S)

    def handler(job):
        together.wait()
        if job.payload["n"] == 1:
            cluster.steal(job.id)  # as if its lease had expired and another worker took it

    with caplog.at_level(logging.WARNING, logger="raftq.worker"):
        stats = make_worker(cluster, {"q": handler}, concurrency=3, heartbeat_s=30.0, ack_linger_s=1.0).run()
    assert cluster.ack_calls == [3] and sorted(job_id for job_id, _ in cluster.acks) == [ids[0], ids[2]]
    assert (stats.succeeded, stats.lost) == (3, 1)
    assert f"ack of job {ids[1]} refused" in caplog.text and caplog.text.count(" refused ") == 1


def test_report_requests_stay_within_the_body_bound():
    from raftq.client.worker.core import REPORT_BYTES_MAX, Outcome as _Outcome

    worker = make_worker(FakeCluster(), {"q": square})
    flights = worker._take([LeasedJob(f"j{n}", "q", {}, 1, n, time.time() + 30) for n in range(100)])
    size = 60 << 10  # results near the 64 KiB bound: 100 of them would pass the server's 8 MiB body bound
    requests = worker._report_requests([(f, _Outcome("ok", result="x", size_bytes=size)) for f in flights])
    counts = [len(items) for method, _, items in requests if method == "ack_many"]
    assert sum(counts) == 100 and len(counts) == 2 and all(n * size <= REPORT_BYTES_MAX for n in counts)


def test_prefetch_and_ack_options_are_checked():
    cluster = FakeCluster()
    assert Worker(cluster, {"q": square}, concurrency=900, prefetch="auto").prefetch == 100  # concurrency + prefetch <= 1000
    for options, match in [({"prefetch": -1}, "prefetch"), ({"concurrency": 10, "prefetch": 991}, "prefetch"),
                           ({"ack_batch_max": 0}, "ack_batch_max"), ({"ack_batch_max": 1001}, "ack_batch_max"),
                           ({"ack_linger_s": -0.1}, "ack_linger_s"), ({"ack_linger_s": 5.0}, "ack_linger_s")]:
        with pytest.raises(ValueError, match=match):
            Worker(cluster, {"q": square}, **options)


def test_a_job_counts_as_done_only_once_its_ack_is_answered():
    cluster = FakeCluster()
    job_id = cluster.add("q", {"n": 3})
    ack_sent, answer = threading.Event(), threading.Event()
    ack_many = cluster.ack_many

    def slow_ack_many(worker, items):
        ack_sent.set()
        assert answer.wait(DEADLINE_S)
        return ack_many(worker, items)

    cluster.ack_many = slow_ack_many
    worker = make_worker(cluster, {"q": square})
    thread, box = run_in_thread(worker)
    try:
        assert ack_sent.wait(DEADLINE_S)
        assert (worker.stats.succeeded, worker.stats.processed, worker.inflight_ids()) == (0, 0, [job_id])
    finally:
        answer.set()
    thread.join(DEADLINE_S)
    assert box["stats"].succeeded == 1 and cluster.acks == [(job_id, 9)] and worker.inflight_ids() == []
