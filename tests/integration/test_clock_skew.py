"""A node whose wall clock is wrong leads, then hands on: delays and leases keep their lengths.

Real node processes; node n1 runs under libfaketime (Debian's `faketime`, installed when missing)
with only its wall clock off, monotonic time true. Each case:

1. a true-clock node leads first and stamps the cluster's clock (a warm-up job);
2. n1 leads (skewed from the start, or stepped +1 h once it leads): a job submitted with
   `delay_s=3` becomes leasable no earlier than 3 s and no later than 3 s + BOUND_S; a job leased
   with `lease_s=2` by a worker that then goes silent is leased again within 2 s + BOUND_S, not
   before 2 s; a job with `delay_s=DELAY_ACROSS_S` is submitted;
3. n1 is stopped and a true-clock node takes over: the same two checks again, and the job
   submitted under n1 becomes leasable no earlier than DELAY_ACROSS_S after its submit, and no
   later than that plus the election and BOUND_S.

Before the replicated clock advanced by the leader's monotonic time (the cluster clock was the
maximum wall-clock stamp any leader wrote), a leader ahead froze every delay and lease after it,
and a leader behind froze them while it led (issue 12).
"""

from __future__ import annotations

import time

import pytest

from raftq.chaos.faketime import FaketimeUnavailable, SkewedClock, library_path
from raftq.cluster.localcluster import LocalCluster, http_json, wait_until

#: slack on every timing check: the leader's housekeeping beat (0.25 s), a commit round, our
#: polling interval, and a loaded 2-core machine
BOUND_S = 3.0
#: the delay of the job submitted under the skewed leader and leased under the next one
DELAY_ACROSS_S = 8.0
#: how long an election may add to a delay that spans a leader change (2 s timeout, some margin)
ELECTION_S = 5.0
POLL_S = 0.1

HOUR_S = 3600.0
DAY_S = 86400.0


@pytest.fixture(scope="session")
def libfaketime() -> str:
    try:
        return library_path(install=True)
    except FaketimeUnavailable as exc:
        pytest.skip(str(exc))


def _submit(url: str, queue: str, **job: object) -> str:
    status, body = http_json(f"{url}/v1/queues/{queue}/jobs", method="POST",
                             body={"jobs": [{"payload": {"q": queue}, **job}]}, timeout=10)
    assert status == 201, (status, body)
    return body["ids"][0]


def _lease(url: str, queue: str, worker: str) -> list[dict]:
    status, body = http_json(f"{url}/v1/lease", method="POST",
                             body={"worker": worker, "queues": [queue], "max_jobs": 10, "wait_s": 0}, timeout=10)
    assert status == 200, (status, body)
    return body["jobs"]


def _seconds_until_leased(url: str, queue: str, job_id: str, since: float, *, limit_s: float) -> float:
    """Polls leases on `queue` until `job_id` comes; the seconds from monotonic `since` to the answer."""
    deadline = since + limit_s
    while time.monotonic() < deadline:
        jobs = _lease(url, queue, "checker")
        answered = time.monotonic()
        assert all(job["id"] == job_id for job in jobs), (job_id, jobs)
        if jobs:
            return answered - since
        time.sleep(POLL_S)
    job = http_json(f"{url}/v1/jobs/{job_id}", timeout=10)
    pytest.fail(f"job {job_id} on {queue} not leasable {limit_s:g} s after its submit; record: {job}")


def _check_delay_and_lease(url: str, tag: str) -> None:
    """A delay_s=3 job and a lease_s=2 job of a silent worker, on the current leader `url`."""
    delayed_queue, leased_queue = f"delay-{tag}", f"lease-{tag}"
    submitted = time.monotonic()
    delayed = _submit(url, delayed_queue, delay_s=3)
    held = _submit(url, leased_queue, lease_s=2)
    leased = _lease(url, leased_queue, "silent")
    lease_granted = time.monotonic()
    assert [job["id"] for job in leased] == [held], leased
    # The silent worker never heartbeats, acks or extends: only its lease running out frees the job.
    again_s = _seconds_until_leased(url, leased_queue, held, lease_granted, limit_s=2 + BOUND_S + 5)
    delay_s = _seconds_until_leased(url, delayed_queue, delayed, submitted, limit_s=3 + BOUND_S + 5)
    assert 3.0 <= delay_s <= 3.0 + BOUND_S, f"{tag}: delay_s=3 job leasable after {delay_s:.2f} s"
    # `lease_granted` is taken after the lease answer, so the lease may end a little before 2 s later.
    assert 1.5 <= again_s <= 2.0 + BOUND_S, f"{tag}: lease_s=2 job leased again after {again_s:.2f} s"


def _node_wall_offset_s(cluster: LocalCluster, node_id: str) -> float:
    status, body = http_json(cluster.nodes[node_id].url + "/v1/overview", timeout=5)
    assert status == 200, (status, body)
    return body["time"] - time.time()


@pytest.mark.parametrize("offset_s, step_s", [
    pytest.param(-DAY_S, 0.0, id="behind-1d"),
    pytest.param(-HOUR_S, 0.0, id="behind-1h"),
    pytest.param(HOUR_S, 0.0, id="ahead-1h"),
    pytest.param(DAY_S, 0.0, id="ahead-1d"),
    pytest.param(0.0, HOUR_S, id="stepped+1h"),
])
def test_skewed_leader_then_true_leader(tmp_path, request, libfaketime, offset_s, step_s):
    # Worker timeout 60 s: the silent worker's lease must end by the lease itself, not by WorkerLost.
    cluster = LocalCluster(str(tmp_path / "cluster"), size=3, extra_args=["--worker-timeout", "60"])
    clock = SkewedClock(libfaketime, str(tmp_path / "n1.faketime"), offset_s)
    cluster.nodes["n1"].env = clock.env
    with cluster:
        try:
            _run_case(cluster, clock, offset_s, step_s)
        except BaseException:
            for node_id in cluster.nodes:
                print(f"----- {node_id} log (tail) -----")
                print(cluster.log_text(node_id)[-3000:])
            raise


def _run_case(cluster: LocalCluster, clock: SkewedClock, offset_s: float, step_s: float) -> None:
    seen_offset = _node_wall_offset_s(cluster, "n1")
    assert abs(seen_offset - offset_s) < 5, f"n1's wall clock is off by {seen_offset:.1f} s, wanted {offset_s:g}"

    # 1. A true clock stamps the cluster's time first.
    cluster.move_leader_to("n2")
    _submit(cluster.nodes["n2"].url, "warmup")

    # 2. The skewed node leads.
    cluster.move_leader_to("n1")
    if step_s:
        clock.set_offset(offset_s + step_s)
        wait_until(lambda: abs(_node_wall_offset_s(cluster, "n1") - (offset_s + step_s)) < 5, timeout_s=15,
                   what=f"n1's wall clock stepped by {step_s:+g} s",
                   seen=lambda: _node_wall_offset_s(cluster, "n1"))
        assert cluster.leader() == "n1", "n1 lost leadership while its clock stepped"
    n1 = cluster.nodes["n1"].url
    _check_delay_and_lease(n1, "skewed")
    across_submitted = time.monotonic()
    across = _submit(n1, "across", delay_s=DELAY_ACROSS_S)
    assert cluster.leader() == "n1", "n1 lost leadership during the checks; the case did not test it leading"

    # 3. n1 stops; a true-clock node takes over.
    cluster.terminate("n1")
    leader = cluster.wait_for_leader(exclude="n1")
    url = cluster.nodes[leader].url
    across_s = _seconds_until_leased(url, "across", across, across_submitted,
                                     limit_s=DELAY_ACROSS_S + ELECTION_S + BOUND_S + 5)
    assert DELAY_ACROSS_S <= across_s <= DELAY_ACROSS_S + ELECTION_S + BOUND_S, (
        f"delay_s={DELAY_ACROSS_S:g} job submitted under n1 leasable after {across_s:.2f} s")
    _check_delay_and_lease(url, "after")
