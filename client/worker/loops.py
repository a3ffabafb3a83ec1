"""The worker's three loops, written once for every runtime: fetcher, reporter, beater.

Theory of operation
-------------------
Each loop is a generator (the client's `_plan` idea, client/_base.py): it decides, and yields a
step for its runtime to carry out, then goes on with what the step brought back:

    Call(method, args)     call `worker.client.<method>(*args)`; the runtime sends back its
                           answer, or throws the exception it raised into the generator
    WaitFor(predicate, timeout_s, fetcher)
                           wait until `predicate()` holds, the worker is stopping, or timeout_s
                           passed; fetcher=True marks the fetcher as waiting for room (the core
                           wakes it when there is)
    Sleep(seconds)         wait this long (a beater's sleep ends early when the runtime stops it)
    NextBatch()            wait for finished outcomes to report; sent back (batch, last)

The thread runtime carries steps out with blocking calls and a condition variable, the asyncio
runtime with `await`; what a loop does with the answers, how it backs off and when it stops is
here, once. The only thing a runtime gives a loop is `deliver(jobs) -> bool`: where fetched jobs
go (the thread runtime's queue, or the asyncio buffer and its slot tasks), True when the worker
is stopping and the jobs went straight back instead.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

from raftq.client.errors import RaftqError, ServerError, TransportError
from raftq.protocol import LEASE_S_MIN

#: The loops take the `client.worker.runtime.Worker` they serve; it imports this module, so the
#: annotation is a name only (no import back: tests/unit/test_layout.py forbids cycles).
Worker = Any

log = logging.getLogger("raftq.worker")

#: At shutdown, how long reporting may keep retrying a transient error after the grace period.
FLUSH_S_MAX = 10.0
#: How long shutdown waits for a fetch still in its long poll, beyond `wait_s`.
FETCH_JOIN_S = 15.0

#: Pause after a transient error: doubles from the minimum to the cap, with jitter so that many
#: workers do not hit a newly elected leader in step.
BACKOFF_S_MIN = 0.1
BACKOFF_S_MAX = 5.0
#: Pause after an empty fetch that came back sooner than asked (a server that does not long-poll),
#: so that an idle worker never spins.
IDLE_POLL_S = 0.1
#: The beater never sleeps less than this between rounds.
BEAT_SLEEP_S_MIN = 0.005
#: The beater never sleeps longer than this: a job fetched while it sleeps may carry the
#: shortest lease there is, and must be extended before a quarter of it is gone.
BEAT_SLEEP_S_MAX = LEASE_S_MIN / 4

TRANSIENT = (TransportError, ServerError)


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple
    kwargs: dict | None = None


@dataclass(frozen=True)
class WaitFor:
    predicate: Callable[[], bool]
    timeout_s: float | None = None
    fetcher: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class NextBatch:
    pass


Step = Call | WaitFor | Sleep | NextBatch
Loop = Generator[Step, Any, None]


def fetch_loop(w: Worker, deliver: Callable[[list[Any]], bool]) -> Loop:
    """Fills the buffer while the core allows; ends at the stop (or, in burst mode, when dry)."""
    failures = 0
    while True:
        yield Sleep(0)  # a client answering without suspending must not starve an event loop
        yield WaitFor(w._fetch_due, fetcher=True)
        with w._lock:
            if w._stopping.is_set():
                return
            size, generation, buffered = w._fetch_size(), w._generation, w._buffered
        if size < 1:
            # The room the wait saw is gone: between the wait and the lock, a slot finished a job
            # and its run time shrank the paced buffer's bound below what is buffered. Wait again
            # (asking for max_jobs < 1 would be refused, and a refusal stops the worker).
            continue
        wait_s = 0.0 if w.burst or buffered else w.wait_s  # a long poll only with nothing buffered
        w._hooks("before_fetch")
        started = time.monotonic()
        try:
            jobs = yield Call("fetch", (w.worker_id, w.queues), {"max_jobs": size, "wait_s": wait_s})
        except TRANSIENT as exc:
            failures += 1
            delay_s = backoff_s(failures)
            log.warning("worker %s: fetch failed (%s); retrying in %.1f s", w.worker_id, exc, delay_s)
            yield WaitFor(w._stopping.is_set, timeout_s=delay_s)
            continue
        except RaftqError as exc:
            log.error("worker %s: the cluster refused to lease jobs (%s); stopping", w.worker_id, exc)
            w._fatal_error(exc)
            return
        failures = 0
        w._hooks("after_fetch", jobs)
        if deliver(jobs):
            return
        if jobs:
            continue
        if w.burst:
            if w._idle():
                w.stop("burst: the queues are empty")
                return
            # Something in flight may finish and free a retry; then look again.
            yield WaitFor(lambda: w._generation != generation, timeout_s=max(w.wait_s, IDLE_POLL_S), fetcher=True)
        elif buffered:
            yield WaitFor(lambda: w._buffered == 0, fetcher=True)  # the queue ran dry: long-poll once drained
        elif time.monotonic() - started < min(wait_s, IDLE_POLL_S):
            yield WaitFor(w._stopping.is_set, timeout_s=IDLE_POLL_S)


def report_loop(w: Worker) -> Loop:
    """Sends finished outcomes in batches until the last batch after the stop."""
    while True:
        batch, last = yield NextBatch()
        for method, pairs, items in w._report_requests(batch):
            results = yield from _send(w, method, items)
            w._settle(method, pairs, results)
        if last:
            return


def _send(w: Worker, method: str, items: list[tuple]) -> Generator[Step, Any, list[Any]]:
    """One report request, retried through transient errors (bounded once stopping); per-item results."""
    failures = 0
    while True:
        try:
            return (yield Call(method, (w.worker_id, items)))
        except TRANSIENT as exc:
            failures += 1
            if w._give_up_reporting():
                log.error("worker %s: %s of %d job(s) failed at shutdown (%s); their leases will expire",
                          w.worker_id, method, len(items), exc)
                return [exc] * len(items)
            delay_s = backoff_s(failures)
            log.warning("worker %s: %s failed (%s); retrying in %.1f s", w.worker_id, method, exc, delay_s)
            yield Sleep(delay_s)
        except RaftqError as exc:
            log.error("worker %s: %s of %d job(s) refused: %s", w.worker_id, method, len(items), exc)
            return [exc] * len(items)


def beat_loop(w: Worker) -> Loop:
    """A heartbeat every `heartbeat_s` naming the buffered and running jobs, and one extend
    request for every lease due within `extend_window_s`; runs until its runtime stops it."""
    next_beat = time.monotonic()
    while True:
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + w.heartbeat_s
            try:
                lost = yield Call("heartbeat", (w.worker_id, w._heartbeat_ids()))
            except RaftqError as exc:
                log.warning("worker %s: heartbeat failed: %s", w.worker_id, exc)
            else:
                w._mark_lost(lost, "the server says this worker no longer holds it")
        # Every lease due within the next window goes in this one request: with leases fetched
        # one after another, extending each exactly when due would send a request per few jobs.
        due = w._due_extensions(time.monotonic() + extend_window_s(w.heartbeat_s, w._shortest_lease_s()))
        if due:
            asked_at = time.monotonic()
            try:
                results = yield Call("extend_many", (w.worker_id, [(f.job.id, f.job.lease_token, f.lease_s) for f in due]))
            except RaftqError as exc:
                w._extend_failed(due, exc)
            else:
                w._extended(due, results, asked_at)
        w._drop_expiring(time.monotonic())
        wake_at = min(next_beat, w._next_extension(), time.monotonic() + BEAT_SLEEP_S_MAX)
        yield Sleep(max(BEAT_SLEEP_S_MIN, wake_at - time.monotonic()))


def extend_window_s(heartbeat_s: float, lease_s: float) -> float:
    """How far ahead of its due time a lease is extended, so that extensions go in batches: up
    to one heartbeat interval, and never more than a quarter of a lease (an extension still
    comes well before expiry)."""
    return min(heartbeat_s, lease_s / 4)


def backoff_s(failures: int) -> float:
    """Capped exponential backoff with jitter in [50 %, 100 %]."""
    ceiling = min(BACKOFF_S_MAX, BACKOFF_S_MIN * 2 ** min(failures - 1, 16))
    return ceiling * random.uniform(0.5, 1.0)
