"""Idempotent submit (guarantee 5) and lease fencing (guarantee 3), through the real client."""

from __future__ import annotations

import time

import pytest

from raftq import Client, errors
from raftq.cluster.localcluster import http_json, wait_until


def digest(url: str) -> str:
    return http_json(url + "/v1/cluster?digest=1")[1]["digest"]


def test_same_idempotency_key_gives_one_job(single_node):
    with Client(single_node.urls) as client:
        first = client.submit("emails", {"to": "a"}, idempotency_key="welcome-42")
        second = client.submit("emails", {"to": "a"}, idempotency_key="welcome-42")
        other = client.submit("emails", {"to": "a"}, idempotency_key="welcome-43")
        assert first == second
        assert other != first
        depth = client.queues()["emails"]
        assert depth["ready"] == 2, depth


def test_ack_on_expired_or_foreign_lease_is_409_and_changes_nothing(single_node):
    url = single_node.urls[0]
    with Client(single_node.urls) as client:
        job_id = client.submit("work", {"n": 1}, lease_s=1)
        (job,) = client.fetch("w1", ["work"], max_jobs=1)
        assert job.id == job_id
        before = digest(url)
        with pytest.raises(errors.LeaseError) as foreign:
            client.ack("w2", job.id, job.lease_token)
        assert foreign.value.status == 409
        with pytest.raises(errors.LeaseError):
            client.ack("w1", job.id, job.lease_token + 1000)
        assert digest(url) == before, "a refused ack changed state"
        # Let the 1 s lease run out (the worker heartbeats but never extends: guarantee 8).
        deadline = job.lease_expires_at + 0.2
        while time.time() < deadline:
            client.heartbeat("w1", [job.id])
            time.sleep(0.2)
        with pytest.raises(errors.LeaseError) as expired:
            client.ack("w1", job.id, job.lease_token)
        assert expired.value.code in ("lease_expired", "lease_mismatch")
        record = wait_until(lambda: _state_in(client, job.id, ("ready", "retry_wait")), timeout_s=15,
                            what="the expired lease to be requeued", seen=lambda: client.get(job.id)["state"])
        assert record["attempts"] == 1
        assert record["last_error"]
        (again,) = wait_until(lambda: client.fetch("w2", ["work"], max_jobs=1, wait_s=1), timeout_s=20,
                              what="the job to be delivered again")
        assert again.id == job.id and again.attempt == 2
        client.ack("w2", again.id, again.lease_token)
        assert client.get(job.id)["state"] == "done"
        with pytest.raises(errors.LeaseError):
            client.ack("w1", job.id, job.lease_token)


def _state_in(client: Client, job_id: str, states: tuple[str, ...]) -> dict | None:
    record = client.get(job_id)
    return record if record["state"] in states else None


def test_extend_keeps_the_lease(single_node):
    with Client(single_node.urls) as client:
        client.submit("slow", {"n": 1}, lease_s=1)
        (job,) = client.fetch("w1", ["slow"])
        new_expiry = client.extend("w1", job.id, job.lease_token, 30)
        assert new_expiry > job.lease_expires_at + 20
        time.sleep(1.5)  # past the original 1 s lease, to show the extension holds it
        client.ack("w1", job.id, job.lease_token)
        assert client.get(job.id)["state"] == "done"


def test_a_repeated_ack_with_the_same_lease_is_ok_and_changes_nothing(single_node):
    """A client retries an ack whose answer it lost: the same answer, and no second effect."""
    url = single_node.urls[0]
    with Client(single_node.urls) as client:
        client.submit("retry-ack", {"n": 1})
        (job,) = client.fetch("w1", ["retry-ack"])
        client.ack("w1", job.id, job.lease_token)
        after_first = digest(url)
        client.ack("w1", job.id, job.lease_token)
        assert digest(url) == after_first
        assert client.get(job.id)["state"] == "done"


def test_release_hands_jobs_back_without_an_attempt_one_outcome_per_item(single_node):
    url = single_node.urls[0]
    with Client(single_node.urls) as client:
        ids = client.submit_many("release", [{"n": 1}, {"n": 2}], max_attempts=1)
        first, second = client.fetch("w1", ["release"], max_jobs=2)
        # One stale token beside a good one: the stale item is refused alone.
        outcomes = client.release_many("w1", [(first.id, first.lease_token), (second.id, second.lease_token + 1000)])
        assert outcomes[0] is None and isinstance(outcomes[1], errors.LeaseError), outcomes
        record = client.get(first.id)
        assert (record["state"], record["attempts"], record["last_error"]) == ("ready", 0, None)
        assert client.get(second.id)["state"] == "leased"
        before = digest(url)
        again = client.release_many("w1", [(first.id, first.lease_token)])  # already released: refused, no change
        assert isinstance(again[0], errors.LeaseError) and digest(url) == before
        # max_attempts=1 and leased twice: the released lease did not use the only attempt up.
        (redelivered,) = client.fetch("w2", ["release"], max_jobs=1)
        assert redelivered.id == first.id and redelivered.attempt == 1
        client.ack("w2", redelivered.id, redelivered.lease_token)
        assert sorted(ids) == sorted([first.id, second.id])
        _, metrics = http_text(url + "/metrics")
        assert 'raftq_jobs_released_total{queue="release"} 1.0' in metrics


def http_text(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()
