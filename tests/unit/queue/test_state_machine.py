"""Unit tables for QueueStateMachine: every command and every outcome it can have."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import msgpack
import pytest

from raftq.cluster.queue import commands as c
from raftq.cluster.queue import results as r
from raftq.cluster.queue.jobs import TRANSITIONS_MAX, backoff_delay_ms
from raftq.cluster.queue.state_machine import EVENTS, LEASE_HEAP_SLACK, QueueStateMachine
from raftq.cluster.raft.messages import Entry, EntryKind

T0 = 1_000_000  # an arbitrary start of the replicated clock, in ms
LEASE_MS = 30_000


def job(job_id: str, **overrides) -> c.NewJob:
    fields = dict(id=job_id, payload=b"\x91\x01", priority=0, delay_ms=0, max_attempts=3, lease_ms=LEASE_MS,
                  idempotency_key=None, backoff_base_ms=1_000, backoff_cap_ms=300_000)
    fields.update(overrides)
    return c.NewJob(**fields)


class Machine:
    """A state machine fed through real log entries (encode -> Entry -> apply), one index at a time."""

    def __init__(self, **options) -> None:
        self.sm = QueueStateMachine(**options)
        self.index = 0

    def __call__(self, command):
        self.index += 1
        result = self.sm.apply(Entry(self.index, 1, EntryKind.NORMAL, c.encode_command(command)))
        self.sm.check_invariants()
        return result

    def submit(self, *jobs: c.NewJob, queue: str = "q", now: int = T0):
        return self(c.Submit(now, queue, jobs))

    def lease(self, queues=("q",), max_jobs: int = 1, worker: str = "w1", now: int = T0) -> tuple[r.JobGrant, ...]:
        return self(c.Lease(now, worker, tuple(queues), max_jobs)).jobs

    def lease_one(self, **kwargs) -> r.JobGrant:
        jobs = self.lease(**kwargs)
        assert len(jobs) == 1, jobs
        return jobs[0]

    def ack(self, job_id: str, lease: int, worker: str = "w1", now: int = T0, result: bytes | None = None):
        return self(c.Ack(now, worker, (c.AckItem(job_id, lease, result),))).outcomes[0]

    def fail(self, job_id: str, lease: int, error: str = "boom", *, retry: bool = True, delay_ms: int | None = None,
             worker: str = "w1", now: int = T0, entropy: int = 7):
        return self(c.Fail(now, worker, entropy, (c.FailItem(job_id, lease, error, retry, delay_ms),))).outcomes[0]

    def extend(self, job_id: str, lease: int, lease_ms: int, worker: str = "w1", now: int = T0):
        return self(c.Extend(now, worker, (c.ExtendItem(job_id, lease, lease_ms),))).outcomes[0]

    def release(self, job_id: str, lease: int, worker: str = "w1", now: int = T0):
        return self(c.Release(now, worker, (c.ReleaseItem(job_id, lease),))).outcomes[0]

    def tick(self, now: int, entropy: int = 7) -> r.Ticked:
        return self(c.Tick(now, entropy))

    def state(self, job_id: str) -> str | None:
        record = self.sm.get_job(job_id)
        return None if record is None else record["state"]

    def logical_state(self) -> dict:
        """The snapshot without the bookkeeping every entry moves (index, clock)."""
        state = msgpack.unpackb(self.sm.snapshot(), raw=False)
        del state["last_applied"], state["clock_ms"]
        return state


@pytest.fixture
def m() -> Machine:
    return Machine()


def assert_unchanged(m: Machine, command) -> object:
    before = m.logical_state()
    result = m(command)
    assert m.logical_state() == before
    return result


# ---------------------------------------------------------------------- apply plumbing


def test_noop_entry_returns_none_and_advances_index(m):
    assert m.sm.apply(Entry(1, 1, EntryKind.NOOP, b"")) is None
    assert m.sm.last_applied == 1


def test_undecodable_entry_is_rejected_without_change(m):
    m.submit(job("a"))
    before = m.logical_state()
    result = m.sm.apply(Entry(m.index + 1, 1, EntryKind.NORMAL, b"\x93\x63\x01\x02"))
    assert isinstance(result, r.Rejected) and "unknown command tag" in result.reason
    assert m.sm.last_applied == m.index + 1
    assert m.logical_state() == before


@pytest.mark.parametrize("index", [0, 2, 5])
def test_entries_apply_in_order_once(index):
    sm = QueueStateMachine()
    with pytest.raises(AssertionError):
        sm.apply(Entry(index, 1, EntryKind.NOOP, b""))


def test_clock_never_runs_backwards(m):
    m.submit(job("a"), now=T0 + 500)
    m.submit(job("b"), now=T0)  # a new leader whose clock lags
    assert m.sm.clock_ms == T0 + 500
    assert m.sm.get_job("b")["created_at_ms"] == T0 + 500


# ---------------------------------------------------------------------- submit


def test_submit_creates_ready_jobs_in_order(m):
    result = m.submit(job("a", priority=3), job("b", payload=b"\xc0"))
    assert result == r.Submitted(("a", "b"), (True, True))
    record = m.sm.get_job("a")
    assert record["state"] == "ready" and record["priority"] == 3 and record["attempts"] == 0
    assert record["created_at_ms"] == record["ready_at_ms"] == T0
    assert record["transitions"] == [["ready", T0]]
    assert m.sm.get_job("b")["payload"] == b"\xc0"
    assert m.sm.queue_stats()["q"]["ready"] == 2
    assert m.sm.counters[("submitted", "q")] == 2


def test_get_job_record_fields(m):
    m.submit(job("a", idempotency_key="k"))
    assert set(m.sm.get_job("a")) == {
        "id", "queue", "state", "payload", "priority", "attempts", "max_attempts", "lease_ms", "backoff_base_ms",
        "backoff_cap_ms", "idempotency_key", "created_at_ms", "ready_at_ms", "leased_at_ms", "lease",
        "lease_expires_at_ms", "worker", "finished_at_ms", "last_error", "result", "transitions", "key", "group",
    }
    assert m.sm.get_job("missing") is None


def test_delayed_job_is_scheduled_until_due(m):
    m.submit(job("a", delay_ms=5_000))
    assert m.state("a") == "scheduled" and m.sm.get_job("a")["ready_at_ms"] == T0 + 5_000
    assert m.sm.next_due_ms() == T0 + 5_000
    assert m.lease(now=T0 + 4_999) == ()
    assert m.lease_one(now=T0 + 5_000).id == "a"  # Lease promotes due jobs before picking


def test_tick_promotes_due_scheduled_jobs_in_due_order(m):
    m.submit(job("late", delay_ms=2_000), job("early", delay_ms=1_000), job("never", delay_ms=9_000))
    assert m.tick(T0 + 2_000) == r.Ticked(expired=0, promoted=2, dropped=0, keys_dropped=0)
    assert [j.id for j in m.lease(max_jobs=5, now=T0 + 2_000)] == ["early", "late"]
    assert m.state("never") == "scheduled"


IDEMPOTENCY_CASES = [
    # (name, second submit (queue, job, now offset), expected id, created)
    ("same key inside window", ("q", job("b", idempotency_key="k"), 3_599_999), "a", False),
    ("same key after window", ("q", job("b", idempotency_key="k"), 3_600_000), "b", True),
    ("same key other queue", ("other", job("b", idempotency_key="k"), 1), "b", True),
    ("other key", ("q", job("b", idempotency_key="k2"), 1), "b", True),
    ("no key", ("q", job("b"), 1), "b", True),
    ("same id no key", ("q", job("a"), 1), "a", False),
]


@pytest.mark.parametrize("name, second, expected_id, created", IDEMPOTENCY_CASES, ids=[c[0] for c in IDEMPOTENCY_CASES])
def test_idempotent_submit(m, name, second, expected_id, created):
    m.submit(job("a", idempotency_key="k", payload=b"\x01"))
    queue, new, offset = second
    result = m.submit(new, queue=queue, now=T0 + offset)
    assert result == r.Submitted((expected_id,), (created,))
    assert m.sm.job_count() == (2 if created else 1)
    assert m.sm.get_job("a")["payload"] == b"\x01"  # the first job is never overwritten


def test_idempotent_submit_after_window_with_tick(m):
    m.submit(job("a", idempotency_key="k"))
    assert m.tick(T0 + 3_600_000).keys_dropped == 1
    assert m.submit(job("b", idempotency_key="k"), now=T0 + 3_600_000).created == (True,)
    # The new job's key lives a full window from its own submit.
    assert m.submit(job("c", idempotency_key="k"), now=T0 + 7_199_999).ids == ("b",)


def test_duplicate_key_inside_one_batch(m):
    result = m.submit(job("a", idempotency_key="k"), job("b", idempotency_key="k"), job("c"))
    assert result == r.Submitted(("a", "a", "c"), (True, False, True))
    assert m.sm.job_count() == 2
    assert m.sm.counters[("submitted", "q")] == 2


def test_queue_full_refuses_whole_batch_and_changes_nothing(m):
    m(c.SetQueueConfig(T0, "q", 3))
    m.submit(job("a"), job("b"))
    result = assert_unchanged(m, c.Submit(T0, "q", (job("c"), job("d"))))
    assert result == r.QueueFull("q", 3)
    assert m.submit(job("c")).created == (True,)


def test_queue_full_counts_only_unfinished_and_new_jobs(m):
    m(c.SetQueueConfig(T0, "q", 2))
    m.submit(job("a", idempotency_key="k"), job("b"))
    lease = m.lease_one()
    m.ack(lease.id, lease.lease_token)  # done: no longer counts
    assert m.submit(job("a2", idempotency_key="k"), job("c")) == r.Submitted(("a", "c"), (False, True))
    assert isinstance(m.submit(job("d")), r.QueueFull)
    assert m.submit(job("a3", idempotency_key="k")).ids == ("a",)  # a duplicate creates nothing
    m(c.SetQueueConfig(T0, "q", None))
    assert m.submit(job("d")).created == (True,)


def test_queue_full_on_a_new_queue_does_not_create_it(m):
    m(c.SetQueueConfig(T0, "tiny", 1))
    assert assert_unchanged(m, c.Submit(T0, "tiny", (job("a"), job("b")))) == r.QueueFull("tiny", 1)


# ---------------------------------------------------------------------- lease


PRIORITY_CASES = [
    # (name, [(id, priority)], expected lease order)
    ("fifo within a priority", [("a", 0), ("b", 0), ("c", 0)], ["a", "b", "c"]),
    ("9 runs first", [("low", 0), ("high", 9), ("mid", 5)], ["high", "mid", "low"]),
    ("mixed", [("a", 1), ("b", 2), ("c", 1), ("d", 2), ("e", 0)], ["b", "d", "a", "c", "e"]),
]


@pytest.mark.parametrize("name, jobs, order", PRIORITY_CASES, ids=[p[0] for p in PRIORITY_CASES])
def test_priority_then_fifo(m, name, jobs, order):
    m.submit(*(job(i, priority=p) for i, p in jobs))
    assert [j.id for j in m.lease(max_jobs=10)] == order


def test_round_robin_across_queues(m):
    m.submit(*(job(f"a{i}") for i in range(4)), queue="A")
    m.submit(*(job(f"b{i}") for i in range(4)), queue="B")
    m.submit(job("c0"), queue="C")
    first = [j.id for j in m.lease(queues=("A", "B", "C"), max_jobs=5)]
    assert sorted(first) == ["a0", "a1", "b0", "b1", "c0"]
    # One job per queue per round: the first three picks come from three different queues.
    assert len({i[0] for i in first[:3]}) == 3
    second = [j.id for j in m.lease(queues=("A", "B", "C"), max_jobs=2)]
    assert sorted(second) == ["a2", "b2"]


def test_round_robin_start_rotates(m):
    m.submit(*(job(f"a{i}") for i in range(10)), queue="A")
    m.submit(*(job(f"b{i}") for i in range(10)), queue="B")
    firsts = {m.lease(queues=("A", "B"), max_jobs=1)[0].id[0] for _ in range(4)}
    assert firsts == {"a", "b"}  # a single-job lease does not always drain the queue named first


def test_lease_grants_fencing_tokens_and_counts_attempts(m):
    m.submit(job("a", lease_ms=10_000), job("b"))
    leases = m.lease(max_jobs=2, now=T0 + 5)
    assert [j.lease_token for j in leases] == [1, 2]
    first = leases[0]
    assert first == r.JobGrant("a", "q", b"\x91\x01", 1, 1, T0 + 10_005, 0, 10_000)
    record = m.sm.get_job("a")
    assert record["state"] == "leased" and record["worker"] == "w1" and record["leased_at_ms"] == T0 + 5
    assert m.sm.lease_holder("a") == ("w1", 1, T0 + 10_005)
    assert m.sm.leased_by_worker() == {"w1": ["a", "b"]}
    assert m.sm.counters[("leased", "q")] == 2


@pytest.mark.parametrize("queues, max_jobs", [((), 5), (("nope",), 5), (("q",), 0)])
def test_lease_nothing(m, queues, max_jobs):
    m.submit(job("a"))
    assert m.lease(queues=queues, max_jobs=max_jobs) == ()
    assert m.state("a") == "ready"


def test_lease_stops_at_max_jobs_and_has_ready(m):
    m.submit(*(job(str(i)) for i in range(5)))
    assert len(m.lease(max_jobs=3)) == 3
    assert m.sm.has_ready(["other", "q"])
    assert len(m.lease(max_jobs=3)) == 2
    assert not m.sm.has_ready(["q"])


# ---------------------------------------------------------------------- ack, fail, extend: lease checks


def _leased(m: Machine, **job_overrides) -> r.JobGrant:
    m.submit(job("a", **job_overrides))
    return m.lease_one()


def _ack(m, lease, **kw):
    return m.ack("a", lease, **kw)


def _fail(m, lease, **kw):
    return m.fail("a", lease, **kw)


def _extend(m, lease, **kw):
    return m.extend("a", lease, 60_000, **kw)


def _release(m, lease, **kw):
    return m.release("a", lease, **kw)


LEASE_OPERATIONS = [_ack, _fail, _extend, _release]
LEASE_OPERATION_NAMES = ["ack", "fail", "extend", "release"]


LEASE_ERROR_CASES = [
    # (name, mutate lease token, worker, now offset, expected code)
    ("unknown token", lambda t: t + 100, "w1", 0, r.LEASE_MISMATCH),
    ("other worker", lambda t: t, "w2", 0, r.LEASE_MISMATCH),
    ("expired, not yet requeued", lambda t: t, "w1", LEASE_MS, r.LEASE_EXPIRED),
    ("long expired", lambda t: t, "w1", LEASE_MS + 999_999, r.LEASE_EXPIRED),
]


@pytest.mark.parametrize("operation", LEASE_OPERATIONS, ids=LEASE_OPERATION_NAMES)
@pytest.mark.parametrize("name, token, worker, offset, code", LEASE_ERROR_CASES, ids=[x[0] for x in LEASE_ERROR_CASES])
def test_stale_or_foreign_lease_is_refused_and_changes_nothing(m, operation, name, token, worker, offset, code):
    leased = _leased(m)
    before = m.logical_state()
    outcome = operation(m, token(leased.lease_token), worker=worker, now=T0 + offset)
    assert isinstance(outcome, r.ItemError) and outcome.code == code, outcome
    assert m.logical_state() == before


@pytest.mark.parametrize("operation", LEASE_OPERATIONS, ids=LEASE_OPERATION_NAMES)
def test_unknown_job_is_not_found(m, operation):
    outcome = operation(m, 1)
    assert outcome.code == r.NOT_FOUND


@pytest.mark.parametrize("operation", LEASE_OPERATIONS, ids=LEASE_OPERATION_NAMES)
def test_job_not_leased_is_lease_mismatch(m, operation):
    m.submit(job("a"))
    assert operation(m, 1).code == r.LEASE_MISMATCH


@pytest.mark.parametrize("operation", LEASE_OPERATIONS, ids=LEASE_OPERATION_NAMES)
def test_lease_after_expiry_requeue_is_refused(m, operation):
    leased = _leased(m)
    m.tick(T0 + LEASE_MS)
    assert m.state("a") in ("ready", "retry_wait")
    assert operation(m, leased.lease_token, now=T0 + LEASE_MS).code == r.LEASE_MISMATCH
    nxt = m.lease_one(now=T0 + LEASE_MS + 400_000)  # the next holder
    assert operation(m, leased.lease_token, now=T0 + LEASE_MS + 400_000).code == r.LEASE_MISMATCH
    assert m.sm.lease_holder("a") == ("w1", nxt.lease_token, nxt.lease_expires_at_ms)


# ---------------------------------------------------------------------- release


def test_release_requeues_without_counting_the_attempt(m):
    m.submit(job("a", max_attempts=1), job("b"))
    first = m.lease_one(now=T0)
    assert first.id == "a" and first.attempt == 1
    assert m.release("a", first.lease_token, now=T0 + 5) is r.OK
    record = m.sm.get_job("a")
    assert (record["state"], record["attempts"]) == ("ready", 0)
    assert m.sm.lease_holder("a") is None
    assert m.sm.counters[("released", "q")] == 1
    # Back at the end of its priority's FIFO: b, leased by nobody yet, comes first.
    assert [j.id for j in m.lease(max_jobs=2, worker="w2", now=T0 + 10)] == ["b", "a"]
    again = m.sm.get_job("a")
    assert again["attempts"] == 1 and again["worker"] == "w2"  # max_attempts=1: still one attempt left to use


def test_a_leased_job_holds_no_ready_order_number_and_returns_with_a_fresh_one(m):
    m.submit(job("a"), job("b"))
    first = m.lease_one(now=T0)
    assert first.id == "a" and m.sm._jobs["a"].seq == 0, "a leased job keeps an int it no longer needs"
    assert m.release("a", first.lease_token, now=T0 + 5) is r.OK
    assert m.sm._jobs["a"].seq > m.sm._jobs["b"].seq > 0, "a released job rejoins the FIFO behind b"
    assert [j.id for j in m.lease(max_jobs=2, worker="w2", now=T0 + 10)] == ["b", "a"]
    again = m.sm._jobs["a"]
    assert m.ack("a", again.lease_token, worker="w2", now=T0 + 11) is r.OK
    assert (again.state, again.seq) == ("done", 0)


def test_released_job_on_its_last_attempt_is_not_dead_lettered(m):
    m.submit(job("a", max_attempts=1))
    for round_ in range(3):
        leased = m.lease_one(now=T0 + round_)
        assert leased.attempt == 1
        assert m.release("a", leased.lease_token, now=T0 + round_) is r.OK
    assert m.state("a") == "ready"


def test_stale_release_changes_nothing_and_neighbours_still_go_back(m):
    m.submit(job("a"), job("b"))
    a, b = m.lease(max_jobs=2)
    before_b = m.sm.get_job("b")["attempts"]
    outcomes = m(c.Release(T0, "w1", (c.ReleaseItem("a", a.lease_token + 99), c.ReleaseItem("b", b.lease_token)))).outcomes
    assert outcomes[0].code == r.LEASE_MISMATCH and outcomes[1] is r.OK
    assert m.state("a") == "leased" and m.state("b") == "ready"
    assert m.sm.get_job("b")["attempts"] == before_b - 1


def test_release_frees_a_key_slot_and_keeps_a_fifo_group_in_order(m):
    m(c.SetQueueConfig(T0, "q", None, max_running_per_key=1, fifo=True))
    m.submit(job("k1", key="tenant"), job("k2", key="tenant"), job("g1", group="order"), job("g2", group="order"))
    first = {j.id: j for j in m.lease(max_jobs=4)}
    assert set(first) == {"k1", "g1"}  # one per key at a time; a FIFO group one at a time
    for job_id in ("k1", "g1"):
        assert m.release(job_id, first[job_id].lease_token) is r.OK
    again = [j.id for j in m.lease(max_jobs=4, worker="w2", now=T0 + 1)]
    assert sorted(again) == ["g1", "k1"] or sorted(again) == ["g1", "k2"], again  # the group's head first, still
    assert "g2" not in again


def test_released_lease_cannot_be_acked(m):
    leased = _leased(m)
    m.release("a", leased.lease_token)
    assert m.ack("a", leased.lease_token).code == r.LEASE_MISMATCH


# ---------------------------------------------------------------------- ack


def test_ack_finishes_job(m):
    leased = _leased(m)
    assert m.ack("a", leased.lease_token, now=T0 + 10, result=b"\x2a") is r.OK
    record = m.sm.get_job("a")
    assert record["state"] == "done" and record["result"] == b"\x2a" and record["finished_at_ms"] == T0 + 10
    assert [s for s, _ in record["transitions"]] == ["ready", "leased", "done"]
    assert m.sm.lease_holder("a") is None and m.sm.leased_by_worker() == {}
    assert m.sm.counters[("acked", "q")] == 1


def test_repeated_ack_is_ok_and_changes_nothing(m):
    leased = _leased(m)
    m.ack("a", leased.lease_token)
    assert assert_unchanged(m, c.Ack(T0 + 1, "w1", (c.AckItem("a", leased.lease_token, b"\x01"),))).outcomes == (r.OK,)
    assert m.ack("a", leased.lease_token + 1).code == r.LEASE_MISMATCH


def test_ack_batch_outcome_per_item(m):
    m.submit(job("a"), job("b"))
    a, b = m.lease(max_jobs=2)
    result = m(c.Ack(T0, "w1", (c.AckItem("a", a.lease_token, None), c.AckItem("b", 999, None), c.AckItem("x", 1, None))))
    assert [getattr(o, "code", "ok") for o in result.outcomes] == ["ok", r.LEASE_MISMATCH, r.NOT_FOUND]
    assert m.state("a") == "done" and m.state("b") == "leased"


# ---------------------------------------------------------------------- fail


def test_fail_with_explicit_delay_waits_then_retries(m):
    leased = _leased(m)
    assert m.fail("a", leased.lease_token, "oops", delay_ms=5_000, now=T0 + 100) is r.OK
    record = m.sm.get_job("a")
    assert record["state"] == "retry_wait" and record["ready_at_ms"] == T0 + 5_100 and record["last_error"] == "oops"
    assert m.lease(now=T0 + 5_099) == ()
    assert m.tick(T0 + 5_100).promoted == 1
    again = m.lease_one(now=T0 + 5_100)
    assert again.attempt == 2 and again.lease_token > leased.lease_token
    assert m.sm.counters[("failed", "q")] == 1 and m.sm.counters[("retried", "q")] == 1


def test_fail_with_zero_delay_is_ready_at_once(m):
    leased = _leased(m)
    m.fail("a", leased.lease_token, delay_ms=0)
    assert m.state("a") == "ready"


def test_backoff_grows_within_full_jitter_bounds(m):
    base, cap = 100, 1_000
    leased = _leased(m, max_attempts=8, backoff_base_ms=base, backoff_cap_ms=cap)
    now = T0
    for attempt in range(1, 8):
        entropy = 1_000 + attempt
        m.fail("a", leased.lease_token, now=now, entropy=entropy)
        delay = m.sm.get_job("a")["ready_at_ms"] - now
        bound = min(cap, base * 2 ** (attempt - 1))
        assert 0 <= delay < bound
        assert delay == backoff_delay_ms(base, cap, attempt, entropy, 0)
        now += delay
        leased = m.lease_one(now=now)
        assert leased.attempt == attempt + 1


def test_fail_without_retry_dead_letters_at_once(m):
    leased = _leased(m)
    m.fail("a", leased.lease_token, "bad input", retry=False)
    record = m.sm.get_job("a")
    assert record["state"] == "dead" and record["last_error"] == "bad input" and record["attempts"] == 1
    assert m.sm.counters[("dead_lettered", "q")] == 1 and m.sm.counters[("retried", "q")] == 0


def test_dead_letter_after_max_attempts_with_last_error(m):
    m.submit(job("a", max_attempts=2))
    m.fail("a", m.lease_one().lease_token, "first", delay_ms=0)
    m.fail("a", m.lease_one().lease_token, "second", delay_ms=0)
    assert m.state("a") == "dead"
    [dead] = m.sm.dead_jobs("q", 10)
    assert dead["id"] == "a" and dead["attempts"] == 2 and dead["last_error"] == "second"
    assert m.lease() == ()


def test_fail_batch_uses_entropy_per_position(m):
    m.submit(job("a", backoff_base_ms=10_000, backoff_cap_ms=10_000), job("b", backoff_base_ms=10_000,
                                                                           backoff_cap_ms=10_000))
    a, b = m.lease(max_jobs=2)
    m(c.Fail(T0, "w1", 99, (c.FailItem("a", a.lease_token, "e", True, None), c.FailItem("b", b.lease_token, "e", True, None))))
    assert m.sm.get_job("a")["ready_at_ms"] - T0 == backoff_delay_ms(10_000, 10_000, 1, 99, 0)
    assert m.sm.get_job("b")["ready_at_ms"] - T0 == backoff_delay_ms(10_000, 10_000, 1, 99, 1)


# ---------------------------------------------------------------------- extend


def test_extend_moves_expiry(m):
    leased = _leased(m)
    assert m.extend("a", leased.lease_token, 60_000, now=T0 + 20_000) == r.Extended(T0 + 80_000)
    assert m.sm.lease_holder("a") == ("w1", leased.lease_token, T0 + 80_000)
    assert m.tick(T0 + LEASE_MS).expired == 0  # the old expiry is stale
    assert m.ack("a", leased.lease_token, now=T0 + 79_999) is r.OK


def test_extended_lease_expires_at_new_time(m):
    leased = _leased(m)
    m.extend("a", leased.lease_token, 60_000, now=T0)
    assert m.sm.next_due_ms() == T0 + 60_000
    assert m.tick(T0 + 60_000).expired == 1


# ---------------------------------------------------------------------- tick: expiry, retention


def test_lease_expiry_requeues_and_counts_attempt(m):
    _leased(m, max_attempts=2)
    assert m.sm.next_due_ms() == T0 + LEASE_MS
    assert m.tick(T0 + LEASE_MS - 1).expired == 0
    assert m.tick(T0 + LEASE_MS).expired == 1
    record = m.sm.get_job("a")
    assert record["state"] in ("ready", "retry_wait") and record["last_error"] == "lease expired"
    assert record["attempts"] == 1
    assert m.sm.leased_by_worker() == {}
    assert m.sm.counters[("requeued_expired", "q")] == 1
    second = m.lease_one(now=T0 + LEASE_MS + 1_000)
    assert second.attempt == 2
    m.tick(second.lease_expires_at_ms)
    record = m.sm.get_job("a")
    assert record["state"] == "dead" and record["last_error"] == "lease expired"
    assert m.sm.counters[("dead_lettered", "q")] == 1


def test_finished_records_dropped_after_retention(m):
    leased = _leased(m)
    m.ack("a", leased.lease_token, now=T0 + 10)
    m.submit(job("b"), now=T0 + 10)
    m(c.Cancel(T0 + 20, "b"))
    retention = m.sm.retention_ms
    assert m.sm.next_due_ms() == T0 + 10 + retention
    assert m.tick(T0 + 10 + retention - 1).dropped == 0
    assert m.tick(T0 + 10 + retention).dropped == 1
    assert m.sm.get_job("a") is None and m.state("b") == "cancelled"
    assert m.tick(T0 + 20 + retention).dropped == 1
    assert m.sm.get_job("b") is None
    assert "q" not in m.sm.queue_stats(), "an empty queue with default settings leaves the state"
    assert m.sm.next_due_ms() is None


def test_dead_jobs_are_kept_past_retention(m):
    leased = _leased(m)
    m.fail("a", leased.lease_token, retry=False)
    m.tick(T0 + 10 * m.sm.retention_ms)
    assert m.state("a") == "dead"


def test_short_retention_and_window_options():
    m = Machine(retention_ms=100, idempotency_window_ms=50)
    m.submit(job("a", idempotency_key="k"))
    m.ack("a", m.lease_one().lease_token)
    assert m.tick(T0 + 100) == r.Ticked(expired=0, promoted=0, dropped=1, keys_dropped=1)


# ---------------------------------------------------------------------- worker lost, renew


def test_worker_lost_requeues_only_its_jobs(m):
    m.submit(job("a"), job("b"), job("c", max_attempts=1))
    m.lease(worker="w1", max_jobs=1)
    m.lease(worker="w2", max_jobs=1)
    m.lease(worker="w1", max_jobs=1)
    result = m(c.WorkerLost(T0 + 5, "w1", 3))
    assert result == r.Released(requeued=1, dead_lettered=1)
    assert m.state("a") in ("ready", "retry_wait") and m.sm.get_job("a")["last_error"] == "worker w1 lost"
    assert m.state("b") == "leased"
    assert m.state("c") == "dead" and m.sm.get_job("c")["last_error"] == "worker w1 lost"
    assert m.sm.leased_by_worker() == {"w2": ["b"]}
    assert m.sm.counters[("requeued_worker_lost", "q")] == 1
    assert m(c.WorkerLost(T0 + 6, "w1", 3)) == r.Released(0, 0)


def test_renew_leases_gives_every_lease_a_full_period(m):
    m.submit(job("short", lease_ms=1_000), job("long", lease_ms=100_000))
    short, long = m.lease(max_jobs=2)
    m.extend("long", long.lease_token, 500_000)
    result = m(c.RenewLeases(T0 + 900))
    assert result == r.Renewed(1)
    assert m.sm.lease_holder("short")[2] == T0 + 1_900
    assert m.sm.lease_holder("long")[2] == T0 + 500_000  # already later: unchanged
    assert m.tick(T0 + 1_000).expired == 0
    assert m.tick(T0 + 1_900).expired == 1


# ---------------------------------------------------------------------- cancel


def _to_state(m: Machine, state: str, job_id: str = "a", queue: str = "q") -> None:
    """Brings a new job `job_id` into `state`; `queue` must hold no other ready job (lease takes any)."""
    m.submit(job(job_id, delay_ms=1_000 if state == "scheduled" else 0), queue=queue)
    if state in ("scheduled", "ready"):
        return
    leased = m.lease_one(queues=(queue,))
    assert leased.id == job_id, f"queue {queue} held another ready job, {leased.id}"
    if state == "leased":
        return
    if state == "retry_wait":
        m.fail(job_id, leased.lease_token, delay_ms=5_000)
    elif state == "dead":
        m.fail(job_id, leased.lease_token, retry=False)
    elif state == "done":
        m.ack(job_id, leased.lease_token)
    elif state == "cancelled":
        m(c.Cancel(T0, job_id))


CANCEL_CASES = [
    ("scheduled", r.OK), ("ready", r.OK), ("leased", r.OK), ("retry_wait", r.OK), ("dead", r.OK),
    ("cancelled", r.OK), ("done", r.CONFLICT),
]


@pytest.mark.parametrize("state, expected", CANCEL_CASES, ids=[x[0] for x in CANCEL_CASES])
def test_cancel_in_each_state(m, state, expected):
    _to_state(m, state)
    assert m.state("a") == state
    outcome = m(c.Cancel(T0 + 1, "a"))
    if expected is r.OK:
        assert outcome is r.OK
        assert m.state("a") == "cancelled" and m.sm.get_job("a")["finished_at_ms"] is not None
        # Nothing brings it back: not a lease, not a tick, not a redrive.
        m.tick(T0 + 400_000)
        assert m.lease(now=T0 + 400_000) == ()
        assert m(c.Redrive(T0 + 400_000, "q", None)) == r.Redriven(0)
        assert m.state("a") == "cancelled"
        assert m.sm.lease_holder("a") is None and m.sm.dead_jobs("q", 10) == []
    else:
        assert outcome.code == expected and m.state("a") == state


def test_cancel_counts_once(m):
    m.submit(job("a"))
    m(c.Cancel(T0, "a"))
    m(c.Cancel(T0, "a"))
    assert m.sm.counters[("cancelled", "q")] == 1


def test_cancel_unknown_is_not_found(m):
    assert m(c.Cancel(T0, "nope")).code == r.NOT_FOUND


def test_cancelled_leased_job_refuses_its_holder(m):
    leased = _leased(m)
    m(c.Cancel(T0, "a"))
    assert m.ack("a", leased.lease_token).code == r.LEASE_MISMATCH


def test_many_cancels_are_compacted_out_of_the_ready_fifo(m):
    m.submit(*(job(f"{i:05d}") for i in range(6_000)))
    for i in range(5_999):
        m.sm.apply(Entry(m.index + 1, 1, EntryKind.NORMAL, c.encode_command(c.Cancel(T0, f"{i:05d}"))))
        m.index += 1
    m.sm.check_invariants()
    assert m.sm._queues["q"].ready_entries_count() < 5_000
    assert m.lease_one().id == "05999"


def test_acked_leases_leave_the_lease_heap_long_before_they_would_have_expired(m):
    """A burst of short jobs: each ack leaves its lease's heap entry stale until its expiry time
    (30 s away); the heap is swept as it grows, so it stays near the live leases, not the burst."""
    m.submit(*(job(f"{i:05d}") for i in range(1_500)))
    for _ in range(1_500):
        leased = m.lease_one()
        assert m.ack(leased.id, leased.lease_token) == r.OK
    assert len(m.sm._leases) <= 2 * 1 + LEASE_HEAP_SLACK + 1, len(m.sm._leases)
    # Leases that stay live are kept through the sweeps, and still expire when their time comes.
    m.submit(*(job(f"late{i}") for i in range(600)))
    assert len(m.lease(max_jobs=600)) == 600
    assert m.tick(T0 + LEASE_MS).expired == 600


# ---------------------------------------------------------------------- redrive, purge, config


def _dead(m: Machine, *ids: str, queue: str = "q") -> None:
    m.submit(*(job(i) for i in ids), queue=queue)
    for leased in m.lease(queues=(queue,), max_jobs=len(ids)):
        m.fail(leased.id, leased.lease_token, "gave up", retry=False)


def test_redrive_all(m):
    _dead(m, "a", "b")
    assert m(c.Redrive(T0 + 5, "q", None)) == r.Redriven(2)
    record = m.sm.get_job("a")
    assert record["state"] == "ready" and record["attempts"] == 0 and record["ready_at_ms"] == T0 + 5
    assert m.lease_one(now=T0 + 5).attempt == 1
    assert m.sm.counters[("redriven", "q")] == 2


def test_redrive_selected_ids_skips_others(m):
    _dead(m, "a", "b")
    m.submit(job("ready"))
    _dead(m, "elsewhere", queue="other")
    result = m(c.Redrive(T0, "q", ("b", "b", "ready", "elsewhere", "nope")))
    assert result == r.Redriven(1)
    assert (m.state("a"), m.state("b"), m.state("elsewhere")) == ("dead", "ready", "dead")


def test_redrive_unknown_queue(m):
    assert m(c.Redrive(T0, "nope", None)) == r.Redriven(0)


def test_purge_dead(m):
    _dead(m, "a", "b")
    m.submit(job("c"))
    assert m(c.Purge(T0, "q", "dead")) == r.Purged(2)
    assert m.sm.get_job("a") is None and m.state("c") == "ready"
    assert m.sm.queue_stats()["q"]["dead"] == 0


def test_purge_ready(m):
    m.submit(job("a"), job("b", priority=5), job("later", delay_ms=1_000))
    m(c.Cancel(T0, "a"))
    assert m(c.Purge(T0, "q", "ready")) == r.Purged(1)
    assert m.sm.get_job("b") is None and m.state("a") == "cancelled"
    assert m.lease_one(now=T0 + 1_000).id == "later"


@pytest.mark.parametrize("queue, state", [("nope", "dead"), ("q", "leased"), ("q", "bogus")])
def test_purge_nothing(m, queue, state):
    _dead(m, "a")
    assert assert_unchanged(m, c.Purge(T0, queue, state)) == r.Purged(0)


def test_set_queue_config_creates_the_queue(m):
    assert m(c.SetQueueConfig(T0, "new", 10)) is r.OK
    assert m.sm.queue_stats() == {"new": {s: 0 for s in
                                          ["scheduled", "ready", "leased", "retry_wait", "done", "dead", "cancelled"]}}


# ---------------------------------------------------------------------- queries


def test_dead_jobs_pagination(m):
    _dead(m, *(f"j{i}" for i in range(5)))
    page = m.sm.dead_jobs("q", 2)
    assert [j["id"] for j in page] == ["j0", "j1"]
    assert [j["id"] for j in m.sm.dead_jobs("q", 2, "j1")] == ["j2", "j3"]
    assert [j["id"] for j in m.sm.dead_jobs("q", 10, "j3")] == ["j4"]
    assert m.sm.dead_jobs("nope", 10) == [] and m.sm.dead_jobs("q", 0) == []


def test_queue_stats_by_state(m):
    _to_state(m, "leased")
    m.submit(job("b", delay_ms=5), job("c"))
    assert m.sm.queue_stats() == {"q": {"scheduled": 1, "ready": 1, "leased": 1, "retry_wait": 0, "done": 0,
                                        "dead": 0, "cancelled": 0}}


def test_counters_cover_every_event_of_every_queue(m):
    m.submit(job("a"), queue="x")
    m.submit(job("b"), queue="y")
    assert set(m.sm.counters) == {(event, q) for event in EVENTS for q in ("x", "y")}


def test_transitions_are_bounded_and_keep_the_submission(m):
    m.submit(job("a", max_attempts=100))
    for cycle in range(1, 21):
        m.fail("a", m.lease_one(now=T0 + 2 * cycle).lease_token, delay_ms=0, now=T0 + 2 * cycle + 1)
    transitions = m.sm.get_job("a")["transitions"]
    assert len(transitions) == TRANSITIONS_MAX
    # The submission, then the newest ones: every lease and its failure (straight back to ready).
    newest = [[state, T0 + 2 * cycle + (state == "ready")] for cycle in range(1, 21) for state in ("leased", "ready")]
    assert transitions == [["ready", T0]] + newest[-(TRANSITIONS_MAX - 1):]


def test_jobs_of_one_command_share_their_equal_values(m):
    """Memory, checked by structure: a job record has no __dict__, and the jobs one command creates
    or moves hold one object for the history, the settings and the lease expiry they have alike."""
    m.submit(job("a"), job("b"))
    m.lease(max_jobs=2, now=T0 + 5)
    a, b = m.sm._jobs["a"], m.sm._jobs["b"]
    assert not hasattr(a, "__dict__")
    assert a.transitions is b.transitions
    assert a.lease_ms is b.lease_ms and a.backoff_cap_ms is b.backoff_cap_ms
    assert a.lease_expires_at_ms is b.lease_expires_at_ms
    assert m.sm.get_job("a")["transitions"] == [["ready", T0], ["leased", T0 + 5]]
    m(c.Ack(T0 + 6, "w1", (c.AckItem("a", a.lease_token, None), c.AckItem("b", b.lease_token, None))))
    assert a.transitions is b.transitions and m.sm.get_job("b")["transitions"][-1] == ["done", T0 + 6]


def test_idempotency_keys_of_one_submit_are_one_batch(m):
    """Memory, checked by structure: the keys one Submit brings are one batch (one expiry, two
    tuples) and one entry each in their queue's dict; the batch leaves whole when its window is
    over, and a Submit drops expired batches before it looks a key up."""
    m.submit(job("a", idempotency_key="k1"), job("b", idempotency_key="k2"), job("c", idempotency_key="k1"), job("d"))
    m.submit(job("e", idempotency_key="k3"), now=T0 + 10)
    assert list(m.sm._idempotency_fifo) == [(T0 + 3_600_000, "q", ("k1", "k2"), ("a", "b")),
                                            (T0 + 3_600_010, "q", ("k3",), ("e",))]
    assert m.sm._idempotency == {"q": {"k1": "a", "k2": "b", "k3": "e"}}
    assert m.sm.idempotency_keys() == [(("q", "k1"), ("a", T0 + 3_600_000)), (("q", "k2"), ("b", T0 + 3_600_000)),
                                       (("q", "k3"), ("e", T0 + 3_600_010))]
    # No Tick yet: the Submit itself drops the expired batch, then k1 maps to its new job.
    assert m.submit(job("f", idempotency_key="k1"), now=T0 + 3_600_000).ids == ("f",)
    assert m.sm.idempotency_keys() == [(("q", "k1"), ("f", T0 + 7_200_000)), (("q", "k3"), ("e", T0 + 3_600_010))]
    assert m.tick(T0 + 3_600_010).keys_dropped == 1
    assert m.sm.idempotency_key_count() == 1


def test_a_shortened_idempotency_window_keeps_live_and_restored_replicas_equal():
    """Nodes restarted with a smaller --idempotency-window: a key submitted after it expires
    before the keys held from the longer window. A live replica and one restored from a snapshot
    taken then must drop it at the same instant (a Submit looks only at the first batch)."""
    long_window = Machine(idempotency_window_ms=100_000)
    long_window.submit(job("a", idempotency_key="k1"))
    live = Machine(idempotency_window_ms=10_000)
    live.sm.restore(long_window.sm.snapshot())
    live.index = long_window.index
    live.submit(job("b", idempotency_key="k2"), now=T0 + 1_000)
    restored = Machine(idempotency_window_ms=10_000)
    restored.sm.restore(live.sm.snapshot())
    restored.index = live.index
    again = (job("c", idempotency_key="k2"),)
    outcomes = [replica.submit(*again, now=T0 + 20_000) for replica in (live, restored)]
    assert outcomes == [r.Submitted(("c",), (True,))] * 2, f"k2's window (10 s) is over on both: {outcomes}"
    assert live.sm.digest() == restored.sm.digest()
    assert live.sm.idempotency_keys() == [(("q", "k1"), ("a", T0 + 100_000)), (("q", "k2"), ("c", T0 + 30_000))]


def test_a_deleted_queues_idempotency_batches_go_with_it(m):
    m.submit(job("a", idempotency_key="k"), queue="gone")
    m.submit(job("b", idempotency_key="k"), queue="kept")
    m.lease_one(queues=("gone",))
    assert m(c.DeleteQueue(T0, "gone", True)) is r.OK
    assert [batch[1] for batch in m.sm._idempotency_fifo] == ["kept"]
    # The same key and the same id again in a queue of that name: one batch, not two.
    m.submit(job("a", idempotency_key="k"), queue="gone", now=T0 + 5)
    other = Machine()
    other.sm.restore(m.sm.snapshot())
    other.sm.check_invariants()
    assert other.sm.idempotency_keys() == m.sm.idempotency_keys() == [
        (("gone", "k"), ("a", T0 + 3_600_005)), (("kept", "k"), ("b", T0 + 3_600_000))]


def test_queries_change_nothing(m):
    _to_state(m, "leased")
    m.submit(job("b", delay_ms=100))
    m(c.Cancel(T0, "b"))  # leaves a stale delayed entry that next_due_ms skips
    before = m.sm.snapshot()
    m.sm.get_job("a"), m.sm.queue_stats(), m.sm.dead_jobs("q", 5), m.sm.has_ready(["q"])
    m.sm.next_due_ms(), m.sm.leased_by_worker(), m.sm.lease_holder("a"), m.sm.counters
    assert m.sm.snapshot() == before


# ---------------------------------------------------------------------- snapshot


def test_restore_discards_prior_state_and_reproduces_digest(m):
    _to_state(m, "leased")
    m.submit(job("b", delay_ms=10, idempotency_key="k"), job("c", priority=4))
    other = Machine()
    other.submit(job("zzz"), queue="unrelated")
    other.sm.restore(m.sm.snapshot())
    other.sm.check_invariants()
    assert other.sm.digest() == m.sm.digest()
    assert other.sm.get_job("zzz") is None and "unrelated" not in other.sm.queue_stats()
    assert other.sm.last_applied == m.sm.last_applied and other.sm.clock_ms == m.sm.clock_ms


def test_digest_differs_when_state_differs(m):
    twin = Machine()
    for machine in (m, twin):
        machine.submit(job("a"))
    assert m.sm.digest() == twin.sm.digest()
    m.lease()
    twin(c.Lease(T0, "w2", ("q",), 1))
    assert m.sm.digest() != twin.sm.digest()


def test_restore_refuses_other_versions(m):
    with pytest.raises(ValueError):
        m.sm.restore(msgpack.packb({"version": 999}))


def test_results_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.Submitted(("a",), (True,)).ids = ()


# ---------------------------------------------------------------------- data-driven cases
#
# tests/testdata/queue/*.txt hold stories told as directives (etcd's datadriven format):
#
#     # A comment says what the next case shows.
#     lease worker=w1 queues=q max=2 now=1100
#     ----
#     Leased(a attempt=1 lease=1 expires=1600)
#
# Each directive is applied to one machine per file, and its output must match the text under
# `----` (up to a blank line). Run with RAFTQ_REWRITE=1 to write the actual output into the files
# instead; then review the diff like code. `now` carries over from the previous directive.

TESTDATA = pathlib.Path(__file__).resolve().parents[2] / "testdata" / "queue"


def _parse_cases(text: str) -> tuple[list[tuple[list[str], str, list[str]]], list[str]]:
    """([(comment and blank lines before, directive line, expected output lines)], trailing lines)."""
    cases, prefix, lines = [], [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            prefix.append(line)
            i += 1
            continue
        assert i + 1 < len(lines) and lines[i + 1] == "----", f"line {i + 1}: directive without ----: {line!r}"
        i += 2
        expected = []
        while i < len(lines) and lines[i].strip():
            expected.append(lines[i])
            i += 1
        cases.append((prefix, line, expected))
        prefix = []
    return cases, prefix


class _Story:
    def __init__(self) -> None:
        self.m = Machine(retention_ms=10_000, idempotency_window_ms=5_000)
        self.now = 0

    def run(self, line: str) -> list[str]:
        name, *words = line.split()
        args = dict(word.split("=", 1) for word in words)
        self.now = int(args.pop("now", self.now))
        return getattr(self, "do_" + name.replace("-", "_"))(args)

    def _int(self, args: dict, key: str, default: int | None = None) -> int | None:
        value = args.get(key)
        return default if value is None or value == "none" else int(value)

    def do_submit(self, a: dict) -> list[str]:
        jobs = tuple(
            job(i, priority=self._int(a, "priority", 0), delay_ms=self._int(a, "delay", 0),
                max_attempts=self._int(a, "attempts", 3), lease_ms=self._int(a, "lease_ms", 500),
                idempotency_key=a.get("key"), backoff_base_ms=self._int(a, "base", 100),
                backoff_cap_ms=self._int(a, "cap", 1_000), key=a.get("job_key"), group=a.get("group"))
            for i in a["ids"].split(",")
        )
        result = self.m(c.Submit(self.now, a.get("queue", "q"), jobs))
        if isinstance(result, r.QueueFull):
            return [repr(result)]
        pairs = (f"{i} {'new' if new else 'duplicate'}" for i, new in zip(result.ids, result.created))
        return [f"Submitted({', '.join(pairs)})"]

    def do_lease(self, a: dict) -> list[str]:
        result = self.m(c.Lease(self.now, a.get("worker", "w1"), tuple(a.get("queues", "q").split(",")),
                                self._int(a, "max", 1)))
        return [f"Leased({j.id} queue={j.queue} attempt={j.attempt} lease={j.lease_token} expires={j.lease_expires_at_ms})"
                for j in result.jobs] or ["Leased()"]

    def _outcomes(self, result: r.ItemOutcomes) -> list[str]:
        return [f"error {o.code}: {o.message}" if isinstance(o, r.ItemError) else
                f"Extended(expires={o.expires_at_ms})" if isinstance(o, r.Extended) else "ok"
                for o in result.outcomes]

    def do_ack(self, a: dict) -> list[str]:
        item = c.AckItem(a["id"], int(a["lease"]), None)
        return self._outcomes(self.m(c.Ack(self.now, a.get("worker", "w1"), (item,))))

    def do_fail(self, a: dict) -> list[str]:
        item = c.FailItem(a["id"], int(a["lease"]), a.get("error", "boom"), a.get("retry", "true") == "true",
                          self._int(a, "delay"))
        return self._outcomes(self.m(c.Fail(self.now, a.get("worker", "w1"), self._int(a, "entropy", 0), (item,))))

    def do_extend(self, a: dict) -> list[str]:
        item = c.ExtendItem(a["id"], int(a["lease"]), int(a["lease_ms"]))
        return self._outcomes(self.m(c.Extend(self.now, a.get("worker", "w1"), (item,))))

    def do_tick(self, a: dict) -> list[str]:
        return [repr(self.m(c.Tick(self.now, self._int(a, "entropy", 0))))]

    def do_worker_lost(self, a: dict) -> list[str]:
        return [repr(self.m(c.WorkerLost(self.now, a["worker"], self._int(a, "entropy", 0))))]

    def do_renew(self, a: dict) -> list[str]:
        return [repr(self.m(c.RenewLeases(self.now)))]

    def do_cancel(self, a: dict) -> list[str]:
        return [repr(self.m(c.Cancel(self.now, a["id"])))]

    def do_redrive(self, a: dict) -> list[str]:
        ids = tuple(a["ids"].split(",")) if "ids" in a else None
        return [repr(self.m(c.Redrive(self.now, a.get("queue", "q"), ids)))]

    def do_purge(self, a: dict) -> list[str]:
        return [repr(self.m(c.Purge(self.now, a.get("queue", "q"), a["state"])))]

    def do_config(self, a: dict) -> list[str]:
        return [repr(self.m(c.SetQueueConfig(
            self.now, a.get("queue", "q"), self._int(a, "max_depth"), self._int(a, "rate_per_ks"),
            self._int(a, "burst"), self._int(a, "per_key"), a.get("fifo", "false") == "true")))]

    def do_held(self, a: dict) -> list[str]:
        held = self.m.sm.held_back(a.get("queue", "q"), self.now)
        wait = self.m.sm.lease_wait_ms(tuple(a.get("queues", "q").split(",")), self.now)
        return [" ".join(f"{kind}={count}" for kind, count in held.items()) + f" lease_wait={wait}"]

    def do_put_schedule(self, a: dict) -> list[str]:
        return [repr(self.m(c.PutSchedule(
            self.now, a["name"], a.get("queue", "q"), b"\x90", a.get("cron"), self._int(a, "every"),
            a.get("tz", "UTC"), a.get("overlap", "allow"), a.get("catch_up", "all"), 0, self._int(a, "attempts", 3),
            500, 100, 1_000, int(a["next"]))))]

    def do_fire(self, a: dict) -> list[str]:
        return [repr(self.m(c.FireSchedule(self.now, a["name"], int(a["rev"]), int(a["at"]), int(a["next"]),
                                           a.get("run", "true") == "true", a.get("id", "f" + a["at"]))))]

    def do_pause(self, a: dict) -> list[str]:
        return [repr(self.m(c.PauseSchedule(self.now, a["name"], True, 0)))]

    def do_resume(self, a: dict) -> list[str]:
        return [repr(self.m(c.PauseSchedule(self.now, a["name"], False, int(a["next"]))))]

    def do_delete_schedule(self, a: dict) -> list[str]:
        return [repr(self.m(c.DeleteSchedule(self.now, a["name"])))]

    def do_schedules(self, a: dict) -> list[str]:
        keys = ("name", "revision", "paused", "next_fire_ms", "last_fire_ms", "last_job_id", "created_count",
                "skipped_count")
        return [" ".join(f"{k}={record[k]}" for k in keys) for record in self.m.sm.schedules()] or ["no schedules"]

    def do_job(self, a: dict) -> list[str]:
        record = self.m.sm.get_job(a["id"])
        if record is None:
            return ["not found"]
        keys = ("state", "attempts", "ready_at_ms", "lease", "worker", "lease_expires_at_ms", "last_error")
        return [" ".join(f"{k}={record[k]}" for k in keys if record[k] is not None)]

    def do_stats(self, a: dict) -> list[str]:
        return [f"{queue}: " + " ".join(f"{s}={n}" for s, n in counts.items() if n)
                for queue, counts in self.m.sm.queue_stats().items()] or ["no queues"]

    def do_next_due(self, a: dict) -> list[str]:
        return [str(self.m.sm.next_due_ms())]


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txt")), ids=lambda p: p.stem)
def test_data_driven(path):
    story = _Story()
    out, failures = [], []
    cases, trailing = _parse_cases(path.read_text())
    for prefix, line, expected in cases:
        actual = story.run(line)
        out += prefix + [line, "----"] + actual
        if actual != expected:
            failures.append(f"{line}\n  expected {expected}\n  actual   {actual}")
    if os.environ.get("RAFTQ_REWRITE") == "1":
        path.write_text("\n".join(out + trailing).rstrip("\n") + "\n")
        return
    assert not failures, f"{path.name}: (RAFTQ_REWRITE=1 rewrites)\n" + "\n".join(failures)


# ---------------------------------------------------------------------- deleting queues (issue 11)


def test_delete_queue_is_refused_while_it_holds_unfinished_jobs(m):
    m.submit(job("a"), job("b"))
    m.lease_one()
    refused = assert_unchanged(m, c.DeleteQueue(T0, "q", False))
    assert isinstance(refused, r.ItemError) and refused.code == r.CONFLICT and "2 unfinished" in refused.message
    assert isinstance(m(c.DeleteQueue(T0, "nope", False)), r.ItemError)


def test_a_forced_delete_cancels_everything_and_forgets_the_queue(m):
    m.submit(job("a", idempotency_key="k"), job("b"), job("c", delay_ms=60_000))
    leased = m.lease_one()
    m(c.SetQueueConfig(T0, "q", 5))
    assert m(c.DeleteQueue(T0, "q", True)) is r.OK
    assert "q" not in m.sm.queue_stats() and [m.state(i) for i in "abc"] == [None, None, None]
    assert m.ack(leased.id, leased.lease_token).code in (r.LEASE_MISMATCH, r.NOT_FOUND)
    m.tick(T0 + 3_600_000 * 2)  # the retention and idempotency FIFOs skip what is gone
    ids = m.submit(job("d", idempotency_key="k")).ids
    assert ids == ("d",), "the deleted queue's idempotency keys are gone with it"


def test_an_empty_unconfigured_queue_leaves_the_state(m):
    m(c.SetQueueConfig(T0, "empty", None))
    assert "empty" not in m.sm.queue_stats(), "PUT {} must not create a queue that never goes away"
    m(c.SetQueueConfig(T0, "limited", 10))
    assert m.sm.has_queue("limited") and m.sm.queue_count() == 1
    m.submit(job("a"), queue="done-soon")
    leased = m.lease_one(queues=("done-soon",))
    m.ack(leased.id, leased.lease_token)
    assert m.sm.has_queue("done-soon")
    m.tick(T0 + m.sm.retention_ms + 1)
    assert not m.sm.has_queue("done-soon"), "its last record left with retention, so does the queue"
