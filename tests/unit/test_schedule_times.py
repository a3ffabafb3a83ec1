"""Fire-time arithmetic and catch-up planning (cluster/schedules.py), with cron in IANA zones."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from raftq.cluster import schedules as s

BERLIN = ZoneInfo("Europe/Berlin")


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def berlin(*args) -> int:
    return ms(datetime(*args, tzinfo=BERLIN))


def test_every_keeps_its_grid():
    assert s.next_fire_after(None, 2_000, "UTC", 10_000) == 12_000
    assert s.first_fire_from(None, 2_000, "UTC", 10_500, grid_ms=4_000) == 12_000
    assert s.first_fire_from(None, 2_000, "UTC", 10_500, grid_ms=20_000) == 20_000
    assert s.first_fire_from(None, 2_000, "UTC", 10_500) == 12_500


def test_cron_in_a_zone():
    start = ms(datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc))  # 13:00 in Berlin
    assert s.next_fire_after("30 14 * * *", None, "Europe/Berlin", start) == berlin(2026, 1, 5, 14, 30)
    assert s.next_fire_after("*/5 * * * *", None, "UTC", start) == start + 300_000  # strictly after


def test_spring_forward_runs_a_skipped_time_right_after_the_jump():
    # 2026-03-29 in Berlin: 02:00 -> 03:00; 02:30 does not exist, so it runs at 03:00.
    fire = s.next_fire_after("30 2 * * *", None, "Europe/Berlin", berlin(2026, 3, 29, 1, 0))
    assert fire == berlin(2026, 3, 29, 3, 0)
    assert s.next_fire_after("30 2 * * *", None, "Europe/Berlin", fire) == berlin(2026, 3, 30, 2, 30)


def test_fall_back_runs_a_daily_time_once_and_a_frequent_job_through_both_hours():
    # 2026-10-25 in Berlin: 03:00 -> 02:00; 02:30 happens twice; a daily 02:30 fires once.
    first = s.next_fire_after("30 2 * * *", None, "Europe/Berlin", berlin(2026, 10, 25, 0, 0))
    second = s.next_fire_after("30 2 * * *", None, "Europe/Berlin", first)
    assert second - first == 24 * 3_600_000 + 3_600_000  # the next day; the 25-hour day between
    fires = [berlin(2026, 10, 25, 1, 50)]
    for _ in range(8):
        fires.append(s.next_fire_after("*/30 * * * *", None, "Europe/Berlin", fires[-1]))
    steps = [(b - a) // 60_000 for a, b in zip(fires[1:], fires[2:])]
    assert steps == [30] * 7, steps  # every 30 minutes of real time, through both 02:xx hours


@pytest.mark.parametrize("cron, zone", [("61 * * * *", "UTC"), ("* * *", "UTC"), ("0 0 30 2 *", "UTC"),
                                        ("0 0 * * *", "Mars/Olympus_Mons")])
def test_bad_specs_are_refused(cron, zone):
    with pytest.raises(s.ScheduleSpecError):
        s.check_cron(cron, zone)


def _record(catch_up: str, next_fire_ms: int, every_ms: int = 2_000) -> dict:
    return {"cron": None, "every_ms": every_ms, "timezone": "UTC", "catch_up": catch_up, "next_fire_ms": next_fire_ms}


@pytest.mark.parametrize("catch_up", ["none", "latest", "all"])
def test_a_fire_late_within_the_grace_runs_whatever_the_policy(catch_up):
    assert s.plan_fires(_record(catch_up, 10_000), 10_000 + s.MISSED_AFTER_MS) == [(10_000, 12_000, True)]
    assert s.plan_fires(_record(catch_up, 10_000), 9_999) == []


def test_catch_up_after_an_outage():
    now = 100_000 + 30_500  # down for 30 s: fires 100 000 ... 130 000 were missed
    assert s.plan_fires(_record("none", 100_000), now) == [(100_000, 132_000, False)]
    assert s.plan_fires(_record("latest", 100_000), now) == [(100_000, 130_000, False), (130_000, 132_000, True)]
    plan = s.plan_fires(_record("all", 100_000), now)
    assert plan == [(fire, fire + 2_000, True) for fire in range(100_000, 132_000, 2_000)]


def test_catch_up_all_keeps_only_the_newest_missed_fire_times():
    # A leader whose wall clock is a day ahead finds 86,400 missed fire times of a 1 s schedule.
    plan = s.plan_fires(_record("all", 0, every_ms=1_000), 86_400_000)
    oldest_kept = 86_400_000 - (s.CATCH_UP_ALL_MAX - 1) * 1_000
    assert plan == [(0, oldest_kept, False)]
    then = s.plan_fires(_record("all", oldest_kept, every_ms=1_000), 86_400_000)
    assert then[0] == (oldest_kept, oldest_kept + 1_000, True) and len(then) == s.FIRES_PER_BEAT_MAX
    start = ms(datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc))
    record = {"cron": "* * * * *", "every_ms": None, "timezone": "UTC", "catch_up": "all", "next_fire_ms": start}
    [(fire, skip_to, run)] = s.plan_fires(record, start + 2 * 86_400_000)
    assert (fire, run) == (start, False) and skip_to == start + (2 * 1440 - s.CATCH_UP_ALL_MAX + 1) * 60_000


def test_catch_up_all_is_bounded_per_beat():
    plan = s.plan_fires(_record("all", 0, every_ms=1_000), 1_000_000)
    assert len(plan) == s.FIRES_PER_BEAT_MAX and plan[-1][1] == s.FIRES_PER_BEAT_MAX * 1_000


def test_catch_up_latest_with_cron():
    start = ms(datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc))
    record = {"cron": "*/10 * * * *", "every_ms": None, "timezone": "UTC", "catch_up": "latest",
              "next_fire_ms": start}
    plan = s.plan_fires(record, start + 45 * 60_000)
    assert plan == [(start, start + 40 * 60_000, False), (start + 40 * 60_000, start + 50 * 60_000, True)]


def test_fire_job_ids_are_deterministic_and_time_ordered():
    assert s.fire_job_id("nightly", 5_000) == s.fire_job_id("nightly", 5_000)
    assert s.fire_job_id("nightly", 5_000) != s.fire_job_id("hourly", 5_000)
    assert s.fire_job_id("b", 5_000) < s.fire_job_id("a", 6_000)
    assert len(s.fire_job_id("x" * 128, 1 << 43)) <= 64
