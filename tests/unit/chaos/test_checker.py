"""The chaos checker on hand-written histories: it must fail exactly when a guarantee broke.

Each history is built with `History`, a tiny builder of the records `chaos.history` writes:
`submit`, `lease`, `ack`, `nack` ops (an invoke record and a completion record) and events.
Times are explicit (`at=`), so each case reads like the timeline it describes.
"""

from __future__ import annotations

import itertools

import pytest

from raftq.chaos import checker
from raftq.chaos.history import numbered

LEASE_S = 5.0
WALL0 = 1_000_000.0  # wall clock at t=0 in these histories


class History:
    def __init__(self) -> None:
        self.records: list[dict] = [self._at(0.0, proc="runner", op="meta", type="event", lease_s=LEASE_S, rate=10)]
        self._ids = itertools.count(1)

    @staticmethod
    def _at(t: float, **fields) -> dict:
        return {"t": t, "wall": WALL0 + t, **fields}

    def _op(self, proc: str, op: str, at: float, outcome: str | None, invoke: dict, done: dict,
            took: float = 0.1) -> None:
        op_id = f"{proc}:{next(self._ids)}"
        self.records.append(self._at(at, proc=proc, op=op, type="invoke", op_id=op_id, **invoke))
        if outcome is not None:  # None: the process died before the op completed
            self.records.append(self._at(at + took, proc=proc, op=op, type=outcome, op_id=op_id, **done))

    def submit(self, value: str, job: str | None = None, *, at: float, outcome: str | None = "ok",
               delay_s: float | None = None, took: float = 0.1, due: float | None = None) -> "History":
        """due: when the open-loop schedule made it due (`scheduled_t`); at: when it was sent."""
        invoke = {"value": value, **({"delay_s": delay_s} if delay_s else {}),
                  **({"scheduled_t": due} if due is not None else {})}
        self._op("p0", "submit", at, outcome, invoke, {"job": job} if outcome == "ok" else {"error": "x"}, took)
        return self

    def lease(self, worker: str, jobs: list[tuple[str, str, int]], *, at: float, outcome: str = "ok") -> "History":
        """jobs: (job id, value, lease token); each lease expires LEASE_S after the op starts."""
        listed = [{"id": j, "value": v, "lease": token, "expires": WALL0 + at + LEASE_S, "attempt": 1}
                  for j, v, token in jobs]
        self._op(worker, "lease", at, outcome, {"worker": worker}, {"jobs": listed} if outcome == "ok" else {})
        return self

    def ack(self, worker: str, job: str, lease: int, *, at: float, outcome: str | None = "ok",
            op: str = "ack") -> "History":
        self._op(worker, op, at, outcome, {"worker": worker, "job": job, "lease": lease, "value": None},
                 {} if outcome == "ok" else {"code": "lease_mismatch"})
        return self

    def event(self, op: str, *, at: float, **fields) -> "History":
        self.records.append(self._at(at, proc="runner", op=op, type="event", **fields))
        return self

    def check(self) -> checker.CheckResult:
        return checker.check(sorted(self.records, key=lambda r: r["t"]))


def healthy() -> History:
    """Two jobs submitted, delivered, acked; drained; digests equal."""
    return (History()
            .submit("a", "j1", at=1).submit("b", "j2", at=2)
            .lease("w1", [("j1", "a", 1), ("j2", "b", 2)], at=3)
            .ack("w1", "j1", 1, at=4).ack("w1", "j2", 2, at=4.5)
            .event("drained", at=10, complete=True)
            .event("converged", at=11, digests={"n1": "d", "n2": "d", "n3": "d"}, equal=True))


def lines_of(records: list[dict], **match) -> list[int]:
    return [r["line"] for r in numbered(records) if all(r.get(k) == v for k, v in match.items())]


def test_a_healthy_history_is_valid():
    result = healthy().check()
    assert result.valid, result.violations
    assert result.counts["attempted"] == 2 and result.counts["acked"] == 2 and result.counts["completed"] == 2
    assert result.counts["lost"] == 0 and result.counts["duplicates"] == 0
    assert checker.summarize(result).splitlines()[-1] == "lost=0 unexpected=0 duplicates=0"


def test_an_acknowledged_job_never_delivered_is_lost_and_named_with_its_lines():
    h = healthy().submit("c", "j3", at=5)
    records = sorted(h.records, key=lambda r: r["t"])
    result = checker.check(records)
    assert not result.valid
    (lost,) = result.violations_of("lost")
    assert lost.job == "j3" and lost.value == "c"
    assert lost.lines == lines_of(records, op="submit", value="c") + lines_of(records, op="submit", job="j3")
    summary = checker.summarize(result)
    assert "j3" in summary and summary.splitlines()[-1] == "lost=1 unexpected=0 duplicates=0"


def test_a_job_delivered_but_never_submitted_is_unexpected():
    result = healthy().lease("w2", [("j9", "zz", 7)], at=6).ack("w2", "j9", 7, at=6.5).check()
    (unexpected,) = result.violations_of("unexpected")
    assert unexpected.job == "j9" and unexpected.value == "zz"
    assert result.counts["unexpected"] == 1 and not result.valid


def test_a_delivery_after_a_2xx_ack_breaks_ack_finality():
    # j1 acked at 4 (answered 4.1); leased again at 6: the ack was not final.
    result = healthy().lease("w2", [("j1", "a", 5)], at=6).ack("w2", "j1", 5, at=6.5).check()
    (violation,) = result.violations_of("delivered_after_ack")
    assert violation.job == "j1" and len(violation.lines) == 4
    assert not result.valid


def test_a_delivery_concurrent_with_the_ack_is_not_called_after_it():
    # The second lease started (5.95) before the ack's answer (6.0): not provably after it.
    h = (History().submit("a", "j1", at=1).lease("w1", [("j1", "a", 1)], at=2)
         .ack("w1", "j1", 1, at=5.9).lease("w2", [("j1", "a", 2)], at=5.95))
    assert h.check().violations_of("delivered_after_ack") == []


def test_an_ack_accepted_on_a_lease_replaced_by_a_newer_one_is_a_stale_lease_ack():
    # w1's lease 1 ran out; w2 got lease 2 (answered at 9.1); w1's ack with lease 1 at 10 is accepted: wrong.
    h = (History().submit("a", "j1", at=1)
         .lease("w1", [("j1", "a", 1)], at=2)
         .lease("w2", [("j1", "a", 2)], at=9)
         .ack("w1", "j1", 1, at=10))
    (violation,) = h.check().violations_of("stale_lease_ack")
    assert violation.job == "j1" and "lease 2" in violation.message


def test_an_ack_accepted_after_its_lease_expired_is_a_stale_lease_ack():
    # Lease from t=2 expires at 7; an ack sent at 8 must be refused, yet it was accepted.
    h = History().submit("a", "j1", at=1).lease("w1", [("j1", "a", 1)], at=2).ack("w1", "j1", 1, at=8)
    (violation,) = h.check().violations_of("stale_lease_ack")
    assert "after that lease expired" in violation.message


def test_a_leader_change_renews_leases_so_a_late_ack_is_forgiven():
    # A new leader took office at 6 (RenewLeases: expiry becomes >= 6 + 5 = 11); the ack at 8 is fine.
    h = (History().submit("a", "j1", at=1).lease("w1", [("j1", "a", 1)], at=2)
         .event("status", at=6, node="n2", role="leader", term=3, leader="n2", serving=True)
         .ack("w1", "j1", 1, at=8))
    result = h.check()
    assert result.violations_of("stale_lease_ack") == [], result.violations


def test_a_refused_late_ack_is_no_violation_and_the_redelivery_counts_as_a_duplicate():
    h = (History().submit("a", "j1", at=1)
         .lease("w1", [("j1", "a", 1)], at=2)
         .ack("w1", "j1", 1, at=8, outcome="fail")
         .lease("w2", [("j1", "a", 2)], at=9).ack("w2", "j1", 2, at=9.5))
    result = h.check()
    assert result.valid, result.violations
    assert result.counts["duplicates"] == 1 and result.counts["duplicates_pct"] == 100.0
    assert result.stats["duplicate_causes"] == {"ack_refused": 1}


def test_a_redelivery_after_a_deliberate_fail_is_a_retry_not_a_duplicate():
    h = (History().submit("a", "j1", at=1)
         .lease("w1", [("j1", "a", 1)], at=2).ack("w1", "j1", 1, at=2.5, op="nack")
         .lease("w1", [("j1", "a", 2)], at=3).ack("w1", "j1", 2, at=3.5))
    result = h.check()
    assert result.valid and result.counts["retries"] == 1 and result.counts["duplicates"] == 0


def test_a_stalled_job_s_redelivery_is_attributed_to_the_workload():
    h = (History().submit("a", "j1", at=1).lease("w1", [("j1", "a", 1)], at=2)
         .event("stall", at=2.2, job="j1", lease=1)
         .lease("w2", [("j1", "a", 2)], at=8).ack("w2", "j1", 2, at=8.5))
    result = h.check()
    assert result.counts["duplicates"] == 1 and result.counts["duplicates_unplanned"] == 0
    assert result.stats["duplicate_causes"] == {"workload_stall": 1}


def test_an_unknown_submit_that_comes_out_is_recovered_not_unexpected():
    h = (History().submit("a", at=1, outcome="info").submit("b", at=2, outcome=None)  # b: the producer died
         .lease("w1", [("j1", "a", 1)], at=3).ack("w1", "j1", 1, at=4))
    result = h.check()
    assert result.valid, result.violations
    assert result.counts["unknown"] == 2 and result.counts["recovered"] == 1 and result.counts["lost"] == 0


def test_a_refused_submit_that_comes_out_is_a_violation():
    h = History().submit("a", at=1, outcome="fail").lease("w1", [("j1", "a", 1)], at=3)
    (violation,) = h.check().violations_of("failed_submit_delivered")
    assert violation.value == "a"


def test_one_value_under_two_job_ids_is_a_double_submit():
    h = (History().submit("a", "j1", at=1)
         .lease("w1", [("j1", "a", 1), ("j2", "a", 2)], at=2).ack("w1", "j1", 1, at=3).ack("w1", "j2", 2, at=3))
    (violation,) = h.check().violations_of("double_submit")
    assert "j1" in violation.message and "j2" in violation.message


def test_after_the_drain_an_acknowledged_job_neither_acked_nor_dead_is_not_completed():
    h = (History().submit("a", "j1", at=1).submit("b", "j2", at=1.5)
         .lease("w1", [("j1", "a", 1), ("j2", "b", 2)], at=2).ack("w1", "j1", 1, at=3)
         .event("dead", at=9, jobs=[]).event("drained", at=10, complete=True))
    (violation,) = h.check().violations_of("not_completed")
    assert violation.job == "j2"
    dead = (History().submit("b", "j2", at=1.5).lease("w1", [("j2", "b", 2)], at=2)
            .event("dead", at=9, jobs=["j2"]).event("drained", at=10, complete=True))
    assert dead.check().valid


def test_an_unanswered_ack_counts_as_completed_only_when_the_cluster_says_the_job_is_done():
    def history(final_state: str | None) -> History:
        h = (History().submit("a", "j1", at=1).lease("w1", [("j1", "a", 1)], at=2)
             .ack("w1", "j1", 1, at=3, outcome=None)  # the worker was killed before the answer came
             .event("dead", at=9, jobs=[]).event("drained", at=10, complete=True))
        return h if final_state is None else h.event("final_states", at=11, jobs={"j1": final_state})

    assert checker.unanswered_acks(history(None).records) == {"j1"}
    assert history("done").check().valid
    for state in (None, "ready", "unknown: Unavailable"):
        (violation,) = history(state).check().violations_of("not_completed")
        assert violation.job == "j1", state


def test_an_unanswered_ack_of_a_job_the_cluster_forgot_counts_as_completed_unless_it_is_dead():
    # The cluster forgets only finished jobs, once their retention is over ("gone").
    def history(dead: list[str]) -> History:
        return (History().submit("a", "j1", at=1).lease("w1", [("j1", "a", 1)], at=2)
                .ack("w1", "j1", 1, at=3, outcome=None)
                .event("dead", at=9, jobs=dead).event("drained", at=10, complete=True)
                .event("final_states", at=11, jobs={"j1": "gone"}))

    assert history([]).check().valid
    assert history([]).check().counts["completed"] == 1
    assert history(["j1"]).check().counts["completed"] == 0


def test_different_digests_after_the_heal_and_liveness_events_are_violations():
    h = (healthy().event("converged", at=12, digests={"n1": "d", "n2": "e"}, equal=False)
         .event("liveness", at=13, message="no leader 60 s after healing kill-all"))
    result = h.check()
    assert len(result.violations_of("digest_mismatch")) == 1
    assert "kill-all" in result.violations_of("liveness")[0].message


def test_an_op_without_completion_counts_as_unknown():
    h = History().submit("a", at=1, outcome=None)
    result = h.check()
    assert result.counts["unknown"] == 1 and result.valid


def test_time_to_new_leader_failover_step_down_and_availability_per_fault():
    h = (History()
         .event("status", at=0.5, node="n1", role="leader", term=2, leader="n1", serving=True)
         .event("nemesis", at=10, phase="start", fault="isolate-leader", instance=1, deposes_leader=True,
                expects_step_down=True, leader="n1", term=2)
         .submit("a", "j1", at=10.2)  # took 0.1 s: answered at 10.3
         .event("status", at=11.0, node="n1", role="follower", term=3, leader=None, serving=False)
         .event("status", at=11.5, node="n2", role="leader", term=3, leader="n2", serving=True)
         .submit("b", at=12, outcome="info")
         .event("nemesis", at=16, phase="stop", fault="isolate-leader", instance=1))
    stats = h.check().stats
    assert stats["elections"] == 1
    assert stats["to_leader_s"] == {"n": 1, "p50": 1.5, "p99": 1.5}
    assert stats["step_down_s"]["p50"] == 1.0
    assert stats["failover_s"]["p50"] == pytest.approx(0.3)
    row = stats["faults"]["isolate-leader"]
    assert row["runs"] == 1 and row["submits"] == 2 and row["availability_pct"] == 50.0 and row["elections"] == 1
    assert row["goodput_pct"] == pytest.approx(100 * 1 / (10 * 6), abs=0.1)


def test_failover_counts_from_when_the_fault_let_a_leader_be_elected_again():
    # nats-7567 keeps the majority paused for its first steps: no election is possible until then.
    h = (History()
         .event("status", at=0.5, node="n1", role="leader", term=2, leader="n1", serving=True)
         .event("nemesis", at=10, phase="start", fault="nats-7567", instance=1, deposes_leader=False, term=2)
         .event("nemesis", at=10.01, phase="detail", fault="nats-7567", instance=1,
                detail={"stopped": "n1", "leader": "n1", "deposes_leader": True, "leader_possible_t": 13.0})
         .submit("a", at=10.5, took=4.0)  # waited out the outage: answered at 14.5
         .event("status", at=14.2, node="n2", role="leader", term=3, leader="n2", serving=True)
         .event("nemesis", at=16, phase="stop", fault="nats-7567", instance=1))
    row = h.check().stats["faults"]["nats-7567"]
    assert row["to_leader_p99_s"] == pytest.approx(1.2) and row["failover_p99_s"] == pytest.approx(1.5)


def test_load_peaks_take_the_leader_s_pending_and_rss_and_any_node_s_send_queue_per_fault():
    h = (History()
         .event("load", at=1, node="n1", role="leader", pending=7, send_queue=3, rss_bytes=100 * 2**20)
         .event("load", at=1, node="n2", role="follower", pending=0, send_queue=9, rss_bytes=300 * 2**20)
         .event("nemesis", at=10, phase="start", fault="kill-follower", instance=1)
         .event("load", at=11, node="n1", role="leader", pending=40, send_queue=500, rss_bytes=120 * 2**20)
         .event("nemesis", at=16, phase="stop", fault="kill-follower", instance=1))
    load = h.check().stats["load"]
    assert load["run"] == {"samples": 3, "pending_max": 40, "send_queue_max": 500, "leader_rss_mib_max": 120.0}
    assert load["faults"]["kill-follower"]["samples"] == 1


@pytest.mark.parametrize("values, q, expected", [([], 50, None), ([3.0], 99, 3.0), ([1, 2, 3, 4], 50, 2),
                                                 ([1, 2, 3, 4], 99, 4), (list(range(1, 101)), 99, 99)])
def test_percentile_is_nearest_rank(values, q, expected):
    assert checker.percentile(values, q) == expected


def test_unknown_record_types_are_refused():
    with pytest.raises(ValueError, match="unknown record type"):
        checker.check([{"t": 0, "proc": "x", "op": "submit", "type": "bogus"}])


def test_a_fault_that_deposed_the_leader_only_this_time_says_so_in_its_detail():
    h = (History()
         .event("status", at=0.5, node="n1", role="leader", term=2, leader="n1", serving=True)
         .event("nemesis", at=10, phase="start", fault="halves", instance=1, deposes_leader=False, term=2)
         .event("nemesis", at=10.01, phase="detail", fault="halves", instance=1,
                detail={"minority": ["n1"], "leader": "n1", "deposes_leader": True, "expects_step_down": True})
         .event("status", at=11.2, node="n1", role="follower", term=2, leader=None, serving=False)
         .event("status", at=12.0, node="n3", role="leader", term=3, leader="n3", serving=True)
         .event("nemesis", at=16, phase="stop", fault="halves", instance=1))
    stats = h.check().stats
    assert stats["to_leader_s"]["p50"] == 2.0 and stats["step_down_s"]["p50"] == pytest.approx(1.2)


# ---------------------------------------------------------------------------- timing (guarantee 9)


def delayed(lease_at: float) -> History:
    """A job submitted at t=1 with delay_s=2 (the submit answered at 1.1), first leased at lease_at."""
    return (History().submit("a", "j1", at=1, delay_s=2.0)
            .lease("w1", [("j1", "a", 1)], at=lease_at).ack("w1", "j1", 1, at=lease_at + 0.5))


def test_a_delayed_job_leased_within_its_window_is_valid():
    # The lease op ends at 3.0: exactly the delay after the submit was sent; late side well inside.
    assert delayed(2.9).check().valid
    assert delayed(3.1 + checker.TIMING_BOUND_S - 1).check().valid


def test_a_delayed_job_leased_before_its_delay_is_a_violation():
    result = delayed(2.5).check()  # lease answered at 2.6 < 1 + 2
    assert [v.job for v in result.violations_of("delay_early")] == ["j1"], result.violations


def test_a_delayed_job_leased_far_after_its_delay_is_a_violation():
    result = delayed(3.1 + checker.TIMING_BOUND_S + 1).check()
    assert [v.job for v in result.violations_of("delay_late")] == ["j1"], result.violations


def dropped(again_at: float) -> History:
    """A timed job (delay_s=0.5, so in the timing sample): lease 1 of j1 asked for at t=2 and dropped by its worker; lease 2 handed out at again_at."""
    return (History().submit("a", "j1", at=1, delay_s=0.5)
            .lease("w1", [("j1", "a", 1)], at=2).event("drop", at=2.5, job="j1", lease=1)
            .lease("w2", [("j1", "a", 2)], at=again_at).ack("w2", "j1", 2, at=again_at + 0.5))


def test_a_dropped_lease_handed_out_again_after_it_ran_out_is_valid():
    assert dropped(2 + LEASE_S).check().valid  # answered 0.1 s after it could first run out
    assert dropped(2.1 + LEASE_S + 2 + checker.TIMING_BOUND_S - 1).check().valid  # within backoff + bound


def test_a_dropped_lease_handed_out_again_before_it_could_run_out_is_a_violation():
    result = dropped(2 + LEASE_S - 1).check()
    assert [v.job for v in result.violations_of("lease_early")] == ["j1"], result.violations


def test_early_requeue_during_a_fault_is_not_judged():
    """The leader rightly requeues a lost worker's jobs before their leases run out (WorkerLost)."""
    history = dropped(2 + LEASE_S - 1)
    history.event("nemesis", at=1.5, phase="start", fault="worker-kill", instance=1)
    history.event("nemesis", at=9, phase="stop", fault="worker-kill", instance=1)
    assert not history.check().violations_of("lease_early")


def test_a_dropped_lease_handed_out_again_far_too_late_is_a_violation():
    result = dropped(2.1 + LEASE_S + 2 + checker.TIMING_BOUND_S + 1).check()
    assert [v.job for v in result.violations_of("lease_late")] == ["j1"], result.violations


# ---------------------------------------------------------------------------- damage at rest


@pytest.mark.parametrize("fields, kinds", [
    ({"kind": "wal-middle", "refused": True, "named": True, "must_refuse": True}, []),
    ({"kind": "snapshot", "refused": False, "named": False, "must_refuse": False}, []),
    ({"kind": "snapshot", "refused": True, "named": False, "must_refuse": False}, ["damage_unnamed"]),
    ({"kind": "hard-state", "refused": False, "named": False, "must_refuse": True}, ["damage_ignored"]),
])
def test_damage_at_rest_is_judged_by_the_refusal_and_its_message(fields, kinds):
    history = healthy().event("damage", at=6, node="n2", file="/d/n2/wal/hardstate", **fields)
    result = history.check()
    assert [v.kind for v in result.violations] == kinds, result.violations


def test_lease_late_is_judged_on_the_delayed_sample_only():
    """Other jobs may wait behind a backlog of ready work; the delayed ones run at the top priority."""
    late = 2.1 + LEASE_S + 2 + checker.TIMING_BOUND_S + 1
    plain = (History().submit("a", "j1", at=1)
             .lease("w1", [("j1", "a", 1)], at=2).event("drop", at=2.5, job="j1", lease=1)
             .lease("w2", [("j1", "a", 2)], at=late).ack("w2", "j1", 2, at=late + 0.5))
    assert not plain.check().violations_of("lease_late")


def test_a_delayed_job_may_come_late_after_a_lease_whose_answer_was_lost():
    """That lease may have taken it; the job comes out once that lease ran out and its backoff passed."""
    late = 3.1 + checker.TIMING_BOUND_S + 1
    history = (History().submit("a", "j1", at=1, delay_s=2.0)
               .lease("w9", [], at=late - LEASE_S - 2.5, outcome="info")
               .lease("w1", [("j1", "a", 1)], at=late).ack("w1", "j1", 1, at=late + 0.5))
    assert not history.check().violations_of("delay_late")
    assert [v.kind for v in delayed(late).check().violations] == ["delay_late"]


@pytest.mark.parametrize("fields, kinds", [
    ({"stopped": True, "named": True, "exit_code": 1}, []),
    ({"stopped": True, "named": False, "exit_code": 1}, ["disk_full_unnamed"]),
    ({"stopped": False, "named": False, "exit_code": None}, ["disk_full_ignored"]),
])
def test_a_node_on_a_full_disk_must_stop_and_say_why(fields, kinds):
    result = healthy().event("disk_full", at=5, node="n1", **fields).check()
    assert [v.kind for v in result.violations] == kinds


# ---------------------------------------------------------------------------- goodput (open loop)


def open_loop() -> History:
    """A history from open-loop producers: the meta event names the in-flight bound."""
    h = History()
    h.records[0]["inflight_max"] = 2
    return h


def test_goodput_counts_every_job_due_on_the_schedule_including_those_never_sent():
    # Offered during the fault [10, 16): 4 submits due in it (one answered 4xx, one never answered)
    # and 2 jobs kept back by the in-flight bound: 6. Acknowledged during it: 2 (one of them due
    # before the fault). The one due at 15.8 is answered after the fault: it does not count here.
    h = (open_loop()
         .submit("a", "j1", at=9.9, due=9.9, took=0.3)
         .event("nemesis", at=10, phase="start", fault="latency", instance=1)
         .submit("b", "j2", at=11, due=11, took=0.5)
         .submit("c", at=12, due=12, outcome="fail")
         .submit("d", at=13, due=13, outcome=None)
         .event("unsent", at=14, scheduled_t=14, jobs=2)
         .submit("e", "j5", at=15.8, due=15.8, took=0.5)
         .event("nemesis", at=16, phase="stop", fault="latency", instance=1))
    stats = h.check().stats
    row = stats["faults"]["latency"]
    assert (row["offered"], row["unsent"], row["goodput_pct"]) == (6, 2, pytest.approx(100 * 2 / 6, abs=0.1))
    overall = stats["goodput"]
    assert overall["open_loop"] is True
    assert (overall["offered"], overall["acked"], overall["unsent"]) == (7, 3, 2)
    assert overall["pct"] == pytest.approx(100 * 3 / 7, abs=0.1)


def test_submit_latency_counts_from_the_scheduled_start_not_from_the_send():
    # Due at 1.0 but sent at 1.4 (its producer was busy): 0.1 s on the wire is 0.5 s of latency.
    h = open_loop().submit("a", "j1", at=1.4, due=1.0, took=0.1).submit("b", "j2", at=2.0, due=2.0, took=0.2)
    latency = h.check().stats["goodput"]["latency_s"]
    assert latency["n"] == 2
    assert latency["p50"] == pytest.approx(0.2) and latency["p99"] == pytest.approx(0.5)


def test_goodput_of_a_closed_loop_history_is_against_the_nominal_rate():
    # No in-flight bound in the meta event: what was sent is not what was offered; 10 jobs/s was.
    h = History().submit("a", "j1", at=1).submit("b", "j2", at=2).submit("c", "j3", at=3)
    overall = h.check().stats["goodput"]
    assert overall["open_loop"] is False
    assert (overall["offered"], overall["acked"]) == (20, 3)


def test_goodput_arithmetic():
    assert checker.goodput_pct(8, 10) == 80.0
    assert checker.goodput_pct(0, 10) == 0.0
    assert checker.goodput_pct(3, 0) is None
    counter = checker._Counter([(1.0, 1), (2.0, 50), (2.0, 1), (3.0, 1)])
    assert counter.count() == 53
    assert counter.count(2.0, 3.0) == 51  # [low, high)
    assert counter.count(3.5) == 0


def test_overlapping_submits_of_one_producer_are_each_checked_for_loss():
    # Open loop: one producer's submits overlap; each acknowledged one must still come out.
    h = (open_loop()
         .submit("a", "j1", at=1.0, due=1.0, took=2.0)
         .submit("b", "j2", at=1.2, due=1.2, took=0.1)
         .lease("w1", [("j2", "b", 1)], at=4)
         .ack("w1", "j2", 1, at=5))
    result = h.check()
    assert [v.job for v in result.violations_of("lost")] == ["j1"]
