"""The job record, its states, and the deterministic backoff draw.

A `Job` is a mutable `__slots__` record owned by one `QueueStateMachine`: millions of them may
be alive, so it carries no per-instance dict, and the state machine changes its fields in place.
The state is one of the interned strings below (compared by identity on the hot path, sent on the
wire as-is).

Every field holds an immutable value (str, int, bytes, None, or a tuple of those): a change
replaces a field, never mutates what it held. So a row taken by `job_row` (a tuple of the
field values) stays exactly as it was while the job keeps changing, which is what lets a
snapshot capture a million rows on the event loop and encode them later in a worker thread
(see `QueueStateMachine.capture`). `transitions` is a tuple for that reason: appending to a
shared list would reach into every capture that holds it.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable

SCHEDULED = "scheduled"  #: submitted with a delay; ready_at_ms in the future
READY = "ready"  #: waiting in its queue's priority FIFO
LEASED = "leased"  #: held by a worker until lease_expires_at_ms
RETRY_WAIT = "retry_wait"  #: failed an attempt; ready again at ready_at_ms
DONE = "done"  #: acked (finished; dropped after retention)
DEAD = "dead"  #: attempts exhausted or failed without retry; kept until redrive, purge or cancel
CANCELLED = "cancelled"  #: cancelled (finished; dropped after retention)
#: Internal: a job deleted by Purge. Never visible: the record has left every index, and lazy
#: structures that still hold it skip it because its state is no longer theirs.
PURGED = "purged"

#: Every visible state, in lifecycle order (the order of `queue_stats` keys).
STATES: tuple[str, ...] = (SCHEDULED, READY, LEASED, RETRY_WAIT, DONE, DEAD, CANCELLED)
#: States counted against a queue's max_depth: work not yet finished.
ACTIVE_STATES: tuple[str, ...] = (SCHEDULED, READY, LEASED, RETRY_WAIT)
#: States whose record is dropped `retention_ms` after finished_at_ms.
FINISHED_STATES: tuple[str, ...] = (DONE, CANCELLED)

#: Transitions kept per job: enough to read a job's recent history, bounded so that a job retried
#: a thousand times does not grow without limit. The first (submission) is always kept.
TRANSITIONS_MAX = 16
#: The string objects of every state, by value: restored records get these very objects back,
#: so they compare by identity like live ones, and a million records share a handful of strings.
_INTERNED_STATES = {state: state for state in (*STATES, PURGED)}

_MASK64 = (1 << 64) - 1


class Job:
    """One job. Times are integer milliseconds of the replicated clock."""

    __slots__ = (
        "id", "queue", "state", "payload", "priority", "attempts", "max_attempts", "lease_ms",
        "backoff_base_ms", "backoff_cap_ms", "idempotency_key", "created_at_ms", "ready_at_ms",
        "leased_at_ms", "lease_token", "lease_expires_at_ms", "worker", "finished_at_ms", "last_error",
        "result", "transitions", "seq", "key", "group", "order",
    )

    def __init__(
        self, id: str, queue: str, state: str, payload: bytes, priority: int, max_attempts: int,
        lease_ms: int, backoff_base_ms: int, backoff_cap_ms: int, idempotency_key: str | None,
        created_at_ms: int, ready_at_ms: int, key: str | None = None, group: str | None = None,
        transitions: tuple[tuple[str, int], ...] | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.state = state
        self.payload = payload
        self.priority = priority
        self.attempts = 0  # leases granted so far (reset by redrive)
        self.max_attempts = max_attempts
        self.lease_ms = lease_ms
        self.backoff_base_ms = backoff_base_ms
        self.backoff_cap_ms = backoff_cap_ms
        self.idempotency_key = idempotency_key
        self.created_at_ms = created_at_ms
        self.ready_at_ms = ready_at_ms
        # The current lease, or the most recent one once it ended: an ack repeated with the token
        # of the lease that completed the job is answered OK again.
        self.leased_at_ms: int | None = None
        self.lease_token: int | None = None
        self.lease_expires_at_ms: int | None = None
        self.worker: str | None = None
        self.finished_at_ms: int | None = None
        self.last_error: str | None = None
        self.result: bytes | None = None
        # (state, at_ms) pairs, oldest first; replaced (by `extended_history`), never mutated, so
        # the jobs of one command may share one: the caller may pass ((state, created_at_ms),).
        self.transitions: tuple[tuple[str, int], ...] = (
            ((state, created_at_ms),) if transitions is None else transitions)
        # Order of entry into the ready FIFO or the delay heap; unique, so it breaks every tie
        # and lets restore() rebuild both structures in the order the live machine holds them.
        # 0 from the lease on: a job re-enters either structure with a fresh one, and a finished
        # record kept for the retention hour need not hold an int of its own (32 bytes a job).
        self.seq = 0
        # Flow control (see commands.NewJob): at most one of key and group is set.
        self.key = key
        self.group = group
        # Place in its group's line: a fresh sequence number at submit and at redrive (a
        # redriven job rejoins the end of its group's line). 0 for jobs without a group.
        self.order = 0

    def record(self) -> dict:
        """The job as a plain dict with wire-friendly names (times in ms, payload bytes)."""
        return {
            "id": self.id,
            "queue": self.queue,
            "state": self.state,
            "payload": self.payload,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "lease_ms": self.lease_ms,
            "backoff_base_ms": self.backoff_base_ms,
            "backoff_cap_ms": self.backoff_cap_ms,
            "idempotency_key": self.idempotency_key,
            "created_at_ms": self.created_at_ms,
            "ready_at_ms": self.ready_at_ms,
            "leased_at_ms": self.leased_at_ms,
            "lease": self.lease_token,
            "lease_expires_at_ms": self.lease_expires_at_ms,
            "worker": self.worker,
            "finished_at_ms": self.finished_at_ms,
            "last_error": self.last_error,
            "result": self.result,
            "transitions": [list(t) for t in self.transitions],
            "key": self.key,
            "group": self.group,
        }

    def to_row(self) -> tuple:
        """Every field, in __slots__ order, for the canonical snapshot (msgpack packs the
        transitions' tuples as arrays). Immutable all the way down: see the module docstring."""
        return job_row(self)

    @classmethod
    def from_row(cls, row: tuple | list) -> "Job":
        """The inverse of `to_row`, after a msgpack round trip (which may give lists for tuples).

        The state strings come back as this module's objects (`_INTERNED_STATES`); an unknown
        state is kept as it is, for the caller to refuse.
        """
        assert len(row) == ROW_FIELD_COUNT, "snapshot job row has the wrong number of fields"
        job = cls.__new__(cls)
        (
            job.id, job.queue, state, job.payload, job.priority, job.attempts, job.max_attempts, job.lease_ms,
            job.backoff_base_ms, job.backoff_cap_ms, job.idempotency_key, job.created_at_ms, job.ready_at_ms,
            job.leased_at_ms, job.lease_token, job.lease_expires_at_ms, job.worker, job.finished_at_ms, job.last_error,
            job.result, transitions, job.seq, job.key, job.group, job.order,
        ) = row
        interned = _INTERNED_STATES
        job.state = interned.get(state, state)
        job.transitions = tuple([(interned.get(s, s), at_ms) for s, at_ms in transitions])
        return job


def extended_history(
    transitions: tuple[tuple[str, int], ...], transition: tuple[str, int]
) -> tuple[tuple[str, int], ...]:
    """`transitions` followed by a (state, at_ms) transition, as a new tuple (rows captured
    earlier keep the old one). Past TRANSITIONS_MAX the submission stays and the oldest
    transition after it goes."""
    if len(transitions) < TRANSITIONS_MAX:
        return (*transitions, transition)
    return (transitions[0], *transitions[2:], transition)


#: A job's row (`Job.to_row`) as one C-level call: `map(job_row, jobs)` takes a million rows
#: without running a line of Python per job, which keeps a snapshot's capture short.
job_row: Callable[[Job], tuple] = attrgetter(*Job.__slots__)
#: Fields in a row.
ROW_FIELD_COUNT = len(Job.__slots__)
#: Fields in a row of a version-1 snapshot, written before jobs had key, group and order.
ROW_FIELD_COUNT_V1 = ROW_FIELD_COUNT - 3


def splitmix64(x: int) -> int:
    """SplitMix64 (Steele, Lea, Flood 2014): a 64-bit mix whose outputs look uniform."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def backoff_delay_ms(base_ms: int, cap_ms: int, attempts: int, entropy: int, position: int) -> int:
    """Full-jitter exponential backoff: floor(jitter * min(cap, base * 2**(attempts - 1))).

    The jitter is splitmix64(entropy + position) / 2**64, in [0, 1), so the delay lies in
    [0, bound - 1] for bound = min(cap, base * 2**(attempts - 1)). Integer arithmetic only, so
    every replica computes the same delay.

    Args:
        base_ms, cap_ms: the job's backoff policy.
        attempts: the attempt that just failed (1 for the first).
        entropy: the command's 64-bit draw.
        position: distinguishes the jobs requeued by one command.
    """
    exponent = max(attempts - 1, 0)
    # Past 2**62 any real cap has been reached; the guard keeps the shift small.
    bound = cap_ms if exponent >= 62 else min(cap_ms, base_ms << exponent)
    if bound <= 0:
        return 0
    return (splitmix64((entropy + position) & _MASK64) * bound) >> 64
