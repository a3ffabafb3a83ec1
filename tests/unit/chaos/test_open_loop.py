"""The open-loop schedule: requests come due on time whatever happened to the earlier ones, and a
request past the in-flight bound is reported as not to be sent (never silently skipped)."""

from __future__ import annotations

import pytest

from raftq.chaos.open_loop import Due, OpenLoop


def test_requests_come_due_at_start_plus_k_intervals():
    schedule = OpenLoop(start=100.0, interval_s=0.2, inflight_max=4)
    assert schedule.take(now=99.9, inflight=0) == []
    assert schedule.take(now=100.0, inflight=0) == [Due(100.0, True)]
    assert schedule.take(now=100.1, inflight=1) == []
    assert schedule.next_at == pytest.approx(100.2)
    assert [d.at for d in schedule.take(now=100.45, inflight=1)] == pytest.approx([100.2, 100.4])


def test_a_late_wake_up_takes_every_request_that_came_due_none_dropped_and_none_moved():
    schedule = OpenLoop(start=0.0, interval_s=0.25, inflight_max=100)
    due = schedule.take(now=1.0, inflight=0)  # the producer woke 1 s late: five requests are due
    assert [d.at for d in due] == [0.0, 0.25, 0.5, 0.75, 1.0] and all(d.send for d in due)
    assert schedule.next_at == 1.25  # the schedule does not restart from the late wake-up


def test_unanswered_requests_do_not_slow_the_schedule_until_the_bound_and_then_are_counted_as_unsent():
    schedule = OpenLoop(start=0.0, interval_s=1.0, inflight_max=3)
    sent = []
    for now in range(6):  # nothing is ever answered
        for due in schedule.take(now=float(now), inflight=len(sent)):
            if due.send:
                sent.append(due.at)
    assert sent == [0.0, 1.0, 2.0]
    assert schedule.taken == 6  # the three past the bound were taken (and reported unsent), not skipped


def test_several_due_at_once_fill_the_free_slots_in_order():
    schedule = OpenLoop(start=0.0, interval_s=0.1, inflight_max=3)
    due = schedule.take(now=0.35, inflight=1)
    assert [(round(d.at, 2), d.send) for d in due] == [(0.0, True), (0.1, True), (0.2, False), (0.3, False)]


@pytest.mark.parametrize("interval_s, inflight_max", [(0.0, 1), (-1.0, 1), (0.1, 0)])
def test_bad_settings_are_refused(interval_s, inflight_max):
    with pytest.raises(ValueError):
        OpenLoop(start=0.0, interval_s=interval_s, inflight_max=inflight_max)


def _workload(*argv: str):
    from raftq.chaos.__main__ import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["--seed", "1", *argv])).workload


def test_the_command_s_in_flight_bound_covers_a_few_seconds_of_each_producer_s_requests():
    assert _workload().inflight_max == 16                  # 20 jobs/s: 5 requests/s per producer
    assert _workload("--rate", "100").inflight_max == 75   # one job per request: 25/s per producer, 3 s
    assert _workload("--rate", "1000").inflight_max == 16  # batches of 50: 5 requests/s per producer again
    assert _workload("--inflight", "4").inflight_max == 4
