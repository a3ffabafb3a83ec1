"""The leader's housekeeping: expiry ticks, worker liveness, and lease renewal on taking office.

Theory of operation
-------------------
Only the leader runs it, and it changes nothing itself: every decision becomes a command that
goes through the log like a client's (`propose`), so followers' state changes only by applying.

- `Tick` when a lease expires or a delayed job comes due (`next_due_ms()` of the applied state),
  and, while anything waits on the clock, once the applied clock lags the leader's by an election
  timeout: a successor starts from the clock it applied (`leader_clock.py`), so that bounds how
  long the cluster's time stands still at a failover. At most one in flight.
- `WorkerLost` when a worker that holds leases has not been heard from (lease requests and
  heartbeats, `touch_worker`) within the worker timeout; at most one in flight per worker.
- `RenewLeases` on taking office, so that a failover does not requeue healthy work: the new
  leader has never heard from any worker, so it starts every holder's clock at its own start.
- `FireSchedule` for each fire time of a schedule that has come (cluster/schedules.py decides
  what catch_up makes of missed ones); at most one batch in flight per schedule. A fire applies
  only while it is its schedule's next, so a fire proposed twice (by this leader from a stale
  view, or by two leaders in turn) creates one job. Fire times are wall-clock instants (a cron
  schedule names times of day; the cluster's clock loses the time a whole-cluster outage lasts),
  so due-ness is the one reading of the leader's wall clock here; the command is stamped with
  the cluster's clock like any other.

Every `now_ms` is the node's `now_ms()`: the cluster's clock, advanced by the leader's monotonic
time, never its wall clock. Worker liveness is leader-local knowledge (monotonic time of the last
request); a new leader starts it afresh from the lease holders in its state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Protocol

from raftq.cluster import schedules as sched
from raftq.cluster.config import NodeConfig
from raftq.cluster.constants import HOUSEKEEPING_INTERVAL_S
from raftq.cluster.errors import NotLeaderError, ProposalLost, Unavailable
from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue.state_machine import QueueStateMachine

log = logging.getLogger("raftq.node")


class _Leader(Protocol):
    """What housekeeping needs of the node."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def queue(self) -> QueueStateMachine: ...

    def now_ms(self) -> int: ...

    async def propose(self, command: cmds.Command) -> Any: ...


class LeaderHousekeeping:
    """See the module docstring."""

    def __init__(self, config: NodeConfig, node: _Leader) -> None:
        self.config = config
        self._node = node
        self.worker_last_seen: dict[str, float] = {}
        self._tick_inflight = False
        self._lost_inflight: set[str] = set()
        self._fires_inflight: set[str] = set()  # schedules whose fires are being proposed
        self._entropy = random.Random()
        #: the leader commits its clock at least this often while anything waits on the clock
        self._clock_sync_ms = int(config.election_ticks * config.tick_interval_s * 1000)

    async def run(self, stopping: Any) -> None:
        """The leader-only loop; `stopping()` is true once the node shuts down."""
        while not stopping():
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            if not self._node.is_leader:
                continue
            self._maybe_tick()
            self._check_workers()
            self._fire_schedules()

    def take_office(self) -> None:
        """This node just became leader: start every lease holder's clock now, renew their leases."""
        monotonic_now = time.monotonic()
        self.worker_last_seen = {worker: monotonic_now for worker in self._node.queue.lease_holders()}
        self._tick_inflight = False
        self._lost_inflight.clear()
        self._fires_inflight.clear()
        asyncio.get_running_loop().create_task(self._propose_quietly(cmds.RenewLeases(now_ms=self._node.now_ms())))

    def touch_worker(self, worker: str) -> None:
        """Records that a worker is alive (lease requests and heartbeats); leader-local knowledge.

        The table is kept in order of last contact (oldest first) and bounded by
        `known_workers_max`: past it, the longest-silent workers that hold no lease are forgotten.
        """
        seen = self.worker_last_seen
        seen.pop(worker, None)
        seen[worker] = time.monotonic()
        if len(seen) > self.config.known_workers_max:
            holding = set(self._node.queue.lease_holders())
            for name in list(seen):
                if len(seen) <= self.config.known_workers_max:
                    break
                if name not in holding:
                    del seen[name]

    def workers_table(self) -> list[dict]:
        """Workers the leader knows: last heartbeat age and the jobs each holds."""
        monotonic_now = time.monotonic()
        holders = self._node.queue.leased_by_worker()
        names = sorted(set(self.worker_last_seen) | set(holders))
        return [
            {
                "worker": name,
                "last_seen_s_ago": round(monotonic_now - self.worker_last_seen[name], 3)
                if name in self.worker_last_seen else None,
                "jobs": sorted(holders.get(name, [])),
            }
            for name in names
        ]

    def workers_alive_count(self) -> int:
        cutoff = time.monotonic() - self.config.worker_timeout_ms / 1000
        return sum(1 for seen in self.worker_last_seen.values() if seen >= cutoff)

    def entropy(self) -> int:
        """A fresh 64-bit random draw for a command (backoff jitter is drawn by the leader)."""
        return self._entropy.getrandbits(64)

    def _maybe_tick(self) -> None:
        if self._tick_inflight:
            return
        queue = self._node.queue
        due_ms = queue.next_due_ms()
        if due_ms is None:
            return  # nothing waits on the clock: its standing still at a failover harms no one
        current_ms = self._node.now_ms()
        if due_ms > current_ms and current_ms - queue.clock_ms < self._clock_sync_ms:
            return
        self._tick_inflight = True
        command = cmds.Tick(now_ms=current_ms, entropy=self.entropy())
        asyncio.get_running_loop().create_task(self._propose_tick(command))

    async def _propose_tick(self, command: cmds.Tick) -> None:
        try:
            await self._propose_quietly(command)
        finally:
            self._tick_inflight = False

    def _fire_schedules(self) -> None:
        current_ms = sched.wall_now_ms()  # fire times are wall-clock instants (cluster/schedules.py)
        due_at = self._node.queue.next_fire_ms()
        if due_at is None or due_at > current_ms:
            return  # the common case, O(schedules) without building records
        for record in self._node.queue.due_schedules(current_ms):
            name = record["name"]
            if name in self._fires_inflight:
                continue
            try:
                plan = sched.plan_fires(record, current_ms)
            except sched.ScheduleSpecError as exc:  # this node's zone database lacks the zone
                log.error("schedule %s cannot fire on this node: %s", name, exc)
                continue
            commands = [cmds.FireSchedule(now_ms=self._node.now_ms(), name=name, revision=record["revision"], fire_ms=fire_ms,
                                          next_fire_ms=next_fire_ms, run=run, job_id=sched.fire_job_id(name, fire_ms))
                        for fire_ms, next_fire_ms, run in plan]
            if commands:
                self._fires_inflight.add(name)
                asyncio.get_running_loop().create_task(self._propose_fires(name, commands))

    async def _propose_fires(self, name: str, commands: list[cmds.FireSchedule]) -> None:
        try:
            for command in commands:
                result = await self._node.propose(command)
                if getattr(result, "outcome", None) == "stale":
                    break  # another leader's fire, a pause or a new revision came first
                if result.outcome != "created":
                    log.info("schedule %s: fire at %s %s", name, sched.describe_ms(command.fire_ms), result.outcome)
        except (NotLeaderError, Unavailable, ProposalLost) as exc:
            log.info("housekeeping FireSchedule not applied: %s", exc)
        finally:
            self._fires_inflight.discard(name)

    def _check_workers(self) -> None:
        timeout_s = self.config.worker_timeout_ms / 1000
        monotonic_now = time.monotonic()
        # Names only: this runs every housekeeping beat, and the job lists can be long.
        holders = self._node.queue.lease_holders()
        holding = set(holders)
        # Forget idle workers long gone, so the table stays bounded by live workers.
        for worker, seen in list(self.worker_last_seen.items()):
            if worker not in holding and monotonic_now - seen > 10 * timeout_s:
                del self.worker_last_seen[worker]
        for worker in holders:
            last_seen = self.worker_last_seen.setdefault(worker, monotonic_now)
            if monotonic_now - last_seen < timeout_s or worker in self._lost_inflight:
                continue
            self._lost_inflight.add(worker)
            log.warning("worker %s lost: no heartbeat for %.1f s; requeueing its jobs", worker, timeout_s)
            command = cmds.WorkerLost(now_ms=self._node.now_ms(), worker=worker, entropy=self.entropy())
            asyncio.get_running_loop().create_task(self._propose_worker_lost(worker, command))

    async def _propose_worker_lost(self, worker: str, command: cmds.WorkerLost) -> None:
        try:
            await self._propose_quietly(command)
        finally:
            self._lost_inflight.discard(worker)
            self.worker_last_seen.pop(worker, None)

    async def _propose_quietly(self, command: cmds.Command) -> None:
        try:
            await self._node.propose(command)
        except (NotLeaderError, Unavailable, ProposalLost) as exc:
            log.info("housekeeping %s not applied: %s", type(command).__name__, exc)
