"""Random command sequences against QueueStateMachine: determinism, snapshots, invariants.

Each seed drives one `random.Random(seed)` generator of commands (valid ones mostly, plus stale
leases, unknown ids, a clock that steps back, NOOPs and undecodable entries). Two machines apply
the same entries; one of them is rebuilt from its own snapshot midway. After every entry the
results must be equal, the invariants must hold, and the digests must match at checkpoints.
A failure names the seed; rerun one with `-k "seed_N"`.
"""

from __future__ import annotations

import random

import pytest

from raftq.cluster.queue import commands as c
from raftq.cluster.queue import results as r
from raftq.cluster.queue.jobs import LEASED, STATES
from raftq.cluster.queue.state_machine import QueueStateMachine
from raftq.cluster.raft.messages import Entry, EntryKind

SEEDS = range(120)
STEPS = 250
QUEUES = ("a", "b", "c")
WORKERS = ("w1", "w2", "w3")
KEYS = tuple(f"k{i}" for i in range(6))
#: Short enough that retention and idempotency expiry happen inside one run.
OPTIONS = dict(retention_ms=40_000, idempotency_window_ms=15_000)


class Scenario:
    """Generates the next command from what the machine has handed out so far."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1_000_000
        self.next_id = 0
        self.grants: list[tuple[str, int, str]] = []  # (job id, lease token, worker) ever granted
        self.ids: list[str] = []

    def advance_clock(self) -> int:
        step = self.rng.choice((0, 0, 1, 10, 100, 700, 2_000, 6_000, 20_000))
        if self.rng.random() < 0.03:
            return self.now - self.rng.randint(1, 5_000)  # a lagging new leader; the machine keeps max
        self.now += step
        return self.now

    def command(self) -> c.Command | bytes | None:
        """A command, raw bytes for an undecodable entry, or None for a NOOP entry."""
        rng = self.rng
        now = self.advance_clock()
        kind = rng.choices(
            ["submit", "lease", "ack", "fail", "extend", "tick", "lost", "renew", "cancel", "redrive", "purge",
             "config", "noop", "garbage"],
            weights=[20, 20, 15, 10, 5, 12, 2, 2, 5, 3, 1, 2, 2, 1],
        )[0]
        if kind == "noop":
            return None
        if kind == "garbage":
            return bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
        return getattr(self, "_" + kind)(now)

    def _submit(self, now: int) -> c.Submit:
        jobs = []
        for _ in range(self.rng.choice((1, 1, 2, 5))):
            self.next_id += 1
            job_id = f"j{self.next_id:04d}"
            if self.ids and self.rng.random() < 0.03:
                job_id = self.rng.choice(self.ids)  # a repeated id is idempotent too
            self.ids.append(job_id)
            jobs.append(c.NewJob(
                id=job_id, payload=bytes([self.next_id % 256]), priority=self.rng.choice((0, 0, 1, 5, 9)),
                delay_ms=self.rng.choice((0, 0, 0, 500, 3_000)), max_attempts=self.rng.randint(1, 3),
                lease_ms=self.rng.choice((1_000, 5_000, 30_000)),
                idempotency_key=self.rng.choice(KEYS + (None,) * 6),
                backoff_base_ms=100, backoff_cap_ms=self.rng.choice((0, 2_000)),
            ))
        return c.Submit(now, self.rng.choice(QUEUES), tuple(jobs))

    def _lease(self, now: int) -> c.Lease:
        queues = tuple(self.rng.sample(QUEUES, self.rng.randint(1, 3)))
        return c.Lease(now, self.rng.choice(WORKERS), queues, self.rng.choice((1, 1, 3, 10)))

    def _lease_ref(self) -> tuple[str, int, str]:
        """A lease to present: mostly a real grant (maybe stale), sometimes forged."""
        if not self.grants or self.rng.random() < 0.05:
            return f"j{self.rng.randint(0, self.next_id + 3):04d}", self.rng.randint(0, 50), self.rng.choice(WORKERS)
        job_id, token, worker = self.rng.choice(self.grants[-12:])
        if self.rng.random() < 0.1:
            worker = self.rng.choice(WORKERS)
        if self.rng.random() < 0.05:
            token += 1
        return job_id, token, worker

    def _ack(self, now: int) -> c.Ack:
        job_id, token, worker = self._lease_ref()
        return c.Ack(now, worker, (c.AckItem(job_id, token, self.rng.choice((None, b"\x01"))),))

    def _fail(self, now: int) -> c.Fail:
        job_id, token, worker = self._lease_ref()
        item = c.FailItem(job_id, token, "error", self.rng.random() < 0.8, self.rng.choice((None, None, 0, 1_500)))
        return c.Fail(now, worker, self.rng.getrandbits(64), (item,))

    def _extend(self, now: int) -> c.Extend:
        job_id, token, worker = self._lease_ref()
        return c.Extend(now, worker, (c.ExtendItem(job_id, token, self.rng.choice((1_000, 10_000))),))

    def _tick(self, now: int) -> c.Tick:
        return c.Tick(now, self.rng.getrandbits(64))

    def _lost(self, now: int) -> c.WorkerLost:
        return c.WorkerLost(now, self.rng.choice(WORKERS), self.rng.getrandbits(64))

    def _renew(self, now: int) -> c.RenewLeases:
        return c.RenewLeases(now)

    def _cancel(self, now: int) -> c.Cancel:
        return c.Cancel(now, self.rng.choice(self.ids) if self.ids else "j0000")

    def _redrive(self, now: int) -> c.Redrive:
        ids = None
        if self.ids and self.rng.random() < 0.5:
            ids = tuple(self.rng.sample(self.ids, min(3, len(self.ids))))
        return c.Redrive(now, self.rng.choice(QUEUES), ids)

    def _purge(self, now: int) -> c.Purge:
        return c.Purge(now, self.rng.choice(QUEUES), self.rng.choice(("dead", "ready")))

    def _config(self, now: int) -> c.SetQueueConfig:
        return c.SetQueueConfig(now, self.rng.choice(QUEUES), self.rng.choice((None, 3, 8, 20)))


def entry_for(index: int, command: c.Command | bytes | None) -> Entry:
    if command is None:
        return Entry(index, 1, EntryKind.NOOP, b"")
    data = command if isinstance(command, bytes) else c.encode_command(command)
    return Entry(index, 1, EntryKind.NORMAL, data)


def expected_lease_outcome(sm: QueueStateMachine, command) -> str:
    """What an ack/fail/extend must answer, judged from queries before the entry applies: only the
    current holder's token, before its expiry on the clock the command brings, is accepted."""
    item = command.items[0]
    record = sm.get_job(item.id)
    if record is None:
        return r.NOT_FOUND
    if isinstance(command, c.Ack) and record["state"] == "done" and record["lease"] == item.lease_token:
        return "ok"  # a repeated ack
    if sm.lease_holder(item.id) != (command.worker, item.lease_token, record["lease_expires_at_ms"]):
        return r.LEASE_MISMATCH
    clock_ms = max(sm.clock_ms, command.now_ms)
    return r.LEASE_EXPIRED if clock_ms >= record["lease_expires_at_ms"] else "ok"


def check_machine(sm: QueueStateMachine) -> None:
    sm.check_invariants()
    stats = sm.queue_stats()
    assert sum(sum(counts.values()) for counts in stats.values()) == sm.job_count()
    leased_ids = [job_id for ids in sm.leased_by_worker().values() for job_id in ids]
    assert len(leased_ids) == len(set(leased_ids)), "a job held by two leases"
    assert len(leased_ids) == sum(counts[LEASED] for counts in stats.values())
    for counts in stats.values():
        assert set(counts) == set(STATES)


def run(seed: int, steps: int = STEPS) -> None:
    scenario = Scenario(seed)
    live = QueueStateMachine(**OPTIONS)
    twin = QueueStateMachine(**OPTIONS)
    restore_at = scenario.rng.randint(steps // 4, 3 * steps // 4)
    for index in range(1, steps + 1):
        command = scenario.command()
        entry = entry_for(index, command)
        expected = expected_lease_outcome(live, command) if isinstance(command, (c.Ack, c.Fail, c.Extend)) else None
        result = live.apply(entry)
        assert twin.apply(entry) == result, f"seed={seed} index={index}: replicas answered differently"
        if expected is not None:
            outcome = result.outcomes[0]
            assert getattr(outcome, "code", "ok") == expected, f"seed={seed} index={index}: {command} -> {outcome}"
        if isinstance(command, bytes):
            assert isinstance(result, r.Rejected) or isinstance(c.decode_command(command), c.COMMAND_TYPES)
        if isinstance(result, r.Leased):
            scenario.grants.extend((job.id, job.lease_token, command.worker) for job in result.jobs)
            assert len({job.id for job in result.jobs}) == len(result.jobs)
        if isinstance(command, c.Tick):
            due = live.next_due_ms()
            assert due is None or due > live.clock_ms, f"seed={seed}: a Tick left due work behind"
        check_machine(live)
        if index % 50 == 0 or index == restore_at:
            assert twin.digest() == live.digest(), f"seed={seed} index={index}: digests differ"
        if index == restore_at:
            # The twin continues from its own snapshot: fresh FIFOs and heaps without stale entries,
            # which must not change a single later outcome.
            snapshot = twin.snapshot()
            twin = QueueStateMachine(**OPTIONS)
            twin.restore(snapshot)
            check_machine(twin)
            assert twin.snapshot() == snapshot
    assert twin.digest() == live.digest(), f"seed={seed}: digests differ at the end"
    assert twin.snapshot() == live.snapshot()


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed_{s}")
def test_random_sequences(seed):
    run(seed)


def test_scenarios_reach_every_state_and_outcome():
    """The generator is only useful if it gets everywhere: count what a few seeds reach."""
    seen_states: set[str] = set()
    seen_results: set[str] = set()
    for seed in range(20):
        scenario = Scenario(seed)
        sm = QueueStateMachine(**OPTIONS)
        for index in range(1, STEPS + 1):
            command = scenario.command()
            result = sm.apply(entry_for(index, command))
            if isinstance(result, r.Leased):
                scenario.grants.extend((job.id, job.lease_token, command.worker) for job in result.jobs)
            outcomes = result.outcomes if isinstance(result, r.ItemOutcomes) else (result,)
            for outcome in outcomes:
                seen_results.add(getattr(outcome, "code", type(outcome).__name__))
            for counts in sm.queue_stats().values():
                seen_states.update(state for state, count in counts.items() if count)
    assert seen_states == set(STATES)
    assert {r.NOT_FOUND, r.LEASE_MISMATCH, r.LEASE_EXPIRED, r.CONFLICT, "QueueFull", "Rejected", "Extended",
            "Ok", "Submitted", "Leased", "Ticked", "Released", "Redriven", "Purged", "Renewed"} <= seen_results
