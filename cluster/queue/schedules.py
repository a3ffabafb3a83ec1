"""The schedule record the queue state machine keeps for each periodic job.

The state machine never evaluates a cron expression: the leader does (cluster/schedules.py) and
proposes one `FireSchedule` per due fire time, carrying the next fire time it computed. The record
holds what makes each fire take effect at most once: a fire applies only while the schedule's
`revision` (the log index of the PutSchedule that made this spec) and `next_fire_ms` are the ones
the leader saw, and applying it moves `next_fire_ms` on. Every field holds an immutable value, so
a snapshot's capture can share rows (as with `jobs.Job`).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable

OVERLAP_POLICIES: tuple[str, ...] = ("allow", "skip")
CATCH_UP_POLICIES: tuple[str, ...] = ("none", "latest", "all")

#: Outcomes of a FireSchedule (the ScheduleFired result and the fire counters).
CREATED = "created"  #: the fire created its job
SKIPPED_OVERLAP = "skipped_overlap"  #: overlap=skip and the previous fire's job was not finished
SKIPPED_CATCH_UP = "skipped_catch_up"  #: a fire missed during an outage that catch_up leaves out
SKIPPED_FULL = "skipped_full"  #: the target queue was at its max_depth
STALE = "stale"  #: already applied, or for an old revision, or the schedule is paused or gone
FIRE_OUTCOMES: tuple[str, ...] = (CREATED, SKIPPED_OVERLAP, SKIPPED_CATCH_UP, SKIPPED_FULL)


class Schedule:
    """One periodic job. Times are milliseconds of the cluster's clock."""

    __slots__ = (
        "name", "queue", "payload", "cron", "every_ms", "timezone", "overlap", "catch_up", "priority",
        "max_attempts", "lease_ms", "backoff_base_ms", "backoff_cap_ms", "revision", "paused",
        "next_fire_ms", "last_fire_ms", "last_job_id", "created_count", "skipped_count",
    )

    def spec(self) -> tuple:
        """What a PutSchedule sets; an identical PUT changes nothing (a worker re-declaring its
        schedules at every start must not move their fire times)."""
        return (self.queue, self.payload, self.cron, self.every_ms, self.timezone, self.overlap, self.catch_up,
                self.priority, self.max_attempts, self.lease_ms, self.backoff_base_ms, self.backoff_cap_ms)

    def record(self) -> dict:
        return {slot: getattr(self, slot) for slot in self.__slots__}

    @classmethod
    def from_row(cls, row: tuple | list) -> "Schedule":
        if len(row) != len(cls.__slots__):
            raise ValueError(f"schedule row has {len(row)} fields, not {len(cls.__slots__)}")
        schedule = cls.__new__(cls)
        for slot, value in zip(cls.__slots__, row):
            setattr(schedule, slot, value)
        return schedule


#: A schedule's snapshot row, as one C-level call (see jobs.job_row).
schedule_row: Callable[[Schedule], tuple] = attrgetter(*Schedule.__slots__)
