"""Guarantees 1, 2, 3 and 7 on one real node: kill -9 mid-work loses nothing acknowledged.

1,000 jobs are submitted; a worker thread fetches and acks; the node is SIGKILLed while the worker
is mid-way and restarted. Every job not acked before the kill is delivered again, and no job whose
ack got a 2xx is delivered again.
"""

from __future__ import annotations

import threading

from raftq import Client, errors
from raftq.cluster.localcluster import wait_until

JOB_COUNT = 1000


def test_kill_9_mid_work_then_restart(single_node):
    with Client(single_node.urls, deadline=60) as client:
        ids = []
        for start in range(0, JOB_COUNT, 100):
            ids += client.submit_many("crash", [{"n": n} for n in range(start, start + 100)], lease_s=2)
        assert len(set(ids)) == JOB_COUNT

    acked: set[str] = set()
    attempted: set[str] = set()  # acks sent; those cut off by the kill have an unknown outcome
    delivered_before: list[str] = []
    stop = threading.Event()

    def work() -> None:
        with Client(single_node.urls, deadline=2, timeout=2) as worker:
            while not stop.is_set():
                try:
                    jobs = worker.fetch("w-before", ["crash"], max_jobs=10, wait_s=0.5)
                    for job in jobs:
                        delivered_before.append(job.id)
                        attempted.add(job.id)
                        worker.ack("w-before", job.id, job.lease_token)
                        acked.add(job.id)  # only after the 2xx
                except errors.RaftqError:
                    return  # the node is gone

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    wait_until(lambda: len(acked) >= 300, timeout_s=60, what="300 acks before the kill", seen=lambda: len(acked))
    single_node.kill("n1")
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert 300 <= len(acked) < JOB_COUNT

    single_node.start_node("n1")
    single_node.wait_for_leader(timeout_s=30)
    delivered_after: dict[str, int] = {}
    with Client(single_node.urls, deadline=60) as client:
        def drained() -> bool:
            for job in client.fetch("w-after", ["crash"], max_jobs=100, wait_s=1):
                delivered_after[job.id] = delivered_after.get(job.id, 0) + 1
                client.ack("w-after", job.id, job.lease_token)
            return client.queues()["crash"].get("done") == JOB_COUNT

        wait_until(drained, timeout_s=120, what="every unacked job delivered again",
                   seen=lambda: (len(acked), len(delivered_after)))
        redelivered_acked = acked & set(delivered_after)
        assert not redelivered_acked, f"acked jobs delivered again: {sorted(redelivered_acked)[:5]}"
        missing = set(ids) - attempted - set(delivered_after)
        assert not missing, f"{len(missing)} jobs never acked before the kill were not delivered again"
        assert len(attempted - acked) <= 1, "one ack at most was in flight at the kill"
        stats = client.queues()["crash"]
        assert stats.get("done") == JOB_COUNT, stats
