"""Flow control inside the queue state machine: lanes, turns, token buckets.

Theory of operation
-------------------
A queue's READY jobs wait in *lanes*. Jobs with neither a key nor a group share the pool lane
(`POOL`); a job submitted with a `key` waits in that key's lane, one with a `group` in that
group's lane. Each lane keeps one FIFO per priority, as a queue without lanes would. Lanes are
what the limits act on and what fairness rotates over:

* `max_running_per_key`: a key's lane has no candidate while that many jobs of the key are LEASED.
* `fifo`: a group's lane offers only the group's *head*, its earliest-submitted job that is not
  finished (done, dead, cancelled). While the head is leased, waiting to retry or delayed, the
  group offers nothing, so the jobs of a group are leased one at a time in submit order and a
  failed attempt with retries left keeps the group blocked behind it (as SQS FIFO does). The
  group's unfinished jobs sit in a heap by their submit `order`; finished ones leave it lazily.
* Fairness: `turns` lists, in round-robin order, exactly the lanes that have a candidate now.
  A lease takes the first lane's candidate and sends that lane to the back of the line if it
  still has one. Every event that can change a lane's candidate (a job entering or leaving the
  lane, a lease of its key ending, its group's head finishing, a settings change) refreshes that
  lane's place, so a lease never scans lanes that a limit holds back. Priority orders jobs
  within a lane; across lanes, turns are round-robin.
* Rate: a token bucket per queue on leases, on the replicated clock. Its level is kept in
  millionths of a lease, so that refilling by `rate_per_ks` units per millisecond is exact
  integer arithmetic: min(burst, level + rate × elapsed) does not depend on how often it is
  refilled, so a replica, a restored snapshot and the leader's read-only question "when can
  this queue lease again?" all agree.

The turn order and the bucket are state (they decide future leases) and go into snapshots; the
lanes, heaps and running counts are rebuilt from the job records.
"""

from __future__ import annotations

from collections import deque

from raftq.cluster.queue.jobs import READY, Job

#: Lane of the jobs with neither key nor group. Keyed and grouped lanes are "k:" + key and
#: "g:" + group, so the three kinds never collide.
POOL = ""
#: Bucket units per lease: the level counts millionths of a lease, refilled by rate_per_ks units
#: per millisecond (rate_per_ks leases per 1000 s = rate_per_ks / 10**6 leases per ms).
UNITS_PER_LEASE = 1_000_000


def lane_of(job: Job) -> str:
    if job.group is not None:
        return "g:" + job.group
    if job.key is not None:
        return "k:" + job.key
    return POOL


class Lane:
    """The READY jobs of one key, group or the pool: one FIFO per priority (plus stale entries
    of jobs cancelled or purged while ready, skipped when they reach the front)."""

    __slots__ = ("id", "ready")

    def __init__(self, lane_id: str, levels: int) -> None:
        self.id = lane_id
        self.ready: list[deque[Job] | None] = [None] * levels

    def push(self, job: Job) -> None:
        priority = job.policy.priority  # not Job.priority: a property, a Python call per job
        fifo = self.ready[priority]
        if fifo is None:
            fifo = self.ready[priority] = deque()
        fifo.append(job)

    def peek(self) -> Job | None:
        """The oldest READY job of the highest priority; drops stale entries it passes."""
        for fifo in reversed(self.ready):
            if fifo is None:
                continue
            while fifo:
                job = fifo[0]
                if job.state == READY:
                    return job
                fifo.popleft()
        return None

    def take(self, job: Job) -> None:
        """Removes `job` (READY, in this lane). O(1) at the front; a FIFO group's head may sit
        behind successors that became ready before its retry, which costs a scan."""
        fifo = self.ready[job.policy.priority]
        assert fifo, f"job {job.id} taken from lane {self.id!r} that does not hold it"
        if fifo[0] is job:
            fifo.popleft()
        else:
            fifo.remove(job)

    def entries_count(self) -> int:
        return sum(len(fifo) for fifo in self.ready if fifo is not None)

    def live(self) -> list[Job]:
        return [job for fifo in self.ready if fifo is not None for job in fifo if job.state == READY]

    def compact(self) -> None:
        self.ready = [None if fifo is None else deque(job for job in fifo if job.state == READY)
                      for fifo in self.ready]


def bucket_level(level: int, at_ms: int, now_ms: int, rate_per_ks: int, burst: int) -> int:
    """The bucket's level at now_ms (>= at_ms), in UNITS_PER_LEASE per lease."""
    return min(burst * UNITS_PER_LEASE, level + rate_per_ks * max(0, now_ms - at_ms))


def bucket_wait_ms(level: int, rate_per_ks: int) -> int:
    """Milliseconds until a bucket at `level` holds one lease (0 when it does now)."""
    missing = UNITS_PER_LEASE - level
    if missing <= 0:
        return 0
    return -(-missing // rate_per_ks)  # ceiling division
