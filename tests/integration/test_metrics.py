"""Every node's /metrics moves by exactly what happened, and follows a leader change.

100 jobs submitted, 60 acked, 30 failed (20 retryable into retry_wait, 10 straight to the DLQ),
10 left ready; the three nodes are scraped and parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from raftq import Client
from raftq.cluster.localcluster import wait_until

QUEUE = "metered"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


EXPECTED_COUNTERS = {
    "raftq_jobs_submitted_total": 100,
    "raftq_jobs_leased_total": 90,
    "raftq_jobs_acked_total": 60,
    "raftq_jobs_failed_total": 30,
    "raftq_jobs_retried_total": 20,
    "raftq_jobs_dead_lettered_total": 10,
}
EXPECTED_DEPTH = {"ready": 10, "leased": 0, "retry_wait": 20, "dead": 10, "done": 60, "scheduled": 0}


def check_node(samples: dict, node_id: str) -> list[str]:
    wrong = []
    for name, expected in EXPECTED_COUNTERS.items():
        seen = value(samples, name, queue=QUEUE)
        if seen != expected:
            wrong.append(f"{node_id} {name}: expected {expected}, saw {seen}")
    for state, expected in EXPECTED_DEPTH.items():
        seen = value(samples, "raftq_queue_depth", queue=QUEUE, state=state)
        if seen != expected:
            wrong.append(f"{node_id} depth {state}: expected {expected}, saw {seen}")
    return wrong


def test_metrics_follow_the_applied_log_on_every_node(three_nodes):
    with Client(three_nodes.urls) as client:
        ids = client.submit_many(QUEUE, [{"n": n} for n in range(100)], max_attempts=3)
        assert len(ids) == 100
        jobs = []
        while len(jobs) < 90:
            jobs += client.fetch("w1", [QUEUE], max_jobs=90 - len(jobs), wait_s=1)
        outcomes = client.ack_many("w1", [(j.id, j.lease_token, None) for j in jobs[:60]])
        assert outcomes == [None] * 60
        # Retryable fails wait up to 300 s of backoff here: far longer than the test, so they stay put.
        client.fail_many("w1", [(j.id, j.lease_token, "try later", True, 300.0) for j in jobs[60:80]])
        client.fail_many("w1", [(j.id, j.lease_token, "poison", False, None) for j in jobs[80:90]])
        leader = three_nodes.wait_for_leader()

    def all_right() -> bool:
        return not any(check_node(scrape(three_nodes.nodes[n].url), n) for n in three_nodes.nodes)

    wait_until(all_right, timeout_s=30, what="every node's metrics to match",
               seen=lambda: [w for n in three_nodes.nodes for w in check_node(scrape(three_nodes.nodes[n].url), n)])

    leader_samples = scrape(three_nodes.nodes[leader].url)
    assert value(leader_samples, "raftq_raft_role", role="leader") == 1
    assert value(leader_samples, "raftq_workers_alive") == 1
    assert value(leader_samples, "raftq_job_latency_seconds_count", queue=QUEUE) == 60
    assert value(leader_samples, "raftq_job_queue_wait_seconds_count", queue=QUEUE) == 90
    followers = [n for n in three_nodes.nodes if n != leader]
    for node_id in followers:
        samples = scrape(three_nodes.nodes[node_id].url)
        assert value(samples, "raftq_workers_alive") is None, "leader-only metric exported by a follower"
        assert value(samples, "raftq_raft_role", role="follower") == 1
    changes_before = {n: value(scrape(three_nodes.nodes[n].url), "raftq_raft_leader_changes_total") for n in followers}

    three_nodes.kill(leader)
    new_leader = three_nodes.wait_for_leader(exclude=leader, timeout_s=30)
    samples = scrape(three_nodes.nodes[new_leader].url)
    assert not check_node(samples, new_leader)
    assert value(samples, "raftq_raft_role", role="leader") == 1
    assert value(samples, "raftq_raft_leader_changes_total") > changes_before[new_leader]
