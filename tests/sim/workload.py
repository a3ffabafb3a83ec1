"""The simulated clients: producers, workers and the leader's housekeeping, proposing on leaders.

Theory of operation
-------------------
Each step the workload picks a node that believes it leads (sometimes any node, to exercise
`NotLeader`) and proposes a few commands built with `cluster.queue.commands`, stamped with that
node's simulated clock (`tick * tick_ms + skew`: a new leader's clock may lag, SPEC/STYLE §4):

- Submit: 1-3 jobs, each with a unique id and a unique idempotency key. A submit whose outcome
  is unknown (its proposer crashed or lost leadership, or a different entry took its index) is
  retried with the same key and a fresh id, as the client library does.
- Lease / Ack / Fail / Extend by three workers, on the leases they were acknowledged; sometimes on
  leases they should know are stale.
- Tick when the leader's `next_due_ms()` has come (the server's housekeeping), RenewLeases when a
  node takes office, and now and then WorkerLost, Cancel, SetQueueConfig (with rate limits,
  per-key concurrency and FIFO groups switched on and off; jobs carry keys or groups).
- Schedules: PutSchedule, pause, resume and delete now and then; the leader fires each due time
  as the server does (one FireSchedule per fire time, some skipped as a catch-up policy would).
- ReadIndex requests; an answer must not be older than any write acknowledged before the read.

A proposal is *acknowledged* when the node that proposed it applies its index with the term that
`propose` returned (what the server's `_settle_proposal` does before answering 2xx). The
acknowledged job ids are what the final check looks for in the leader's state machine.

In the final phase only the liveness probe (a Tick), submit retries and RenewLeases are proposed,
so that the cluster can quiesce and be compared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue import results as res
from raftq.cluster.queue.commands import encode_command
from raftq.cluster.raft.errors import NotLeader, ProposalDropped
from raftq.cluster.raft.messages import Entry

from .invariants import Violation, describe_command

if TYPE_CHECKING:
    from .cluster import SimNode

__all__ = ["Workload", "TICK_MS"]

#: Simulated milliseconds per tick (the SPEC's 100 ms tick).
TICK_MS = 100
QUEUES = ("q1", "q2")
WORKERS = ("w1", "w2", "w3")
#: Flow-control keys and FIFO groups the jobs carry (few, so that limits bite).
JOB_KEYS = ("t1", "t2")
JOB_GROUPS = ("g1", "g2", "g3")
SCHEDULES = ("s1", "s2")


@dataclass(slots=True)
class _Pending:
    term: int
    kind: str  # "submit", "lease", "ack", "fail", "extend", "probe", "other"
    command: Any
    proposed_tick: int
    meta: Any = None  # submit: the key list; ack/fail/extend: (worker, items)


@dataclass(slots=True)
class _SubmitKey:
    key: str
    queue: str
    template: cmds.NewJob  # the first attempt's job (the id changes on retries)
    ids: list[str] = field(default_factory=list)  # every id ever proposed with this key
    acknowledged_id: str | None = None
    in_flight: bool = False


class Workload:
    """See the module docstring.

    Args:
        rng: the simulation's random source.
        nodes: node id -> SimNode (the shells; the workload reads role, term, clock, state machine).
        trace: one line per event when tracing, else None.
    """

    def __init__(self, rng: random.Random, nodes: dict[str, "SimNode"], trace: Callable[[str], None] | None) -> None:
        self.rng = rng
        self.nodes = nodes
        self._trace = trace
        self.skew_ms = {node_id: rng.randint(-300, 300) for node_id in nodes}
        self.pending: dict[tuple[str, int, int], _Pending] = {}  # (node, incarnation, index) -> proposal
        self.keys: dict[str, _SubmitKey] = {}
        self.retry: list[str] = []  # keys whose last attempt failed or is unknown
        self.acknowledged: dict[str, str] = {}  # job id -> key
        self.held: dict[str, dict[str, tuple[int, int]]] = {w: {} for w in WORKERS}  # worker -> id -> (token, exp)
        self.reads: dict[tuple[str, int], tuple[int, int]] = {}  # (node, ctx) -> (required index, tick)
        self.read_ctx = 0
        self.max_acked_index = 0
        self.tick = 0
        self.final = False
        self.probe_from_tick: int | None = None  # final phase: first tick after the faults stopped
        self.liveness_tick: int | None = None  # first tick a probe proposed after that was acknowledged
        self._job_seq = 0
        self._leading: dict[str, tuple[int, int]] = {}  # node -> (incarnation, term) it leads in
        self.stats = {"proposed": 0, "acknowledged": 0, "lost": 0, "unknown": 0, "not_leader": 0,
                      "dropped": 0, "submits_acked": 0, "leases_acked": 0, "reads_served": 0}

    # ------------------------------------------------------------------ helpers

    def now_ms(self, node_id: str) -> int:
        return max(0, self.tick * TICK_MS + self.skew_ms[node_id])

    def _log(self, line: str) -> None:
        if self._trace is not None:
            self._trace(line)

    def _leaders(self) -> list["SimNode"]:
        return [node for node in self.nodes.values() if node.is_up and node.is_leader]

    def _propose(self, node: "SimNode", command: Any, kind: str, meta: Any = None) -> bool:
        self.stats["proposed"] += 1
        try:
            index, term = node.raft.propose(encode_command(command))
        except NotLeader as exc:
            self.stats["not_leader"] += 1
            self._log(f"client {node.node_id} NotLeader(leader={exc.leader_id}) for {describe_command(command)}")
            return False
        except ProposalDropped:
            self.stats["dropped"] += 1
            self._log(f"client {node.node_id} ProposalDropped for {describe_command(command)}")
            return False
        self.pending[(node.node_id, node.incarnation, index)] = _Pending(term, kind, command, self.tick, meta)
        self._log(f"client propose on {node.node_id} -> {index}/{term} {describe_command(command)}")
        return True

    # ------------------------------------------------------------------ each step

    def act(self, tick: int) -> None:
        self.tick = tick
        self._take_office()
        leaders = self._leaders()
        if self.final:
            self._act_final(leaders)
            return
        up = [node for node in self.nodes.values() if node.is_up]
        if not up:
            return
        rng = self.rng
        for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
            if leaders and rng.random() < 0.9:
                node = rng.choice(leaders)
            else:
                node = rng.choice(up)
            self._one_op(node)
        for node in leaders:
            self._housekeeping(node)

    def _act_final(self, leaders: list["SimNode"]) -> None:
        for node in leaders:
            if self.liveness_tick is None and not any(p.kind == "probe" for p in self.pending.values()):
                self._propose(node, cmds.Tick(self.now_ms(node.node_id), self.rng.getrandbits(64)), "probe")
            keys, self.retry = self.retry, []
            for key in keys:
                self._submit_retry(node, key)

    def _take_office(self) -> None:
        """Mirrors the server's `_observe_role`: a node that stops leading fails its pending
        proposals (their outcome is unknown: they may still commit), and a node that just became
        leader proposes RenewLeases (`_take_office`)."""
        for node_id, node in self.nodes.items():
            now = (node.incarnation, node.raft.term) if node.is_up and node.is_leader else None
            before = self._leading.get(node_id)
            if before == now:
                continue
            if before is not None:
                self._fail_pending(node_id, before[0])
            if now is None:
                del self._leading[node_id]
            else:
                self._leading[node_id] = now
                self._propose(node, cmds.RenewLeases(self.now_ms(node_id)), "other")

    def _fail_pending(self, node_id: str, incarnation: int) -> None:
        for key in [k for k in self.pending if k[0] == node_id and k[1] == incarnation]:
            self.stats["unknown"] += 1
            self._settle_failed(self.pending.pop(key))
        for key in [k for k in self.reads if k[0] == node_id]:
            del self.reads[key]

    def _housekeeping(self, node: "SimNode") -> None:
        now = self.now_ms(node.node_id)
        due = node.sm.next_due_ms()
        if due is not None and due <= now and self.rng.random() < 0.5:
            self._propose(node, cmds.Tick(now, self.rng.getrandbits(64)), "other")
        for schedule in node.sm.due_schedules(now):
            if self.rng.random() < 0.5:
                continue  # a slow leader: the fire comes later, or from the next leader
            fire_ms, every_ms = schedule["next_fire_ms"], schedule["every_ms"]
            run = now - fire_ms < 3_000 or self.rng.random() < 0.5  # a catch-up policy may skip it
            self._job_seq += 1
            self._propose(node, cmds.FireSchedule(now, schedule["name"], schedule["revision"], fire_ms,
                                                  fire_ms + every_ms, run, f"f{self._job_seq}"), "other")

    def _one_op(self, node: "SimNode") -> None:
        rng = self.rng
        roll = rng.random()
        now = self.now_ms(node.node_id)
        if self.retry and roll < 0.3:
            self._submit_retry(node, self.retry.pop(0))
        elif roll < 0.40:
            self._submit_new(node, now)
        elif roll < 0.58:
            worker = rng.choice(WORKERS)
            queues = rng.choice((QUEUES, ("q1",), ("q2",), ("q2", "q1")))
            self._propose(node, cmds.Lease(now, worker, queues, rng.randint(1, 3)), "lease", worker)
        elif roll < 0.82:
            self._finish_some(node, now)
        elif roll < 0.88:
            self._propose(node, cmds.Tick(now, rng.getrandbits(64)), "other")
        elif roll < 0.93:
            self._read(node)
        elif roll < 0.95:
            self._propose(node, cmds.WorkerLost(now, rng.choice(WORKERS), rng.getrandbits(64)), "other")
        elif roll < 0.965:
            if self.keys:
                key = self.keys[rng.choice(sorted(self.keys))]
                self._propose(node, cmds.Cancel(now, rng.choice(key.ids)), "other")
        elif roll < 0.985:
            self._configure(node, now)
        else:
            self._schedule_op(node, now)

    def _configure(self, node: "SimNode", now: int) -> None:
        rng = self.rng
        depth = rng.choice((None, None, 2, 6)) if rng.random() < 0.5 else None
        rate = rng.choice((None, 3_000, 10_000))
        self._propose(node, cmds.SetQueueConfig(
            now, rng.choice(QUEUES), depth, rate, rng.choice((1, 3)) if rate else None,
            rng.choice((None, 1, 2)), rng.random() < 0.6), "other")

    def _schedule_op(self, node: "SimNode", now: int) -> None:
        rng = self.rng
        name = rng.choice(SCHEDULES)
        roll = rng.random()
        if roll < 0.6:
            every_ms = rng.choice((700, 1_500))
            self._propose(node, cmds.PutSchedule(
                now, name, rng.choice(QUEUES), b"\x90", None, every_ms, "UTC", rng.choice(("allow", "skip")),
                "all", 0, 2, 1_000, 100, 1_000, now + every_ms), "other")
        elif roll < 0.8:
            self._propose(node, cmds.PauseSchedule(now, name, True, 0), "other")
        elif roll < 0.95:
            self._propose(node, cmds.PauseSchedule(now, name, False, now + 500), "other")
        else:
            self._propose(node, cmds.DeleteSchedule(now, name), "other")

    # ------------------------------------------------------------------ submits

    def _submit_new(self, node: "SimNode", now: int) -> None:
        rng = self.rng
        queue = rng.choice(QUEUES)
        jobs = []
        keys = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            self._job_seq += 1
            job_id = f"j{self._job_seq}"
            key = f"k{self._job_seq}"
            lane = rng.random()
            job = cmds.NewJob(
                id=job_id, payload=bytes((self._job_seq % 256,)), priority=rng.choice((0, 0, 5, 9)),
                delay_ms=rng.choice((0, 0, 0, 300, 1500)), max_attempts=rng.randint(1, 3),
                lease_ms=rng.choice((500, 1000, 2500)), idempotency_key=key,
                backoff_base_ms=100, backoff_cap_ms=1000,
                key=rng.choice(JOB_KEYS) if lane < 0.3 else None,
                group=rng.choice(JOB_GROUPS) if 0.3 <= lane < 0.6 else None,
            )
            self.keys[key] = _SubmitKey(key, queue, job, [job_id])
            jobs.append(job)
            keys.append(key)
        self._send_submit(node, cmds.Submit(now, queue, tuple(jobs)), keys)

    def _submit_retry(self, node: "SimNode", key: str) -> None:
        entry = self.keys[key]
        if entry.acknowledged_id is not None or entry.in_flight:
            return
        self._job_seq += 1
        job_id = f"j{self._job_seq}r"
        entry.ids.append(job_id)
        job = entry.template._replace(id=job_id)
        self._send_submit(node, cmds.Submit(self.now_ms(node.node_id), entry.queue, (job,)), [key])

    def _send_submit(self, node: "SimNode", command: cmds.Submit, keys: list[str]) -> None:
        if self._propose(node, command, "submit", keys):
            for key in keys:
                self.keys[key].in_flight = True
        else:
            self.retry.extend(k for k in keys if k not in self.retry)

    # ------------------------------------------------------------------ workers

    def _finish_some(self, node: "SimNode", now: int) -> None:
        rng = self.rng
        workers = [w for w in WORKERS if self.held[w]]
        if not workers:
            return
        worker = rng.choice(workers)
        held = self.held[worker]
        job_ids = sorted(held)
        chosen = rng.sample(job_ids, min(len(job_ids), rng.randint(1, 2)))
        items = [(job_id, held[job_id][0]) for job_id in chosen]
        roll = rng.random()
        if roll < 0.6:
            command: Any = cmds.Ack(now, worker, tuple(cmds.AckItem(j, t, b"ok") for j, t in items))
            kind = "ack"
        elif roll < 0.85:
            command = cmds.Fail(now, worker, rng.getrandbits(64), tuple(
                cmds.FailItem(j, t, "boom", rng.random() < 0.8, rng.choice((None, None, 0, 200))) for j, t in items))
            kind = "fail"
        else:
            command = cmds.Extend(now, worker, tuple(cmds.ExtendItem(j, t, rng.choice((500, 2000))) for j, t in items))
            kind = "extend"
        if kind != "extend":
            for job_id in chosen:
                del held[job_id]
        self._propose(node, command, kind, (worker, items))

    def _read(self, node: "SimNode") -> None:
        self.read_ctx += 1
        try:
            node.raft.read_index(self.read_ctx)
        except NotLeader:
            return
        self.reads[(node.node_id, self.read_ctx)] = (self.max_acked_index, self.tick)

    def on_read_state(self, node: "SimNode", context: int, read_index: int) -> None:
        """A ReadIndex answer: it must cover every write acknowledged before the read was issued."""
        issued = self.reads.pop((node.node_id, context), None)
        if issued is None:
            return
        required, tick = issued
        self.stats["reads_served"] += 1
        if read_index < required:
            raise Violation("linearizable reads", f"{node.node_id} answered read {context} (issued at tick {tick}) "
                            f"with index {read_index}, but index {required} was acknowledged before it")

    # ------------------------------------------------------------------ outcomes

    def on_apply(self, node: "SimNode", entry: Entry, result: Any) -> None:
        pending = self.pending.pop((node.node_id, node.incarnation, entry.index), None)
        if pending is None:
            return
        if entry.term != pending.term:
            self.stats["lost"] += 1
            self._log(f"client lost {entry.index}/{pending.term} on {node.node_id} (replaced by term {entry.term})")
            self._settle_failed(pending)
            return
        self.stats["acknowledged"] += 1
        self.max_acked_index = max(self.max_acked_index, entry.index)
        self._settle_acknowledged(node, entry, pending, result)

    def on_snapshot_installed(self, node: "SimNode", index: int) -> None:
        """node's state jumped to a snapshot at index: its proposals up to there will never be
        applied there, so their outcome is unknown (the server fails them the same way)."""
        for key in [k for k in self.pending if k[0] == node.node_id and k[1] == node.incarnation and k[2] <= index]:
            self.stats["unknown"] += 1
            self._settle_failed(self.pending.pop(key))

    def on_crash(self, node_id: str, incarnation: int) -> None:
        self._fail_pending(node_id, incarnation)
        self._leading.pop(node_id, None)

    def _settle_failed(self, pending: _Pending) -> None:
        if pending.kind == "submit":
            for key in pending.meta:
                self.keys[key].in_flight = False
                if key not in self.retry:
                    self.retry.append(key)
        elif pending.kind in ("ack", "fail") and self.rng.random() < 0.5:
            worker, items = pending.meta  # the worker retries with the same token later
            for job_id, token in items:
                self.held[worker].setdefault(job_id, (token, 0))

    def _settle_acknowledged(self, node: "SimNode", entry: Entry, pending: _Pending, result: Any) -> None:
        self._log(f"client ack {entry.index}/{entry.term} on {node.node_id}: {_short(result)}")
        if pending.kind == "probe" and self.probe_from_tick is not None and pending.proposed_tick >= self.probe_from_tick:
            if self.liveness_tick is None:
                self.liveness_tick = self.tick
        if pending.kind == "submit":
            for key in pending.meta:
                self.keys[key].in_flight = False
            if isinstance(result, res.Submitted):
                self.stats["submits_acked"] += 1
                for key, job_id in zip(pending.meta, result.ids):
                    self.keys[key].acknowledged_id = job_id
                    self.acknowledged[job_id] = key
            # QueueFull: refused, nothing to retry (the client would get 429 and give up here).
        elif pending.kind == "lease" and isinstance(result, res.Leased):
            self.stats["leases_acked"] += len(result.jobs)
            for job in result.jobs:
                self.held[pending.meta][job.id] = (job.lease_token, job.lease_expires_at_ms)
        elif pending.kind == "extend" and isinstance(result, res.ItemOutcomes):
            worker, items = pending.meta
            for (job_id, token), outcome in zip(items, result.outcomes):
                if isinstance(outcome, res.ItemError):
                    self.held[worker].pop(job_id, None)

    def drop_expired_holds(self) -> None:
        """Workers mostly forget leases long past their expiry (some keep them: stale acks)."""
        for worker in WORKERS:
            held = self.held[worker]
            for job_id in sorted(held):
                token, expires = held[job_id]
                if expires and expires + 2000 < self.tick * TICK_MS and self.rng.random() < 0.3:
                    del held[job_id]

    def unsettled_count(self) -> int:
        """Submits not yet acknowledged or refused, plus proposals in flight."""
        return len(self.pending) + len(self.retry)


def _short(result: Any) -> str:
    text = repr(result)
    return text if len(text) <= 160 else text[:157] + "..."
