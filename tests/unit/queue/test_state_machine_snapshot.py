"""Snapshots of QueueStateMachine in two halves: capture() on the loop, write_snapshot() off it,
and the streaming restore_from().

The canonical bytes are pinned by `reference_snapshot`, the one-shot encoding `snapshot()` had
before it was split: every digest ever compared across replicas depends on them staying equal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import msgpack
import pytest

from raftq.cluster.queue import commands as c
from raftq.cluster.queue import state_machine
from raftq.cluster.queue.jobs import TRANSITIONS_MAX
from raftq.cluster.queue.schedules import schedule_row
from raftq.cluster.queue.state_machine import (
    EVENTS, SNAPSHOT_KEYS, SNAPSHOT_VERSION, QueueStateMachine, SnapshotCapture, write_snapshot,
)
from tests.unit.queue.test_state_machine import LEASE_MS, T0, Machine, _dead, _to_state, job

EVERY_STATE = ("scheduled", "ready", "leased", "retry_wait", "done", "dead", "cancelled")


def reference_snapshot(sm: QueueStateMachine) -> bytes:
    """The encoding as one msgpack call over one dict (what `snapshot()` was before streaming)."""
    state = {
        "clock_ms": sm.clock_ms,
        "idempotency": [
            [queue, key, job_id, expires_at]
            for (queue, key), (job_id, expires_at) in sm.idempotency_keys()
        ],
        "jobs": [sm._jobs[job_id].to_row() for job_id in sorted(sm._jobs)],
        "last_applied": sm.last_applied,
        "lease_counter": sm._lease_counter,
        "queues": [
            [name, queue.max_depth, [queue.events[event] for event in EVENTS], list(queue.settings()),
             [queue.bucket_level, queue.bucket_at_ms], list(queue.turns)]
            for name, queue in sorted(sm._queues.items())
        ],
        "rotation": sm._rotation,
        "schedules": [list(schedule_row(sm._schedules[name])) for name in sorted(sm._schedules)],
        "seq": sm._seq,
        "version": SNAPSHOT_VERSION,
    }
    return msgpack.packb(state, use_bin_type=True)


def busy_machine() -> Machine:
    """Jobs in every state across three queues, idempotency keys, a queue config, long
    transition histories and finished records: every kind of row a snapshot holds."""
    m = Machine()
    for state in sorted(EVERY_STATE, key=lambda state: state == "ready"):  # ready last: lease takes any
        _to_state(m, state, f"{state}-a")
    m.submit(job("k1", idempotency_key="key-1"), job("k2", idempotency_key="key-2", priority=9), queue="other")
    m.submit(job("later", delay_ms=60_000), job("p5", priority=5), queue="third")
    _dead(m, "d1", "d2", queue="third")
    m(c.SetQueueConfig(T0, "other", 50))
    m.submit(job("bouncer", max_attempts=100), queue="bouncy")
    for _ in range(TRANSITIONS_MAX + 3):  # past the bound: the oldest after the submission go
        leased = m.lease_one(queues=("bouncy",))
        m.fail("bouncer", leased.lease_token, delay_ms=0)
    # Flow control: a rate-limited fifo queue with keys and groups, some held back by a limit.
    m(c.SetQueueConfig(T0, "flow", None, 2_000, 3, 1, True))
    m.submit(job("g1", group="A"), job("g2", group="A"), job("g3", group="B", delay_ms=5_000),
             job("t1", key="T"), job("t2", key="T"), job("u1", key="U"), job("plain"), queue="flow")
    m.lease(queues=("flow",), max_jobs=2)
    m(c.PutSchedule(T0, "nightly", "flow", b"\x90", "0 3 * * *", None, "Europe/Paris", "skip", "latest", 0, 5,
                    30_000, 1_000, 300_000, T0 + 3_600_000))
    m(c.PutSchedule(T0, "often", "flow", b"\x90", None, 2_000, "UTC", "allow", "all", 0, 5, 30_000, 1_000,
                    300_000, T0 + 2_000))
    m.sm.check_invariants()
    return m


def some_commands(m: Machine) -> None:
    """Commands that change every kind of field a capture holds."""
    m.submit(job("new-1"), job("new-2", idempotency_key="key-3"), queue="other", now=T0 + 10)
    for leased in m.lease(queues=("q", "other", "third", "bouncy"), max_jobs=10, worker="w2", now=T0 + 20):
        if leased.id.endswith("2"):
            m.ack(leased.id, leased.lease_token, worker="w2", now=T0 + 30, result=b"\xa2ok")
        else:
            m.extend(leased.id, leased.lease_token, 90_000, worker="w2", now=T0 + 30)
    m(c.Redrive(T0 + 40, "third", None))
    m(c.Cancel(T0 + 40, "ready-a"))
    m(c.WorkerLost(T0 + 50, "w1", 99))
    m(c.RenewLeases(T0 + 60))
    m(c.SetQueueConfig(T0 + 60, "third", 7))
    m.tick(T0 + 5_000_000)  # drops finished records and idempotency keys, promotes, expires
    m(c.Purge(T0 + 5_000_000, "third", "dead"))


def chunks_of(capture: SnapshotCapture, **options) -> list[bytes]:
    pieces: list[bytes] = []
    write_snapshot(capture, pieces.append, **options)
    return pieces


def assert_immutable(value: object, path: str = "capture") -> None:
    if isinstance(value, tuple) or path == "jobs":  # the list of rows is the capture's own
        for position, item in enumerate(value):
            assert_immutable(item, f"{path}[{position}]")
    else:
        assert value is None or type(value) in (str, int, bytes, bool), f"{path} is a {type(value).__name__}"


# ---------------------------------------------------------------------- capture and write


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 2048])
def test_written_pieces_are_the_canonical_snapshot(rows_per_chunk):
    m = busy_machine()
    assert {record["state"] for record in map(m.sm.get_job, m.sm._jobs)} >= set(EVERY_STATE)
    pieces = chunks_of(m.sm.capture(), rows_per_chunk=rows_per_chunk)
    assert b"".join(pieces) == m.sm.snapshot() == reference_snapshot(m.sm)
    assert m.sm.digest() == hashlib.sha256(m.sm.snapshot()).hexdigest()
    # The map header, one piece per key (with its scalar or array header), then the rows in
    # pieces of rows_per_chunk: no msgpack call covers more.
    arrays = (m.sm.job_count(), m.sm.idempotency_key_count(), len(m.sm._queues), m.sm.schedule_count())
    keys_written = len(SNAPSHOT_KEYS) - (m.sm.membership is None)  # written once a CONFIG entry applied
    assert len(pieces) == 1 + keys_written + sum(-(-rows // rows_per_chunk) for rows in arrays)


def test_merged_sorted_runs_give_the_same_bytes(monkeypatch):
    m = busy_machine()
    m.submit(*(job(f"z{i:03d}", idempotency_key=f"bulk-{i % 50:02d}-{i}") for i in range(120, 0, -1)), queue="bulk")
    expected = reference_snapshot(m.sm)
    for run in (1, 2, 5, 64):  # many runs: the heapq.merge path, with every kind of overlap
        monkeypatch.setattr(state_machine, "SORT_RUN", run)
        assert b"".join(chunks_of(m.sm.capture(), rows_per_chunk=3)) == expected


def test_empty_machine_snapshot_is_canonical():
    sm = QueueStateMachine()
    assert sm.snapshot() == reference_snapshot(sm)
    assert list(msgpack.unpackb(sm.snapshot(), raw=False)) == [key for key in SNAPSHOT_KEYS if key != "membership"]


def test_capture_shares_nothing_mutable():
    m = busy_machine()
    capture = m.sm.capture()
    assert capture.last_applied == m.sm.last_applied
    for field in dataclasses.fields(capture):
        assert_immutable(getattr(capture, field.name), field.name)
    assert capture.jobs is not m.sm.capture().jobs
    with pytest.raises(dataclasses.FrozenInstanceError):
        capture.last_applied = 0


def test_capture_written_after_more_applies_is_the_state_captured():
    m = busy_machine()
    before = m.sm.snapshot()
    capture = m.sm.capture()
    some_commands(m)
    assert m.sm.snapshot() != before  # the commands did change the state...
    assert b"".join(chunks_of(capture, rows_per_chunk=7)) == before  # ...but not the capture
    assert capture.last_applied < m.sm.last_applied


def test_row_taken_before_a_transition_keeps_its_history():
    m = Machine()
    m.submit(job("a"))
    row = m.sm._jobs["a"].to_row()
    m.lease_one()
    assert row[2] == "ready" and row[20] == (("ready", T0),)
    assert m.sm._jobs["a"].transitions == (("ready", T0), ("leased", T0))


def test_a_jobs_snapshot_row_keeps_its_layout_with_the_times_its_transitions_hold():
    """A Job keeps its settings in one shared Policy and its created, leased and finished times
    only in its transitions; its snapshot row must still be the 25 fields every version wrote."""
    m = Machine()
    m.submit(job("a", idempotency_key="key-a", priority=3))
    first = m.lease_one(now=T0 + 10)
    m.fail("a", first.lease_token, "boom", delay_ms=0, now=T0 + 20)
    second = m.lease_one(now=T0 + 30)
    m.ack("a", second.lease_token, now=T0 + 40, result=b"\x01")
    history = (("ready", T0), ("leased", T0 + 10), ("ready", T0 + 20), ("leased", T0 + 30), ("done", T0 + 40))
    expected = (
        "a", "q", "done", b"\x91\x01", 3, 2, 3, LEASE_MS, 1_000, 300_000, "key-a", T0, T0 + 20, T0 + 30,
        second.lease_token, T0 + 30 + LEASE_MS, "w1", T0 + 40, "boom", b"\x01", history, 0, None, None, 0,
    )
    assert m.sm._jobs["a"].to_row() == expected
    restored = QueueStateMachine()
    restored.restore(m.sm.snapshot())
    assert restored._jobs["a"].to_row() == expected
    assert restored.get_job("a") == m.sm.get_job("a")
    assert m.sm.get_job("a")["leased_at_ms"] == T0 + 30 and m.sm.get_job("a")["finished_at_ms"] == T0 + 40


def test_a_job_never_leased_nor_finished_has_no_such_times_in_its_row():
    m = Machine()
    m.submit(job("a", delay_ms=5_000))
    row = m.sm._jobs["a"].to_row()
    assert (row[11], row[12], row[13], row[17]) == (T0, T0 + 5_000, None, None)


def test_jobs_with_equal_settings_share_one_policy_object_live_and_restored():
    m = Machine()
    m.submit(job("a"), job("b"), job("c", priority=9))
    m.submit(job("d"), now=T0 + 1)  # another command, the same settings
    jobs = m.sm._jobs
    assert jobs["a"].policy is jobs["b"].policy is jobs["d"].policy
    assert jobs["c"].policy == (9, 3, LEASE_MS, 1_000, 300_000) and jobs["c"].policy is not jobs["a"].policy
    restored = QueueStateMachine()
    restored.restore(m.sm.snapshot())
    again = restored._jobs
    assert again["a"].policy is again["b"].policy is again["d"].policy
    assert again["c"].policy == jobs["c"].policy


# ---------------------------------------------------------------------- restore_from


class TrickleReader(io.RawIOBase):
    """A stream that hands out at most `step` bytes per read, like a slow socket or pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__()
        self._data, self._position, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        piece = self._data[self._position:self._position + min(self._step, len(buffer))]
        buffer[:len(piece)] = piece
        self._position += len(piece)
        return len(piece)


@pytest.mark.parametrize("read_bytes, step", [(1 << 20, 1 << 20), (7, 3), (64, 1)])
def test_restore_from_stream_round_trip(monkeypatch, read_bytes, step):
    monkeypatch.setattr(state_machine, "RESTORE_READ_BYTES", read_bytes)
    m = busy_machine()
    data = m.sm.snapshot()
    other = Machine()
    other.submit(job("zzz"), queue="unrelated")
    other.sm.restore_from(TrickleReader(data, step))
    other.sm.check_invariants()
    assert other.sm.digest() == m.sm.digest() and other.sm.snapshot() == data
    assert other.sm.get_job("zzz") is None and other.sm.last_applied == m.sm.last_applied
    assert type(other.sm.get_job("bouncer")) is dict
    assert all(type(job.transitions) is tuple for job in other.sm._jobs.values())
    # The restored machine goes on exactly like the original.
    other.index = m.index
    some_commands(m)
    some_commands(other)
    assert other.sm.digest() == m.sm.digest()


def test_restored_states_are_the_module_strings():
    m = busy_machine()
    other = QueueStateMachine()
    other.restore(m.sm.snapshot())
    for restored in other._jobs.values():
        live = m.sm._jobs[restored.id]
        assert restored.state is live.state
        assert all(a is b for (a, _), (b, _) in zip(restored.transitions, live.transitions))


def _pack_map(state: dict) -> bytes:
    return msgpack.packb(state, use_bin_type=True)


def _snapshot_map(m: Machine) -> dict:
    return msgpack.unpackb(m.sm.snapshot(), raw=False)


def _bad_snapshots(m: Machine) -> dict[str, bytes]:
    good = m.sm.snapshot()
    state = _snapshot_map(m)
    other_version = dict(state, version=SNAPSHOT_VERSION + 1)
    other_version["jobs"] = [row + [None] for row in state["jobs"]]  # a new format may change rows too
    bad_row = dict(state)
    bad_row["jobs"] = state["jobs"][:1] + [state["jobs"][1][:5]] + state["jobs"][2:]
    unknown_queue = dict(state)
    unknown_queue["jobs"] = [[row[0], "nowhere", *row[2:]] for row in state["jobs"]]
    unknown_state = dict(state)
    unknown_state["jobs"] = [[*row[:2], "limbo", *row[3:]] for row in state["jobs"]]
    duplicate_id = dict(state)
    duplicate_id["jobs"] = state["jobs"] + state["jobs"][-1:]
    return {
        "empty": b"",
        "garbage": b"\xc1not msgpack at all",
        "not a map": msgpack.packb([1, 2, 3]),
        "version only": msgpack.packb({"version": 999}),
        "other version": _pack_map(other_version),
        "version missing": _pack_map({k: v for k, v in state.items() if k != "version"}),
        "version as bool": _pack_map(dict(state, version=True)),
        "key missing": _pack_map({k: v for k, v in state.items() if k != "seq"}),
        "unknown key": _pack_map(dict(state, extra=1)),
        "trailing byte": good + b"\x00",
        "trailing partial object": good + b"\xcd",
        "second snapshot": good + good,
        "short job row": _pack_map(bad_row),
        "job in an unknown queue": _pack_map(unknown_queue),
        "job in an unknown state": _pack_map(unknown_state),
        "job id twice": _pack_map(duplicate_id),
        "clock not an integer": _pack_map(dict(state, clock_ms="soon")),
        "queue counters short": _pack_map(dict(state, queues=[[q[0], q[1], q[2][:3]] for q in state["queues"]])),
        "jobs not an array": _pack_map(dict(state, jobs=7)),
    }


BAD_NAMES = list(_bad_snapshots(busy_machine()))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_stream_is_refused_and_changes_nothing(name):
    m = busy_machine()
    data = _bad_snapshots(m)[name]
    target = busy_machine()
    some_commands(target)
    before = target.sm.digest()
    with pytest.raises(ValueError):
        target.sm.restore_from(io.BytesIO(data))
    assert target.sm.digest() == before
    target.sm.check_invariants()
    some_commands(target)  # and it still works


def test_version_1_snapshot_restores_with_no_limits_and_no_schedules():
    """A snapshot written before flow control: jobs without key, group and order, queues without
    settings, no schedules. It restores to the state a version-2 snapshot of it would give."""
    m = Machine()
    m.submit(job("a"), job("b", priority=9), job("c", delay_ms=5_000))
    m(c.SetQueueConfig(T0, "q", 10))
    m.lease_one()
    state = _snapshot_map(m)
    state["version"] = 1
    state["jobs"] = [row[:-3] for row in state["jobs"]]
    state["queues"] = [row[:3] for row in state["queues"]]
    del state["schedules"]
    restored = Machine()
    restored.sm.restore(_pack_map(state))
    restored.index = m.index
    restored.sm.check_invariants()
    assert restored.sm.digest() == m.sm.digest()
    assert restored.lease_one().id == m.lease_one().id == "a"


def test_other_version_is_named_as_such():
    m = busy_machine()
    state = _snapshot_map(m)
    state["version"] = 3
    state["jobs"] = [[1, 2, 3]]  # rows it cannot read either: the version is what it reports
    with pytest.raises(ValueError, match="version 3"):
        m.sm.restore(_pack_map(dict(state, shiny=True)))


def test_every_truncation_is_refused_and_changes_nothing():
    m = busy_machine()
    data = m.sm.snapshot()
    target = QueueStateMachine()
    target.restore(data)
    before = target.digest()
    for size in range(len(data)):
        with pytest.raises(ValueError):
            target.restore_from(io.BytesIO(data[:size]))
    assert target.digest() == before


def test_the_membership_of_the_last_config_entry_travels_in_the_snapshot():
    from raftq.cluster.raft.messages import Entry, EntryKind

    m = QueueStateMachine()
    without = m.snapshot()
    assert m.apply(Entry(1, 1, EntryKind.CONFIG, b"members-1")) is None
    assert m.apply(Entry(2, 1, EntryKind.CONFIG, b"members-2")) is None
    restored = QueueStateMachine()
    restored.restore(m.snapshot())
    assert restored.membership == b"members-2" and restored.last_applied == 2
    assert restored.digest() == m.digest() != QueueStateMachine().digest()
    old = QueueStateMachine()
    old.restore(without)  # a snapshot from before memberships were recorded
    assert old.membership is None
