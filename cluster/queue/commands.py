"""Queue commands: the values the leader replicates through the Raft log, and their codec.

Theory of operation
-------------------
Every state change of the queue is one command, built at the API edge from a validated request,
stamped with the leader's clock (`now_ms`) and, where the outcome needs randomness (backoff
jitter), with a 64-bit `entropy` drawn by the leader. Replicas never read a clock or a random
generator of their own: the command carries everything `QueueStateMachine.apply` needs, so every
replica computes the same state from the same log.

Wire form: a msgpack array `[tag, field, field, ...]` in the declared field order; nested items
(`NewJob`, `AckItem`, ...) are arrays of their fields in the same way. Positional arrays keep a
1000-job submit compact and fast to pack. `decode_command` checks the tag, the arity and the type
of every field (and the priority range, which indexes an array in the state machine) before it
builds anything, so an entry that does not decode is refused whole with `CommandDecodeError`
rather than half-applied.

A tag, once used, keeps its meaning forever: entries written by older nodes stay in the log.
"""

from __future__ import annotations

from dataclasses import fields
from operator import attrgetter
from typing import Any, Callable, ClassVar, NamedTuple, Union

import msgpack

from raftq.cluster.records import record

# Job priorities run 0 (lowest, the default) to 9 (runs first); the state machine keeps one FIFO
# per level, so a priority outside the range would index past its array. The wire's bounds.
from raftq.protocol import PRIORITY_MAX, PRIORITY_MIN


class CommandDecodeError(ValueError):
    """Raised when bytes are not the encoding of a queue command."""


# ---------------------------------------------------------------------- items


class NewJob(NamedTuple):
    """One job of a Submit, with every default already resolved at the API edge.

    A named tuple rather than a frozen dataclass like the other items: a batched submit builds
    one per job at the edge and again on every replica's decode, and a frozen dataclass's
    `__init__` (one `object.__setattr__` per field) cost several times a tuple's construction;
    a tuple is also its own wire form (an array of the fields in order). Immutable all the same.
    """

    id: str
    payload: bytes  # msgpack encoding of the user's value; opaque here
    priority: int  # PRIORITY_MIN..PRIORITY_MAX, 9 runs first
    delay_ms: int  # 0 = ready at once
    max_attempts: int  # leases allowed before the job is dead-lettered
    lease_ms: int  # lease (visibility) timeout of each attempt
    idempotency_key: str | None
    backoff_base_ms: int
    backoff_cap_ms: int
    # Flow control (at most one of the two; the API edge refuses both): the queue's
    # max_running_per_key counts LEASED jobs by `key`; in a fifo queue the jobs of one `group`
    # are leased one at a time in submit order. Both also name a lane for round-robin fairness.
    key: str | None = None
    group: str | None = None


@record
class AckItem:
    id: str
    lease_token: int  # the fencing token the lease answer gave
    result: bytes | None  # msgpack encoding of the job's result, if any


@record
class FailItem:
    id: str
    lease_token: int
    error: str
    retry: bool  # False: dead-letter at once
    delay_ms: int | None  # None: exponential backoff with full jitter


@record
class ReleaseItem:
    id: str
    lease_token: int


@record
class ExtendItem:
    id: str
    lease_token: int
    lease_ms: int  # the lease now ends at now + lease_ms


# ---------------------------------------------------------------------- commands


@record
class Submit:
    TAG: ClassVar[int] = 1
    now_ms: int
    queue: str
    jobs: tuple[NewJob, ...]


@record
class Lease:
    TAG: ClassVar[int] = 2
    now_ms: int
    worker: str
    queues: tuple[str, ...]
    max_jobs: int


@record
class Ack:
    TAG: ClassVar[int] = 3
    now_ms: int
    worker: str
    items: tuple[AckItem, ...]


@record
class Fail:
    TAG: ClassVar[int] = 4
    now_ms: int
    worker: str
    entropy: int  # 64-bit draw by the leader; item i's jitter is splitmix64(entropy + i)
    items: tuple[FailItem, ...]


@record
class Extend:
    TAG: ClassVar[int] = 5
    now_ms: int
    worker: str
    items: tuple[ExtendItem, ...]


@record
class Tick:
    """Expire leases, promote due jobs, drop records and idempotency keys past their time."""

    TAG: ClassVar[int] = 6
    now_ms: int
    entropy: int


@record
class WorkerLost:
    """Requeue every job leased by `worker` (each counts as an attempt)."""

    TAG: ClassVar[int] = 7
    now_ms: int
    worker: str
    entropy: int


@record
class RenewLeases:
    """A new leader's first act: no live lease ends before now + its lease_ms."""

    TAG: ClassVar[int] = 8
    now_ms: int


@record
class Cancel:
    TAG: ClassVar[int] = 9
    now_ms: int
    id: str


@record
class Redrive:
    """DEAD -> READY with attempts reset; ids=None redrives every dead job of the queue."""

    TAG: ClassVar[int] = 10
    now_ms: int
    queue: str
    ids: tuple[str, ...] | None


@record
class Purge:
    """Delete every job of the queue in `state` ("dead" or "ready")."""

    TAG: ClassVar[int] = 11
    now_ms: int
    queue: str
    state: str


@record
class SetQueueConfig:
    """Replaces the queue's settings (a field left None is unlimited / off)."""

    TAG: ClassVar[int] = 12
    now_ms: int
    queue: str
    max_depth: int | None  # jobs not finished (scheduled, ready, leased, retry_wait); None = unbounded
    # Token bucket on leases: refills rate_per_ks / 1000 leases a second (integer, so that every
    # replica computes the same level), holds at most `burst` leases. None = no rate limit.
    rate_per_ks: int | None = None
    burst: int | None = None
    max_running_per_key: int | None = None  # LEASED jobs of one key at a time; None = unlimited
    fifo: bool = False  # the jobs of one group are leased one at a time, in submit order


@record
class PutSchedule:
    """Creates or replaces a schedule; the leader computed `next_fire_ms` from the spec at `now_ms`.

    The spec (cron or every_ms, timezone) is carried for display and for the leader's own fire-time
    arithmetic (cluster/schedules.py); the state machine never evaluates it.
    """

    TAG: ClassVar[int] = 13
    now_ms: int
    name: str
    queue: str
    payload: bytes  # msgpack of the user's value, like NewJob.payload
    cron: str | None
    every_ms: int | None
    timezone: str
    overlap: str  # "allow" | "skip"
    catch_up: str  # "none" | "latest" | "all"
    priority: int
    max_attempts: int
    lease_ms: int
    backoff_base_ms: int
    backoff_cap_ms: int
    next_fire_ms: int


@record
class DeleteSchedule:
    TAG: ClassVar[int] = 14
    now_ms: int
    name: str


@record
class PauseSchedule:
    """paused=True stops fires; paused=False resumes from `next_fire_ms` (fires missed while
    paused are skipped: the leader computed the next one after now)."""

    TAG: ClassVar[int] = 15
    now_ms: int
    name: str
    paused: bool
    next_fire_ms: int


@record
class FireSchedule:
    """The leader's decision about one due fire time of a schedule.

    Applied only while the schedule's revision is `revision` and its next fire time is
    `fire_ms`, so each (name, fire time) takes effect at most once however often leaders
    propose it. `run`: create job `job_id` (subject to the overlap policy), or skip this fire
    time (catch-up policy). Either way the schedule's next fire time becomes `next_fire_ms`.
    """

    TAG: ClassVar[int] = 16
    now_ms: int
    name: str
    revision: int
    fire_ms: int
    next_fire_ms: int
    run: bool
    job_id: str


@record
class Release:
    """LEASED -> READY without counting the attempt: a worker hands back jobs it did not start."""

    TAG: ClassVar[int] = 17
    now_ms: int
    worker: str
    items: tuple[ReleaseItem, ...]


@record
class DeleteQueue:
    """Removes a queue, its settings, counters and finished records; refused (CONFLICT) while it
    holds unfinished jobs unless `force`, which cancels them first."""

    TAG: ClassVar[int] = 18
    now_ms: int
    queue: str
    force: bool


Command = Union[
    Submit, Lease, Ack, Fail, Extend, Tick, WorkerLost, RenewLeases, Cancel, Redrive, Purge, SetQueueConfig,
    PutSchedule, DeleteSchedule, PauseSchedule, FireSchedule, Release, DeleteQueue,
]
COMMAND_TYPES: tuple[type, ...] = (
    Submit, Lease, Ack, Fail, Extend, Tick, WorkerLost, RenewLeases, Cancel, Redrive, Purge, SetQueueConfig,
    PutSchedule, DeleteSchedule, PauseSchedule, FireSchedule, Release, DeleteQueue,
)


# ---------------------------------------------------------------------- codec

# A field's schema is a tuple of accepted types (checked with isinstance), or a decoder function
# for composite fields (a tuple of items or of strings).
_Schema = tuple[Union[tuple[type, ...], Callable[[Any, str], Any]], ...]

_INT = (int,)
_OPT_INT = (int, type(None))
_STR = (str,)
_OPT_STR = (str, type(None))
_BYTES = (bytes,)
_OPT_BYTES = (bytes, type(None))
_BOOL = (bool,)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if type(value) is not tuple or not all(type(v) is str for v in value):
        raise CommandDecodeError(f"{where}: expected an array of strings")
    return value


def _opt_strings(value: Any, where: str) -> tuple[str, ...] | None:
    return None if value is None else _strings(value, where)


def _new_job(values: tuple, where: str, index: int) -> NewJob:
    # The common case in one step: an array of the current shape whose field types are one of
    # the accepted combinations (see _NEW_JOB_TYPES); anything else takes the field-by-field path.
    if type(values) is tuple and tuple(map(type, values)) in _NEW_JOB_TYPES and \
            PRIORITY_MIN <= values[2] <= PRIORITY_MAX:
        return tuple.__new__(NewJob, values)
    where = f"{where}[{index}]"
    job = _build(NewJob, _NEW_JOB_SCHEMA, values, where)
    if not PRIORITY_MIN <= job.priority <= PRIORITY_MAX:
        raise CommandDecodeError(f"{where}: priority {job.priority} out of range")
    return job


def _items_of(builder: Callable[[tuple, str, int], Any]) -> Callable[[Any, str], tuple]:
    """A decoder of an array of items; builder(item, where, index) names the item's place
    (`where[index]`) only when it has to, off the path every well-formed item takes."""
    def decode_items(value: Any, where: str) -> tuple:
        if type(value) is not tuple:
            raise CommandDecodeError(f"{where}: expected an array of items")
        return tuple(builder(item, where, i) for i, item in enumerate(value))

    return decode_items


def _item(cls: type, schema: _Schema) -> Callable[[tuple, str, int], Any]:
    return lambda values, where, index: _build(cls, schema, values, f"{where}[{index}]")


_NEW_JOB_SCHEMA: _Schema = (_STR, _BYTES, _INT, _INT, _INT, _INT, _OPT_STR, _INT, _INT, _OPT_STR, _OPT_STR)
#: The exact field types of a NewJob array that _NEW_JOB_SCHEMA accepts as they are (no bool for an
#: int: msgpack decodes `true` as bool, which the schema's isinstance would also take, so such an
#: array goes the slow path and decodes as before).
_NEW_JOB_TYPES = frozenset(
    (str, bytes, int, int, int, int, idempotency_key, int, int, key, group)
    for idempotency_key in (str, type(None)) for key in (str, type(None)) for group in (str, type(None))
)
_ACK_ITEM_SCHEMA: _Schema = (_STR, _INT, _OPT_BYTES)
#: The exact field types of an AckItem array taken as they are (a bool token goes the slow path).
_ACK_ITEM_TYPES = frozenset(((str, int, bytes), (str, int, type(None))))


def _ack_item(values: tuple, where: str, index: int) -> AckItem:
    # Every job acked is one of these on every follower: the common shape in one step, as _new_job.
    if type(values) is tuple and tuple(map(type, values)) in _ACK_ITEM_TYPES:
        return AckItem(*values)
    return _build(AckItem, _ACK_ITEM_SCHEMA, values, f"{where}[{index}]")


_FAIL_ITEM = _item(FailItem, (_STR, _INT, _STR, _BOOL, _OPT_INT))
_EXTEND_ITEM = _item(ExtendItem, (_STR, _INT, _INT))
_RELEASE_ITEM = _item(ReleaseItem, (_STR, _INT))

#: tag -> (command class, schema of its fields in declared order)
_COMMAND_SCHEMAS: dict[int, tuple[type, _Schema]] = {
    Submit.TAG: (Submit, (_INT, _STR, _items_of(_new_job))),
    Lease.TAG: (Lease, (_INT, _STR, _strings, _INT)),
    Ack.TAG: (Ack, (_INT, _STR, _items_of(_ack_item))),
    Fail.TAG: (Fail, (_INT, _STR, _INT, _items_of(_FAIL_ITEM))),
    Extend.TAG: (Extend, (_INT, _STR, _items_of(_EXTEND_ITEM))),
    Tick.TAG: (Tick, (_INT, _INT)),
    WorkerLost.TAG: (WorkerLost, (_INT, _STR, _INT)),
    RenewLeases.TAG: (RenewLeases, (_INT,)),
    Cancel.TAG: (Cancel, (_INT, _STR)),
    Redrive.TAG: (Redrive, (_INT, _STR, _opt_strings)),
    Purge.TAG: (Purge, (_INT, _STR, _STR)),
    SetQueueConfig.TAG: (SetQueueConfig, (_INT, _STR, _OPT_INT, _OPT_INT, _OPT_INT, _OPT_INT, _BOOL)),
    PutSchedule.TAG: (PutSchedule, (_INT, _STR, _STR, _BYTES, _OPT_STR, _OPT_INT, _STR, _STR, _STR, _INT, _INT,
                                    _INT, _INT, _INT, _INT)),
    DeleteSchedule.TAG: (DeleteSchedule, (_INT, _STR)),
    PauseSchedule.TAG: (PauseSchedule, (_INT, _STR, _BOOL, _INT)),
    FireSchedule.TAG: (FireSchedule, (_INT, _STR, _INT, _INT, _INT, _BOOL, _STR)),
    Release.TAG: (Release, (_INT, _STR, _items_of(_RELEASE_ITEM))),
    DeleteQueue.TAG: (DeleteQueue, (_INT, _STR, _BOOL)),
}
#: Fields added to a shape after entries of the shorter shape were written: an array that lacks
#: them decodes with these values (older logs stay readable; a tag keeps its meaning).
_TRAILING_DEFAULTS: dict[type, tuple] = {
    NewJob: (None, None),  # key, group
    SetQueueConfig: (None, None, None, False),  # rate_per_ks, burst, max_running_per_key, fifo
}


def _build(cls: type, schema: _Schema, values: Any, where: str) -> Any:
    defaults = _TRAILING_DEFAULTS.get(cls)
    if defaults and type(values) is tuple and len(schema) - len(defaults) <= len(values) < len(schema):
        values = values + defaults[len(values) - len(schema):]
    if type(values) is not tuple or len(values) != len(schema):
        raise CommandDecodeError(f"{where}: expected an array of {len(schema)} fields for {cls.__name__}")
    converted = []
    for position, (value, expected) in enumerate(zip(values, schema)):
        if type(expected) is tuple:
            if not isinstance(value, expected):
                raise CommandDecodeError(
                    f"{where}: {cls.__name__} field {position} has type {type(value).__name__}"
                )
            converted.append(value)
        else:
            converted.append(expected(value, f"{where}.{position}"))
    return cls(*converted)


def _getter(cls: type) -> attrgetter:
    return attrgetter(*(f.name for f in fields(cls)))


_ITEM_FIELDS = {AckItem: _getter(AckItem), FailItem: _getter(FailItem), ExtendItem: _getter(ExtendItem),
                ReleaseItem: _getter(ReleaseItem)}
_SCALAR_FIELDS = {cls: _getter(cls) for cls in COMMAND_TYPES}


def encode_command(command: Command) -> bytes:
    """Encodes a command for the log.

    Args:
        command: any of the command dataclasses of this module.
    Returns:
        The msgpack bytes `[tag, field, ...]`.
    """
    cls = type(command)
    assert cls in _SCALAR_FIELDS, f"not a queue command: {cls.__name__}"
    if cls is Submit:
        values: tuple = (command.now_ms, command.queue, command.jobs)  # each NewJob packs as its array
    else:
        values = _SCALAR_FIELDS[cls](command)
        if len(_COMMAND_SCHEMAS[cls.TAG][1]) == 1:
            values = (values,)  # attrgetter of one name returns the value, not a 1-tuple
        if cls in (Ack, Fail, Extend, Release):
            items = command.items
            getter = _ITEM_FIELDS[type(items[0])] if items else None
            values = values[:-1] + (tuple(map(getter, items)) if getter else (),)
    return msgpack.packb((cls.TAG,) + tuple(values), use_bin_type=True)


def decode_command(data: bytes) -> Command:
    """Decodes one log entry's data.

    Args:
        data: bytes produced by `encode_command`.
    Returns:
        The command.
    Raises:
        CommandDecodeError: the bytes are not msgpack, or not a known command of the right shape.
    """
    try:
        raw = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CommandDecodeError(f"not msgpack: {exc}") from None
    if type(raw) is not tuple or not raw or type(raw[0]) is not int:
        raise CommandDecodeError("expected an array starting with an integer command tag")
    entry = _COMMAND_SCHEMAS.get(raw[0])
    if entry is None:
        raise CommandDecodeError(f"unknown command tag {raw[0]}")
    cls, schema = entry
    return _build(cls, schema, raw[1:], cls.__name__)
