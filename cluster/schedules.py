"""Fire times of schedules, and what the leader proposes when they come due.

Theory of operation
-------------------
A schedule fires at wall-clock instants: "every_ms" apart, or where a cron expression matches in an
IANA time zone (cronsim evaluates it; see the README for why that library). The state machine
never evaluates either (it stays pure, and a time-zone database can differ between nodes): it
keeps each schedule's `next_fire_ms`, and the leader, every housekeeping beat, turns the fire
times that have come into `FireSchedule` commands (`plan_fires`). Each command names the fire
time it is for and carries the next one, and applies only while that fire time is still the
schedule's next, so a fire time takes effect once however many leaders propose it.

Fire times are wall-clock instants, compared with the leader's wall clock (`wall_now_ms`; SPEC,
Time: wall-clock time is for absolute run-at times and cron schedules). The cluster's own clock,
which stamps every command, advances only while a leader serves, so it never sees a fire time
missed during a whole-cluster outage, and a cron schedule on it would drift by every outage. A
leader whose wall clock is wrong fires early or late; a fire time still makes one job, because
the state machine applies each fire time once. A fire due while the cluster had a leader is
proposed within a housekeeping beat; one missed by more than `MISSED_AFTER_MS` (the whole
cluster was down) is handled by the schedule's catch_up:

    all     every missed fire time creates its job, oldest first (at most FIRES_PER_BEAT_MAX
            per beat, so a long outage does not flood the log in one go), but no more than the
            newest CATCH_UP_ALL_MAX of them: older ones are skipped in one entry (a leader
            whose wall clock is a day ahead must not make a day of jobs);
    latest  the missed fire times are skipped in one entry, and the latest one runs;
    none    the missed fire times are skipped in one entry; the schedule goes on from now.

DST follows Debian cron (cronsim's rule): a wall time skipped by a spring-forward runs right
after the jump; a daily wall time repeated by a fall-back runs once; a job that runs every
few minutes runs through both copies of the repeated hour. Schedules in UTC have none of this.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

# zoneinfo and cronsim are imported where a schedule is first evaluated, not here: most nodes
# hold no schedule, and the two (zoneinfo brings sysconfig and its build tables) cost every node
# about 0.8 MiB of RSS at start.

#: A fire this late counts as missed and obeys catch_up (the cluster was down or without a
#: leader): longer than an election and a few housekeeping beats, shorter than any outage an
#: operator would call one.
MISSED_AFTER_MS = 10_000
#: Fires one housekeeping beat proposes for one schedule when catching up with catch_up=all.
FIRES_PER_BEAT_MAX = 100
#: Missed fire times catch_up=all makes jobs for, the newest ones (Temporal's catch-up window does
#: the same in time): a day of a once-a-minute schedule, or an hour of a 4-second one.
CATCH_UP_ALL_MAX = 1440
#: Cron steps `latest` and `none` walk to find the newest missed fire time; past it they jump
#: by searching from now instead (a once-a-minute schedule down for a week is 10,080 steps).
CATCH_UP_STEPS_MAX = 20_000
#: The shortest period of an every_s schedule: one housekeeping beat proposes each fire.
EVERY_MS_MIN = 1_000
EVERY_MS_MAX = 366 * 86_400_000


def wall_now_ms() -> int:
    """This node's wall clock, the one reading of it the schedules make (see the module docstring)."""
    return int(time.time() * 1000)


class ScheduleSpecError(ValueError):
    """Raised when a cron expression or a time zone is not valid."""


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`. Raises ScheduleSpecError for an unknown one."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # on first use: see the imports above

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleSpecError(f"unknown time zone {name!r}") from exc


def check_cron(expression: str, timezone_name: str) -> None:
    """Raises ScheduleSpecError unless `expression` is a cron expression with a next fire time."""
    next_fire_after(expression, None, timezone_name, 0)


def next_fire_after(cron: str | None, every_ms: int | None, timezone_name: str, after_ms: int) -> int:
    """The first fire time strictly after `after_ms` (epoch milliseconds).

    For every_ms the fire times are `after_ms + every_ms`: the caller passes the previous fire
    time, so the fire times stay on the grid the first one set.
    """
    if every_ms is not None:
        return after_ms + every_ms
    assert cron is not None
    from cronsim import CronSim, CronSimError  # on first use: see the imports above

    start = datetime.fromtimestamp(after_ms / 1000, zone(timezone_name))
    try:
        fire = next(iter(CronSim(cron, start)))
    except (CronSimError, StopIteration, ValueError) as exc:
        raise ScheduleSpecError(f"cron expression {cron!r}: {exc or 'never matches'}") from exc
    return int(fire.timestamp() * 1000)


def first_fire_from(cron: str | None, every_ms: int | None, timezone_name: str, now_ms: int,
                    grid_ms: int | None = None) -> int:
    """The first fire time after `now_ms`: for a new schedule, or one resumed from a pause.

    An every_ms schedule keeps the grid of `grid_ms` (its old next fire time) when it has one,
    else starts one period from now.
    """
    if every_ms is not None and grid_ms is not None:
        if grid_ms > now_ms:
            return grid_ms
        return grid_ms + ((now_ms - grid_ms) // every_ms + 1) * every_ms
    return next_fire_after(cron, every_ms, timezone_name, now_ms)


def plan_fires(schedule: dict[str, Any], now_ms: int) -> list[tuple[int, int, bool]]:
    """What to propose for one due schedule: (fire_ms, next_fire_ms, run) per FireSchedule, in order.

    Args:
        schedule: its record in the applied state (`QueueStateMachine.due_schedules`).
        now_ms: the leader's clock.
    """
    cron, every_ms, tz = schedule["cron"], schedule["every_ms"], schedule["timezone"]
    fire = schedule["next_fire_ms"]
    if fire > now_ms:
        return []
    following = next_fire_after(cron, every_ms, tz, fire)
    if now_ms - fire <= MISSED_AFTER_MS:
        return [(fire, following, True)]
    policy = schedule["catch_up"]
    if policy == "all":
        oldest_kept = _oldest_of_newest(cron, every_ms, tz, fire, now_ms, CATCH_UP_ALL_MAX)
        if oldest_kept != fire:
            return [(fire, oldest_kept, False)]  # the rest next beat, from oldest_kept
        plan = []
        while fire <= now_ms and len(plan) < FIRES_PER_BEAT_MAX:
            following = next_fire_after(cron, every_ms, tz, fire)
            plan.append((fire, following, True))
            fire = following
        return plan
    latest = _latest_fire_at_or_before(cron, every_ms, tz, fire, now_ms)
    upcoming = next_fire_after(cron, every_ms, tz, latest)
    if policy == "latest":
        skip = [(fire, latest, False)] if latest != fire else []
        return skip + [(latest, upcoming, True)]
    return [(fire, upcoming, False)]  # none


def _oldest_of_newest(cron: str | None, every_ms: int | None, tz: str, fire: int, now_ms: int, count: int) -> int:
    """The oldest of the newest `count` fire times <= now_ms, from `fire` (<= now_ms) on."""
    if every_ms is not None:
        missed = (now_ms - fire) // every_ms + 1
        return fire + max(0, missed - count) * every_ms
    kept: deque[int] = deque(maxlen=count)
    for _ in range(CATCH_UP_STEPS_MAX):
        if fire > now_ms:
            break
        kept.append(fire)
        fire = next_fire_after(cron, None, tz, fire)
    return kept[0]


def _latest_fire_at_or_before(cron: str | None, every_ms: int | None, tz: str, fire: int, now_ms: int) -> int:
    """The newest fire time <= now_ms, given `fire` <= now_ms is one."""
    if every_ms is not None:
        return fire + (now_ms - fire) // every_ms * every_ms
    latest = fire
    for _ in range(CATCH_UP_STEPS_MAX):
        following = next_fire_after(cron, None, tz, latest)
        if following > now_ms:
            return latest
        latest = following
    return latest  # a very long outage of a very frequent schedule: the rest is skipped next beat


def fire_job_id(name: str, fire_ms: int) -> str:
    """The id of the job a fire time creates: time-ordered like other ids (the fire time's
    milliseconds in hex first), and the same whichever leader proposes it."""
    return f"{fire_ms:011x}s{hashlib.blake2b(name.encode(), digest_size=6).hexdigest()}"


def describe_ms(at_ms: int | None) -> str | None:
    """An ISO-8601 UTC time for people (the API also gives seconds)."""
    if at_ms is None:
        return None
    return datetime.fromtimestamp(at_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
