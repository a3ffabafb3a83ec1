"""The deterministic queue state machine that every replica applies committed entries to.

Theory of operation
-------------------
`QueueStateMachine.apply(entry)` decodes one committed command and changes the queue state. Every
replica applies the same entries in the same order, so every replica must compute the same state
(SPEC guarantee 6). Hence the rules this module keeps (STYLE §4):

* No clock, no randomness, no I/O. Time comes only from commands: `clock_ms` is the maximum
  `now_ms` seen so far (a new leader's clock may lag the old one's, and time must not run
  backwards), and every decision uses `clock_ms`. A leader's `now_ms` is this clock advanced by
  its monotonic time, never its wall clock (`cluster/leader_clock.py`). Backoff jitter comes from the command's
  `entropy` through `splitmix64`.
* No iteration over a set of str (string hashing differs per process); dicts keep insertion
  order, and anything whose order matters is sorted or carries a sequence number.
* Business outcomes (unknown id, stale lease, full queue) are result values (`results.py`),
  never exceptions: an apply that raises on one replica only would diverge the cluster. Broken
  invariants are asserts, because a replica in an impossible state must stop, not guess.

Job lifecycle (SPEC.md):

    submit ─► SCHEDULED ─(due)─► READY ─lease─► LEASED ─ack─► DONE ─(retention)─► dropped
                                   ▲               │ fail / lease expired / worker lost
                                   │               ▼
                                   └─(due)── RETRY_WAIT       (attempts left, retry=True)
                          redrive  │               │ attempts exhausted or retry=False
                                   └────────────── DEAD ─purge─► deleted
    cancel: any state but DONE ─► CANCELLED ─(retention)─► dropped

Structures (rebuilt by `restore` from the job records, except what decides future leases and
is not derivable from them: each queue's turn order and token bucket, and the schedules):

* `_jobs`: id -> Job, the single source of truth; every other structure indexes it.
* Per queue (`_Queue`): its READY jobs in lanes (the pool, and one lane per key or group), each
  with ten FIFO deques, one per priority, and the turns the lanes take (flow.py); per-state counts
  kept incrementally (so `queue_stats` is O(queues)); the DEAD jobs by id; metric counters; its
  settings (max_depth, rate and burst with the token bucket, max_running_per_key, fifo).
* `_schedules`: name -> Schedule (schedules.py): each fire time applies at most once.
* `_delayed`: a heap of (ready_at_ms, seq, job) for SCHEDULED and RETRY_WAIT jobs.
* `_leases`: a heap of (expires_at_ms, token, job) for LEASED jobs.
* `_worker_jobs`: worker -> {id: job} of the jobs it holds (WorkerLost, heartbeats).
* `_idempotency`: queue -> {key: job id} for every key inside its window, and
  `_idempotency_fifo`, the keys by expiry: one (expires_at_ms, queue, keys, ids) batch per Submit
  that brought keys (all the keys of one Submit expire together). A key is in exactly one batch,
  the one that added it; a Submit drops the expired batches before it looks a key up, so every
  key it finds is inside its window, and a Tick drops them too.
* `_finished`: a FIFO of the DONE and CANCELLED jobs by finished_at_ms, dropped after
  `retention_ms`.

The deques and heaps use lazy deletion: cancelling a ready job only flips its state, and the
stale entry is skipped when it reaches the front (a state or sequence check tells it apart).
Stale entries never change an outcome, only memory, and `_compact_*` bounds that. Because a job
receives a fresh, unique `seq` each time it enters a ready FIFO or the delay heap, and a lease a
fresh, unique token, both structures have a total order that `restore` reproduces exactly.

Snapshots are taken in two halves, because a state may hold a million jobs and the node serves
from one asyncio event loop. `capture()` runs on the loop between two applies: one C-level pass
that copies each job's fields into a tuple (`job_row`), plus the scalars, the idempotency batches
and one row per queue. It is cheap because it shares instead of copying deeply: every field of
a job holds an immutable value (`jobs.py`), so the rows need no protection from later applies.
`write_snapshot(capture, write)` then runs anywhere, typically a worker thread: it sorts, makes
each job's snapshot row from its slots (`snapshot_row`: the settings unpacked, the times the
transitions hold written out), and encodes in bounded steps (a few thousand rows per msgpack
call), so the GIL returns to the loop between steps. `snapshot()` and `digest()` are the same
two calls, so there is one encoder and the bytes stay canonical. `restore_from(stream)` decodes
a snapshot file row by row into job records and changes nothing until the whole stream has been
read and checked.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import io
from collections import deque
from itertools import groupby, islice
from operator import attrgetter, itemgetter
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import msgpack

from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue.commands import CommandDecodeError, decode_command
from raftq.cluster.queue.flow import POOL, UNITS_PER_LEASE, Lane, bucket_level, bucket_wait_ms, lane_of
from raftq.cluster.queue.jobs import (
    ACTIVE_STATES, CANCELLED, DEAD, DONE, FINISHED_STATES, LEASED, PURGED, READY, RETRY_WAIT, SCHEDULED,
    ROW_FIELD_COUNT, ROW_FIELD_COUNT_V1, STATES, TRANSITIONS_MAX, Job, Policy, backoff_delay_ms, extended_history,
    job_row, snapshot_row,
)
from raftq.cluster.queue.results import (  # re-exported: the API maps these to HTTP
    CONFLICT, LEASE_EXPIRED, LEASE_MISMATCH, NOT_FOUND, OK, ApplyResult, Extended, ItemError, ItemOutcomes,
    Leased, JobGrant, Ok, Outcome, Purged, QueueFull, Redriven, Rejected, Released, Renewed, ScheduleFired,
    Submitted, Ticked,
)
from raftq.cluster.queue.schedules import (
    CREATED, SKIPPED_CATCH_UP, SKIPPED_FULL, SKIPPED_OVERLAP, STALE, Schedule, schedule_row,
)
from raftq.cluster.raft.messages import Entry, EntryKind
from raftq.cluster.records import record

__all__ = [
    "QueueStateMachine", "SnapshotCapture", "write_snapshot", "EVENTS", "SNAPSHOT_VERSION",
    "ApplyResult", "Outcome", "Ok", "OK", "ItemError", "Extended", "ItemOutcomes", "Submitted", "QueueFull", "Leased", "JobGrant", "Ticked", "Released",
    "Renewed", "Redriven", "Purged", "Rejected", "NOT_FOUND", "LEASE_MISMATCH", "LEASE_EXPIRED", "CONFLICT",
]

#: Metric counter events, kept per queue (`counters` is keyed (event, queue)).
EVENTS: tuple[str, ...] = (
    "submitted", "leased", "acked", "failed", "retried", "dead_lettered", "cancelled",
    "requeued_expired", "requeued_worker_lost", "redriven", "released",
)
#: Snapshots written before "released" was counted carry only the counters before it (restored as 0).
EVENTS_COUNT_BEFORE_RELEASE = EVENTS.index("released")
#: Format of `snapshot()`. Version 2 added flow control (job key, group and order; queue
#: settings, bucket and turns) and schedules; restore also reads version 1, and refuses others.
SNAPSHOT_VERSION = 2
#: States in which a job has left its group's line (a FIFO group's head is never one of these).
_OUT_OF_GROUP: tuple[str, ...] = (DONE, DEAD, CANCELLED, PURGED)
PRIORITY_LEVELS = cmds.PRIORITY_MAX + 1
#: Stale entries tolerated in a heap or a queue's FIFOs beyond the number of live ones before
#: they are swept out: the sweep is O(size), so letting this many pile up keeps it amortised O(1).
COMPACT_SLACK = 4096
#: Stale lease-heap entries tolerated beyond twice the live leases of the last sweep, checked at
#: every push: a lease ended by an ack leaves its entry behind until its expiry time (30 s by
#: default), so a burst of short jobs otherwise keeps one dead entry (72 bytes) per job for that
#: long. After a sweep the heap holds only live entries, and the next waits until it has doubled:
#: each sweep is paid for by as many pushes as it reads (amortised O(1) a push).
LEASE_HEAP_SLACK = 256
#: Distinct job settings `_new_policy` keeps before it starts afresh (a memory bound, not a behaviour).
POLICIES_MAX = 4096
#: A NewJob's settings as a plain tuple, in Policy's field order: one C-level call, and a tuple
#: equal (and hashing equal) to the Policy of the same values, so it finds that Policy in a dict.
_settings_of: Callable[[cmds.NewJob], tuple] = attrgetter(*Policy._fields)
#: Keys of the snapshot map, in the sorted order the canonical encoding writes them.
SNAPSHOT_KEYS: tuple[str, ...] = (
    "clock_ms", "idempotency", "jobs", "last_applied", "lease_counter", "membership", "queues", "rotation",
    "schedules", "seq", "version",
)
#: Keys a snapshot may lack: "membership" is written only once a CONFIG entry was applied, so the
#: snapshots of a cluster whose membership never changed are what they were before it existed.
SNAPSHOT_KEYS_OPTIONAL: tuple[str, ...] = ("membership",)
#: Keys a version-1 snapshot has (no schedules).
SNAPSHOT_KEYS_V1: tuple[str, ...] = tuple(key for key in SNAPSHOT_KEYS if key not in ("schedules", "membership"))
assert list(SNAPSHOT_KEYS) == sorted(SNAPSHOT_KEYS)
#: Rows per msgpack call and per `write` when writing a snapshot: a few milliseconds of work,
#: after which a worker thread can hand the GIL back to the event loop.
ROWS_PER_CHUNK = 2048
#: Rows per sorted run when writing a snapshot: one `sorted()` call of a few milliseconds.
SORT_RUN = 16384
#: Bytes the streaming restore reads from its file at a time.
RESTORE_READ_BYTES = 1 << 20
#: The sort key of every snapshot array: the first field of a row (job id, queue name, key).
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)


class _Queue:
    """One named queue: its lanes of READY jobs, per-state counts, dead jobs, settings and counters
    (lanes, turns, groups, running and the bucket: see flow.py)."""

    __slots__ = (
        "name", "lanes", "turns", "groups", "running", "counts", "dead", "max_depth", "events",
        "rate_per_ks", "burst", "max_running_per_key", "fifo", "bucket_level", "bucket_at_ms",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        # The pool lane always exists; keyed and grouped lanes live while they hold entries.
        self.lanes: dict[str, Lane] = {POOL: Lane(POOL, PRIORITY_LEVELS)}
        self.turns: dict[str, None] = {}  # lanes with a candidate, in round-robin order
        self.groups: dict[str, list[tuple[int, Job]]] = {}  # group -> heap of (order, job), unfinished
        self.running: dict[str, int] = {}  # key -> LEASED jobs of that key
        self.counts: dict[str, int] = dict.fromkeys(STATES, 0)
        self.dead: dict[str, Job] = {}
        self.max_depth: int | None = None
        self.events: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self.rate_per_ks: int | None = None
        self.burst = 0
        self.max_running_per_key: int | None = None
        self.fifo = False
        self.bucket_level = 0
        self.bucket_at_ms = 0

    def active_count(self) -> int:
        counts = self.counts
        return counts[SCHEDULED] + counts[READY] + counts[LEASED] + counts[RETRY_WAIT]

    def ready_entries_count(self) -> int:
        return sum(lane.entries_count() for lane in self.lanes.values())

    def settings(self) -> tuple[int | None, int | None, int | None, bool]:
        """(rate_per_ks, burst, max_running_per_key, fifo), as SetQueueConfig carries them."""
        return (self.rate_per_ks, self.burst if self.rate_per_ks is not None else None,
                self.max_running_per_key, self.fifo)

    def bucket_now(self, now: int) -> int:
        """The token bucket's level at `now` (read-only; UNITS_PER_LEASE per lease)."""
        assert self.rate_per_ks is not None
        return bucket_level(self.bucket_level, self.bucket_at_ms, now, self.rate_per_ks, self.burst)


@record
class SnapshotCapture:
    """The whole state at one applied index, as immutable values (`QueueStateMachine.capture`).

    Shares nothing mutable with the machine: apart from its own list of rows, it holds tuples of
    str, int, bytes and None only, so `write_snapshot` can encode it in a worker thread while
    the machine goes on applying. Nothing is sorted yet: sorting costs O(n log n) comparisons
    of Python objects, which belong off the event loop.

    Attributes:
        last_applied: index of the last entry applied: the index of the snapshot.
        clock_ms, lease_counter, seq, rotation: the machine's scalar fields.
        idempotency: the idempotency batches (expires_at_ms, queue, keys, job ids), one per Submit
            that brought keys, in any order (`write_snapshot` writes one row per key).
        queues: (name, max_depth, counters of EVENTS in that order, settings (rate_per_ks, burst,
            max_running_per_key, fifo), bucket (level, at_ms), turns (lane ids in order)) per
            queue, in any order.
        schedules: one `schedule_row` per schedule, in any order.
        membership: the data of the last CONFIG entry applied (an encoded cluster membership,
            opaque here), or None when none was.
        jobs: one `Job.to_row()` row per job, in any order. A list, because `list(map())`
            builds a million rows faster than `tuple(map())`; no one changes it after capture.
    """

    last_applied: int
    clock_ms: int
    lease_counter: int
    seq: int
    rotation: int
    idempotency: tuple[tuple[int, str, tuple[str, ...], tuple[str, ...]], ...]
    queues: tuple[tuple, ...]
    jobs: list[tuple]
    schedules: tuple[tuple, ...] = ()
    membership: bytes | None = None


class QueueStateMachine:
    """Applies committed queue commands; answers read-only queries about the applied state.

    Args:
        retention_ms: how long DONE and CANCELLED records stay readable after they finish.
        idempotency_window_ms: how long a submit's idempotency key maps to its job.
    Both must be equal on every replica: they decide when a Tick drops state.
    """

    def __init__(self, retention_ms: int = 3_600_000, idempotency_window_ms: int = 3_600_000) -> None:
        assert retention_ms >= 0 and idempotency_window_ms >= 0
        self.retention_ms = retention_ms
        self.idempotency_window_ms = idempotency_window_ms
        self._handlers: dict[type, Callable[[Any], ApplyResult]] = {
            cmds.Submit: self._apply_submit,
            cmds.Lease: self._apply_lease,
            cmds.Ack: self._apply_ack,
            cmds.Fail: self._apply_fail,
            cmds.Extend: self._apply_extend,
            cmds.Tick: self._apply_tick,
            cmds.WorkerLost: self._apply_worker_lost,
            cmds.RenewLeases: self._apply_renew_leases,
            cmds.Cancel: self._apply_cancel,
            cmds.Redrive: self._apply_redrive,
            cmds.Purge: self._apply_purge,
            cmds.SetQueueConfig: self._apply_set_queue_config,
            cmds.PutSchedule: self._apply_put_schedule,
            cmds.DeleteSchedule: self._apply_delete_schedule,
            cmds.PauseSchedule: self._apply_pause_schedule,
            cmds.FireSchedule: self._apply_fire_schedule,
            cmds.Release: self._apply_release,
            cmds.DeleteQueue: self._apply_delete_queue,
        }
        self._reset()

    def _reset(self) -> None:
        self.last_applied = 0  # index of the last entry applied (Raft's lastApplied)
        self.clock_ms = 0  # max now_ms of every command applied: the replicated clock
        self._lease_counter = 0  # last fencing token granted; tokens are never reused
        self._seq = 0  # last sequence number given to a ready / delayed entry
        self._rotation = 0  # Lease commands applied; rotates the first queue served
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, _Queue] = {}
        self._delayed: list[tuple[int, int, Job]] = []
        self._leases: list[tuple[int, int, Job]] = []
        self._leases_live_at_sweep = 0  # entries left by the last sweep of _leases (all live then)
        self._worker_jobs: dict[str, dict[str, Job]] = {}
        # Per key: one entry in its queue's dict and two pointers in its batch (about 60 bytes),
        # not a (queue, key) tuple, a (job id, expiry) tuple and a FIFO tuple (about 240).
        self._idempotency: dict[str, dict[str, str]] = {}
        self._idempotency_fifo: deque[tuple[int, str, tuple[str, ...], tuple[str, ...]]] = deque()
        self._finished: deque[Job] = deque()
        self._schedules: dict[str, Schedule] = {}
        #: The data of the last CONFIG entry applied (the Raft core's encoded membership, opaque
        #: here): snapshots carry it, so a node restored from one knows its cluster's members.
        self.membership: bytes | None = None
        #: Observations for metrics and logs, (kind, queue, value): "job_latency" (submit -> ack, ms),
        #: "queue_wait" (submit -> first lease, ms), "dead_lettered" (attempts made). Not state: excluded from snapshots and digests;
        #: the node drains it after every applied batch.
        self.metric_samples: list[tuple[str, str, int]] = []
        #: Memory only, not state: the values many jobs hold alike, one object each (see
        #: _new_policy and _at_now).
        self._policies: dict[tuple, Policy] = {}
        self._now_values_at_ms = -1
        self._now_values: dict[Any, Any] = {}

    # ------------------------------------------------------------------ apply

    def apply(self, entry: Entry, command: cmds.Command | None = None) -> ApplyResult | None:
        """Applies one committed entry.

        Args:
            entry: the next committed entry; its index must be last_applied + 1.
            command: the command `entry.data` encodes, when the caller holds it already (the
                leader that proposed it: a decode of the encoding equals the command); else the
                data is decoded here.
        Returns:
            None for a NOOP entry, `Rejected` for data that is not a command, else the command's
            result (see `results.py`).
        """
        assert entry.index == self.last_applied + 1, (
            f"entry {entry.index} applied after {self.last_applied}: committed entries apply in order, once"
        )
        self.last_applied = entry.index
        if entry.kind == EntryKind.NOOP:
            return None
        if entry.kind == EntryKind.CONFIG:
            self.membership = entry.data
            return None
        if command is None:
            try:
                command = decode_command(entry.data)
            except CommandDecodeError as exc:
                # Every replica decodes the same bytes the same way, so refusing the entry keeps
                # them equal; raising would stop every node on the same entry at every restart.
                return Rejected(f"entry {entry.index}: {exc}")
        if command.now_ms > self.clock_ms:
            self.clock_ms = command.now_ms
        return self._handlers[type(command)](command)

    # ------------------------------------------------------------------ submit

    def _apply_submit(self, command: cmds.Submit) -> Submitted | QueueFull:
        now = self.clock_ms
        name = command.queue
        ids: list[str] = []
        created: list[bool] = []
        fresh: list[cmds.NewJob] = []
        batch_keys: dict[str, str] = {}  # key -> id of the first job in this batch that used it
        batch_ids: dict[str, None] = {}
        if self._idempotency_fifo and self._idempotency_fifo[0][0] <= now:
            self._drop_idempotency_keys(now)  # so that every key found below is inside its window
        for new in command.jobs:
            known = self._known_job_id(name, new, now, batch_keys, batch_ids)
            if known is not None:
                ids.append(known)
                created.append(False)
                continue
            ids.append(new.id)
            created.append(True)
            fresh.append(new)
            batch_ids[new.id] = None
            if new.idempotency_key is not None:
                batch_keys[new.idempotency_key] = new.id
        queue = self._queues.get(name)
        if fresh and queue is not None and queue.max_depth is not None:
            if queue.active_count() + len(fresh) > queue.max_depth:
                return QueueFull(name, queue.max_depth)
        if fresh:
            if queue is None:
                queue = self._queue(name)
            for new in fresh:
                self._create_job(queue, new, now)
            queue.events["submitted"] += len(fresh)
            if batch_keys:
                self._add_idempotency_keys(name, batch_keys, now)
        return Submitted(tuple(ids), tuple(created))

    def _known_job_id(
        self, queue: str, new: cmds.NewJob, now: int, batch_keys: dict[str, str], batch_ids: dict[str, None]
    ) -> str | None:
        """The id of the job `new` duplicates (same key inside the window, or same id), or None."""
        key = new.idempotency_key
        if key is not None:
            if key in batch_keys:
                return batch_keys[key]
            held = self._idempotency.get(queue)
            found = None if held is None else held.get(key)
            if found is not None:  # inside its window: expired keys were dropped first
                return found
        # Ids are unique by construction at the edge; a repeated id is the same job submitted
        # again, so it is idempotent by id too and never overwrites the first record.
        if new.id in self._jobs or new.id in batch_ids:
            return new.id
        return None

    def _create_job(self, queue: _Queue, new: cmds.NewJob, now: int) -> None:
        delayed = new.delay_ms > 0
        state = SCHEDULED if delayed else READY
        settings = _settings_of(new)
        policy = self._policies.get(settings)
        if policy is None:
            policy = self._new_policy(settings)
        job = Job(
            new.id, queue.name, state, new.payload, policy, new.idempotency_key, self._transition(state, now)[1],
            self._at_now(now, now + new.delay_ms) if delayed else now, new.key, new.group,
        )
        self._jobs[job.id] = job
        queue.counts[job.state] += 1
        if job.group is not None:
            self._join_group(queue, job)
        if delayed:
            self._push_delayed(job)
        else:
            self._push_ready(queue, job)

    def _add_idempotency_keys(self, queue: str, keys: dict[str, str], now: int) -> None:
        """Indexes the keys of the jobs one Submit created ({key: job id}), as one batch that
        expires a window from now."""
        held = self._idempotency.get(queue)
        if held is None:
            held = self._idempotency[queue] = {}
        held.update(keys)
        batch = (now + self.idempotency_window_ms, queue, tuple(keys), tuple(keys.values()))
        fifo = self._idempotency_fifo
        if fifo and fifo[-1][0] > batch[0]:
            # The window was shortened (a restart with a smaller --idempotency-window): keep the
            # batches in expiry order, the order a replica restored from a snapshot has, since a
            # Submit looks only at the first batch to drop expired keys.
            fifo.insert(bisect.bisect_right(fifo, batch[0], key=_FIRST), batch)
        else:
            fifo.append(batch)

    # ------------------------------------------------------------------ lease

    def _apply_lease(self, command: cmds.Lease) -> Leased:
        now = self.clock_ms
        self._promote_due(now)
        names = command.queues
        self._rotation += 1
        if not names or command.max_jobs <= 0:
            return Leased(())
        # Round robin: one job per queue per round, the first queue rotating per Lease so that a
        # busy queue named first cannot starve the others. Within a queue, lanes take turns
        # (flow.py); a queue whose limits hold everything back is skipped, not waited for.
        start = self._rotation % len(names)
        rotated = names[start:] + names[:start]
        active = [q for q in map(self._queues.get, rotated) if q is not None and q.turns and self._has_token(q, now)]
        taken: list[JobGrant] = []
        max_jobs = command.max_jobs
        while active and len(taken) < max_jobs:
            still_ready = []
            for queue in active:
                job = self._take_turn(queue)
                if job is None:
                    continue
                taken.append(self._grant(queue, job, command.worker, now))
                if queue.rate_per_ks is not None:
                    queue.bucket_level -= UNITS_PER_LEASE
                if len(taken) >= max_jobs:
                    break
                if queue.turns and self._has_token(queue, now):
                    still_ready.append(queue)
            active = still_ready
        return Leased(tuple(taken))

    def _has_token(self, queue: _Queue, now: int) -> bool:
        """Refills the queue's bucket to `now`; True when it holds a lease (or has no rate)."""
        if queue.rate_per_ks is None:
            return True
        queue.bucket_level = queue.bucket_now(now)
        queue.bucket_at_ms = now
        return queue.bucket_level >= UNITS_PER_LEASE

    def _take_turn(self, queue: _Queue) -> Job | None:
        """The candidate of the lane whose turn it is, out of its lane (the caller grants it)."""
        turns = queue.turns
        while turns:
            lane_id = next(iter(turns))
            del turns[lane_id]
            lane = queue.lanes[lane_id]
            job = self._candidate(queue, lane)
            assert job is not None, f"queue {queue.name}: lane {lane_id!r} took a turn without a candidate"
            lane.take(job)
            return job
        return None

    def _candidate(self, queue: _Queue, lane: Lane) -> Job | None:
        """The job `lane` would give a lease now, or None when it is empty or a limit holds it."""
        job = lane.peek()
        if job is None:
            return None
        if job.key is not None and queue.max_running_per_key is not None:
            if queue.running.get(job.key, 0) >= queue.max_running_per_key:
                return None
        if job.group is not None and queue.fifo:
            head = self._group_head(queue, job.group)
            return head if head is not None and head.state == READY else None
        return job

    def _group_head(self, queue: _Queue, group: str) -> Job | None:
        """The group's earliest-submitted unfinished job; drops finished ones it passes."""
        heap = queue.groups.get(group)
        while heap:
            order, job = heap[0]
            if job.order == order and job.state not in _OUT_OF_GROUP:
                return job
            heapq.heappop(heap)
        queue.groups.pop(group, None)
        return None

    def _join_group(self, queue: _Queue, job: Job) -> None:
        """Puts `job` at the end of its group's line (at submit, and again at redrive)."""
        self._seq += 1
        job.order = self._seq
        heap = queue.groups.get(job.group)
        if heap is None:
            heap = queue.groups[job.group] = []
        heapq.heappush(heap, (job.order, job))

    def _refresh_turn(self, queue: _Queue, lane_id: str) -> None:
        """Keeps `turns` exact for one lane after something that may change its candidate: a
        lane that gained one joins the back of the line, one that lost it leaves the line, and
        an empty keyed or grouped lane is dropped."""
        lane = queue.lanes.get(lane_id)
        if lane is None:
            queue.turns.pop(lane_id, None)
            return
        if self._candidate(queue, lane) is not None:
            if lane_id not in queue.turns:
                queue.turns[lane_id] = None
            return
        queue.turns.pop(lane_id, None)
        if lane_id != POOL and lane.peek() is None:
            del queue.lanes[lane_id]

    def _refresh_all_turns(self, queue: _Queue) -> None:
        """After a settings change: every lane, in id order (the lanes dict's order is history)."""
        for lane_id in sorted(queue.lanes):
            self._refresh_turn(queue, lane_id)

    def _grant(self, queue: _Queue, job: Job, worker: str, now: int) -> JobGrant:
        """Leases `job`, already taken out of its lane, to `worker`."""
        self._lease_counter += 1
        token = self._lease_counter
        policy = job.policy  # its fields directly: Job's properties cost a Python call each
        expires_at = self._at_now(now, now + policy.lease_ms)
        job.attempts += 1
        if job.attempts == 1:
            self.metric_samples.append(("queue_wait", job.queue, now - job.transitions[0][1]))  # created_at_ms
        job.lease_token = token
        job.lease_expires_at_ms = expires_at
        job.worker = worker
        job.seq = 0  # out of the ready FIFO: see Job.seq
        self._move(queue, job, LEASED, now)
        self._push_lease(expires_at, token, job)
        held = self._worker_jobs.get(worker)
        if held is None:
            held = self._worker_jobs[worker] = {}
        held[job.id] = job
        queue.events["leased"] += 1
        if job.key is not None:
            queue.running[job.key] = queue.running.get(job.key, 0) + 1
        self._refresh_turn(queue, lane_of(job))
        return JobGrant(job.id, job.queue, job.payload, job.attempts, token, expires_at, policy.priority,
                        policy.lease_ms)

    # ------------------------------------------------------------------ ack, fail, extend

    def _apply_ack(self, command: cmds.Ack) -> ItemOutcomes:
        now = self.clock_ms
        outcomes: list[Outcome] = []
        for item in command.items:
            job = self._jobs.get(item.id)
            if job is not None and job.state == DONE and job.lease_token == item.lease_token:
                # The client retries an ack whose answer it lost: same answer, no change.
                outcomes.append(OK)
                continue
            error = self._lease_error(job, item.id, item.lease_token, command.worker, now)
            if error is not None:
                outcomes.append(error)
                continue
            queue = self._queues[job.queue]
            self._end_lease(job)
            job.result = item.result
            self._finish(queue, job, DONE, now)
            if job.key is not None or job.group is not None:
                self._refresh_turn(queue, lane_of(job))  # a key slot freed, or the group's next
            queue.events["acked"] += 1
            self.metric_samples.append(("job_latency", job.queue, now - job.transitions[0][1]))  # created_at_ms
            outcomes.append(OK)
        return ItemOutcomes(tuple(outcomes))

    def _apply_fail(self, command: cmds.Fail) -> ItemOutcomes:
        now = self.clock_ms
        outcomes: list[Outcome] = []
        for position, item in enumerate(command.items):
            job = self._jobs.get(item.id)
            error = self._lease_error(job, item.id, item.lease_token, command.worker, now)
            if error is not None:
                outcomes.append(error)
                continue
            queue = self._queues[job.queue]
            queue.events["failed"] += 1
            requeued = self._end_attempt(
                queue, job, now, item.error, retry=item.retry, delay_ms=item.delay_ms,
                entropy=command.entropy, position=position,
            )
            if requeued:
                queue.events["retried"] += 1
            outcomes.append(OK)
        return ItemOutcomes(tuple(outcomes))

    def _apply_extend(self, command: cmds.Extend) -> ItemOutcomes:
        now = self.clock_ms
        outcomes: list[Outcome] = []
        for item in command.items:
            job = self._jobs.get(item.id)
            error = self._lease_error(job, item.id, item.lease_token, command.worker, now)
            if error is not None:
                outcomes.append(error)
                continue
            expires_at = now + item.lease_ms
            job.lease_expires_at_ms = expires_at
            # The old heap entry goes stale (its expiry no longer matches the job's).
            self._push_lease(expires_at, job.lease_token, job)
            outcomes.append(Extended(expires_at))
        return ItemOutcomes(tuple(outcomes))

    def _apply_release(self, command: cmds.Release) -> ItemOutcomes:
        """Hands leased jobs back to READY (at the back of their priority's FIFO) and gives back
        the attempt their lease counted: the worker never started them."""
        now = self.clock_ms
        outcomes: list[Outcome] = []
        for item in command.items:
            job = self._jobs.get(item.id)
            error = self._lease_error(job, item.id, item.lease_token, command.worker, now)
            if error is not None:
                outcomes.append(error)
                continue
            queue = self._queues[job.queue]
            self._end_lease(job)
            job.attempts -= 1
            job.ready_at_ms = now
            self._move(queue, job, READY, now)
            self._push_ready(queue, job)
            if job.key is not None or job.group is not None:
                self._refresh_turn(queue, lane_of(job))  # as `_end_attempt`: a key slot freed, or the group's head back
            queue.events["released"] += 1
            outcomes.append(OK)
        return ItemOutcomes(tuple(outcomes))

    @staticmethod
    def _lease_error(job: Job | None, job_id: str, lease: int, worker: str, now: int) -> ItemError | None:
        """Why `worker` may not complete `job` under token `lease` at `now`, or None if it may.

        A lease covers [leased_at, expires_at): at expires_at a Tick would requeue the job, so an
        ack at or after that instant is refused even before the Tick is applied.
        """
        if job is None:
            return ItemError(NOT_FOUND, f"no job {job_id}")
        if job.state != LEASED:
            return ItemError(LEASE_MISMATCH, f"job {job_id} is {job.state}; lease {lease} is not held")
        if job.lease_token != lease or job.worker != worker:
            return ItemError(
                LEASE_MISMATCH, f"lease {lease} of worker {worker} is not the current lease of job {job_id}"
            )
        if now >= job.lease_expires_at_ms:
            return ItemError(LEASE_EXPIRED, f"lease {lease} of job {job_id} expired at {job.lease_expires_at_ms} ms")
        return None

    # ------------------------------------------------------------------ housekeeping commands

    def _apply_tick(self, command: cmds.Tick) -> Ticked:
        now = self.clock_ms
        expired = self._expire_leases(now, command.entropy)
        promoted = self._promote_due(now)
        dropped = self._drop_finished(now)
        keys_dropped = self._drop_idempotency_keys(now)
        self._compact_heaps()
        return Ticked(expired, promoted, dropped, keys_dropped)

    def _apply_worker_lost(self, command: cmds.WorkerLost) -> Released:
        now = self.clock_ms
        held = self._worker_jobs.get(command.worker)
        if not held:
            return Released(0, 0)
        requeued = dead_lettered = 0
        error = f"worker {command.worker} lost"
        # Token order is lease order: the same on every replica and after a restore.
        for position, job in enumerate(sorted(held.values(), key=_lease_token)):
            queue = self._queues[job.queue]
            if self._end_attempt(queue, job, now, error, retry=True, delay_ms=None,
                                 entropy=command.entropy, position=position):
                requeued += 1
                queue.events["requeued_worker_lost"] += 1
            else:
                dead_lettered += 1
        return Released(requeued, dead_lettered)

    def _apply_renew_leases(self, command: cmds.RenewLeases) -> Renewed:
        """A new leader cannot know how long its predecessor was unreachable, so it gives every
        live lease at least one full lease period from its own clock instead of expiring work
        that healthy workers are still doing."""
        now = self.clock_ms
        renewed = 0
        for held in self._worker_jobs.values():
            for job in held.values():
                target = now + job.lease_ms
                if target > job.lease_expires_at_ms:
                    job.lease_expires_at_ms = target
                    self._push_lease(target, job.lease_token, job)
                    renewed += 1
        return Renewed(renewed)

    def _expire_leases(self, now: int, entropy: int) -> int:
        heap = self._leases
        expired = 0
        while heap and heap[0][0] <= now:
            expires_at, token, job = heapq.heappop(heap)
            if job.state != LEASED or job.lease_token != token or job.lease_expires_at_ms != expires_at:
                continue  # stale: acked, failed, extended or renewed since
            queue = self._queues[job.queue]
            if self._end_attempt(queue, job, now, "lease expired", retry=True, delay_ms=None,
                                 entropy=entropy, position=expired):
                queue.events["requeued_expired"] += 1
            expired += 1
        return expired

    def _promote_due(self, now: int) -> int:
        """Moves SCHEDULED and RETRY_WAIT jobs whose ready_at has come to READY, in (ready_at, seq) order."""
        heap = self._delayed
        promoted = 0
        while heap and heap[0][0] <= now:
            _, seq, job = heapq.heappop(heap)
            if job.seq != seq or (job.state != SCHEDULED and job.state != RETRY_WAIT):
                continue  # stale: cancelled since
            queue = self._queues[job.queue]
            self._move(queue, job, READY, now)
            self._push_ready(queue, job)
            promoted += 1
        return promoted

    def _drop_finished(self, now: int) -> int:
        fifo = self._finished
        cutoff = now - self.retention_ms
        dropped = 0
        while fifo and fifo[0].finished_at_ms <= cutoff:
            job = fifo.popleft()
            if self._jobs.get(job.id) is not job:  # deleted with its queue (and perhaps submitted again)
                continue
            assert job.state in FINISHED_STATES, f"job {job.id} in the finished FIFO is {job.state}"
            del self._jobs[job.id]
            queue = self._queues[job.queue]
            queue.counts[job.state] -= 1
            self._drop_if_unused(queue)
            dropped += 1
        return dropped

    def _drop_idempotency_keys(self, now: int) -> int:
        fifo = self._idempotency_fifo
        index = self._idempotency
        dropped = 0
        while fifo and fifo[0][0] <= now:
            _, queue, keys, ids = fifo.popleft()
            held = index[queue]
            for key, job_id in zip(keys, ids):
                assert held[key] == job_id, f"idempotency key {key!r} of {queue} moved to {held[key]}, not {job_id}"
                del held[key]
            if not held:
                del index[queue]
            dropped += len(keys)
        return dropped

    # ------------------------------------------------------------------ operator commands

    def _apply_cancel(self, command: cmds.Cancel) -> Ok | ItemError:
        now = self.clock_ms
        job = self._jobs.get(command.id)
        if job is None:
            return ItemError(NOT_FOUND, f"no job {command.id}")
        if job.state == DONE:
            return ItemError(CONFLICT, f"job {command.id} is done and cannot be cancelled")
        if job.state == CANCELLED:
            return OK
        queue = self._queues[job.queue]
        was_ready = job.state == READY
        if job.state == LEASED:
            self._end_lease(job)  # the holder's ack now answers lease_mismatch
        elif job.state == DEAD:
            del queue.dead[job.id]
        self._finish(queue, job, CANCELLED, now)
        queue.events["cancelled"] += 1
        self._refresh_turn(queue, lane_of(job))
        if was_ready:
            self._compact_ready(queue)
        return OK

    def _apply_redrive(self, command: cmds.Redrive) -> Redriven:
        now = self.clock_ms
        queue = self._queues.get(command.queue)
        if queue is None:
            return Redriven(0)
        # All: in id order (ids are time-ordered at the edge), independent of dict history.
        targets: Iterable[str] = sorted(queue.dead) if command.ids is None else dict.fromkeys(command.ids)
        count = 0
        for job_id in targets:
            job = queue.dead.pop(job_id, None)
            if job is None:
                continue  # not dead, or not in this queue: nothing to redrive
            job.attempts = 0
            job.ready_at_ms = now
            self._move(queue, job, READY, now)
            if job.group is not None:
                self._join_group(queue, job)
            self._push_ready(queue, job)
            count += 1
        queue.events["redriven"] += count
        return Redriven(count)

    def _apply_purge(self, command: cmds.Purge) -> Purged:
        queue = self._queues.get(command.queue)
        if queue is None:
            return Purged(0)
        if command.state == DEAD:
            doomed = list(queue.dead.values())
            queue.dead.clear()
        elif command.state == READY:
            doomed = [job for lane in queue.lanes.values() for job in lane.live()]
            for lane in queue.lanes.values():
                lane.ready = [None] * PRIORITY_LEVELS  # every entry left is stale now
        else:
            return Purged(0)  # the edge only sends "dead" or "ready"
        for job in doomed:
            del self._jobs[job.id]
            queue.counts[job.state] -= 1
            job.state = PURGED
        self._refresh_all_turns(queue)  # emptied lanes leave; groups may have new heads
        return Purged(len(doomed))

    def _apply_delete_queue(self, command: cmds.DeleteQueue) -> Ok | ItemError:
        queue = self._queues.get(command.queue)
        if queue is None:
            return ItemError(NOT_FOUND, f"no queue {command.queue}")
        unfinished = queue.active_count()
        if unfinished and not command.force:
            return ItemError(CONFLICT, f"queue {command.queue} holds {unfinished} unfinished jobs; "
                                       "delete with force=true to cancel them")
        records = sorted((job for job in self._jobs.values() if job.queue == command.queue), key=_job_id)
        for job in records:  # through the one cancel path, so that leases, heaps and lanes stay right
            if job.state in ACTIVE_STATES:
                self._apply_cancel(cmds.Cancel(now_ms=command.now_ms, id=job.id))
        for job in records:  # every record is finished now; the FIFOs skip the ones gone
            del self._jobs[job.id]
            job.state = PURGED
        if self._idempotency.pop(command.queue, None) is not None:
            self._idempotency_fifo = deque(batch for batch in self._idempotency_fifo if batch[1] != command.queue)
        del self._queues[command.queue]
        return OK

    def _drop_if_unused(self, queue: _Queue) -> None:
        """An empty queue with default settings leaves the state (it counts against no limit)."""
        if not any(queue.counts.values()) and queue.max_depth is None and queue.settings() == (None, None, None, False):
            del self._queues[queue.name]

    def _apply_set_queue_config(self, command: cmds.SetQueueConfig) -> Ok:
        now = self.clock_ms
        queue = self._queue(command.queue)
        queue.max_depth = command.max_depth
        rate, burst = command.rate_per_ks, command.burst
        if rate is None or burst is None or rate <= 0 or burst <= 0:
            queue.rate_per_ks, queue.burst, queue.bucket_level, queue.bucket_at_ms = None, 0, 0, 0
        elif queue.rate_per_ks is None:
            # A new limit starts with a full bucket, as a queue idle for a long time would have.
            queue.rate_per_ks, queue.burst, queue.bucket_level, queue.bucket_at_ms = rate, burst, burst * UNITS_PER_LEASE, now
        else:
            # The leases already granted keep counting: refill at the old rate, cap at the new burst.
            level = min(queue.bucket_now(now), burst * UNITS_PER_LEASE)
            queue.rate_per_ks, queue.burst, queue.bucket_level, queue.bucket_at_ms = rate, burst, level, now
        limit = command.max_running_per_key
        queue.max_running_per_key = limit if limit is not None and limit > 0 else None
        queue.fifo = command.fifo
        self._refresh_all_turns(queue)
        self._drop_if_unused(queue)
        return OK

    # ------------------------------------------------------------------ schedules

    def _apply_put_schedule(self, command: cmds.PutSchedule) -> Ok:
        old = self._schedules.get(command.name)
        schedule = Schedule.__new__(Schedule)
        (schedule.name, schedule.queue, schedule.payload, schedule.cron, schedule.every_ms, schedule.timezone,
         schedule.overlap, schedule.catch_up, schedule.priority, schedule.max_attempts, schedule.lease_ms,
         schedule.backoff_base_ms, schedule.backoff_cap_ms) = (
            command.name, command.queue, command.payload, command.cron, command.every_ms, command.timezone,
            command.overlap, command.catch_up, command.priority, command.max_attempts, command.lease_ms,
            command.backoff_base_ms, command.backoff_cap_ms)
        if old is not None and old.spec() == schedule.spec():
            return OK  # re-declared as it was: keep its fire times
        schedule.revision = self.last_applied
        schedule.next_fire_ms = command.next_fire_ms
        # A replaced schedule keeps its pause, its history, and its last job (for overlap=skip).
        schedule.paused = old.paused if old is not None else False
        schedule.last_fire_ms = old.last_fire_ms if old is not None else None
        schedule.last_job_id = old.last_job_id if old is not None else None
        schedule.created_count = old.created_count if old is not None else 0
        schedule.skipped_count = old.skipped_count if old is not None else 0
        self._schedules[command.name] = schedule
        return OK

    def _apply_delete_schedule(self, command: cmds.DeleteSchedule) -> Ok | ItemError:
        if self._schedules.pop(command.name, None) is None:
            return ItemError(NOT_FOUND, f"no schedule {command.name}")
        return OK

    def _apply_pause_schedule(self, command: cmds.PauseSchedule) -> Ok | ItemError:
        schedule = self._schedules.get(command.name)
        if schedule is None:
            return ItemError(NOT_FOUND, f"no schedule {command.name}")
        if schedule.paused and not command.paused:
            schedule.next_fire_ms = command.next_fire_ms  # fires due while paused are skipped
            schedule.revision = self.last_applied  # fires computed before the pause no longer apply
        schedule.paused = command.paused
        return OK

    def _apply_fire_schedule(self, command: cmds.FireSchedule) -> ScheduleFired:
        schedule = self._schedules.get(command.name)
        if (schedule is None or schedule.paused or schedule.revision != command.revision
                or schedule.next_fire_ms != command.fire_ms or command.next_fire_ms <= command.fire_ms):
            return ScheduleFired(command.name, command.fire_ms, STALE, None)
        schedule.next_fire_ms = command.next_fire_ms
        schedule.last_fire_ms = command.fire_ms
        outcome, job_id = self._schedule_job(schedule, command)
        if outcome == CREATED:
            schedule.created_count += 1
            schedule.last_job_id = job_id
        else:
            schedule.skipped_count += 1
        return ScheduleFired(command.name, command.fire_ms, outcome, job_id)

    def _schedule_job(self, schedule: Schedule, command: cmds.FireSchedule) -> tuple[str, str | None]:
        """Creates the job of one fire time, unless a policy or a full queue says not to."""
        if not command.run:
            return SKIPPED_CATCH_UP, None
        if schedule.overlap == "skip" and schedule.last_job_id is not None:
            previous = self._jobs.get(schedule.last_job_id)
            if previous is not None and previous.state in (SCHEDULED, READY, LEASED, RETRY_WAIT):
                return SKIPPED_OVERLAP, None
        queue = self._queue(schedule.queue)
        if queue.max_depth is not None and queue.active_count() >= queue.max_depth:
            return SKIPPED_FULL, None
        if command.job_id in self._jobs:
            return CREATED, command.job_id  # ids are unique at the edge; never overwrite a record
        new = cmds.NewJob(command.job_id, schedule.payload, schedule.priority, 0, schedule.max_attempts,
                          schedule.lease_ms, None, schedule.backoff_base_ms, schedule.backoff_cap_ms)
        self._create_job(queue, new, self.clock_ms)
        queue.events["submitted"] += 1
        return CREATED, command.job_id

    def schedules(self) -> list[dict]:
        """Every schedule's record, by name."""
        return [self._schedules[name].record() for name in sorted(self._schedules)]

    def schedule(self, name: str) -> dict | None:
        found = self._schedules.get(name)
        return None if found is None else found.record()

    def due_schedules(self, now_ms: int) -> list[dict]:
        """Records of the unpaused schedules whose next fire time has come, by name."""
        return [schedule.record() for name, schedule in sorted(self._schedules.items())
                if not schedule.paused and schedule.next_fire_ms <= now_ms]

    def next_fire_ms(self) -> int | None:
        """The earliest next fire time of an unpaused schedule (O(schedules); they are few)."""
        times = [s.next_fire_ms for s in self._schedules.values() if not s.paused]
        return min(times) if times else None

    def schedule_count(self) -> int:
        return len(self._schedules)

    # ------------------------------------------------------------------ transitions

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        return queue

    def _move(self, queue: _Queue, job: Job, state: str, now: int) -> None:
        counts = queue.counts
        counts[job.state] -= 1
        counts[state] += 1
        job.state = state
        job.transitions = self._history(job.transitions, state, now)

    def _push_ready(self, queue: _Queue, job: Job) -> None:
        self._seq += 1
        job.seq = self._seq
        lane_id = lane_of(job)
        lane = queue.lanes.get(lane_id)
        if lane is None:
            lane = queue.lanes[lane_id] = Lane(lane_id, PRIORITY_LEVELS)
        lane.push(job)
        if lane_id not in queue.turns:
            self._refresh_turn(queue, lane_id)

    def _push_delayed(self, job: Job) -> None:
        self._seq += 1
        job.seq = self._seq
        heapq.heappush(self._delayed, (job.ready_at_ms, job.seq, job))

    def _end_lease(self, job: Job) -> None:
        """Forgets the worker's hold on a LEASED job (its lease heap entry goes stale). The
        caller refreshes the job's lane once the job is in its next state."""
        held = self._worker_jobs[job.worker]
        del held[job.id]
        if not held:
            del self._worker_jobs[job.worker]
        if job.key is not None:
            running = self._queues[job.queue].running
            count = running[job.key] - 1
            if count:
                running[job.key] = count
            else:
                del running[job.key]

    def _end_attempt(
        self, queue: _Queue, job: Job, now: int, error: str, *, retry: bool, delay_ms: int | None,
        entropy: int, position: int,
    ) -> bool:
        """Ends a LEASED job's attempt without success: requeue it, or dead-letter it when retry is
        False or its attempts are used up. Returns True when requeued."""
        self._end_lease(job)
        job.last_error = error
        requeued = self._requeue_or_bury(queue, job, now, retry=retry, delay_ms=delay_ms, entropy=entropy,
                                         position=position)
        if job.key is not None or job.group is not None:
            self._refresh_turn(queue, lane_of(job))  # a key slot freed, or the group's next
        return requeued

    def _requeue_or_bury(
        self, queue: _Queue, job: Job, now: int, *, retry: bool, delay_ms: int | None, entropy: int, position: int,
    ) -> bool:
        if not retry or job.attempts >= job.max_attempts:
            self._move(queue, job, DEAD, now)
            queue.dead[job.id] = job
            queue.events["dead_lettered"] += 1
            self.metric_samples.append(("dead_lettered", job.queue, job.attempts))
            return False
        if delay_ms is None:
            delay_ms = backoff_delay_ms(job.backoff_base_ms, job.backoff_cap_ms, job.attempts, entropy, position)
        if delay_ms <= 0:
            job.ready_at_ms = now
            self._move(queue, job, READY, now)
            self._push_ready(queue, job)
        else:
            job.ready_at_ms = now + delay_ms
            self._move(queue, job, RETRY_WAIT, now)
            self._push_delayed(job)
        return True

    def _finish(self, queue: _Queue, job: Job, state: str, now: int) -> None:
        self._move(queue, job, state, now)  # the transition is its finished_at_ms
        self._finished.append(job)  # finished is final: its finished_at_ms never changes again

    # ------------------------------------------------------------------ shared values (memory only)

    def _new_policy(self, settings: tuple) -> Policy:
        """The Policy of settings (`_settings_of`) this machine holds none for yet, kept so that
        every later job with equal settings gets this one object (`_create_job` looks it up):
        the jobs of a batch carry the same settings, and without this each would hold a tuple of
        its own (80 bytes; a queued job is about 550). Identity never decides anything, so this
        changes memory only. The table starts afresh past POLICIES_MAX."""
        table = self._policies
        if len(table) >= POLICIES_MAX:
            table.clear()
        policy = table[settings] = Policy(*settings)
        return policy

    def _values_at(self, now: int) -> dict[Any, Any]:
        """The values built at the clock's `now` for the command being applied: a table emptied
        whenever the clock moves, so that it keeps nothing of the past alive (objects allocated
        amid a burst and kept after it would pin the allocator's 1 MiB arenas after the burst)."""
        if now != self._now_values_at_ms:
            self._now_values_at_ms = now
            self._now_values = {}
        return self._now_values

    def _at_now(self, now: int, time_ms: int) -> int:
        """A time computed at `now` (a lease or key expiry, a due time), one object for every job
        of the command that computes the same."""
        table = self._values_at(now)
        found = table.get(time_ms)
        if found is None:
            found = table[time_ms] = time_ms
        return found

    def _transition(self, state: str, now: int) -> tuple[tuple[str, int], tuple[tuple[str, int]]]:
        """The transition (state, now), and the one-transition history ((state, now),), built once
        per state for all the jobs that the command being applied moves (56 + 48 bytes a job)."""
        table = self._values_at(now)
        found = table.get(state)
        if found is None:
            pair = (state, now)
            found = table[state] = (pair, (pair,))
        return found

    def _history(self, transitions: tuple[tuple[str, int], ...], state: str, now: int) -> tuple[tuple[str, int], ...]:
        """`transitions` followed by (state, now), one tuple for all the jobs of the command being
        applied that move from equal histories: the jobs a Submit created together are leased
        together and acked together, and each would otherwise keep its own (64 bytes a job)."""
        table = self._values_at(now)
        key = (transitions, state)
        found = table.get(key)
        if found is None:
            found = table[key] = extended_history(transitions, self._transition(state, now)[0])
        return found

    # ------------------------------------------------------------------ compaction

    def _compact_heaps(self) -> None:
        leased = delayed = 0
        for queue in self._queues.values():
            leased += queue.counts[LEASED]
            delayed += queue.counts[SCHEDULED] + queue.counts[RETRY_WAIT]
        if len(self._leases) > 2 * leased + COMPACT_SLACK:
            self._sweep_leases()
        if len(self._delayed) > 2 * delayed + COMPACT_SLACK:
            self._delayed = [e for e in self._delayed if _delayed_entry_live(e)]
            heapq.heapify(self._delayed)

    def _push_lease(self, expires_at: int, token: int, job: Job) -> None:
        """Adds a lease's expiry to the heap, sweeping out stale entries past LEASE_HEAP_SLACK."""
        heapq.heappush(self._leases, (expires_at, token, job))
        if len(self._leases) > 2 * self._leases_live_at_sweep + LEASE_HEAP_SLACK:
            self._sweep_leases()

    def _sweep_leases(self) -> None:
        self._leases = [e for e in self._leases if _lease_entry_live(e)]
        heapq.heapify(self._leases)
        self._leases_live_at_sweep = len(self._leases)

    @staticmethod
    def _compact_ready(queue: _Queue) -> None:
        if queue.ready_entries_count() <= 2 * queue.counts[READY] + COMPACT_SLACK:
            return
        for lane in queue.lanes.values():
            lane.compact()

    # ------------------------------------------------------------------ read-only queries

    def get_job(self, job_id: str) -> dict | None:
        """The job record (see `Job.record`), or None when unknown or dropped after retention."""
        job = self._jobs.get(job_id)
        return None if job is None else job.record()

    def job_state(self, job_id: str) -> str | None:
        """The job's state, or None when unknown or dropped after retention; O(1), no record built."""
        job = self._jobs.get(job_id)
        return None if job is None else job.state

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """{queue: {state: count}} for every known queue, every state present; O(queues)."""
        return {name: dict(self._queues[name].counts) for name in sorted(self._queues)}

    def dead_jobs(self, queue: str, limit: int, after_id: str | None = None) -> list[dict]:
        """Up to `limit` DEAD records of `queue` in id order, starting after `after_id`."""
        found = self._queues.get(queue)
        if found is None or limit <= 0:
            return []
        ids = found.dead.keys() if after_id is None else (i for i in found.dead if i > after_id)
        return [found.dead[job_id].record() for job_id in heapq.nsmallest(limit, ids)]

    def queue_count(self) -> int:
        """Queues in the state: configured ones and ones holding job records."""
        return len(self._queues)

    def has_queue(self, name: str) -> bool:
        return name in self._queues

    def has_ready(self, queues: Iterable[str]) -> bool:
        """True when any of `queues` holds a READY job (due delayed jobs wait for a Tick or Lease)."""
        for name in queues:
            queue = self._queues.get(name)
            if queue is not None and queue.counts[READY]:
                return True
        return False

    def lease_wait_ms(self, queues: Iterable[str], now_ms: int) -> int | None:
        """How long until a Lease on `queues` at `now_ms` could grant a job: 0 when one could now,
        the time until a rate-limited queue's next token, or None when no queue has a job its
        key and group limits let go (those free up only through an applied entry). Read-only.
        """
        now = max(self.clock_ms, now_ms)
        wait: int | None = None
        for name in queues:
            queue = self._queues.get(name)
            if queue is None or not queue.turns:
                continue
            if queue.rate_per_ks is None:
                return 0
            queue_wait = bucket_wait_ms(queue.bucket_now(now), queue.rate_per_ks)
            if queue_wait == 0:
                return 0
            wait = queue_wait if wait is None else min(wait, queue_wait)
        return wait

    def ready_count(self, queues: Iterable[str]) -> int:
        """READY jobs in `queues`: at most what one Lease could grant now (limits may hold some back)."""
        return sum(queue.counts[READY] for name in queues if (queue := self._queues.get(name)) is not None)

    def held_back(self, name: str, now_ms: int) -> dict[str, int]:
        """READY jobs of queue `name` that a limit holds back now, by limit: "key" (their key has
        max_running_per_key leases), "fifo" (waiting behind their group's head), "rate" (the
        rest, while the bucket is empty). O(lanes)."""
        queue = self._queues.get(name)
        held = {"key": 0, "fifo": 0, "rate": 0}
        if queue is None:
            return held
        for lane_id, lane in queue.lanes.items():
            grouped = lane_id.startswith("g:")
            in_turn = lane_id in queue.turns
            if lane_id == POOL or (in_turn and not (grouped and queue.fifo)):
                continue
            waiting = len(lane.live()) - (1 if in_turn else 0)  # a group in turn offers its head
            held["fifo" if grouped else "key"] += waiting
        if queue.rate_per_ks is not None and queue.bucket_now(max(self.clock_ms, now_ms)) < UNITS_PER_LEASE:
            held["rate"] = queue.counts[READY] - held["key"] - held["fifo"]
        return held

    def queue_settings(self) -> dict[str, dict[str, Any]]:
        """{queue: its settings} for every known queue, as `GET /v1/queues` shows them."""
        settings = {}
        for name in sorted(self._queues):
            queue = self._queues[name]
            rate_per_ks, burst, max_running_per_key, fifo = queue.settings()
            settings[name] = {
                "max_depth": queue.max_depth,
                "rate_per_s": None if rate_per_ks is None else rate_per_ks / 1000,
                "burst": burst,
                "max_running_per_key": max_running_per_key,
                "fifo": fifo,
            }
        return settings

    def next_due_ms(self) -> int | None:
        """When the leader should next propose a Tick: the earliest delayed job, lease expiry,
        retention drop or idempotency key expiry; None when nothing is pending.

        Pops stale heap tops on the way: that changes no logical state (and not the snapshot).
        """
        candidates = []
        while self._delayed and not _delayed_entry_live(self._delayed[0]):
            heapq.heappop(self._delayed)
        if self._delayed:
            candidates.append(self._delayed[0][0])
        while self._leases and not _lease_entry_live(self._leases[0]):
            heapq.heappop(self._leases)
        if self._leases:
            candidates.append(self._leases[0][0])
        if self._finished:
            candidates.append(self._finished[0].finished_at_ms + self.retention_ms)
        if self._idempotency_fifo:
            candidates.append(self._idempotency_fifo[0][0])
        return min(candidates) if candidates else None

    def lease_holders(self) -> list[str]:
        """Workers holding at least one lease, sorted; O(workers), for the leader's liveness check."""
        return sorted(self._worker_jobs)

    def leased_by_worker(self) -> dict[str, list[str]]:
        """{worker: [ids of the jobs it holds]} for every worker holding a lease."""
        return {worker: list(held) for worker, held in self._worker_jobs.items()}

    def precheck(self, command: cmds.Ack | cmds.Fail | cmds.Extend | cmds.Release, now_ms: int) -> list[Outcome | None]:
        """Each item's outcome if the current state already decides it, else None; changes nothing.

        The leader answers a batch whose every item is refused (or is a repeated ack) without
        writing an entry, so a refused request changes nothing, not even the clock. Items that
        may succeed (None) go through the log, where `apply` decides them again.
        """
        now = max(self.clock_ms, now_ms)
        outcomes: list[Outcome | None] = []
        for item in command.items:
            job = self._jobs.get(item.id)
            if isinstance(command, cmds.Ack) and job is not None and job.state == DONE and job.lease_token == item.lease_token:
                outcomes.append(OK)
                continue
            outcomes.append(self._lease_error(job, item.id, item.lease_token, command.worker, now))
        return outcomes

    def oldest_ready_ms(self) -> dict[str, int]:
        """{queue: ready_at_ms of its oldest READY job} for queues with ready jobs (O(queues))."""
        oldest: dict[str, int] = {}
        for name, queue in self._queues.items():
            if not queue.counts[READY]:
                continue
            heads = [_first_ready(fifo) for lane in queue.lanes.values() for fifo in lane.ready if fifo]
            times = [job.ready_at_ms for job in heads if job is not None]
            if times:
                oldest[name] = min(times)
        return oldest

    def lease_holder(self, job_id: str) -> tuple[str, int, int] | None:
        """(worker, lease token, expires_at_ms) of a LEASED job, else None."""
        job = self._jobs.get(job_id)
        if job is None or job.state != LEASED:
            return None
        return job.worker, job.lease_token, job.lease_expires_at_ms

    @property
    def counters(self) -> dict[tuple[str, str], int]:
        """Metric counters {(event, queue): count}, every event of `EVENTS` for every queue."""
        return {
            (event, name): count
            for name, queue in self._queues.items()
            for event, count in queue.events.items()
        }

    def idempotency_key_count(self) -> int:
        """Idempotency keys held (each until its window is over); O(queues)."""
        return sum(map(len, self._idempotency.values()))

    def idempotency_keys(self) -> list[tuple[tuple[str, str], tuple[str, int]]]:
        """((queue, key), (job id, expires_at_ms)) of every key held, sorted; O(keys)."""
        return sorted(_idempotency_rows(tuple(self._idempotency_fifo)))

    def job_count(self) -> int:
        """Jobs with a record (every state, finished ones until dropped)."""
        return len(self._jobs)

    # ------------------------------------------------------------------ snapshot

    def capture(self) -> SnapshotCapture:
        """The whole state as immutable values, cheaply: the on-loop half of a snapshot.

        O(jobs), but all of it C-level work: one `job_row` tuple per job (`map` over the dict,
        no Python code per job), plus the idempotency items and one row per queue. Nothing is
        sorted here; `write_snapshot` sorts and encodes, in another thread if need be, while
        this machine goes on applying: rows hold only immutable values (see `jobs.py`), so
        later applies cannot reach into them.
        """
        return SnapshotCapture(
            last_applied=self.last_applied,
            clock_ms=self.clock_ms,
            lease_counter=self._lease_counter,
            seq=self._seq,
            rotation=self._rotation,
            idempotency=tuple(self._idempotency_fifo),
            queues=tuple(
                (name, queue.max_depth, tuple(map(queue.events.__getitem__, EVENTS)), queue.settings(),
                 (queue.bucket_level, queue.bucket_at_ms), tuple(queue.turns))
                for name, queue in self._queues.items()
            ),
            jobs=list(map(job_row, self._jobs.values())),  # a list: builds faster than a tuple
            schedules=tuple(map(schedule_row, self._schedules.values())),
            membership=self.membership,
        )

    def snapshot(self) -> bytes:
        """The whole state, canonical: equal states give equal bytes on any replica.

        `capture()` then `write_snapshot()`, joined: the one encoder, whether the bytes end up
        here, in a file or in `digest()`. Derived structures (FIFOs, heaps, indexes, counts)
        are left out and rebuilt by restore from the job records; keys and rows are sorted; no
        stale entry appears.
        """
        parts: list[bytes] = []
        write_snapshot(self.capture(), parts.append)
        return b"".join(parts)

    def digest(self) -> str:
        """sha256 hex of `snapshot()`: equal exactly when the states are equal.

        Hashes the pieces as they are encoded instead of joining them first: same bytes, same
        hash, half the memory.
        """
        return capture_digest(self.capture())

    def restore(self, data: bytes) -> None:
        """Replaces the whole state by the snapshot `data`; see `restore_from`.

        Raises:
            ValueError: the data is not exactly one snapshot of this version; nothing changed.
        """
        self.restore_from(io.BytesIO(data))

    def restore_from(self, stream: BinaryIO) -> None:
        """Replaces the whole state by the snapshot read from `stream`, discarding everything held before.

        Streams: the jobs array is decoded one row at a time straight into records, so memory
        peaks near the restored state plus one read buffer, not twice the state. The version
        key is written last (keys are sorted), so nothing is trusted while reading: the fields
        are parsed into locals, checked once the stream has ended, and only then installed.
        Either the whole snapshot becomes the state, or the machine is left exactly as it was.

        Args:
            stream: a binary file object positioned at the snapshot's first byte; read to its end.
        Raises:
            ValueError: the bytes are not exactly one snapshot of this version (another version,
                truncated, trailing bytes, unknown or missing keys, malformed rows, rows that do
                not fit together); the machine is unchanged.
            OSError: reading the stream failed; the machine is unchanged.
        """
        fields, jobs = _decode_snapshot(stream)
        # _reset() gives every attribute a new object and mutates none of the old ones, so a
        # shallow copy of the attributes is the whole old state, to put back if installing fails.
        saved = self.__dict__.copy()
        try:
            self._install(fields, jobs)
        except BaseException as exc:
            self.__dict__ = saved
            if isinstance(exc, (KeyError, IndexError, TypeError, ValueError)):
                raise ValueError(f"queue snapshot is inconsistent: {type(exc).__name__}: {exc}") from exc
            raise

    def _install(self, fields: dict[str, Any], jobs: list[Job]) -> None:
        """Makes decoded snapshot fields the state. Raises on rows that do not fit together (a
        job in an unknown queue or state, a row of the wrong shape); the caller rolls back."""
        self._reset()
        for key in ("clock_ms", "last_applied", "lease_counter", "rotation", "seq"):
            if type(fields[key]) is not int:
                raise TypeError(f"{key} is {fields[key]!r}, not an integer")
        self.last_applied = fields["last_applied"]
        self.clock_ms = fields["clock_ms"]
        self._lease_counter = fields["lease_counter"]
        self._seq = fields["seq"]
        self._rotation = fields["rotation"]
        if fields["membership"] is not None and type(fields["membership"]) is not bytes:
            raise TypeError(f"membership is {fields['membership']!r}, not bytes")
        self.membership = fields["membership"]
        turns: dict[str, tuple[str, ...]] = {}
        for name, max_depth, events, settings, bucket, queue_turns in fields["queues"]:
            if len(events) not in (len(EVENTS), EVENTS_COUNT_BEFORE_RELEASE):
                raise ValueError(f"queue {name!r} has {len(events)} event counters, not {len(EVENTS)}")
            queue = self._queue(name)
            queue.max_depth = max_depth
            queue.events = dict(zip(EVENTS, tuple(events) + (0,) * (len(EVENTS) - len(events))))
            rate_per_ks, burst, queue.max_running_per_key, queue.fifo = settings
            if rate_per_ks is not None:
                queue.rate_per_ks, queue.burst = rate_per_ks, burst
                queue.bucket_level, queue.bucket_at_ms = bucket
            turns[name] = queue_turns
        for row in fields["schedules"]:
            schedule = Schedule.from_row(row)
            self._schedules[schedule.name] = schedule
        self._restore_idempotency(fields["idempotency"])
        self._restore_jobs(jobs)
        for name, queue_turns in turns.items():
            if queue_turns is None:  # version 1: no limits, so the lanes with a candidate, in order
                self._refresh_all_turns(self._queues[name])
            else:
                self._queues[name].turns = dict.fromkeys(queue_turns)

    def _restore_idempotency(self, rows: Sequence[tuple]) -> None:
        """Indexes the snapshot's (queue, key, job id, expires_at_ms) rows, and batches them by
        (expiry, queue) in that order (the batches of the Submits that brought them may have
        been split or merged; the keys expire at the same instants all the same).

        Raises:
            ValueError, TypeError: a key twice, or a row of the wrong shape; `restore_from` rolls back.
        """
        index = self._idempotency
        for queue, key, job_id, _ in rows:
            held = index.get(queue)
            if held is None:
                held = index[queue] = {}
            if key in held:
                raise ValueError(f"idempotency key {key!r} of queue {queue!r} appears twice")
            held[key] = job_id
        by_expiry = _sorted_in_runs([(expires_at, queue, key, job_id) for queue, key, job_id, expires_at in rows])
        fifo = self._idempotency_fifo
        for (expires_at, queue), batch in groupby(by_expiry, key=_expiry_and_queue):
            pairs = [(key, job_id) for _, _, key, job_id in batch]
            fifo.append((expires_at, queue, tuple(map(_FIRST, pairs)), tuple(map(_SECOND, pairs))))

    def _restore_jobs(self, jobs: list[Job]) -> None:
        """Indexes restored records into every derived structure, in the order the live machine had.

        Raises:
            KeyError, IndexError, TypeError, ValueError: records that do not fit together (an
                unknown queue or state, an id twice); `restore_from` rolls back.
        """
        ready: list[Job] = []
        leased: list[Job] = []
        finished: list[Job] = []
        for job in jobs:
            self._jobs[job.id] = job
            queue = self._queues[job.queue]
            queue.counts[job.state] += 1
            if job.state == READY:
                ready.append(job)
            elif job.state == SCHEDULED or job.state == RETRY_WAIT:
                self._delayed.append((job.ready_at_ms, job.seq, job))
            elif job.state == LEASED:
                leased.append(job)
            elif job.state == DEAD:
                queue.dead[job.id] = job
            else:
                finished.append(job)
        if len(self._jobs) != len(jobs):  # before the heaps: two records would compare as equal keys
            raise ValueError(f"{len(jobs) - len(self._jobs)} job ids appear twice")
        for job in sorted(ready, key=_job_seq):  # seq order is the FIFO order the live machine had
            queue = self._queues[job.queue]
            lane_id = lane_of(job)
            lane = queue.lanes.get(lane_id)
            if lane is None:
                lane = queue.lanes[lane_id] = Lane(lane_id, PRIORITY_LEVELS)
            lane.push(job)
        heapq.heapify(self._delayed)
        for job in sorted(leased, key=_lease_token):
            self._leases.append((job.lease_expires_at_ms, job.lease_token, job))
            self._worker_jobs.setdefault(job.worker, {})[job.id] = job
            if job.key is not None:
                running = self._queues[job.queue].running
                running[job.key] = running.get(job.key, 0) + 1
        heapq.heapify(self._leases)
        self._leases_live_at_sweep = len(self._leases)
        for job in jobs:
            if job.group is not None and job.state not in _OUT_OF_GROUP:
                queue = self._queues[job.queue]
                queue.groups.setdefault(job.group, []).append((job.order, job))
        for queue in self._queues.values():
            for heap in queue.groups.values():
                heapq.heapify(heap)
        finished.sort(key=lambda job: (job.finished_at_ms, job.id))
        self._finished = deque(finished)

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Asserts every structural invariant (for tests and the simulator; O(jobs)).

        Raises:
            AssertionError: naming the first invariant found broken.
        """
        counts = {name: dict.fromkeys(STATES, 0) for name in self._queues}
        tokens: dict[int, str] = {}
        for job_id, job in self._jobs.items():
            assert job.id == job_id and job.state in STATES, f"job {job_id} bad key or state {job.state}"
            assert job.queue in self._queues, f"job {job_id} in unknown queue {job.queue}"
            counts[job.queue][job.state] += 1
            assert job.lease_ms >= 0 and job.attempts >= 0, f"job {job_id} negative lease_ms / attempts"
            if job.state == LEASED:
                assert job.lease_token not in tokens, f"lease {job.lease_token} held by {job_id} and {tokens.get(job.lease_token)}"
                tokens[job.lease_token] = job_id
                assert self._worker_jobs.get(job.worker, {}).get(job_id) is job, f"job {job_id} not indexed"
                assert job.lease_token <= self._lease_counter, f"job {job_id} lease token from the future"
            assert (job.state == DEAD) == (self._queues[job.queue].dead.get(job_id) is job), f"job {job_id} dead index"
            # A tuple: captured rows share it (see jobs.py), so it must never change in place.
            assert type(job.transitions) is tuple and len(job.transitions) <= TRANSITIONS_MAX, (
                f"job {job_id} transitions are a {type(job.transitions).__name__} of {len(job.transitions)}"
            )
            assert job.transitions[-1][0] == job.state, (
                f"job {job_id} transitions {job.transitions[-3:]} end elsewhere than {job.state}"
            )
        held_count = sum(len(held) for held in self._worker_jobs.values())
        assert held_count == len(tokens), f"worker index holds {held_count} jobs, {len(tokens)} leased"
        for name, queue in self._queues.items():
            assert queue.counts == counts[name], f"queue {name} counts {queue.counts} != {counts[name]}"
            live_ready = [job for lane in queue.lanes.values() for job in lane.live()]
            assert len(live_ready) == queue.counts[READY] == len({id(j) for j in live_ready}), (
                f"queue {name}: ready FIFOs hold {len(live_ready)} live entries for {queue.counts[READY]} ready jobs"
            )
            assert all(self._jobs.get(j.id) is j for j in live_ready), f"queue {name}: ready job without record"
            self._check_flow_invariants(queue)
        live_delayed = [e for e in self._delayed if _delayed_entry_live(e)]
        delayed_count = sum(q.counts[SCHEDULED] + q.counts[RETRY_WAIT] for q in self._queues.values())
        assert len(live_delayed) == delayed_count, f"{len(live_delayed)} live delayed entries for {delayed_count}"
        # An extend back to an earlier expiry can leave two equal live entries; they count once.
        live_leases = {(e[0], e[1]) for e in self._leases if _lease_entry_live(e)}
        assert len(live_leases) == len(tokens), f"{len(live_leases)} live lease entries for {len(tokens)} leases"
        batched: dict[tuple[str, str], str] = {}
        last_expiry = None
        for expires_at, queue, keys, ids in self._idempotency_fifo:
            assert last_expiry is None or last_expiry <= expires_at, f"idempotency batches out of order at {expires_at}"
            last_expiry = expires_at
            assert len(keys) == len(ids) > 0, f"idempotency batch of {len(keys)} keys and {len(ids)} ids"
            for key, job_id in zip(keys, ids):
                assert (queue, key) not in batched, f"idempotency key {key!r} of {queue} in two batches"
                batched[(queue, key)] = job_id
        indexed = {(queue, key): job_id for queue, held in self._idempotency.items() for key, job_id in held.items()}
        assert all(self._idempotency.values()), "an empty idempotency dict kept"
        assert indexed == batched, f"idempotency index {len(indexed)} keys, batches {len(batched)}: they differ"


    def _check_flow_invariants(self, queue: _Queue) -> None:
        name = queue.name
        for lane_id, lane in queue.lanes.items():
            assert all(lane_of(job) == lane_id for job in lane.live()), f"queue {name}: job in the wrong lane"
            assert lane_id == POOL or lane.entries_count(), f"queue {name}: empty lane {lane_id!r} kept"
        offering = [lane_id for lane_id in queue.lanes if self._candidate(queue, queue.lanes[lane_id]) is not None]
        assert sorted(offering) == sorted(queue.turns), (
            f"queue {name}: lanes with a candidate {sorted(offering)} but turns {list(queue.turns)}"
        )
        # (No "one leased job per group" here: switching fifo on leaves the leases already granted
        # alone. The simulator's FlowModel checks the grants made while fifo is on.)
        running: dict[str, int] = {}
        for job in self._jobs.values():
            if job.queue != name:
                continue
            assert job.key is None or job.group is None, f"job {job.id} has both a key and a group"
            if job.state == LEASED and job.key is not None:
                running[job.key] = running.get(job.key, 0) + 1
        assert running == queue.running, f"queue {name}: running by key {queue.running} != {running}"
        if queue.rate_per_ks is not None:
            assert 0 <= queue.bucket_level <= queue.burst * UNITS_PER_LEASE, f"queue {name}: bucket {queue.bucket_level}"
            assert queue.bucket_at_ms <= self.clock_ms, f"queue {name}: bucket refilled in the future"


# ---------------------------------------------------------------------- snapshot encoding


def capture_digest(capture: SnapshotCapture) -> str:
    """sha256 hex of the snapshot of `capture`; safe in a worker thread, like `write_snapshot`."""
    hasher = hashlib.sha256()
    write_snapshot(capture, hasher.update)
    return hasher.hexdigest()


def write_snapshot(
    capture: SnapshotCapture, write: Callable[[bytes], None], *, rows_per_chunk: int = ROWS_PER_CHUNK
) -> None:
    """Encodes `capture` canonically, in pieces: the concatenation of what `write` receives is
    exactly the `snapshot()` of the state captured.

    The encoding is one msgpack map with the keys of SNAPSHOT_KEYS in that (sorted) order; the
    idempotency keys, jobs and queues are arrays of rows sorted by their first field. The map
    and array headers are packed on their own, and the rows `rows_per_chunk` at a time, so no
    single call holds the GIL for long and no buffer holds the whole state. The sort works the
    same way (see `_sorted_by_first`).

    Safe in a worker thread while the machine keeps applying: it reads only the capture.

    Args:
        capture: from `QueueStateMachine.capture()`.
        write: takes each piece in order, in the calling thread (a file's write, a hash's
            update, a list's append).
        rows_per_chunk: rows per msgpack call and per `write` in the three arrays.
    """
    assert rows_per_chunk > 0, rows_per_chunk
    packer = msgpack.Packer(use_bin_type=True)  # autoreset: each call returns its own bytes
    pack = packer.pack
    scalars = {
        "clock_ms": capture.clock_ms,
        "last_applied": capture.last_applied,
        "lease_counter": capture.lease_counter,
        "rotation": capture.rotation,
        "seq": capture.seq,
        "version": SNAPSHOT_VERSION,
    }
    keys = SNAPSHOT_KEYS
    if capture.membership is not None:
        scalars["membership"] = capture.membership
    else:
        keys = tuple(key for key in SNAPSHOT_KEYS if key != "membership")
    idempotency = _idempotency_rows(capture.idempotency)
    # Generators: each array is sorted only when its turn comes.
    arrays: dict[str, tuple[int, Iterator[tuple]]] = {
        "idempotency": (
            len(idempotency),
            ((queue, key, job_id, expires_at) for (queue, key), (job_id, expires_at) in _sorted_by_first(idempotency)),
        ),
        "jobs": (len(capture.jobs), map(snapshot_row, _sorted_by_first(capture.jobs))),
        "queues": (len(capture.queues), _sorted_by_first(capture.queues)),
        "schedules": (len(capture.schedules), _sorted_by_first(capture.schedules)),
    }
    assert scalars.keys() | arrays.keys() == set(keys)
    write(packer.pack_map_header(len(keys)))
    for key in keys:
        if key in scalars:
            write(pack(key) + pack(scalars[key]))
            continue
        count, rows = arrays[key]
        write(pack(key) + packer.pack_array_header(count))
        written = 0
        while chunk := list(islice(rows, rows_per_chunk)):
            write(b"".join(map(pack, chunk)))
            written += len(chunk)
        assert written == count, f"{key}: {written} rows written under a header of {count}"


def _sorted_by_first(rows: Sequence[tuple]) -> Iterator[tuple]:
    """`rows` in the order of their first field, which must be unique (a dict key), sorted in
    bounded steps.

    One `sorted()` of a million rows is a single C call that holds the GIL for up to a second
    (about 0.1 s when the rows are nearly in order already, as time-ordered ids are). So runs
    of SORT_RUN rows are sorted one call each, then merged by `heapq.merge`, whose Python loop
    lets the GIL go every switch interval: more CPU in all (about 0.4 µs a row), but the event
    loop never waits long for it.
    """
    if len(rows) <= SORT_RUN:
        return iter(sorted(rows, key=_FIRST))
    runs = [sorted(rows[start:start + SORT_RUN], key=_FIRST) for start in range(0, len(rows), SORT_RUN)]
    return heapq.merge(*runs, key=_FIRST)


def _sorted_in_runs(items: list) -> Iterator:
    """`sorted(items)`, in the same order, in bounded steps: one `sorted()` of a million tuples
    holds the GIL for most of a second (a follower installing a snapshot in a worker thread made
    its event loop wait that long), so runs of SORT_RUN are sorted and merged as in
    `_sorted_by_first`. Items must be unique (the merge of equal items could reorder them)."""
    if len(items) <= SORT_RUN:
        return iter(sorted(items))
    return heapq.merge(*[sorted(items[start:start + SORT_RUN]) for start in range(0, len(items), SORT_RUN)])


def _idempotency_rows(
    batches: Iterable[tuple[int, str, tuple[str, ...], tuple[str, ...]]]
) -> list[tuple[tuple[str, str], tuple[str, int]]]:
    """((queue, key), (job id, expires_at_ms)) per key of the idempotency batches, in batch order."""
    return [((queue, key), (job_id, expires_at))
            for expires_at, queue, keys, ids in batches for key, job_id in zip(keys, ids)]


def _expiry_and_queue(row: tuple[int, str, str, str]) -> tuple[int, str]:
    return row[0], row[1]


def _decode_snapshot(stream: BinaryIO) -> tuple[dict[str, Any], list[Job]]:
    """Reads one snapshot from `stream`: its fields other than the jobs, and the job records.

    Raises:
        ValueError: not exactly one snapshot of this version. The version is checked first,
            after the whole map is read (it is the last key), so a snapshot of another version
            is refused as such even when its other keys or rows differ from these.
    """
    unpacker = msgpack.Unpacker(stream, read_size=RESTORE_READ_BYTES, raw=False, use_list=False)
    unpack = unpacker.unpack
    from_row = Job.from_row
    policies: dict[Policy, Policy] = {}  # equal settings, one object: see Policy
    fields: dict[str, Any] = {}
    jobs: list[Job] = []
    row_lengths: set[int] = set()
    problem: str | None = None  # the first thing found wrong, told once the version is known
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpack()
            if key in fields or key not in SNAPSHOT_KEYS:
                problem = problem or f"unexpected key {key!r}"
                unpacker.skip()
            elif key == "jobs":
                fields[key] = None  # the records go to `jobs`
                for position in range(unpacker.read_array_header()):
                    row = unpack()
                    if problem is not None:
                        continue  # read on, to reach the version
                    if type(row) is not tuple or len(row) not in (ROW_FIELD_COUNT, ROW_FIELD_COUNT_V1):
                        problem = f"job row {position} is not an array of {ROW_FIELD_COUNT} fields"
                        continue
                    row_lengths.add(len(row))
                    if len(row) == ROW_FIELD_COUNT_V1:
                        row = row + (None, None, 0)  # key, group, order: version 1 had none
                    try:
                        jobs.append(from_row(row, policies))
                    except (TypeError, ValueError) as exc:  # transitions of the wrong shape
                        problem = f"job row {position}: {exc}"
            else:
                fields[key] = unpack()
        trailing = unpacker.read_bytes(1)
    except msgpack.OutOfData:
        raise ValueError("queue snapshot is truncated") from None
    except (msgpack.UnpackException, ValueError, TypeError) as exc:  # TypeError: an unhashable key
        raise ValueError(f"not a queue snapshot: {type(exc).__name__}: {exc}") from exc
    version = fields.get("version")
    if type(version) is not int or version not in (1, SNAPSHOT_VERSION):
        raise ValueError(f"not a queue snapshot of version {SNAPSHOT_VERSION} (version {version!r})")
    if problem is not None:
        raise ValueError(f"queue snapshot: {problem}")
    if row_lengths - {ROW_FIELD_COUNT_V1 if version == 1 else ROW_FIELD_COUNT}:
        raise ValueError(f"queue snapshot of version {version} has job rows of {sorted(row_lengths)} fields")
    if version == 1:
        if "schedules" in fields:
            raise ValueError("queue snapshot of version 1 has schedules")
        fields["schedules"] = ()
        fields["queues"] = tuple(tuple(row) + ((None, None, None, False), (0, 0), None) for row in fields["queues"]
                                 if type(row) is tuple)
    for key in SNAPSHOT_KEYS_OPTIONAL:
        fields.setdefault(key, None)
    missing = [key for key in SNAPSHOT_KEYS if key not in fields]
    if missing:
        raise ValueError(f"queue snapshot lacks {', '.join(missing)}")
    if trailing:
        raise ValueError("queue snapshot is followed by more bytes")
    return fields, jobs


def _lease_token(job: Job) -> int:
    return job.lease_token


def _job_id(job: Job) -> str:
    return job.id


def _job_seq(job: Job) -> int:
    return job.seq


def _lease_entry_live(entry: tuple[int, int, Job]) -> bool:
    expires_at, token, job = entry
    return job.state == LEASED and job.lease_token == token and job.lease_expires_at_ms == expires_at


def _delayed_entry_live(entry: tuple[int, int, Job]) -> bool:
    _, seq, job = entry
    return job.seq == seq and (job.state == SCHEDULED or job.state == RETRY_WAIT)


def _first_ready(fifo: deque[Job]) -> Job | None:
    """The first live entry of a ready FIFO; stale heads are few (lazy deletion pops them on lease)."""
    for job in fifo:
        if job.state == READY:
            return job
    return None
