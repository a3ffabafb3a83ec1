"""Worker runtime against real nodes: retries with backoff into the DLQ, redrive, worker loss, the
prefetch buffer (bounds, leases, hand-back at stop) and batched acks."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time

import pytest

from raftq import Client, Worker, errors
from raftq.client.worker import LEASE_START_MARGIN_S
from raftq.cluster.localcluster import wait_until

MAX_ATTEMPTS = 4
BACKOFF_BASE_S = 1.0  # the default policy: base 1 s, x2 per attempt, full jitter
#: The leader promotes due jobs on its housekeeping beat; allow for it and a loaded machine.
PROMOTION_SLACK_S = 1.0


def always_fails(job):
    raise RuntimeError(f"boom on attempt {job.attempt}")


def test_always_failing_handler_backs_off_then_dead_letters_then_redrive(single_node):
    with Client(single_node.urls) as client:
        job_id = client.submit("flaky", {"n": 1}, max_attempts=MAX_ATTEMPTS)
        worker = Worker(client, {"flaky": always_fails}, concurrency=2, wait_s=0.5, heartbeat_s=0.5)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            record = wait_until(lambda: _dead(client, job_id), timeout_s=60, what="the job to be dead-lettered",
                                seen=lambda: client.get(job_id)["state"])
        finally:
            worker.stop()
            thread.join(timeout=30)
        assert record["attempts"] == MAX_ATTEMPTS
        assert "boom on attempt 4" in record["last_error"]
        # Each failure -> retry_wait, then ready when due: the wait is within [0, base * 2^(n-1)].
        transitions = record["transitions"]
        waits = []
        for (state, at), (next_state, next_at) in zip(transitions, transitions[1:]):
            if state == "retry_wait" and next_state == "ready":
                waits.append(next_at - at)
        assert len(waits) == MAX_ATTEMPTS - 1, transitions
        for n, waited in enumerate(waits, start=1):
            bound = BACKOFF_BASE_S * 2 ** (n - 1)
            assert 0 <= waited <= bound + PROMOTION_SLACK_S, f"retry {n} waited {waited:.3f}s, bound {bound}s"
        (dead,) = [j for j in client.dead("flaky") if j["id"] == job_id]
        assert dead["attempts"] == MAX_ATTEMPTS and "boom" in dead["last_error"]
        assert client.redrive("flaky") == 1
        after = client.get(job_id)
        assert after["state"] == "ready" and after["attempts"] == 0
        assert client.dead("flaky") == []


def _dead(client: Client, job_id: str) -> dict | None:
    record = client.get(job_id)
    return record if record["state"] == "dead" else None


def test_killed_worker_jobs_are_requeued_after_heartbeat_timeout(single_node):
    """The fixture's nodes declare a worker lost after 2 s without heartbeats."""
    with Client(single_node.urls) as client:
        ids = [client.submit("stall", {"task": "tests.integration.worker_apps.stall", "args": [n], "kwargs": {}},
                             lease_s=3600) for n in range(3)]
        env = {**os.environ, "RAFTQ_NODES": ",".join(single_node.urls)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "raftq.client.cli", "--nodes", ",".join(single_node.urls), "worker",
             "tests.integration.worker_apps:app", "--concurrency", "3"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: all(client.get(i)["state"] == "leased" for i in ids), timeout_s=30,
                       what="the worker to lease all three jobs", seen=lambda: [client.get(i)["state"] for i in ids])
            worker.kill()
            worker.wait(timeout=10)
            # The lease is an hour long: only the heartbeat monitor can requeue these jobs.
            states = wait_until(
                lambda: all(client.get(i)["state"] in ("retry_wait", "ready") for i in ids),
                timeout_s=30, what="the lost worker's jobs to be requeued",
                seen=lambda: [client.get(i)["state"] for i in ids])
            assert states
            for job_id in ids:
                record = client.get(job_id)
                assert record["attempts"] == 1
                assert "lost" in record["last_error"]
        finally:
            if worker.poll() is None:
                worker.kill()


# ---------------------------------------------------------------------------- prefetch buffer, batched acks


class Recording:
    """Wraps a worker's Client: counts accepted and refused acks per job and the ack requests, and
    (extends_fail=True) refuses every extend as if the cluster had stopped answering them."""

    def __init__(self, client: Client, *, extends_fail: bool = False) -> None:
        self.client = client
        self.extends_fail = extends_fail
        self.accepted: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.ack_requests = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.client, name)

    def ack_many(self, worker, items):
        results = self.client.ack_many(worker, items)
        with self.lock:
            self.ack_requests += 1
            for (job_id, *_), result in zip(items, results):
                (self.accepted if result is None else self.refused)[job_id] += 1
        return results

    def extend_many(self, worker, items):
        if self.extends_fail:
            raise errors.ConnectError("the test drops every extend")
        return self.client.extend_many(worker, items)


def _start(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _states(client: Client, ids) -> list[str]:
    return [client.get(job_id)["state"] for job_id in ids]


def _held_by(client: Client, worker_id: str) -> list[str]:
    return next((row["jobs"] for row in client.workers() if row["worker"] == worker_id), [])


def test_prefetch_holds_at_most_concurrency_plus_prefetch_leases(single_node):
    with Client(single_node.urls) as client:
        ids = client.submit_many("pf", [{"n": n} for n in range(30)])
        release = threading.Event()

        def handler(job):
            assert release.wait(60)
            return job.payload["n"]

        worker = Worker(client, {"pf": handler}, concurrency=2, prefetch=3, wait_s=0.5, heartbeat_s=0.5,
                        worker_id="pf-holder")
        thread = _start(worker)
        try:
            wait_until(lambda: len(_held_by(client, "pf-holder")) == 5, timeout_s=30,
                       what="2 running + 3 buffered leases", seen=lambda: _held_by(client, "pf-holder"))
            # Handlers blocked: the server sees exactly concurrency + prefetch leases, again and again.
            samples = [len(_held_by(client, "pf-holder")) for _ in range(20)]
            assert samples == [5] * 20
            assert client.queues()["pf"]["leased"] == 5
        finally:
            release.set()
        wait_until(lambda: set(_states(client, ids)) == {"done"}, timeout_s=60, what="every job acked",
                   seen=lambda: collections.Counter(_states(client, ids)))
        worker.stop()
        thread.join(timeout=30)
        assert worker.stats.succeeded == 30 and worker.stats.inflight_max <= 2 * (2 + 3)
        assert [client.get(job_id)["result"] for job_id in ids] == list(range(30))


@pytest.mark.parametrize("extends_fail", [False, True], ids=["extended", "extends-fail"])
def test_a_buffered_job_never_runs_on_an_expired_lease(single_node, extends_fail):
    """One-second leases, handlers of 0.4 s, one slot and two buffered jobs: a job waits in the
    buffer longer than its lease. Extended, every job runs once; with every extend failing, a
    buffered job whose lease ran out is dropped and runs later on a new lease. Either way each
    handler starts on a live lease and each job has exactly one accepted ack."""
    with Client(single_node.urls) as client:
        ids = client.submit_many("tiny", [{"n": n} for n in range(5)], lease_s=1.0, max_attempts=10)
        recording = Recording(client, extends_fail=extends_fail)
        runs: list[tuple[str, int, float]] = []  # (job, attempt, lease seconds left at start, as fetched)

        def handler(job):
            runs.append((job.id, job.attempt, job.lease_expires_at - time.time()))
            time.sleep(0.4)  # a slow job, against a 1 s lease

        worker = Worker(recording, {"tiny": handler}, concurrency=1, prefetch=2, wait_s=0.5,
                        heartbeat_s=0.2)
        thread = _start(worker)
        try:
            wait_until(lambda: set(_states(client, ids)) == {"done"}, timeout_s=60, what="every job acked",
                       seen=lambda: _states(client, ids))
        finally:
            worker.stop()
            thread.join(timeout=30)
        assert dict(recording.accepted) == {job_id: 1 for job_id in ids}  # a refused ack, if any, ran again
        if not extends_fail:
            # Kept alive: nothing dropped or redelivered, even though the last jobs waited > 1 s.
            assert sorted(job_id for job_id, _, _ in runs) == sorted(ids) and worker.stats.dropped == 0
            assert {client.get(job_id)["attempts"] for job_id in ids} == {1}
        else:
            # Started only with the margin left on the lease it was fetched with (never extended).
            assert all(left_s >= LEASE_START_MARGIN_S for _, _, left_s in runs), runs
            assert worker.stats.dropped >= 1
            assert sum(client.get(job_id)["attempts"] for job_id in ids) >= len(ids) + worker.stats.dropped


def test_stop_hands_buffered_jobs_to_another_worker_at_once(single_node):
    with Client(single_node.urls) as client:
        ids = client.submit_many("handback", [{"n": n} for n in range(5)])  # 30 s leases by default
        started, release = threading.Event(), threading.Event()

        def stuck(job):
            started.set()
            assert release.wait(60)
            return "first worker"

        first = Worker(client, {"handback": stuck}, concurrency=1, prefetch=4, wait_s=0.5, grace_s=60,
                       worker_id="handback-1")
        first_thread = _start(first)
        second = None
        try:
            assert started.wait(30)
            wait_until(lambda: len(_held_by(client, "handback-1")) == 5, timeout_s=30, what="1 running + 4 buffered")
            stopped_at = time.monotonic()
            first.stop()
            second = Worker(client, {"handback": lambda job: "second worker"}, concurrency=4, wait_s=0.5,
                            worker_id="handback-2")
            second_thread = _start(second)
            # Far sooner than the 30 s lease: the four buffered jobs were handed back, not left to expire.
            wait_until(lambda: _states(client, ids).count("done") == 4, timeout_s=10,
                       what="the second worker to run the four handed-back jobs", seen=lambda: _states(client, ids))
            assert time.monotonic() - stopped_at < 10
            assert first_thread.is_alive()  # its running job still has its grace period
        finally:
            release.set()
            first_thread.join(timeout=30)
            if second is not None:
                second.stop()
                second_thread.join(timeout=30)
        results = collections.Counter(client.get(job_id)["result"] for job_id in ids)
        assert results == {"second worker": 4, "first worker": 1}
        assert (first.stats.released, first.stats.succeeded, second.stats.succeeded) == (4, 1, 4)
        handed_back = [client.get(job_id) for job_id in ids if client.get(job_id)["result"] == "second worker"]
        # Released, not failed: the first worker's lease of them counts no attempt.
        assert [(r["attempts"], r["last_error"]) for r in handed_back] == [(1, None)] * 4


def test_batched_acks_ack_every_job_and_count_right(three_nodes):
    with Client(three_nodes.urls) as client:
        ok = client.submit_many("batched", [{"n": n} for n in range(400)])
        bad = client.submit_many("batched", [{"n": -1} for _ in range(20)], max_attempts=1)
        recording = Recording(client)

        def handler(job):
            if job.payload["n"] < 0:
                raise ValueError("negative")
            return job.payload["n"]

        stats = Worker(recording, {"batched": handler}, concurrency=4, prefetch="auto", burst=True,
                       wait_s=0.5).run()
        assert (stats.fetched, stats.succeeded, stats.failed, stats.lost, stats.dropped) == (420, 400, 20, 0, 0)
        assert dict(recording.accepted) == {job_id: 1 for job_id in ok}
        assert recording.ack_requests < 400 / 4  # many outcomes per request
        assert client.queues()["batched"].get("done", 0) == 400
        assert client.queues()["batched"].get("dead", 0) == 20
        assert {client.get(job_id)["state"] for job_id in bad} == {"dead"}
