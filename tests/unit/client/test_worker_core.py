"""The worker's policy driven by scripted events: no threads, no sockets, no clock.

Each test plays what a runtime would see (jobs fetched, a slot free, a handler done, a server's
answer, a timer) into `WorkerCore` with invented times, and checks what it answers.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from raftq import LeasedJob, errors
from raftq.client.worker import core as wc
from raftq.client.worker.core import BUFFERED, RELEASED, REPORTING, RUNNING, Outcome, WorkerCore

WALL_T0 = 1_700_000_000.0  # unix time of the scripted start; monotonic time starts at 0
LEASE_S = 30.0


def jobs(count: int, *, lease_s: float = LEASE_S, payload=None, start: int = 0) -> list[LeasedJob]:
    return [LeasedJob(f"j{n}", "q", payload if payload is not None else {"n": n}, 1, 100 + n, WALL_T0 + lease_s,
                      lease_s=lease_s)
            for n in range(start, start + count)]


def make_core(*, concurrency: int = 4, prefetch: int | str = "auto", **options) -> tuple[WorkerCore, list[int]]:
    changes: list[int] = []
    paced = prefetch == "auto"
    core = WorkerCore(concurrency=concurrency, prefetch=wc.default_prefetch(concurrency) if paced else prefetch,
                      paced=paced, ack_batch_max=options.pop("ack_batch_max", 100),
                      ack_linger_s=options.pop("ack_linger_s", 0.002), on_change=lambda: changes.append(1))
    return core, changes


def run_one(core: WorkerCore, flight, *, now: float, run_s: float, result=None) -> Outcome:
    assert core.start(flight, now)
    done = Outcome("ok", result=result)
    assert core.finish(flight, done, now + run_s)
    return done


# ---------------------------------------------------------------------------- buffer pacing


def test_auto_buffer_is_paced_by_measured_work():
    core, _ = make_core(concurrency=4)
    # Nothing measured yet: fetch for the free slots only.
    assert core.prefetch_now() == 0 and core.fetch_size() == 4 and core.fetch_due()
    flights = core.take(jobs(4), now=0.0, now_wall=WALL_T0)
    assert (core.buffered, core.fetch_size(), core.fetch_due()) == (4, 0, False)
    run_one(core, flights[0], now=0.0, run_s=0.001)  # 1 ms jobs: 4 slots get through 400 in 0.1 s ...
    assert core.prefetch_now() == wc.PREFETCH_DEFAULT_MAX  # ... capped at the default bound
    assert core.fetch_size() == 4 + 256 - 3 and core.fetch_due()
    for flight in flights[1:]:
        run_one(core, flight, now=1.0, run_s=2.0)  # now the jobs take seconds: the average climbs
    assert core.prefetch_now() < 1  # long jobs: no buffer, every job starts on the first free worker
    assert core.fetch_size() == 4  # just the slots (the 4 finished jobs await their acks)


def test_auto_buffer_is_bounded_in_bytes():
    core, _ = make_core(concurrency=2)
    big = "x" * (1 << 20)
    flight, = core.take(jobs(1, payload=big), now=0.0, now_wall=WALL_T0)
    run_one(core, flight, now=0.0, run_s=0.0001)
    # 16 MiB of 1 MiB payloads (each a few bytes over 1 MiB encoded): 15 jobs, not 256.
    assert core.prefetch_now() == wc.PREFETCH_BYTES_MAX // (len(big) + 5) == 15


def test_fixed_and_zero_prefetch():
    fixed, _ = make_core(concurrency=2, prefetch=8)
    assert fixed.prefetch_now() == 8 and fixed.fetch_size() == 10
    none, _ = make_core(concurrency=2, prefetch=0)
    none.take(jobs(1), now=0.0, now_wall=WALL_T0)
    assert none.fetch_size() == 1 and none.fetch_due()  # one slot still idle


def test_refill_waits_for_a_quarter_of_the_buffer():
    core, _ = make_core(concurrency=1, prefetch=8)
    flights = core.take(jobs(9), now=0.0, now_wall=WALL_T0)
    assert not core.fetch_due()
    assert core.start(flights[0], 0.0)
    core.finish(flights[0], Outcome("ok"), 0.1)
    core.settle("ack_many", [(flights[0], Outcome("ok"))], [None])
    assert core.fetch_size() == 1 and not core.fetch_due()  # one free place of 8: not worth a round trip
    run_one(core, flights[1], now=0.2, run_s=0.01)
    assert core.fetch_size() == 2 and core.fetch_due()  # a quarter of the buffer is free: refill


# ---------------------------------------------------------------------------- stop


def test_stop_releases_the_buffer_and_abandons_only_what_outlives_grace():
    core, changes = make_core(concurrency=1, prefetch=4)
    flights = core.take(jobs(5), now=0.0, now_wall=WALL_T0)
    assert core.start(flights[0], 0.0)
    released = core.release_buffered()
    assert [f for f, _ in released] == flights[1:] and {o.kind for _, o in released} == {"released"}
    assert core.buffered == 0 and changes  # the fetcher and shutdown are woken
    (method, pairs, items), = core.report_requests(released)
    assert method == "release_many" and items == [(j.job.id, j.job.lease_token) for j in flights[1:]]
    core.settle(method, pairs, [None] * 4)
    assert core.stats.released == 4 and set(core.flights) == {"j0"}
    assert not core.start(flights[1], 0.0)  # a released job is never started
    # The running job outlives the grace period: failed back as a retry (its attempt counts).
    (flight, abandoned), = core.abandon_running()
    assert flight is flights[0] and abandoned.kind == "abandoned" and abandoned.delay_s == 0.0
    (method, _, items), = core.report_requests([(flight, abandoned)])
    assert method == "fail_many" and items[0][3] is True  # retry
    assert not core.finish(flight, Outcome("ok"), 99.0)  # its late outcome is dropped


def test_jobs_fetched_after_the_stop_go_straight_back():
    core, _ = make_core()
    handed = core.release_late(jobs(2), now=0.0, now_wall=WALL_T0)
    assert [(f.state, o) for f, o in handed] == [(REPORTING, RELEASED)] * 2 and core.buffered == 0


# ---------------------------------------------------------------------------- leases


def test_a_lease_lost_while_buffered_drops_the_job():
    core, _ = make_core(concurrency=1, prefetch=2)
    running, waiting, other = core.take(jobs(3), now=0.0, now_wall=WALL_T0)
    assert core.start(running, 0.0)
    core.mark_lost([waiting.job.id, running.job.id], "the server says this worker no longer holds it")
    assert (core.stats.lost, core.stats.dropped) == (2, 1)
    assert waiting.job.id not in core.flights and not core.start(waiting, 1.0)
    assert core.heartbeat_ids() == [other.job.id]  # a lost running job is not named again either
    # The running one's outcome will be refused: counted lost once, not twice.
    core.finish(running, Outcome("ok"), 1.0)
    core.settle("ack_many", [(running, Outcome("ok"))], [errors.LeaseError("gone", code="lease_expired")])
    assert core.stats.lost == 2


def test_extension_comes_before_expiry_and_a_failed_one_is_retried():
    core, _ = make_core(concurrency=1, prefetch=1)
    flight, buffered = core.take(jobs(2), now=0.0, now_wall=WALL_T0)
    assert core.start(flight, 0.0)
    assert flight.extend_at == pytest.approx(LEASE_S / 2) and flight.expires_at == pytest.approx(LEASE_S)
    assert core.due_extensions(LEASE_S / 2 - 0.01) == []
    due = core.due_extensions(LEASE_S / 2)
    assert due == [flight, buffered]  # buffered jobs are kept alive like running ones
    core.extended(due, [WALL_T0 + 45.0, WALL_T0 + 45.0], asked_at=15.0, now=15.05)
    assert flight.expires_at == pytest.approx(15.0 + LEASE_S)  # reckoned from when the request left
    assert flight.extend_at == pytest.approx(15.05 + LEASE_S / 2)
    # The cluster stops answering: retried soon, not at the next half-lease.
    core.extend_failed([flight, buffered], now=30.05)
    assert core.next_extension() == pytest.approx(30.05 + wc.EXTEND_RETRY_S)
    # Still no answer when the buffered job's lease is nearly out: dropped, never started late.
    core.drop_expiring(45.0 - wc.LEASE_START_MARGIN_S / 2)
    assert buffered.job.id not in core.flights and core.stats.dropped == 1
    assert not core.start(buffered, 45.0)


def test_each_lease_is_extended_by_its_own_jobs_lease_length():
    """A job submitted with an hour's lease keeps an hour per extension, a 2 s one 2 s: the worker
    has no lease length of its own that could shorten (or stretch) a job's."""
    core, _ = make_core(concurrency=2, prefetch=0)
    long_job, short_job = core.take(jobs(1, lease_s=3600.0) + jobs(1, lease_s=2.0, start=1), now=0.0,
                                    now_wall=WALL_T0)
    assert (long_job.lease_s, short_job.lease_s) == (3600.0, 2.0)
    assert core.shortest_lease_s() == 2.0
    assert core.due_extensions(1.0) == [short_job]
    core.extended([short_job], [WALL_T0 + 3.0], asked_at=1.0, now=1.01)
    assert short_job.expires_at == pytest.approx(3.0) and short_job.extend_at == pytest.approx(2.01)
    assert core.due_extensions(1800.0)[:1] == [long_job]
    core.extended([long_job], [WALL_T0 + 5400.0], asked_at=1800.0, now=1800.01)
    assert long_job.expires_at == pytest.approx(5400.0)


def test_a_server_that_does_not_say_the_jobs_lease_length_gives_the_time_left():
    core, _ = make_core(concurrency=1, prefetch=0)
    job = jobs(1, lease_s=20.0)[0]
    old_server = LeasedJob(job.id, job.queue, job.payload, 1, job.lease_token, WALL_T0 + 20.0, lease_expires_in_s=19.5)
    (flight,) = core.take([old_server], now=0.0, now_wall=WALL_T0)
    assert flight.lease_s == 19.5 and flight.expires_at == 19.5


def test_leases_due_within_a_beat_are_extended_in_one_request():
    from raftq.client.worker.loops import extend_window_s

    core, _ = make_core(concurrency=1, prefetch=8)
    # Fetched one after another over 1.5 s: each lease due at its own half-life ...
    for n in range(4):
        core.take(jobs(1, start=n), now=n * 0.5, now_wall=WALL_T0 + n * 0.5)
    window = extend_window_s(heartbeat_s=2.0, lease_s=LEASE_S)
    assert window == 2.0 and extend_window_s(heartbeat_s=2.0, lease_s=1.0) == 0.25
    # ... yet the first beat at which one is due extends all four together.
    first_due = core.next_extension()
    assert [f.job.id for f in core.due_extensions(first_due + window)] == ["j0", "j1", "j2", "j3"]
    assert [f.job.id for f in core.due_extensions(first_due)] == ["j0"]


def test_a_job_is_not_started_on_a_lease_about_to_run_out():
    core, _ = make_core(concurrency=1, prefetch=1)
    flight, = core.take(jobs(1, lease_s=1.0), now=0.0, now_wall=WALL_T0)
    assert not core.start(flight, 1.0 - wc.LEASE_START_MARGIN_S / 2)
    assert core.stats.dropped == 1


# ---------------------------------------------------------------------------- reporting


def test_batched_acks_and_fails_with_per_item_errors():
    core, _ = make_core(concurrency=3, prefetch=0)
    a, b, c = core.take(jobs(3), now=0.0, now_wall=WALL_T0)
    outcomes = {a: Outcome("ok", result=1, size_bytes=1), b: Outcome("ok", result=2, size_bytes=1),
                c: Outcome("rejected", error="Reject: no")}
    for flight in (a, b, c):
        assert core.start(flight, 0.0)
    for flight, done in outcomes.items():
        assert core.finish(flight, done, 0.01)
    # Nothing running or buffered: no other outcome is coming soon, so the linger is not waited out.
    assert core.idle_slots() and core.flush_due(3, oldest_at=0.01, now=0.011, stopping=False)
    requests = core.report_requests(list(outcomes.items()))
    assert [(m, items) for m, _, items in requests] == [
        ("ack_many", [("j0", 100, 1), ("j1", 101, 2)]),
        ("fail_many", [("j2", 102, "Reject: no", False, None)]),  # rejected: no retry
    ]
    (_, ack_pairs, _), (_, fail_pairs, _) = requests
    core.settle("ack_many", ack_pairs, [None, errors.LeaseError("moved", code="lease_mismatch")])
    core.settle("fail_many", fail_pairs, [None])
    s = core.stats
    assert (s.succeeded, s.rejected, s.lost, core.flights) == (2, 1, 1, {})


def test_flush_waits_for_the_linger_or_a_full_batch():
    core, _ = make_core(concurrency=2, prefetch=0, ack_batch_max=3, ack_linger_s=0.01)
    core.take(jobs(2), now=0.0, now_wall=WALL_T0)
    for flight in list(core.flights.values()):
        core.start(flight, 0.0)
    assert not core.flush_due(1, oldest_at=1.0, now=1.005, stopping=False)
    assert core.flush_due(1, oldest_at=1.0, now=1.01, stopping=False)  # the linger is over
    assert core.flush_due(3, oldest_at=1.0, now=1.0, stopping=False)  # a full batch
    assert core.flush_due(1, oldest_at=1.0, now=1.0, stopping=True)


def test_failover_in_the_middle_of_a_batch():
    """The ack request's answer is lost (the leader died); the runtime sends the same request to
    the new leader. Meanwhile the jobs stay held and out of heartbeats; the new leader answers the
    first ack as a repeat (ok) and refuses the one whose lease it let run out."""
    core, _ = make_core(concurrency=3, prefetch=0)
    flights = core.take(jobs(3), now=0.0, now_wall=WALL_T0)
    for flight in flights:
        run_one(core, flight, now=0.0, run_s=0.01, result="r")
    batch = [(f, Outcome("ok", result="r")) for f in flights]
    first = core.report_requests(batch)
    # No answer: nothing settles, the leases are still held, and no heartbeat calls them lost.
    assert set(core.flights) == {"j0", "j1", "j2"} and core.heartbeat_ids() == []
    retried = core.report_requests(batch)
    assert retried == first  # the same items, the same lease tokens: a repeated ack is safe
    (method, pairs, _), = retried
    core.settle(method, pairs, [None, None, errors.LeaseError("expired", code="lease_expired")])
    assert (core.stats.succeeded, core.stats.lost, core.flights) == (3, 1, {})


def test_process_batch_size_follows_measured_work_and_shares_the_buffer():
    core, _ = make_core(concurrency=4, prefetch=64)
    assert core.process_batch_size(waiting=100) == 1  # nothing measured yet
    flight, = core.take(jobs(1), now=0.0, now_wall=WALL_T0)
    run_one(core, flight, now=0.0, run_s=0.001)
    assert core.process_batch_size(waiting=100) == 20  # about 20 ms of 1 ms jobs
    assert core.process_batch_size(waiting=7) == 2  # a fair share of 8 between 4 children


# ---------------------------------------------------------------------------- purity


def test_the_core_imports_no_clock_thread_or_socket():
    source = pathlib.Path(wc.__file__).read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & {"time", "threading", "asyncio", "socket", "random", "concurrent", "multiprocessing"}, imported


def test_states_are_distinct():
    assert len({BUFFERED, RUNNING, REPORTING, wc.DROPPED}) == 4
