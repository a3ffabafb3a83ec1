"""Worker runtime against a real node: retries with backoff into the DLQ, redrive, worker loss."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from client import Client, Worker
from cluster.localcluster import wait_until

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
            [sys.executable, "-m", "client.cli", "--nodes", ",".join(single_node.urls), "worker",
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
