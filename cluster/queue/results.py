"""What `QueueStateMachine.apply` returns: business outcomes as values, never exceptions.

An apply that raised on one replica only would diverge the cluster (STYLE §4), so every outcome a
user can cause (an unknown id, a stale lease, a full queue) is one of these frozen values, and the
API edge maps it to HTTP.

    Submit        -> Submitted | QueueFull
    Lease         -> Leased(jobs: JobGrant...)
    Ack/Fail/Release -> ItemOutcomes(OK | ItemError ...)
    Extend        -> ItemOutcomes(Extended | ItemError ...)
    Tick          -> Ticked
    WorkerLost    -> Released
    RenewLeases   -> Renewed
    Cancel        -> OK | ItemError(not_found | conflict)
    Redrive       -> Redriven;   Purge -> Purged;   SetQueueConfig -> OK
    PutSchedule   -> OK;   DeleteSchedule, PauseSchedule -> OK | ItemError(not_found)
    FireSchedule  -> ScheduleFired
    undecodable   -> Rejected (the entry changes nothing but last_applied)
"""

from __future__ import annotations

from typing import Union

from raftq.cluster.records import record

#: Item error codes (the API's wire codes; all but not_found answer 409).
NOT_FOUND = "not_found"
LEASE_MISMATCH = "lease_mismatch"
LEASE_EXPIRED = "lease_expired"
CONFLICT = "conflict"


@record
class Ok:
    """The item or command took effect (or had already, for a repeated ack)."""


#: The one Ok value; compare with `is OK` or isinstance(outcome, Ok).
OK = Ok()


@record
class ItemError:
    code: str  # NOT_FOUND, LEASE_MISMATCH, LEASE_EXPIRED or CONFLICT
    message: str


@record
class Extended:
    """An Extend item's success: the lease now ends at expires_at_ms."""

    expires_at_ms: int


Outcome = Union[Ok, Extended, ItemError]


@record
class ItemOutcomes:
    outcomes: tuple[Outcome, ...]  # one per item, in order


@record
class Submitted:
    ids: tuple[str, ...]  # in the order submitted
    created: tuple[bool, ...]  # False: idempotent duplicate (id is the first job's) or known id


@record
class QueueFull:
    """The whole batch was refused; nothing changed."""

    queue: str
    max_depth: int


@record
class JobGrant:
    """One job a Lease command handed to a worker (the client's `LeasedJob` is what it receives)."""

    id: str
    queue: str
    payload: bytes
    attempt: int  # 1 for the first lease
    lease_token: int  # fencing token to present on ack, fail and extend
    lease_expires_at_ms: int
    priority: int
    lease_ms: int  # the job's own lease length: what each extension renews it by


@record
class Leased:
    jobs: tuple[JobGrant, ...]


@record
class Ticked:
    expired: int  # leases that ran out (job requeued or dead-lettered)
    promoted: int  # scheduled / retry_wait jobs that became ready
    dropped: int  # finished job records dropped after retention
    keys_dropped: int  # idempotency keys past their window


@record
class Released:
    """WorkerLost: the worker's jobs, requeued or (attempts exhausted) dead-lettered."""

    requeued: int
    dead_lettered: int


@record
class Renewed:
    count: int  # leases whose expiry moved later


@record
class Redriven:
    count: int


@record
class Purged:
    count: int


@record
class ScheduleFired:
    """What a FireSchedule did: outcome is one of schedules.FIRE_OUTCOMES or STALE (nothing
    changed); job_id is set when a job was created."""

    name: str
    fire_ms: int
    outcome: str
    job_id: str | None


@record
class Rejected:
    """The entry's data is not a command this version understands; it changed nothing."""

    reason: str


ApplyResult = Union[
    Submitted, QueueFull, Leased, ItemOutcomes, Ticked, Released, Renewed, Ok, ItemError, Redriven, Purged, Rejected,
    ScheduleFired,
]
