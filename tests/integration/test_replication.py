"""Raft-lite with real node processes: majority before 2xx, failover, full-cluster crash."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from raftq import Client, errors
from raftq.cluster.localcluster import http_json, metric_value, wait_until


def test_a_follower_redirects_to_the_leader(three_nodes):
    leader = three_nodes.wait_for_leader()
    follower = next(n for n in three_nodes.nodes if n != leader)
    status, body = http_json(three_nodes.nodes[follower].url + "/v1/queues/q/jobs", method="POST",
                             body={"jobs": [{"payload": 1}]})
    assert status == 307, body
    assert body["error"]["code"] == "not_leader"
    with Client([three_nodes.nodes[follower].url]) as client:  # only the follower's URL
        job_id = client.submit("q", {"n": 1})
        assert client.get(job_id)["state"] == "ready"


def test_no_majority_no_2xx_then_serves_again(three_nodes):
    leader = three_nodes.wait_for_leader()
    followers = [n for n in three_nodes.nodes if n != leader]
    with Client(three_nodes.urls) as client:
        client.submit("q", {"before": True})
    for node_id in followers:
        three_nodes.kill(node_id)
    with Client([three_nodes.nodes[leader].url], deadline=4, timeout=2) as client:
        for attempt in range(3):
            with pytest.raises(errors.RaftqError):
                client.submit("q", {"attempt": attempt})
    for node_id in followers:
        three_nodes.start_node(node_id)
    three_nodes.wait_for_leader(timeout_s=30)
    with Client(three_nodes.urls, deadline=30) as client:
        job_id = client.submit("q", {"after": True})
        assert client.get(job_id)["state"] == "ready"


def test_all_nodes_kill_9_at_once(three_nodes):
    with Client(three_nodes.urls) as client:
        ids = client.submit_many("q", [{"n": n} for n in range(200)])
        terms_before = {k: s["term"] for k, s in three_nodes.statuses().items()}
    for node_id in three_nodes.nodes:
        three_nodes.kill(node_id)
    for node_id in three_nodes.nodes:
        three_nodes.start_node(node_id)
    three_nodes.wait_for_leader(timeout_s=30)
    with Client(three_nodes.urls, deadline=30) as client:
        client.submit("q", {"marker": True})  # commits an entry of the new term everywhere
        states = {client.get(job_id)["state"] for job_id in ids}
        assert states == {"ready"}
    terms_after = {k: s["term"] for k, s in three_nodes.statuses().items()}
    assert all(terms_after[k] >= terms_before[k] for k in terms_before), (terms_before, terms_after)
    digests = three_nodes.wait_converged(timeout_s=60)
    assert len(set(digests.values())) == 1


def _batched_followers(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {peer: float(value) for peer, value in
            re.findall(r'^raftq_raft_follower_batched\{peer="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def test_a_stalled_quorum_first_follower_hands_its_place_to_the_batched_one(three_nodes):
    """Quorum first (transport/http.py): the leader sends at once to one follower and in batches to
    the other. The one sent to at once stops (SIGSTOP: its connections stay open, nothing
    answers); within a tick or two the batched one takes its place, and submits go on."""
    leader = three_nodes.wait_for_leader()
    leader_url = three_nodes.nodes[leader].url
    with Client(three_nodes.urls) as client:
        for n in range(20):
            client.submit("q", {"n": n})
        batched = wait_until(lambda: (lambda seen: seen if sorted(seen.values()) == [0.0, 1.0] else None)(
            _batched_followers(leader_url)), timeout_s=30, what="one follower batched, one not",
            seen=lambda: _batched_followers(leader_url))
        first = next(peer for peer, value in batched.items() if value == 0)
        other = next(peer for peer, value in batched.items() if value == 1)
        three_nodes.pause(first)
        try:
            def switched() -> bool:
                client.submit("q", {"after": True})  # keeps the batched follower's match index moving
                return _batched_followers(leader_url) == {first: 1.0, other: 0.0}

            wait_until(switched, timeout_s=30, what=f"{other} sent to at once, {first} batched",
                       seen=lambda: _batched_followers(leader_url))
            ids = [client.submit("q", {"n": n}) for n in range(50)]
            assert {client.get(job_id)["state"] for job_id in ids} == {"ready"}
        finally:
            three_nodes.resume(first)
    three_nodes.wait_converged(timeout_s=60)


def test_kill_the_leader_ten_times_under_load(three_nodes):
    """Continuous submits and work while the leader is SIGKILLed and restarted 10 times."""
    submitted: set[str] = set()
    acked: set[str] = set()
    deliveries: dict[str, int] = {}
    failover_s: list[float] = []
    stop = threading.Event()

    def produce() -> None:
        with Client(three_nodes.urls, deadline=30, timeout=3) as client:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    submitted.update(client.submit_many("load", [{"n": n + i} for i in range(10)]))
                except errors.RaftqError:
                    continue
                took = time.monotonic() - started
                if took > 0.5:
                    failover_s.append(took)
                n += 10

    def consume() -> None:
        with Client(three_nodes.urls, deadline=30, timeout=3) as client:
            while not stop.is_set():
                try:
                    for job in client.fetch("w1", ["load"], max_jobs=20, wait_s=0.5):
                        deliveries[job.id] = deliveries.get(job.id, 0) + 1
                        try:
                            client.ack("w1", job.id, job.lease_token)
                            acked.add(job.id)
                        except errors.JobError:
                            pass
                except errors.RaftqError:
                    continue

    threads = [threading.Thread(target=produce, daemon=True), threading.Thread(target=consume, daemon=True)]
    for thread in threads:
        thread.start()
    election_s = []
    for _ in range(10):
        wait_until(lambda: len(submitted) >= 50, timeout_s=60, what="submits flowing")
        old = three_nodes.wait_for_leader(timeout_s=60)
        three_nodes.kill(old)
        killed_at = time.monotonic()
        three_nodes.wait_for_leader(timeout_s=60, exclude=old)
        election_s.append(time.monotonic() - killed_at)
        three_nodes.start_node(old)
        count = len(submitted)
        wait_until(lambda: len(submitted) >= count + 50, timeout_s=60, what="submits flowing after failover",
                   seen=lambda: len(submitted))
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    with Client(three_nodes.urls, deadline=60) as client:
        def drained() -> bool:
            for job in client.fetch("w2", ["load"], max_jobs=200, wait_s=1):
                deliveries[job.id] = deliveries.get(job.id, 0) + 1
                client.ack("w2", job.id, job.lease_token)
                acked.add(job.id)
            depth = client.queues().get("load", {})
            return not any(depth.get(s) for s in ("ready", "leased", "retry_wait", "scheduled"))

        wait_until(drained, timeout_s=180, what="the queue to drain")
    lost = submitted - set(deliveries)
    duplicates = sum(count - 1 for count in deliveries.values())
    print(f"\nsubmitted={len(submitted)} delivered={len(deliveries)} lost={len(lost)} duplicates={duplicates}")
    print(f"time to new leader p50={_p(election_s, 50):.2f}s p99={_p(election_s, 99):.2f}s")
    if failover_s:
        print(f"client-visible failover p50={_p(failover_s, 50):.2f}s p99={_p(failover_s, 99):.2f}s")
    assert not lost, f"{len(lost)} acknowledged submits never delivered, e.g. {sorted(lost)[:5]}"


def _p(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))] if ordered else 0.0


def test_a_follower_far_behind_catches_up_from_entries_read_back_from_the_wal(three_nodes):
    """The leader keeps only the newest applied entries' data in memory (raft/log.py, cold
    entries): a follower that missed more than that gets the older ones read back from the WAL,
    in appends, not a snapshot (the log is far below the snapshot thresholds)."""
    leader = three_nodes.wait_for_leader()
    follower = next(n for n in three_nodes.nodes if n != leader)
    three_nodes.kill(follower)
    payload = {"pad": "x" * 400}
    with Client(three_nodes.urls) as client:
        ids = [job_id for _ in range(30) for job_id in client.submit_many("q", [payload] * 100)]  # ~1.5 MB of log
    leader_url = three_nodes.nodes[leader].url
    assert metric_value(leader_url, "raftq_log_entries_read_back_total") == 0
    three_nodes.start_node(follower)
    three_nodes.wait_converged(timeout_s=60)
    assert metric_value(leader_url, "raftq_log_entries_read_back_total") >= 20, "the catch-up read no entry back"
    assert metric_value(three_nodes.nodes[follower].url, "raftq_snapshots_installed") == 0
    # The caught-up follower can lead with the same jobs.
    three_nodes.move_leader_to(follower)
    with Client(three_nodes.urls) as client:
        assert {client.get(job_id)["state"] for job_id in ids[::300]} == {"ready"}
