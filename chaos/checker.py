"""The checker: Jepsen's total-queue count plus raftq's lease and ack guarantees, over a history.

Pure: it reads records (see `chaos.history`) and returns a `CheckResult`; no I/O, no clock.

Counted (REPLICATION.md §2.2 and §5.1):
    attempted   submits invoked (their values)
    acked       submits answered 2xx (SPEC guarantee 1: durable)
    failed      submits answered 4xx (definitely not applied)
    unknown     submits with no usable answer (transport failure, 5xx, or never completed)
    delivered   values that came out of a lease at least once
    recovered   unknown submits whose value came out anyway
    retries     redeliveries after the previous holder FAILed the job on purpose (the workload's)
    duplicates  every other redelivery: the at-least-once cost (a lease that ran out, a worker
                lost, an ack refused or unanswered); reported as a count and % of acked, not a violation

Violations (each names the job and the history lines that show it):
    lost                      acked, never delivered (must be 0)
    unexpected                delivered, never submitted (must be 0)
    double_submit             one submitted value came out under two job ids (guarantee 5)
    failed_submit_delivered   a submit answered 4xx came out anyway
    delivered_after_ack       a lease handed out a job after a 2xx ack of it completed (guarantee 3)
    stale_lease_ack           a 2xx ack on a lease that another lease of the job had replaced
                              before the ack was sent, or sent after the lease had expired
                              (guarantee 3). A new leader renews every live lease to now +
                              lease_s (RenewLeases), so the expiry used is the latest of: the
                              expiry the lease answer gave, and for each leader the monitor saw
                              take office between the lease and the ack (+ a tolerance for the
                              monitor's lag), the time it was seen + lease_s: a bound that can
                              only forgive, never accuse, a legitimate ack.
    not_completed             acked, yet never completed (2xx ack) nor dead-lettered by the end of
                              the final drain (checked only when the history has a `drained` event).
                              An ack whose answer never came (its worker killed or cut off mid-call)
                              may have been applied: the drain then asks the cluster for that job's
                              state (a `final_states` event), and `done` counts as completed, since
                              only an ack makes a job done; so does `gone` (the record's retention
                              ended, which only a finished job's does) unless the job is dead.
    delay_early               a job submitted with delay_s was leased before delay_s had passed
                              since its submit was sent (SPEC guarantee 9: a clock ran ahead)
    delay_late                ... first leased more than timing_bound_s after its delay ran out
                              (a clock that froze; the bound covers the faults' own outages), or
                              after a lease whose answer may have been lost (unanswered, or sent
                              during a fault, where the client's retry hides a first attempt that
                              committed) ran out
    lease_early               a lease its worker let run out was handed out again before it could
                              have run out (lease_s after the lease was asked for); judged in quiet
                              stretches only (no fault, no leader change, not the final drain),
                              since a worker whose heartbeats stop is rightly requeued earlier
    lease_late                ... handed out again more than timing_bound_s after it ran out,
                              counting lease renewals at leader changes and the requeue backoff
                              (judged on the delayed jobs only: they run at the top priority, so
                              no backlog of ready jobs stands in front of them)
    damage_unnamed            a node refused to start on files the disk nemesis damaged, without
                              naming the damaged file (SPEC guarantee 7)
    damage_ignored            a node started on damaged durable data (a bit flipped mid-WAL or in
                              the hard state) instead of refusing
    disk_full_ignored         a node whose data filesystem the nemesis filled was still running when
                              the fault ended (it must fail-stop: no more votes or heartbeats)
    disk_full_unnamed         ... it stopped without the ERROR line naming the file and ENOSPC
    digest_mismatch           the nodes' state digests differed after the final heal
    liveness                  the harness saw the cluster fail to recover (no leader after a heal,
                              drain never finished): recorded by the runner as `liveness` events

Timings from the nemesis and monitor events: elections, time to a new leader after each fault
that deposes the leader, the old leader's step-down time, client failover (fault start -> a
producer's first 2xx submit sent after it), and availability (% of submits sent during a fault
answered 2xx) per fault kind. Goodput (`Goodput`): jobs acknowledged over jobs offered, overall
and during each fault kind's windows, where offered counts every job the producers' open-loop
schedules made due (sent or kept back by the in-flight bound), with the submit latency measured
from each request's scheduled start (wrk2's rule, so a stall is not hidden by the requests that
were never sent during it).
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from raftq.chaos.history import FAIL, INFO, OK, numbered
from raftq.chaos.load_metrics import INTERVAL_S as LOAD_INTERVAL_S

#: Seconds added to the window in which a leader change may have renewed a lease (monitor lag).
RENEW_TOLERANCE_S = 2.0
#: Seconds of slack on expiry comparisons (lease_expires_at is rounded to the millisecond).
EXPIRY_SLACK_S = 0.005
#: Seconds of slack on the early side of the timing check (history times are read before and after
#: each request, so the check is exact up to rounding).
TIMING_SLACK_S = 0.005
#: Seconds a delayed job or an expired lease may come late: faults hold a few seconds, a paused
#: leader 3 election timeouts, kill-all a restart; a frozen clock (issue 12) came an hour late.
TIMING_BOUND_S = 20.0
#: The requeue backoff's cap (SPEC: base 1 s, x2 per attempt, cap 300 s, full jitter).
BACKOFF_CAP_S = 300.0
#: Faults that take every node down at once; the failover targets leave them out.
WHOLE_CLUSTER_FAULTS = ("kill-all", "lose-unsynced-all")
#: Violations listed per kind in the human summary (the JSON report has them all).
SUMMARY_VIOLATIONS_MAX = 10


@dataclass
class Op:
    op_id: str
    op: str
    proc: str
    invoke: dict
    done: dict | None = None

    @property
    def type(self) -> str:
        return self.done["type"] if self.done is not None else INFO

    @property
    def start_t(self) -> float:
        return self.invoke["t"]

    @property
    def end_t(self) -> float:
        return self.done["t"] if self.done is not None else math.inf

    @property
    def start_wall(self) -> float:
        return self.invoke.get("wall", math.nan)

    @property
    def end_wall(self) -> float:
        return self.done.get("wall", math.inf) if self.done is not None else math.inf

    @property
    def lines(self) -> list[int]:
        return [r["line"] for r in (self.invoke, self.done) if r is not None]

    def field(self, name: str, default: Any = None) -> Any:
        if self.done is not None and name in self.done:
            return self.done[name]
        return self.invoke.get(name, default)


@dataclass
class Delivery:
    value: str | None
    job: str
    lease: int
    expires: float | None
    attempt: int | None
    op: Op


@dataclass
class Violation:
    kind: str
    message: str
    job: str | None = None
    value: str | None = None
    lines: list[int] = field(default_factory=list)


@dataclass
class CheckResult:
    valid: bool
    counts: dict[str, Any]
    violations: list[Violation]
    stats: dict[str, Any]

    def violations_of(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def to_json(self) -> dict:
        return {"valid": self.valid, "counts": self.counts, "stats": self.stats,
                "violations": [asdict(v) for v in self.violations]}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def pair_ops(records: list[dict]) -> tuple[list[Op], list[dict]]:
    """Ops (invoke + completion) in invoke order, and the event records."""
    ops: dict[str, Op] = {}
    events: list[dict] = []
    for record in records:
        kind = record["type"]
        if kind == "event":
            events.append(record)
        elif kind == "invoke":
            ops[record["op_id"]] = Op(record["op_id"], record["op"], record["proc"], record)
        elif kind in (OK, FAIL, INFO):
            op = ops.get(record["op_id"])
            if op is not None and op.done is None:
                op.done = record
        else:
            raise ValueError(f"history line {record.get('line')}: unknown record type {kind!r}")
    return list(ops.values()), events


def unanswered_acks(records: Iterable[dict]) -> set[str]:
    """Ids of jobs with an ack sent whose answer never came: they may or may not be done."""
    ops, _ = pair_ops(numbered(records))
    return _unanswered_ack_jobs(ops)


def _unanswered_ack_jobs(ops: list[Op]) -> set[str]:
    return {str(op.invoke["job"]) for op in ops if op.op == "ack" and (op.done is None or op.type == INFO)}


def check(records: Iterable[dict], *, lease_s: float | None = None,
          renew_tolerance_s: float = RENEW_TOLERANCE_S, timing_bound_s: float = TIMING_BOUND_S) -> CheckResult:
    """Checks a history; see the module docstring for what is counted and what is a violation.

    Args:
        records: history records in time order (`line` numbers are added where missing).
        lease_s: the jobs' lease length, for lease renewal on a leader change; default: the
            `meta` event's `lease_s`. Unknown: an ack whose window saw a leader change is not
            judged on expiry.
        renew_tolerance_s: how late after an ack the monitor may first see a leader that took
            office before it.
        timing_bound_s: how late a delayed job or an expired lease may come (see TIMING_BOUND_S).
    """
    records = numbered(records)
    ops, events = pair_ops(records)
    meta = next((e for e in events if e["op"] == "meta"), {})
    if lease_s is None:
        lease_s = meta.get("lease_s")
    violations: list[Violation] = []

    # ---------------------------------------------------------------- submits
    submits: dict[str, Op] = {}
    for op in ops:
        if op.op == "submit":
            submits.setdefault(op.invoke["value"], op)
    acked = {v: op for v, op in submits.items() if op.type == OK}
    failed = {v: op for v, op in submits.items() if op.type == FAIL}
    unknown = {v: op for v, op in submits.items() if op.type == INFO}

    # ---------------------------------------------------------------- deliveries, acks
    deliveries: list[Delivery] = []
    for op in ops:
        if op.op == "lease" and op.type == OK:
            for job in op.done.get("jobs", []):
                deliveries.append(Delivery(job.get("value"), str(job["id"]), int(job["lease"]), job.get("expires"),
                                           job.get("attempt"), op))
    deliveries.sort(key=lambda d: d.op.end_t)
    by_value: dict[str | None, list[Delivery]] = defaultdict(list)
    by_job: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        by_value[d.value].append(d)
        by_job[d.job].append(d)
    reports: dict[tuple[str, str, int], list[Op]] = defaultdict(list)  # (op, job, lease) -> ops
    acks_ok: list[Op] = []
    for op in ops:
        if op.op in ("ack", "nack"):
            reports[(op.op, str(op.invoke["job"]), int(op.invoke["lease"]))].append(op)
            if op.op == "ack" and op.type == OK:
                acks_ok.append(op)
    completed_jobs = {str(op.invoke["job"]) for op in acks_ok}
    final_states: dict[str, str] = {}
    for e in events:
        if e["op"] == "final_states":
            final_states.update(e.get("jobs", {}))
    # "gone": the cluster forgot the job, which it does only to finished jobs past their retention;
    # it counts as completed unless the drain's dead-letter listing names it (below: dead_jobs).
    gone_jobs = {job for job, state in final_states.items() if state == "gone"}
    completed_jobs |= {job for job in _unanswered_ack_jobs(ops) if final_states.get(job) == "done"}

    # ---------------------------------------------------------------- total-queue
    for value, op in acked.items():
        if value not in by_value:
            violations.append(Violation(
                "lost", f"job {op.done.get('job')} (value {value}) was acknowledged (submit 2xx, history line "
                        f"{op.done['line']}) and never delivered", job=op.done.get("job"), value=value, lines=op.lines))
    for d in deliveries:
        if d.value is None or d.value not in submits:
            violations.append(Violation(
                "unexpected", f"job {d.job} (value {d.value}) was delivered (history line {d.op.done['line']}) but "
                              f"never submitted", job=d.job, value=d.value, lines=d.op.lines))
    for value, op in failed.items():
        if value in by_value:
            d = by_value[value][0]
            violations.append(Violation(
                "failed_submit_delivered", f"value {value}: the submit was refused ({op.done.get('error')}, line "
                                           f"{op.done['line']}) yet job {d.job} came out at line {d.op.done['line']}",
                job=d.job, value=value, lines=op.lines + d.op.lines))
    for value, ds in by_value.items():
        if value is None:
            continue
        jobs = {d.job for d in ds}
        if value in acked and acked[value].done.get("job") is not None:
            jobs.add(str(acked[value].done["job"]))
        if len(jobs) > 1:
            lines = (submits[value].lines if value in submits else []) + [d.op.done["line"] for d in ds]
            violations.append(Violation(
                "double_submit", f"value {value} exists as {len(jobs)} jobs ({', '.join(sorted(jobs))}): one submit "
                                 f"made two jobs", job=sorted(jobs)[0], value=value, lines=sorted(set(lines))))

    # ---------------------------------------------------------------- ack finality and leases
    elections = _elections(events)
    election_walls = _SortedTimes(e["wall"] for e in elections)
    for ack in acks_ok:
        job, token = str(ack.invoke["job"]), int(ack.invoke["lease"])
        for d in by_job.get(job, []):
            if d.op.start_t > ack.end_t:
                violations.append(Violation(
                    "delivered_after_ack", f"job {job} was delivered again (lease {d.lease}, history line "
                                           f"{d.op.done['line']}) after its ack with lease {token} was answered 2xx "
                                           f"(line {ack.done['line']})",
                    job=job, value=d.value, lines=ack.lines + d.op.lines))
                break
        newer = [d for d in by_job.get(job, []) if d.lease > token and d.op.end_t < ack.start_t]
        if newer:
            d = newer[0]
            violations.append(Violation(
                "stale_lease_ack", f"job {job}: an ack with lease {token} was accepted (history line "
                                   f"{ack.done['line']}) "
                                   f"although lease {d.lease} of the same job had been handed out before it was sent "
                                   f"(line {d.op.done['line']})",
                job=job, value=d.value, lines=sorted(ack.lines + d.op.lines)))
            continue
        own = next((d for d in by_job.get(job, []) if d.lease == token), None)
        if own is None or own.expires is None:
            continue
        expires = float(own.expires)
        renewed = election_walls.between(own.op.start_wall, ack.end_wall + renew_tolerance_s)
        if renewed:
            if lease_s is None:
                continue
            expires = max(expires, renewed[-1] + float(lease_s))
        if ack.start_wall > expires + EXPIRY_SLACK_S:
            violations.append(Violation(
                "stale_lease_ack", f"job {job}: an ack with lease {token} was accepted (history line "
                                   f"{ack.done['line']}) "
                                   f"although it was sent {ack.start_wall - expires:.3f} s after that lease expired "
                                   f"(expiry {expires:.3f} from line {own.op.done['line']}"
                                   f"{', renewals by leader changes included' if renewed else ''})",
                job=job, value=own.value, lines=sorted(ack.lines + own.op.lines)))

    # ---------------------------------------------------------------- timing (SPEC guarantee 9)
    # Both sides are the harness's monotonic clock (one machine, so comparable across processes).
    # Early is judged exactly: the cluster's clock never runs faster than its leader's monotonic
    # clock, so a job leased before its delay (or a dropped lease redelivered before it ran out)
    # is a clock that ran ahead. Late gets timing_bound_s, which covers the faults' own outages:
    # it catches a clock that froze (before issue 12: an hour), not a latency target.
    # A lease's answer can be lost: the op ends unanswered, or, inside a fault, the client's own
    # retry on another node hides a first attempt that did commit (a lease is not idempotent).
    fault_spans = [(w["start_t"], w["stop_t"]) for w in _fault_windows(events)]
    unanswered_leases = sorted((o for o in ops if o.op == "lease" and (
        o.type == INFO or any(a <= o.end_t and b >= o.start_t for a, b in fault_spans))), key=lambda o: o.start_t)
    unanswered_starts = [o.start_t for o in unanswered_leases]

    def lost_answer_allowance(since_t: float, until_t: float, since_wall: float, until_wall: float) -> float:
        """A lease whose answer was lost may have taken the job meanwhile: then it came out only once
        that lease ran out (renewed at each leader change) and its requeue backoff passed. Returns the
        latest such time, or -inf."""
        latest = -math.inf
        first = bisect.bisect_left(unanswered_starts, since_t)
        last = bisect.bisect_right(unanswered_starts, until_t)
        for o in unanswered_leases[first:last]:
            renewals = len(election_walls.between(o.start_wall, until_wall))
            latest = max(latest, o.start_t + float(lease_s or 0) * (1 + renewals) + 2.0)
        return latest

    for value, op in acked.items():
        delay_s = op.invoke.get("delay_s")
        if not delay_s or value not in by_value:
            continue
        first = by_value[value][0]
        early_s = op.start_t + delay_s - first.op.end_t
        if early_s > TIMING_SLACK_S:
            violations.append(Violation(
                "delay_early", f"job {first.job} submitted with delay_s={delay_s:g} (line {op.invoke['line']}) was "
                               f"leased {early_s:.3f} s before its delay ran out (line {first.op.done['line']})",
                job=first.job, value=value, lines=op.lines + first.op.lines))
        due_t = max(op.end_t + delay_s,
                    lost_answer_allowance(op.start_t, first.op.start_t, op.start_wall, first.op.end_wall))
        late_s = first.op.end_t - due_t
        if late_s > timing_bound_s:
            violations.append(Violation(
                "delay_late", f"job {first.job} submitted with delay_s={delay_s:g} (line {op.invoke['line']}) was "
                              f"first leased {late_s:.1f} s after its delay ran out (line {first.op.done['line']}; "
                              f"bound {timing_bound_s:g} s)",
                job=first.job, value=value, lines=op.lines + first.op.lines))
    if lease_s is not None:
        windows = _fault_windows(events)
        for e in events:
            if e["op"] not in ("drop", "stall"):
                continue
            job, token = str(e["job"]), int(e["lease"])
            held = next((d for d in by_job.get(job, []) if d.lease == token), None)
            after = next((d for d in by_job.get(job, []) if d.lease > token), None)
            if held is None or after is None:
                continue  # not redelivered: the lost / not_completed checks judge it
            timed = held.value in acked and bool(acked[held.value].invoke.get("delay_s"))
            early_s = held.op.start_t + float(lease_s) - after.op.end_t
            # The leader requeues a worker's jobs early, rightly, once its heartbeats stop reaching it
            # (WorkerLost): a fault on its links or on the worker, a leader change (the new leader
            # gives each worker one heartbeat timeout), or the workers stopped before the drain.
            # Judged in quiet stretches only, where a healthy worker's heartbeats arrive.
            disturbed = (after.op.proc == "drain"
                         or any(w["start_t"] <= after.op.end_t and w["stop_t"] >= held.op.start_t for w in windows)
                         or bool(election_walls.between(held.op.start_wall, after.op.end_wall)))
            if early_s > TIMING_SLACK_S and not disturbed:
                violations.append(Violation(
                    "lease_early", f"job {job}: lease {token} (line {held.op.done['line']}) was let run out by its worker "
                                   f"and the job leased again {early_s:.3f} s before that lease could run out "
                                   f"(line {after.op.done['line']})", job=job, value=held.value,
                    lines=held.op.lines + after.op.lines))
            # Each leader change renews live leases by lease_s; a requeue waits its backoff.
            renewals = len(election_walls.between(held.op.start_wall, after.op.end_wall))
            backoff_s = min(BACKOFF_CAP_S, 2.0 ** (held.attempt or 1))
            due_t = max(held.op.end_t + float(lease_s) * (1 + renewals) + backoff_s,
                        lost_answer_allowance(held.op.end_t, after.op.start_t, held.op.end_wall, after.op.end_wall))
            late_s = after.op.end_t - due_t
            if timed and late_s > timing_bound_s:
                violations.append(Violation(
                    "lease_late", f"job {job}: lease {token} (line {held.op.done['line']}) was let run out by its worker "
                                  f"and the job was leased again only {late_s:.1f} s after it ran out and its backoff "
                                  f"passed (line {after.op.done['line']}; bound {timing_bound_s:g} s)", job=job,
                    value=held.value, lines=held.op.lines + after.op.lines))

    # ---------------------------------------------------------------- damage at rest (disk nemesis)
    for e in events:
        if e["op"] != "damage":
            continue
        if e.get("refused") and not e.get("named"):
            violations.append(Violation(
                "damage_unnamed", f"{e.get('node')} refused to start after {e.get('kind')} damage to {e.get('file')} "
                                  f"but its log does not name that file (line {e['line']})", lines=[e["line"]]))
        if e.get("must_refuse") and not e.get("refused"):
            violations.append(Violation(
                "damage_ignored", f"{e.get('node')} started although {e.get('kind')} damage to {e.get('file')} "
                                  f"hit durable data (line {e['line']})", lines=[e["line"]]))
    for e in events:
        if e["op"] != "disk_full":
            continue
        if not e.get("stopped"):
            violations.append(Violation(
                "disk_full_ignored", f"{e.get('node')} kept running with its data filesystem full (line {e['line']}): "
                                     "a node that cannot persist must stop", lines=[e["line"]]))
        elif not e.get("named"):
            violations.append(Violation(
                "disk_full_unnamed", f"{e.get('node')} stopped on a full disk without the ERROR line naming the file "
                                     f"and ENOSPC (line {e['line']})", lines=[e["line"]]))

    # ---------------------------------------------------------------- completion after the drain
    drained = next((e for e in events if e["op"] == "drained"), None)
    dead_jobs: set[str] = set()
    for e in events:
        if e["op"] == "dead":
            dead_jobs.update(str(j) for j in e.get("jobs", []))
    completed_jobs |= {job for job in _unanswered_ack_jobs(ops) & gone_jobs if job not in dead_jobs}
    if drained is not None:
        for value, op in acked.items():
            if value not in by_value:
                continue  # already lost
            jobs = {d.job for d in by_value[value]}
            if jobs & completed_jobs or jobs & dead_jobs:
                continue
            last = by_value[value][-1]
            violations.append(Violation(
                "not_completed", f"job {last.job} (value {value}) was acknowledged and delivered (last at line "
                                 f"{last.op.done['line']}) but neither completed nor dead-lettered by the end of the "
                                 f"drain (line {drained['line']})",
                job=last.job, value=value, lines=op.lines + [last.op.done["line"], drained["line"]]))

    # ---------------------------------------------------------------- convergence and liveness
    for e in events:
        if e["op"] == "converged" and not e.get("equal", False):
            violations.append(Violation("digest_mismatch", f"state digests differ after the final heal: "
                                                           f"{e.get('digests')} (line {e['line']})", lines=[e["line"]]))
        if e["op"] == "liveness":
            violations.append(Violation("liveness", f"{e.get('message')} (line {e['line']})", lines=[e["line"]]))

    # ---------------------------------------------------------------- redeliveries
    planned = _planned_losses(events, lease_s)
    causes: dict[str, int] = defaultdict(int)
    redeliveries = 0
    unplanned = 0
    for value, ds in by_value.items():
        for previous in ds[:-1]:
            redeliveries += 1
            cause = _fate(previous, reports, planned)
            causes[cause] += 1
            if cause not in ("retry",) and not cause.startswith("workload_"):
                unplanned += 1
    retries = causes.get("retry", 0)
    duplicates = redeliveries - retries
    delivered_values = {v for v in by_value if v is not None}

    counts = {
        "attempted": len(submits),
        "acked": len(acked),
        "failed": len(failed),
        "unknown": len(unknown),
        "deliveries": len(deliveries),
        "delivered": len(delivered_values),
        "completed": len({d.value for d in deliveries if d.job in completed_jobs}),
        "dead_lettered": len(dead_jobs),
        "recovered": len(delivered_values & set(unknown)),
        "lost": sum(1 for v in violations if v.kind == "lost"),
        "unexpected": sum(1 for v in violations if v.kind == "unexpected"),
        "redeliveries": redeliveries,
        "retries": retries,
        "duplicates": duplicates,
        "duplicates_pct": round(100.0 * duplicates / len(acked), 3) if acked else 0.0,
        "duplicates_unplanned": unplanned,
        "duplicates_unplanned_pct": round(100.0 * unplanned / len(acked), 3) if acked else 0.0,
        "violations": len(violations),
    }
    for kind in ("double_submit", "failed_submit_delivered", "delivered_after_ack", "stale_lease_ack",
                 "not_completed", "digest_mismatch", "liveness"):
        counts[kind] = sum(1 for v in violations if v.kind == kind)
    stats = {"duplicate_causes": {k: v for k, v in sorted(causes.items()) if k != "retry"}}
    stats.update(_timings(ops, events, elections, meta))
    return CheckResult(valid=not violations, counts=counts, violations=violations, stats=stats)


def _planned_losses(events: list[dict], lease_s: float | None) -> dict:
    """What the workload itself did to lose leases: stalls and drops by (job, lease), and the
    worker faults by worker id -> [(start t, stop t)]."""
    stalled = {(str(e["job"]), int(e["lease"])) for e in events if e["op"] == "stall"}
    dropped = {(str(e["job"]), int(e["lease"])) for e in events if e["op"] == "drop"}
    worker_faults: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for window in _fault_windows(events):
        for worker in (window.get("detail") or {}).get("workers", []):
            worker_faults[worker].append((window["start_t"], window["stop_t"]))
    return {"stalled": stalled, "dropped": dropped, "worker_faults": worker_faults, "lease_s": lease_s or 0.0}


def _fate(d: Delivery, reports: dict[tuple[str, str, int], list[Op]], planned: dict) -> str:
    """Why a delivery was followed by another one of the same value."""
    key = (d.job, d.lease)
    nacks = reports.get(("nack", *key), [])
    acks = reports.get(("ack", *key), [])
    if any(op.type == OK for op in nacks):
        return "retry"
    if any(op.type == OK for op in acks):
        return "after_ack"  # concurrent with the next lease (a later one is a violation, counted above)
    if key in planned["stalled"]:
        return "workload_stall"
    if key in planned["dropped"]:
        return "workload_drop"
    for start, stop in planned["worker_faults"].get(d.op.proc, []):
        if d.op.start_t <= stop and start <= d.op.end_t + planned["lease_s"]:
            return "workload_worker_fault"
    if any(op.type == FAIL for op in acks):
        return "ack_refused"
    if acks or nacks:
        return "report_unknown"
    return "lease_ran_out"  # never reported: a lost lease answer, or a worker that stopped


class _SortedTimes:
    """Times kept sorted, for "which of them fall in [a, b]" in log time (histories of a million jobs)."""

    def __init__(self, times: Iterable[float]) -> None:
        self._times = sorted(t for t in times if not math.isnan(t))

    def between(self, low: float, high: float) -> list[float]:
        return self._times[bisect.bisect_left(self._times, low):bisect.bisect_right(self._times, high)]


def _elections(events: list[dict]) -> list[dict]:
    """The first observation of each term's leader, in time order: {term, node, t, wall, line}."""
    seen: dict[int, dict] = {}
    for e in events:
        if e["op"] == "status" and e.get("role") == "leader" and e.get("term") is not None:
            term = int(e["term"])
            if term not in seen:
                seen[term] = {"term": term, "node": e.get("node"), "t": e["t"], "wall": e.get("wall", math.nan),
                              "line": e["line"]}
    return sorted(seen.values(), key=lambda e: e["t"])


class _Counter:
    """Weighted times, sorted, for "how many fall in [low, high)" (histories of a million jobs)."""

    def __init__(self, items: Iterable[tuple[float, int]]) -> None:
        pairs = sorted(items)
        self._times = [t for t, _ in pairs]
        self._sums = [0]
        for _, weight in pairs:
            self._sums.append(self._sums[-1] + weight)

    def count(self, low: float = -math.inf, high: float = math.inf) -> int:
        return self._sums[bisect.bisect_left(self._times, high)] - self._sums[bisect.bisect_left(self._times, low)]


def scheduled_t(op: Op) -> float:
    """When a submit was due on its producer's open-loop schedule (when it was sent, in a history
    from closed-loop producers, which recorded no schedule)."""
    return op.invoke.get("scheduled_t", op.start_t)


def goodput_pct(acked: int, offered: float) -> float | None:
    """Acknowledged jobs as a percentage of offered jobs (over the same stretch of time, so this is
    also acknowledged per second over offered per second); None when nothing was offered."""
    return round(100.0 * acked / offered, 1) if offered > 0 else None


class Goodput:
    """Offered and acknowledged jobs over any stretch of the run.

    Offered: every job the producers' schedules made due, at its due time: those sent (each submit
    op) and those the in-flight bound kept back (`unsent` events). A history from closed-loop
    producers (no `inflight_max` in its meta event) records only what was sent, which falls when the
    cluster slows down; its offered load is the nominal rate times the stretch's length.
    Acknowledged: submits answered 2xx, at the time the answer came.
    """

    def __init__(self, submits: list[Op], events: list[dict], meta: dict) -> None:
        self.open_loop = meta.get("inflight_max") is not None
        self.rate = float(meta.get("rate") or 0.0)
        self.acked = _Counter((op.end_t, 1) for op in submits if op.type == OK)
        unsent = [(float(e["scheduled_t"]), int(e.get("jobs", 1))) for e in events if e["op"] == "unsent"]
        self.unsent = _Counter(unsent)
        self.offered_jobs = _Counter([(scheduled_t(op), 1) for op in submits] + unsent)
        starts = [scheduled_t(op) for op in submits] + [t for t, _ in unsent]
        self.span = (min(starts), max(starts)) if starts else (0.0, 0.0)

    def offered(self, low: float, high: float) -> float:
        if self.open_loop:
            return self.offered_jobs.count(low, high)
        return self.rate * (high - low)

    def overall(self) -> dict:
        """The whole run: every job acknowledged (whenever) over every job offered."""
        acked = self.acked.count()
        offered = self.offered_jobs.count() if self.open_loop else self.rate * (self.span[1] - self.span[0])
        return {"offered": round(offered), "acked": acked, "unsent": self.unsent.count(),
                "pct": goodput_pct(acked, offered)}


def _latencies(submits: list[Op]) -> dict:
    """p50/p90/p99 seconds from each 2xx submit's due time to its answer (wrk2's measure: a submit
    that waited for the one before it, or for a free slot, counts the wait)."""
    values = [op.end_t - scheduled_t(op) for op in submits if op.type == OK]
    return {"n": len(values), **{f"p{q}": _round(percentile(values, q)) for q in (50, 90, 99)}}


def _timings(ops: list[Op], events: list[dict], elections: list[dict], meta: dict) -> dict:
    faults = _fault_windows(events)
    submits = sorted((op for op in ops if op.op == "submit"), key=lambda op: op.start_t)
    goodput = Goodput(submits, events, meta)
    by_due = sorted(submits, key=scheduled_t)
    due_times = [scheduled_t(op) for op in by_due]
    submit_starts = [op.start_t for op in submits]
    ok_by_proc: dict[str, list[Op]] = defaultdict(list)  # each producer's 2xx submits by start time
    for op in submits:
        if op.type == OK:
            ok_by_proc[op.proc].append(op)
    ok_starts = {proc: [op.start_t for op in proc_ops] for proc, proc_ops in ok_by_proc.items()}
    per_kind: dict[str, dict] = {}
    to_leader: list[float] = []
    failovers: list[float] = []
    step_downs: list[float] = []
    for i, window in enumerate(faults):
        start, stop = window["start_t"], window["stop_t"]
        until = faults[i + 1]["start_t"] if i + 1 < len(faults) else math.inf
        kind = per_kind.setdefault(window["fault"], {"runs": 0, "submits": 0, "submits_ok": 0, "elections": 0,
                                                     "to_leader_s": [], "failover_s": [], "step_down_s": [],
                                                     "offered": 0.0, "completed_ok": 0, "unsent": 0,
                                                     "latency": []})
        kind["runs"] += 1
        if stop < math.inf:
            kind["offered"] += goodput.offered(start, stop)
            kind["completed_ok"] += goodput.acked.count(start, stop)
            kind["unsent"] += goodput.unsent.count(start, stop)
            kind["latency"].extend(by_due[bisect.bisect_left(due_times, start):bisect.bisect_left(due_times, stop)])
        during = submits[bisect.bisect_left(submit_starts, start):bisect.bisect_left(submit_starts, stop)]
        kind["submits"] += len(during)
        kind["submits_ok"] += sum(1 for op in during if op.type == OK)
        kind["elections"] += sum(1 for e in elections if start <= e["t"] < until)
        detail = window.get("detail") or {}
        if window.get("deposes_leader") or detail.get("deposes_leader"):
            # A fault whose steps keep a majority down for a while (nats-7567) says when a leader
            # became possible again (`leader_possible_t`); time to a new leader and client failover
            # count from then, the time the fault itself forbids an election is not failover time.
            since = max(start, detail.get("leader_possible_t") or start)
            term = window.get("term")
            if term is None:
                earlier = [e["term"] for e in elections if e["t"] < start]
                term = max(earlier) if earlier else 0
            new = next((e for e in elections if e["t"] >= start and e["term"] > term and e["t"] < until), None)
            if new is not None:
                kind["to_leader_s"].append(max(0.0, new["t"] - since))
                to_leader.append(max(0.0, new["t"] - since))
            for proc, proc_ops in ok_by_proc.items():
                j = bisect.bisect_left(ok_starts[proc], start)
                # The earliest 2xx answer, not the first sent: an open-loop producer has several
                # submits in flight, and one stuck on the old leader may be answered after later ones.
                first = min((op for op in proc_ops[j:j + 10_000] if op.end_t >= since), key=lambda op: op.end_t,
                            default=None)
                if first is not None and first.end_t < until:
                    kind["failover_s"].append(first.end_t - since)
                    failovers.append(first.end_t - since)
        old = window.get("leader") or detail.get("leader")
        if (window.get("expects_step_down") or detail.get("expects_step_down")) and old:
            down = next((e for e in events if e["op"] == "status" and e.get("node") == old and start <= e["t"] < until
                         and e.get("role") != "leader"), None)
            if down is not None:
                kind["step_down_s"].append(down["t"] - start)
                step_downs.append(down["t"] - start)
    span_starts = [w["start_t"] for w in faults]  # windows are sorted and do not overlap

    def in_fault(t: float) -> bool:
        i = bisect.bisect_right(span_starts, t) - 1
        return i >= 0 and t < faults[i]["stop_t"]

    healthy = [op for op in submits if not in_fault(op.start_t)]
    table = {}
    for name, kind in sorted(per_kind.items()):
        table[name] = {
            "runs": kind["runs"],
            "submits": kind["submits"],
            "availability_pct": round(100.0 * kind["submits_ok"] / kind["submits"], 1) if kind["submits"] else None,
            "goodput_pct": goodput_pct(kind["completed_ok"], kind["offered"]),
            "offered": round(kind["offered"]),
            "unsent": kind["unsent"],
            "latency_s": _latencies(kind["latency"]),
            "elections": kind["elections"],
            "to_leader_n": len(kind["to_leader_s"]),
            "to_leader_p50_s": _round(percentile(kind["to_leader_s"], 50)),
            "to_leader_p99_s": _round(percentile(kind["to_leader_s"], 99)),
            "failover_p50_s": _round(percentile(kind["failover_s"], 50)),
            "failover_p99_s": _round(percentile(kind["failover_s"], 99)),
            "step_down_p50_s": _round(percentile(kind["step_down_s"], 50)),
        }
    # The targets leave out the faults that take every node down at once (nothing can
    # lead until processes restart): kill-all and lose-unsynced-all.
    but_all = [name for name in per_kind if name not in WHOLE_CLUSTER_FAULTS]
    to_leader_but_all = [x for name in but_all for x in per_kind[name]["to_leader_s"]]
    failover_but_all = [x for name in but_all for x in per_kind[name]["failover_s"]]
    healthy_ok = sum(1 for op in healthy if op.type == OK)
    return {
        "elections": max(0, len(elections) - 1),
        "to_leader_s": {"n": len(to_leader), "p50": _round(percentile(to_leader, 50)),
                        "p99": _round(percentile(to_leader, 99))},
        "failover_s": {"n": len(failovers), "p50": _round(percentile(failovers, 50)),
                       "p99": _round(percentile(failovers, 99))},
        "to_leader_but_all_s": {"n": len(to_leader_but_all), "p50": _round(percentile(to_leader_but_all, 50)),
                                "p99": _round(percentile(to_leader_but_all, 99))},
        "failover_but_all_s": {"n": len(failover_but_all), "p50": _round(percentile(failover_but_all, 50)),
                               "p99": _round(percentile(failover_but_all, 99))},
        "step_down_s": {"n": len(step_downs), "p50": _round(percentile(step_downs, 50)),
                        "p99": _round(percentile(step_downs, 99))},
        "goodput": {**goodput.overall(), "open_loop": goodput.open_loop, "latency_s": _latencies(submits)},
        "healthy": {"submits": len(healthy),
                    "availability_pct": round(100.0 * healthy_ok / len(healthy), 1) if healthy else None},
        "faults": table,
        "load": load_peaks(events, faults),
    }


def load_peaks(events: list[dict], faults: list[dict] | None = None) -> dict:
    """Peaks of the `load` samples (chaos.load_metrics): the leader's pending proposals and RSS, the
    deepest peer send queue of any node; overall and per fault kind (samples inside its windows)."""
    samples = [e for e in events if e["op"] == "load"]
    if faults is None:
        faults = _fault_windows(events)

    def peaks(chosen: list[dict]) -> dict:
        leader = [e for e in chosen if e.get("role") == "leader"]
        return {"samples": len(chosen),
                "pending_max": max((int(e.get("pending") or 0) for e in leader), default=None),
                "send_queue_max": max((int(e.get("send_queue") or 0) for e in chosen), default=None),
                "leader_rss_mib_max": max((round(e["rss_bytes"] / 2**20, 1) for e in leader if e.get("rss_bytes")),
                                          default=None)}

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for w in faults:
        by_kind[w["fault"]].extend(e for e in samples if w["start_t"] <= e["t"] < w["stop_t"])
    return {"run": peaks(samples), "faults": {name: peaks(chosen) for name, chosen in sorted(by_kind.items())}}


def _fault_windows(events: list[dict]) -> list[dict]:
    """Nemesis windows from start to stop, with the detail of what the fault touched."""
    starts: dict[Any, dict] = {}
    windows = []
    for e in events:
        if e["op"] != "nemesis":
            continue
        instance = e.get("instance")
        if e.get("phase") == "start":
            starts[instance] = {**e, "detail": e.get("detail")}
        elif e.get("phase") == "detail" and instance in starts:
            starts[instance]["detail"] = e.get("detail")
        elif e.get("phase") == "stop" and instance in starts:
            s = starts.pop(instance)
            windows.append({**s, "start_t": s["t"], "stop_t": e["t"]})
    for s in starts.values():  # never healed (the run stopped): open until the end
        windows.append({**s, "start_t": s["t"], "stop_t": math.inf})
    return sorted(windows, key=lambda w: w["start_t"])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------------------- the human summary


def summarize(result: CheckResult, *, header: list[str] | None = None) -> str:
    """A short human summary; the last line is `lost=N unexpected=N duplicates=N`."""
    c, s = result.counts, result.stats
    lines = list(header or [])
    lines.append(f"submits: attempted={c['attempted']} acknowledged={c['acked']} failed={c['failed']} "
                 f"unknown={c['unknown']} recovered={c['recovered']}")
    lines.append(f"deliveries: {c['deliveries']} of {c['delivered']} values; completed={c['completed']} "
                 f"dead_lettered={c['dead_lettered']} retries={c['retries']} duplicates={c['duplicates']} "
                 f"({c['duplicates_pct']}% of acknowledged; not caused by the workload's own stalls, drops and "
                 f"worker faults: {c['duplicates_unplanned']} = {c['duplicates_unplanned_pct']}%)")
    lines.append(f"duplicate causes: {s.get('duplicate_causes')}")
    t = s
    lines.append(f"elections={t['elections']} time_to_new_leader p50={_fmt(t['to_leader_s']['p50'])} "
                 f"p99={_fmt(t['to_leader_s']['p99'])} (n={t['to_leader_s']['n']}); client_failover "
                 f"p50={_fmt(t['failover_s']['p50'])} p99={_fmt(t['failover_s']['p99'])} (n={t['failover_s']['n']}); "
                 f"step_down p50={_fmt(t['step_down_s']['p50'])} p99={_fmt(t['step_down_s']['p99'])}")
    but_all_leader, but_all_failover = t["to_leader_but_all_s"], t["failover_but_all_s"]
    lines.append(f"every fault kind but {' and '.join(WHOLE_CLUSTER_FAULTS)}: time_to_new_leader "
                 f"p50={_fmt(but_all_leader['p50'])} p99={_fmt(but_all_leader['p99'])} (n={but_all_leader['n']}); "
                 f"client_failover p50={_fmt(but_all_failover['p50'])} p99={_fmt(but_all_failover['p99'])} "
                 f"(n={but_all_failover['n']})")
    g = t["goodput"]
    lat = g["latency_s"]
    how = ("open loop: every job due on the producers' schedules, sent or not" if g["open_loop"]
           else "closed-loop producers: the nominal rate")
    lines.append(f"goodput overall: {_pct(g['pct'])} ({g['acked']} jobs acknowledged of {g['offered']} offered; "
                 f"{how}; {g['unsent']} not sent, the in-flight bound reached); submit latency from the scheduled "
                 f"start p50={_fmt(lat['p50'])} p90={_fmt(lat['p90'])} p99={_fmt(lat['p99'])} s")
    healthy = t["healthy"]
    lines.append(f"availability outside faults: {_pct(healthy['availability_pct'])} of {healthy['submits']} submits")
    load = t["load"]["run"]
    if load["samples"]:
        lines.append(f"load peaks (/metrics every {LOAD_INTERVAL_S:g} s, {load['samples']} samples): leader pending "
                     f"proposals {load['pending_max']}, peer send queue {load['send_queue_max']} messages, leader "
                     f"RSS {load['leader_rss_mib_max']} MiB")
    if t["faults"]:
        lines.append("per fault kind: avail = % of submits sent during the fault answered 2xx; goodput = jobs "
                     "acknowledged during it / jobs offered during it; unsent = jobs not sent (in-flight bound); "
                     "latency = p50/p99 seconds from a 2xx submit's scheduled start to its answer, for those due "
                     "during it; leader/failover/stepdown = p50/p99 seconds from the fault's start; pend/sendq/rss "
                     "= peaks of the load samples during it")
        lines.append(f"{'fault':<18} {'runs':>4} {'submits':>7} {'avail':>7} {'goodput':>7} {'unsent':>6} "
                     f"{'latency':>9} {'elect':>5} "
                     f"{'leader p50/p99':>14} {'failover p50/p99':>16} {'stepdown':>8} {'pend':>5} {'sendq':>5} "
                     f"{'rss':>5}")
        for name, row in t["faults"].items():
            peak = t["load"]["faults"].get(name, {})
            latency = row["latency_s"]
            lines.append(f"{name:<18} {row['runs']:>4} {row['submits']:>7} {_pct(row['availability_pct']):>7} "
                         f"{_pct(row['goodput_pct']):>7} {row['unsent']:>6} "
                         f"{_fmt(latency['p50']) + '/' + _fmt(latency['p99']):>9} {row['elections']:>5} "
                         f"{_fmt(row['to_leader_p50_s']) + '/' + _fmt(row['to_leader_p99_s']):>14} "
                         f"{_fmt(row['failover_p50_s']) + '/' + _fmt(row['failover_p99_s']):>16} "
                         f"{_fmt(row['step_down_p50_s']):>8} {_num(peak.get('pending_max')):>5} "
                         f"{_num(peak.get('send_queue_max')):>5} {_num(peak.get('leader_rss_mib_max')):>5}")
    if result.violations:
        lines.append(f"VIOLATIONS ({len(result.violations)}):")
        by_kind: dict[str, list[Violation]] = defaultdict(list)
        for v in result.violations:
            by_kind[v.kind].append(v)
        for kind, items in by_kind.items():
            for v in items[:SUMMARY_VIOLATIONS_MAX]:
                lines.append(f"  {kind}: {v.message} [history lines {', '.join(map(str, v.lines))}]")
            if len(items) > SUMMARY_VIOLATIONS_MAX:
                lines.append(f"  {kind}: ... {len(items) - SUMMARY_VIOLATIONS_MAX} more in the JSON report")
    other = {k: c[k] for k in ("double_submit", "failed_submit_delivered", "delivered_after_ack", "stale_lease_ack",
                               "not_completed", "digest_mismatch", "liveness")}
    lines.append(f"valid={'yes' if result.valid else 'NO'} " + " ".join(f"{k}={v}" for k, v in other.items()))
    lines.append(f"lost={c['lost']} unexpected={c['unexpected']} duplicates={c['duplicates']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"
