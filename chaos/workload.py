"""The chaos workload: producers, worker processes, the final drain and the status monitor.

Every call goes through the real client (`Client`, `AsyncClient` for the producers: failover,
redirects, idempotency keys reused on its own retries) and is recorded in the history (`chaos.history`) with its outcome:
    ok    2xx
    fail  a definite refusal (4xx: the request was judged and changed nothing)
    info  no usable answer: a transport failure or a 5xx after the client's retries (a submit
          may still have committed: "did not commit in time" is a 503), or the process died

Producers are tasks of one event loop in a thread of the runner (`AsyncClient`), each offering
a steady rate of unique values ("p<i>-<seq>", also the idempotency key) in requests of
`submit_batch` jobs (`--batch`), open loop (`chaos.open_loop`): a request is sent when it is due,
whether or not the ones before were answered, at most `inflight_max` unanswered per producer; one
that comes due past that bound is recorded as an `unsent` event (offered, not served). Each submit
records the time it was due (`scheduled_t`), so latency counts from the schedule, not from the
send. Every tenth request is submitted with a delay, at the top priority, for the checker's timing
check.

Workers are separate processes (`python -m raftq.chaos.workload --worker ...`) so that the nemesis can
SIGKILL and SIGSTOP them; each leases up to `prefetch` jobs per request, heartbeats the ones it
holds, and for each job (seeded choice) acks it, fails it (retry soon), stalls past its lease and
then acks (the ack must be refused), or drops it (the lease runs out). Acks go back in one
request per fetched batch, FAILs in another; stalled jobs wait in a list (the worker goes on
fetching) and their late acks go back together once their leases have run out. The monitor polls every node's /v1/cluster directly (one thread per
node) and records each change of role, term, leader or serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from raftq.chaos.history import FAIL, INFO, OK, HistoryWriter
from raftq.chaos.open_loop import OpenLoop
from raftq.chaos.topology import python_env
from raftq import AsyncClient, Client, errors

log = logging.getLogger("chaos.workload")

QUEUE = "chaos"


@dataclass(frozen=True)
class WorkloadConfig:
    queue: str = QUEUE
    #: submits per second offered by all producers together
    rate: float = 20.0
    producers: int = 4
    #: submit requests one producer may have unanswered at once (open loop: one that comes due
    #: past this is not sent and counts as offered, not served). 16 at 5 requests a second rides
    #: out 3 s of commit latency; a longer stall (an election, kill-all) shows as unsent requests.
    inflight_max: int = 16
    workers: int = 3
    #: every job's lease; a stalled worker sleeps past it
    lease_s: float = 5.0
    #: high, so the workload's own FAILs never dead-letter a job
    max_attempts: int = 100
    #: the client's per-request timeout and per-call retry budget
    timeout_s: float = 3.0
    deadline_s: float = 10.0
    #: worker behaviour per job: probabilities of FAIL, stall past the lease, drop (rest: ack)
    p_fail: float = 0.08
    p_stall: float = 0.03
    p_drop: float = 0.02
    #: jobs per submit request (one log entry per request)
    submit_batch: int = 1
    #: jobs one fetch may take; all of them are worked at once and acked in one request
    prefetch: int = 3
    #: the "work" of one fetched batch: a uniform wait in this range, seconds
    work_s: tuple[float, float] = (0.02, 0.15)
    #: every delay_every-th submit of a producer carries delay_s, for the checker's timing check
    #: (leasable no earlier than the delay, and not much later); 0 = none. They run at the top
    #: priority, so that a backlog of ready jobs (workers slower than the offered rate on a
    #: loaded machine) does not stand between their due time and their lease.
    delay_every: int = 10
    delay_s: float = 2.0
    timing_priority: int = 9


def outcome_of(exc: BaseException) -> str:
    """fail for a definite refusal (4xx), info for anything that leaves the outcome unknown."""
    if isinstance(exc, (errors.RequestError, errors.JobError)):
        return FAIL
    return INFO


def _error_fields(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "code": getattr(exc, "code", None),
            "status": getattr(exc, "status", None)}


# ---------------------------------------------------------------------------- producers


class Producer:
    """One producer: submit requests of unique values on an open-loop schedule (`chaos.open_loop`),
    each awaited concurrently, at most `inflight_max` unanswered at once."""

    def __init__(self, index: int, urls: Sequence[str], config: WorkloadConfig, history: HistoryWriter,
                 rate: float, run_tag: str) -> None:
        self.proc = f"p{index}"
        self.urls = list(urls)
        self.config = config
        self.history = history
        self.interval_s = 1.0 / rate
        self.run_tag = run_tag

    async def run(self, stopping: asyncio.Event, drain_s: float) -> None:
        """Sends on schedule until stopping is set, then waits up to drain_s for the requests in flight."""
        c = self.config
        client = AsyncClient(self.urls, timeout=c.timeout_s, deadline=c.deadline_s)
        schedule = OpenLoop(time.monotonic(), self.interval_s, c.inflight_max)
        inflight: set[asyncio.Task] = set()
        seq = requests = 0
        try:
            while not stopping.is_set():
                for due in schedule.take(time.monotonic(), len(inflight)):
                    values = [f"{self.proc}-{seq + i}" for i in range(c.submit_batch)]
                    seq += c.submit_batch
                    delayed = c.delay_every and requests % c.delay_every == c.delay_every - 1
                    requests += 1
                    if not due.send:  # offered, not served: the checker counts it against goodput
                        self.history.event("unsent", proc=self.proc, scheduled_t=due.at, jobs=len(values))
                        continue
                    task = asyncio.create_task(self.submit(client, values, c.delay_s if delayed else None, due.at))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                try:
                    async with asyncio.timeout(max(0.0, schedule.next_at - time.monotonic())):
                        await stopping.wait()  # pacing until the next request is due, or the stop
                except TimeoutError:
                    pass
            if inflight:
                await asyncio.wait(inflight, timeout=drain_s)
        finally:
            for task in inflight:
                task.cancel()  # never completed: the checker counts them as unknown
            await client.aclose()

    async def submit(self, client: AsyncClient, values: list[str], delay_s: float | None, scheduled_t: float) -> None:
        """One submit request for values, recorded as one op per value (same request, same times)."""
        c = self.config
        op_ids = self.history.invoke_many("submit", [{"value": value, "scheduled_t": scheduled_t,
                                                      **({"delay_s": delay_s} if delay_s else {})}
                                                     for value in values], proc=self.proc)
        try:
            jobs = await client.submit_many(c.queue, [{"v": value} for value in values],
                                            idempotency_keys=[f"{self.run_tag}-{value}" for value in values],
                                            lease_s=c.lease_s, max_attempts=c.max_attempts, delay_s=delay_s,
                                            priority=c.timing_priority if delay_s else None)
        except errors.RaftqError as exc:
            self.history.complete_many(op_ids, "submit", outcome_of(exc), [_error_fields(exc)] * len(op_ids))
        except Exception as exc:  # a client bug must not stop the run; the outcome is unknown
            self.history.complete_many(op_ids, "submit", INFO, [_error_fields(exc)] * len(op_ids))
        else:
            self.history.complete_many(op_ids, "submit", OK, [{"job": job} for job in jobs])


class Producers:
    """Every producer as a task of one event loop, in a thread of the runner."""

    def __init__(self, urls: Sequence[str], config: WorkloadConfig, history: HistoryWriter, run_tag: str) -> None:
        rate = config.rate / config.producers / config.submit_batch  # requests per second per producer
        self.producers = [Producer(i, urls, config, history, rate, run_tag) for i in range(config.producers)]
        self.thread = threading.Thread(target=self._main, name="producers", daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._drain_s = config.deadline_s + config.timeout_s

    def start(self) -> None:
        self.thread.start()
        self._started.wait(10)

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            await asyncio.gather(*(p.run(self._stopping, self._drain_s) for p in self.producers))

        asyncio.run(main())

    def stop(self, timeout_s: float = 60.0) -> None:
        """No request is due any more; waits (up to timeout_s) for those in flight to be answered."""
        if self._loop is not None and self.thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop has just finished
                pass
        if self.thread.ident is not None:  # started
            self.thread.join(timeout_s)


# ---------------------------------------------------------------------------- lease / report ops


def lease_end_wall(job, answered_wall: float) -> float:
    """When the job's lease ends, on this machine's wall clock, for a lease answer received at
    answered_wall. The answer's `lease_expires_at` is on the cluster's replicated clock, which
    stands still during elections and so runs behind wall time; `lease_expires_in_s` is the time
    left when the leader answered, so answered_wall + it is a bound that can only be late (by the
    answer's transit), never early: the checker forgives with it and never accuses."""
    in_s = getattr(job, "lease_expires_in_s", None)
    return job.lease_expires_at if in_s is None else answered_wall + in_s


def jobs_record(jobs, answered_wall: float) -> list[dict]:
    return [{"id": j.id, "value": j.payload.get("v") if isinstance(j.payload, dict) else None, "lease": j.lease_token,
             "expires": lease_end_wall(j, answered_wall), "attempt": j.attempt} for j in jobs]


def recorded_fetch(client: Client, history: HistoryWriter, proc: str, worker: str, queue: str, max_jobs: int,
                   wait_s: float) -> list:
    op_id = history.invoke("lease", proc=proc, worker=worker)
    try:
        jobs = client.fetch(worker, [queue], max_jobs=max_jobs, wait_s=wait_s)
    except errors.RaftqError as exc:
        history.complete(op_id, "lease", outcome_of(exc), **_error_fields(exc))
        return []
    except Exception as exc:
        history.complete(op_id, "lease", INFO, **_error_fields(exc))
        return []
    history.complete(op_id, "lease", OK, jobs=jobs_record(jobs, time.time()))
    return jobs


def recorded_reports(client: Client, history: HistoryWriter, proc: str, worker: str, jobs, kind: str) -> None:
    """Acks (kind "ack") or FAILs with a quick retry (kind "nack") jobs in one request, recorded as
    one op per job (same request, same times, each with its own outcome)."""
    if not jobs:
        return
    op_ids = history.invoke_many(kind, [{"worker": worker, "job": j.id, "lease": j.lease_token,
                                         "value": j.payload.get("v") if isinstance(j.payload, dict) else None}
                                        for j in jobs], proc=proc)
    try:
        if kind == "ack":
            outcomes = client.ack_many(worker, [(j.id, j.lease_token, None) for j in jobs])
        else:
            outcomes = client.fail_many(worker, [(j.id, j.lease_token, "chaos: planned failure", True, 0.1) for j in jobs])
    except errors.RaftqError as exc:
        history.complete_many(op_ids, kind, outcome_of(exc), [_error_fields(exc)] * len(op_ids))
        return
    except Exception as exc:
        history.complete_many(op_ids, kind, INFO, [_error_fields(exc)] * len(op_ids))
        return
    history.complete_many(op_ids, kind, [OK if outcome is None else outcome_of(outcome) for outcome in outcomes],
                          [{} if outcome is None else _error_fields(outcome) for outcome in outcomes])


def recorded_ack_many(client: Client, history: HistoryWriter, proc: str, worker: str, jobs) -> None:
    recorded_reports(client, history, proc, worker, jobs, "ack")


# ---------------------------------------------------------------------------- the worker process


def worker_main(argv: Sequence[str] | None = None) -> int:
    """`python -m raftq.chaos.workload --worker ID ...`: one lean worker process recording its history."""
    p = argparse.ArgumentParser(prog="python -m raftq.chaos.workload")
    p.add_argument("--worker", required=True)
    p.add_argument("--nodes", required=True, help="comma-separated client URLs")
    p.add_argument("--history", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--queue", default=QUEUE)
    p.add_argument("--lease-s", type=float, default=WorkloadConfig.lease_s)
    p.add_argument("--timeout-s", type=float, default=WorkloadConfig.timeout_s)
    p.add_argument("--deadline-s", type=float, default=WorkloadConfig.deadline_s)
    p.add_argument("--p-fail", type=float, default=WorkloadConfig.p_fail)
    p.add_argument("--p-stall", type=float, default=WorkloadConfig.p_stall)
    p.add_argument("--p-drop", type=float, default=WorkloadConfig.p_drop)
    p.add_argument("--prefetch", type=int, default=WorkloadConfig.prefetch)
    p.add_argument("--work-s", type=float, nargs=2, default=WorkloadConfig.work_s)
    args = p.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    history = HistoryWriter(args.history, args.worker)
    client = Client(args.nodes, timeout=args.timeout_s, deadline=args.deadline_s)
    rng = random.Random(f"{args.seed}-{args.worker}")
    held: dict[str, int] = {}
    held_lock = threading.Lock()

    def heartbeats() -> None:
        while not stop.wait(1.0):
            with held_lock:
                ids = list(held)
            try:
                client.heartbeat(args.worker, ids)
            except errors.RaftqError:
                pass

    threading.Thread(target=heartbeats, name="heartbeat", daemon=True).start()
    proc = args.worker
    stalled: list[tuple[float, object]] = []  # (when its late ack goes, job), in fetch order
    while not stop.is_set():
        now = time.time()
        due = [job for at, job in stalled if at <= now]
        if due:
            stalled = [(at, job) for at, job in stalled if at > now]
            recorded_reports(client, history, proc, args.worker, due, "ack")  # too late: each must be refused
            with held_lock:
                for job in due:
                    held.pop(job.id, None)
        jobs = recorded_fetch(client, history, proc, args.worker, args.queue, args.prefetch,
                              min(1.0, max(0.05, min(at for at, _ in stalled) - now)) if stalled else 1.0)
        if not jobs:
            continue
        answered_wall = time.time()
        with held_lock:
            held.update({j.id: j.lease_token for j in jobs})
        fates: dict[str, list] = {"ack": [], "nack": [], "stall": [], "drop": []}
        for job in jobs:
            draw = rng.random()
            if draw < args.p_fail:
                fates["nack"].append(job)
            elif draw < args.p_fail + args.p_stall:
                fates["stall"].append(job)
            elif draw < args.p_fail + args.p_stall + args.p_drop:
                fates["drop"].append(job)
            else:
                fates["ack"].append(job)
        if stop.wait(rng.uniform(*args.work_s)):  # the "work" of the batch
            break
        for job in fates["stall"]:
            history.event("stall", proc=proc, job=job.id, lease=job.lease_token)
            stalled.append((lease_end_wall(job, answered_wall) + 1.5, job))
        for job in fates["drop"]:
            history.event("drop", proc=proc, job=job.id, lease=job.lease_token)
        recorded_reports(client, history, proc, args.worker, fates["ack"], "ack")
        recorded_reports(client, history, proc, args.worker, fates["nack"], "nack")
        with held_lock:
            for job in fates["ack"] + fates["nack"] + fates["drop"]:
                held.pop(job.id, None)
    client.close()
    history.close()
    return 0


@dataclass
class WorkerProcess:
    worker_id: str
    process: subprocess.Popen
    paused: bool = False

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class WorkerPool:
    """Worker processes: start, SIGKILL, SIGSTOP/SIGCONT, replace, stop."""

    def __init__(self, urls: Sequence[str], history_dir: str, log_dir: str, config: WorkloadConfig, seed: int) -> None:
        self.urls = list(urls)
        self.history_dir = history_dir
        self.log_dir = log_dir
        self.config = config
        self.seed = seed
        self.workers: dict[str, WorkerProcess] = {}
        self._next = 1

    def spawn(self) -> str:
        worker_id = f"w{self._next}"
        self._next += 1
        c = self.config
        args = [sys.executable, "-m", "raftq.chaos.workload", "--worker", worker_id, "--nodes", ",".join(self.urls),
                "--history", os.path.join(self.history_dir, f"{worker_id}.jsonl"), "--seed", str(self.seed),
                "--queue", c.queue, "--lease-s", str(c.lease_s), "--timeout-s", str(c.timeout_s),
                "--deadline-s", str(c.deadline_s), "--p-fail", str(c.p_fail), "--p-stall", str(c.p_stall),
                "--p-drop", str(c.p_drop), "--prefetch", str(c.prefetch),
                "--work-s", *(str(x) for x in c.work_s)]
        out = open(os.path.join(self.log_dir, f"{worker_id}.log"), "ab")
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=python_env())
        out.close()
        self.workers[worker_id] = WorkerProcess(worker_id, process)
        return worker_id

    def start(self) -> None:
        for _ in range(self.config.workers):
            self.spawn()

    def live(self) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.alive and not w.paused]

    def kill(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        if w.alive:
            w.process.send_signal(signal.SIGKILL)
            w.process.wait(10)
        w.paused = False

    def pause(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        w.process.send_signal(signal.SIGSTOP)
        w.paused = True

    def resume(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        if w.alive:
            w.process.send_signal(signal.SIGCONT)
        w.paused = False

    def resume_all(self) -> None:
        for w in self.workers.values():
            if w.paused:
                self.resume(w.worker_id)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (they finish the op in hand and exit), then SIGKILL what is left at the deadline."""
        self.resume_all()
        for w in self.workers.values():
            if w.alive:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for w in self.workers.values():
            try:
                w.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait(10)


# ---------------------------------------------------------------------------- the drain


def record_final_states(urls: Sequence[str], config: WorkloadConfig, history: HistoryWriter,
                        job_ids: Sequence[str]) -> None:
    """Records a `final_states` event: the cluster's state of each job in job_ids (after the drain).

    For the jobs whose ack went unanswered: the checker cannot tell from the history alone whether
    such an ack was applied, and the cluster can. A job the cluster no longer knows ("gone") was
    finished and its record's retention is over: the state forgets only finished jobs.
    """
    states: dict[str, str] = {}
    with Client(urls, timeout=config.timeout_s, deadline=config.deadline_s) as client:
        for job_id in sorted(job_ids):
            try:
                states[job_id] = str(client.get(job_id).get("state"))
            except errors.JobNotFound:
                states[job_id] = "gone"
            except errors.RaftqError as exc:
                states[job_id] = f"unknown: {type(exc).__name__}"
    history.event("final_states", proc="drain", jobs=states)


def drain(urls: Sequence[str], config: WorkloadConfig, history: HistoryWriter, timeout_s: float) -> dict:
    """Leases and acks until the queue holds nothing ready, scheduled, leased or waiting to retry.

    Leases still held by killed or stopped workers run out (lease_s) and come back here. Records
    a `drained` event (complete or not) and a `dead` event with the dead-lettered job ids.
    """
    client = Client(urls, timeout=config.timeout_s, deadline=config.deadline_s)
    deadline = time.monotonic() + timeout_s
    leased = acked = 0
    depth: dict = {}
    complete = False
    try:
        while time.monotonic() < deadline:
            jobs = recorded_fetch(client, history, "drain", "chaos-drain", config.queue, 200, 0.5)
            if jobs:
                leased += len(jobs)
                recorded_ack_many(client, history, "drain", "chaos-drain", jobs)
                acked += len(jobs)
                continue
            try:
                depth = client.queues().get(config.queue, {})
            except errors.RaftqError:
                continue
            if sum(depth.get(state, 0) for state in ("ready", "scheduled", "leased", "retry_wait")) == 0:
                complete = True
                break
        dead: list[str] = []
        try:
            after = None
            while True:
                page = client.dead(config.queue, limit=100, after=after)
                dead.extend(str(job["id"]) for job in page)
                if len(page) < 100:
                    break
                after = page[-1]["id"]
        except errors.RaftqError as exc:
            history.event("liveness", proc="drain", message=f"could not list dead jobs: {exc}")
        history.event("dead", proc="drain", jobs=dead)
        history.event("drained", proc="drain", complete=complete, depth=depth, leased=leased)
        if not complete:
            history.event("liveness", proc="drain",
                          message=f"the drain did not empty queue {config.queue} in {timeout_s:g} s: {depth}")
        return {"complete": complete, "leased": leased, "depth": depth, "dead": len(dead)}
    finally:
        client.close()


# ---------------------------------------------------------------------------- the monitor


class Monitor:
    """Polls every node's /v1/cluster directly and records changes of role, term, leader, serving."""

    def __init__(self, cluster, history: HistoryWriter, interval_s: float = 0.1) -> None:
        self.cluster = cluster
        self.history = history
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._poll, args=(node_id,), name=f"monitor-{node_id}", daemon=True)
                        for node_id in cluster.nodes]
        self.last: dict[str, tuple] = {}
        self.max_term = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)

    def _poll(self, node_id: str) -> None:
        while not self.stop_event.is_set():
            status = self.cluster.status(node_id)
            if status is None:
                view = ("down", None, None, False)
            else:
                view = (status.get("role"), status.get("term"), status.get("leader"), bool(status.get("serving")))
            with self._lock:
                changed = self.last.get(node_id) != view
                self.last[node_id] = view
                if view[1] is not None:
                    self.max_term = max(self.max_term, int(view[1]))
            if changed:
                self.history.event("status", proc="monitor", node=node_id, role=view[0], term=view[1],
                                   leader=view[2], serving=view[3])
            self.stop_event.wait(self.interval_s)

    def term(self) -> int:
        with self._lock:
            return self.max_term


if __name__ == "__main__":
    sys.exit(worker_main())
