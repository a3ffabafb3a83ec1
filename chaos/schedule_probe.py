"""A schedule that fires every 2 s through the whole chaos run, checked for one job per fire time.

Goal: each fire time of a schedule makes exactly one job, however leaders crash, pause and get
cut off (the leader fires each due time as one log entry, applied once per fire time).

`start` puts the schedule (catch_up=all, so that a fire missed while no leader served still
runs once a leader does). `check`, after the final heal, pauses it, so that its last fire time
is the last there will be, then looks up the job of every fire time on the schedule's grid (a
fire time's job id is known: `fire_job_id`) and counts the jobs in its queue: a fire time
without a job, or more jobs than fire times, is a violation.

Fire times are on the leader's wall clock, so a run with the clock-skew fault is different: a
leader a day ahead would find a day of fire times missed. There the schedule catches up with
`latest` (one job, not 43,200), fire times may rightly be skipped, and the check is that the
queue holds exactly the jobs the schedule says it made (none twice).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from raftq.chaos.checker import Violation, percentile
from raftq import Client, errors
from raftq.cluster.schedules import fire_job_id

log = logging.getLogger("chaos.schedule")

NAME = "chaos-heartbeat"
QUEUE = "chaos-schedule"
EVERY_S = 2.0


class ScheduleProbe:
    def __init__(self, urls: Sequence[str], *, wall_clocks_true: bool, deadline_s: float = 60.0) -> None:
        self._urls = list(urls)
        self._deadline_s = deadline_s
        self._strict = wall_clocks_true
        self.first_fire_ms: int | None = None

    def _client(self) -> Client:
        return Client(self._urls, timeout=5.0, deadline=self._deadline_s)

    def start(self) -> None:
        with self._client() as client:
            record = client.put_schedule(NAME, QUEUE, "tick", every_s=EVERY_S,
                                         catch_up="all" if self._strict else "latest")
        self.first_fire_ms = round(record["next_fire_at"] * 1000)
        log.info("schedule %s every %g s from %s", NAME, EVERY_S, record["next_fire"])

    def check(self) -> tuple[list[Violation], dict[str, Any]]:
        """Violations (kind "schedule") and stats; call once the cluster serves after the final heal."""
        assert self.first_fire_ms is not None, "start() first"
        with self._client() as client:
            record = client.pause_schedule(NAME)
            total = sum(client.queues().get(QUEUE, {}).values())
            if not self._strict:
                violations = [] if total == record["jobs_created"] else [Violation(
                    "schedule", f"{total} jobs in {QUEUE}; the schedule made {record['jobs_created']}")]
                return violations, {"jobs": total, "jobs_created": record["jobs_created"],
                                    "fires_skipped": record["fires_skipped"], "strict": False}
            last_ms = round(record["last_fire_at"] * 1000) if record["last_fire_at"] is not None else None
            fires = [] if last_ms is None else list(range(self.first_fire_ms, last_ms + 1, round(EVERY_S * 1000)))
            delays, missing = [], []
            for fire_ms in fires:
                try:
                    job = client.get(fire_job_id(NAME, fire_ms))
                except errors.JobNotFound:
                    missing.append(fire_ms)
                    continue
                delays.append(job["created_at"] - fire_ms / 1000)
        violations = [Violation("schedule", f"fire time {fire_ms} of schedule {NAME} made no job")
                      for fire_ms in missing]
        if total != len(fires) - len(missing):
            violations.append(Violation("schedule", f"{total} jobs in {QUEUE} for {len(fires)} fire times "
                                        f"({len(missing)} without a job): a fire time made two jobs"))
        # Delays compare a job's creation on the cluster's clock with its wall-clock fire time: the
        # cluster's clock loses about an election per failover, so read them as rough.
        stats = {"fire_times": len(fires), "jobs": total, "missing": len(missing),
                 "delay_p50_s": _round(percentile(delays, 50)), "delay_p99_s": _round(percentile(delays, 99)),
                 "delay_max_s": _round(max(delays, default=None))}
        return violations, stats


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
