"""Flow-control and schedule invariants, replayed from the committed ledger (STYLE §11.3).

Independent of the state machine's code (flow.py's lanes and turns, the bucket arithmetic), like
`LeaseModel`: this model keeps only the queue settings, each job's key, group and submit order,
and the live leases that `LeaseModel` holds, and checks each committed Lease, Ack and
FireSchedule against the rules users rely on:

- Per-key concurrency: a grant of a job with a key leaves at most `max_running_per_key` live
  leases of that key in its queue.
- FIFO groups: while a queue is fifo, a grant leaves at most one live lease granted in this fifo
  period per group, and the jobs of a group leased in this period are acked in submit order.
- Rate: in a rate-limited queue, the grants made since its settings last changed number at most
  burst + rate × t in every window of length t (checked for every window ending at a grant).
- Schedules: each (schedule, fire time) creates at most one job.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue import results as res

from .invariants import Violation

#: Grants kept per rate-limited queue for the window check; windows longer than this many grants
#: back are covered by the bucket's own arithmetic, and the check stays O(this) per grant.
RATE_HISTORY_MAX = 64


class FlowModel:
    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, str | None, str | None, int]] = {}  # id -> (queue, key, group, order)
        self.settings: dict[str, cmds.SetQueueConfig] = {}
        self.fifo_since: dict[str, int] = {}  # queue -> ledger index at which fifo was switched on
        self.fifo_grant: dict[str, int] = {}  # job id -> fifo_since of its queue when it was last granted
        self.last_acked: dict[tuple[str, str], int] = {}  # (queue, group) -> order of its last ack this period
        self.acked: dict[str, None] = {}
        self.grant_clocks: dict[str, deque[int]] = {}  # queue -> clocks of its latest grants
        self.fires: dict[tuple[str, int], int] = {}  # (schedule, fire_ms) -> ledger index that created its job
        self._order = 0
        self.checked = {"keyed_grants": 0, "fifo_grants": 0, "fifo_acks": 0, "rate_grants": 0, "fires": 0}

    def apply(self, index: int, command: Any, result: Any, clock_ms: int, holds: dict[str, Any]) -> None:
        """One committed command; `holds` are LeaseModel's live leases before it applies."""
        if isinstance(command, cmds.Submit) and isinstance(result, res.Submitted):
            for job, created in zip(command.jobs, result.created):
                if created:
                    self._order += 1
                    self.jobs[job.id] = (command.queue, job.key, job.group, self._order)
        elif isinstance(command, cmds.SetQueueConfig):
            before = self.settings.get(command.queue)
            self.settings[command.queue] = command
            if command.fifo and not (before is not None and before.fifo):
                self.fifo_since[command.queue] = index
                for key in [k for k in self.last_acked if k[0] == command.queue]:
                    del self.last_acked[key]
            self.grant_clocks[command.queue] = deque(maxlen=RATE_HISTORY_MAX)
        elif isinstance(command, cmds.Lease) and isinstance(result, res.Leased):
            granted: list[str] = []
            for job in result.jobs:
                self._check_grant(index, job.id, clock_ms, holds, granted)
                granted.append(job.id)
        elif isinstance(command, cmds.Ack) and isinstance(result, res.ItemOutcomes):
            for item, outcome in zip(command.items, result.outcomes):
                if not isinstance(outcome, res.ItemError) and item.id not in self.acked:
                    self.acked[item.id] = None
                    self._check_ack(index, item.id)
        elif isinstance(command, cmds.FireSchedule) and isinstance(result, res.ScheduleFired):
            if result.job_id is not None and result.outcome == "created":
                fire = (command.name, command.fire_ms)
                if fire in self.fires:
                    raise Violation("one job per fire time", f"index {index} created job {result.job_id} for "
                                    f"{fire}, whose job index {self.fires[fire]} created already")
                self.fires[fire] = index
                self.checked["fires"] += 1
                self._order += 1
                self.jobs[result.job_id] = (command.name, None, None, self._order)

    def _check_grant(self, index: int, job_id: str, clock_ms: int, holds: dict[str, Any], granted: list[str]) -> None:
        queue, key, group, _ = self.jobs.get(job_id, (None, None, None, 0))
        settings = self.settings.get(queue) if queue is not None else None
        if settings is None:
            return
        live = [other for other in [*holds, *granted] if other != job_id and self.jobs.get(other, ("",))[0] == queue]
        limit = settings.max_running_per_key
        if key is not None and limit:
            self.checked["keyed_grants"] += 1
            same_key = [other for other in live if self.jobs[other][1] == key]
            if len(same_key) >= limit:
                raise Violation("max_running_per_key", f"index {index} leased {job_id} of key {key} in {queue} "
                                f"while {same_key} were leased (limit {limit})")
        if settings.fifo and group is not None:
            self.checked["fifo_grants"] += 1
            period = self.fifo_since[queue]
            same_group = [other for other in live
                          if self.jobs[other][2] == group and self.fifo_grant.get(other) == period]
            if same_group:
                raise Violation("one job of a FIFO group in flight", f"index {index} leased {job_id} of group "
                                f"{group} in {queue} while {same_group} were leased")
            self.fifo_grant[job_id] = period
        else:
            self.fifo_grant.pop(job_id, None)
        if settings.rate_per_ks and settings.burst:
            self.checked["rate_grants"] += 1
            clocks = self.grant_clocks[queue]
            clocks.append(clock_ms)
            for position, start in enumerate(clocks):
                count = len(clocks) - position
                if count * 1_000_000 > settings.burst * 1_000_000 + settings.rate_per_ks * (clock_ms - start):
                    raise Violation("rate limit", f"index {index}: {count} grants in {queue} within "
                                    f"[{start}, {clock_ms}] ms, above burst {settings.burst} + "
                                    f"{settings.rate_per_ks / 1000}/s")

    def _check_ack(self, index: int, job_id: str) -> None:
        queue, _, group, order = self.jobs.get(job_id, (None, None, None, 0))
        if group is None or queue is None or self.fifo_grant.get(job_id) != self.fifo_since.get(queue):
            return
        settings = self.settings.get(queue)
        if settings is None or not settings.fifo:
            return
        self.checked["fifo_acks"] += 1
        last = self.last_acked.get((queue, group), 0)
        if order < last:
            raise Violation("FIFO groups ack in submit order", f"index {index} acked {job_id} of group {group} "
                            f"(submitted #{order}) after a job submitted #{last}")
        self.last_acked[(queue, group)] = order
