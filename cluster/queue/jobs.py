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
from typing import Callable, NamedTuple

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


class Policy(NamedTuple):
    """A job's settings, fixed at submit: one tuple that the jobs of a batch share (the state
    machine hands every job the one object equal to its settings), where five slots of their own
    cost each job 40 bytes."""

    priority: int
    max_attempts: int
    lease_ms: int
    backoff_base_ms: int
    backoff_cap_ms: int


class Job:
    """One job. Times are integer milliseconds of the replicated clock.

    Small on purpose: a node holds every unfinished job and every finished one for the retention
    hour, so each slot is 8 bytes times millions. What is fixed at submit is in `policy`, shared;
    what the transitions already say (when the job was created, last leased, finished) is read
    from them, not stored twice.
    """

    __slots__ = (
        "id", "queue", "state", "payload", "policy", "attempts", "idempotency_key", "ready_at_ms",
        "lease_token", "lease_expires_at_ms", "worker", "last_error", "result", "transitions", "seq", "key",
        "group", "order",
    )

    def __init__(
        self, id: str, queue: str, state: str, payload: bytes, policy: Policy, idempotency_key: str | None,
        transitions: tuple[tuple[str, int], ...], ready_at_ms: int, key: str | None = None,
        group: str | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.state = state
        self.payload = payload
        self.policy = policy
        self.attempts = 0  # leases granted so far (reset by redrive)
        self.idempotency_key = idempotency_key
        self.ready_at_ms = ready_at_ms
        # The current lease, or the most recent one once it ended: an ack repeated with the token
        # of the lease that completed the job is answered OK again. None until the first lease.
        self.lease_token: int | None = None
        self.lease_expires_at_ms: int | None = None
        self.worker: str | None = None
        self.last_error: str | None = None
        self.result: bytes | None = None
        # (state, at_ms) pairs, oldest first, starting with the submission (always kept); replaced
        # (by `extended_history`), never mutated, so the jobs of one command may share one.
        self.transitions = transitions
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

    @property
    def priority(self) -> int:
        return self.policy.priority

    @property
    def max_attempts(self) -> int:
        return self.policy.max_attempts

    @property
    def lease_ms(self) -> int:
        return self.policy.lease_ms

    @property
    def backoff_base_ms(self) -> int:
        return self.policy.backoff_base_ms

    @property
    def backoff_cap_ms(self) -> int:
        return self.policy.backoff_cap_ms

    @property
    def created_at_ms(self) -> int:
        return self.transitions[0][1]  # the submission, which extended_history always keeps

    @property
    def leased_at_ms(self) -> int | None:
        """When the current or most recent lease began; None before the first."""
        return _leased_at(self.lease_token, self.transitions)

    @property
    def finished_at_ms(self) -> int | None:
        """When the job was acked or cancelled; None while it is not."""
        return _finished_at(self.transitions)

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
        """The job's snapshot row (`snapshot_row`): the fields in SNAPSHOT_ROW_FIELDS order,
        immutable all the way down (msgpack packs the transitions' tuples as arrays)."""
        return snapshot_row(job_row(self))

    @classmethod
    def from_row(cls, row: tuple | list, policies: dict[Policy, Policy]) -> "Job":
        """The inverse of `to_row`, after a msgpack round trip (which may give lists for tuples).

        The state strings come back as this module's objects (`_INTERNED_STATES`); an unknown
        state is kept as it is, for the caller to refuse. Equal policies come back as one object:
        `policies` is a dict the caller keeps for the whole restore. The row's created, leased and
        finished times are not kept: the transitions say them.
        """
        assert len(row) == ROW_FIELD_COUNT, "snapshot job row has the wrong number of fields"
        job = cls.__new__(cls)
        (
            job.id, job.queue, state, job.payload, priority, job.attempts, max_attempts, lease_ms,
            backoff_base_ms, backoff_cap_ms, job.idempotency_key, _created_at_ms, job.ready_at_ms,
            _leased_at_ms, job.lease_token, job.lease_expires_at_ms, job.worker, _finished_at_ms, job.last_error,
            job.result, transitions, job.seq, job.key, job.group, job.order,
        ) = row
        policy = Policy(priority, max_attempts, lease_ms, backoff_base_ms, backoff_cap_ms)
        job.policy = policies.setdefault(policy, policy)
        interned = _INTERNED_STATES
        job.state = interned.get(state, state)
        job.transitions = tuple([(interned.get(s, s), at_ms) for s, at_ms in transitions])
        if not job.transitions:
            raise ValueError("a job row without transitions")
        return job


def _leased_at(lease_token: int | None, transitions: tuple[tuple[str, int], ...]) -> int | None:
    """When the job's latest lease began (None before its first, when it has no token): the time
    of its last LEASED transition. After a lease at most three transitions come before the next
    lease or the end (to retry_wait, ready, cancelled; or dead, redriven, cancelled), so the
    truncated history always holds it."""
    if lease_token is None:
        return None
    for state, at_ms in reversed(transitions):
        if state is LEASED:
            return at_ms
    return None


def _finished_at(transitions: tuple[tuple[str, int], ...]) -> int | None:
    """The time of the last transition when it finished the job. It is read from the transition,
    not the state, so that a finished job purged since (state PURGED, no transition of its own)
    keeps its time for the finished FIFO that may still hold it."""
    state, at_ms = transitions[-1]
    return at_ms if state is DONE or state is CANCELLED else None


def extended_history(
    transitions: tuple[tuple[str, int], ...], transition: tuple[str, int]
) -> tuple[tuple[str, int], ...]:
    """`transitions` followed by a (state, at_ms) transition, as a new tuple (rows captured
    earlier keep the old one). Past TRANSITIONS_MAX the submission stays and the oldest
    transition after it goes."""
    if len(transitions) < TRANSITIONS_MAX:
        return (*transitions, transition)
    return (transitions[0], *transitions[2:], transition)


#: A job's slots as one tuple, in one C-level call: `map(job_row, jobs)` takes a million of them
#: without running a line of Python per job, which keeps a snapshot's capture short. The
#: snapshot's row is made from it later, off the event loop (`snapshot_row`).
job_row: Callable[[Job], tuple] = attrgetter(*Job.__slots__)

#: The fields of a job's row in a snapshot, in order: the layout every version of raftq wrote
#: since version 2, which keeps snapshots and digests the same whatever a Job holds in memory.
SNAPSHOT_ROW_FIELDS: tuple[str, ...] = (
    "id", "queue", "state", "payload", "priority", "attempts", "max_attempts", "lease_ms", "backoff_base_ms",
    "backoff_cap_ms", "idempotency_key", "created_at_ms", "ready_at_ms", "leased_at_ms", "lease_token",
    "lease_expires_at_ms", "worker", "finished_at_ms", "last_error", "result", "transitions", "seq", "key",
    "group", "order",
)
#: Fields in a row.
ROW_FIELD_COUNT = len(SNAPSHOT_ROW_FIELDS)
#: Fields in a row of a version-1 snapshot, written before jobs had key, group and order.
ROW_FIELD_COUNT_V1 = ROW_FIELD_COUNT - 3


def snapshot_row(slots: tuple) -> tuple:
    """The snapshot row (SNAPSHOT_ROW_FIELDS) of a job whose slots `job_row` took."""
    (
        id, queue, state, payload, policy, attempts, idempotency_key, ready_at_ms, lease_token,
        lease_expires_at_ms, worker, last_error, result, transitions, seq, key, group, order,
    ) = slots
    priority, max_attempts, lease_ms, backoff_base_ms, backoff_cap_ms = policy
    return (
        id, queue, state, payload, priority, attempts, max_attempts, lease_ms, backoff_base_ms, backoff_cap_ms,
        idempotency_key, transitions[0][1], ready_at_ms,
        _leased_at(lease_token, transitions), lease_token, lease_expires_at_ms, worker,
        _finished_at(transitions), last_error, result, transitions, seq, key, group, order,
    )


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
