"""The worker's policy, without threads, clocks or sockets: what to fetch, which job may start,
which leases to extend, what to report, what a server's answer means.

Theory of operation
-------------------
`WorkerCore` holds every job this worker holds a lease on, as a `Flight`, from its fetch until
its outcome is answered:

    buffered    leased, waiting in the buffer for a slot
    running     its handler runs (for a process pool: handed to a pool process)
    reporting   finished; its ack, fail or release is queued or on the wire, and it keeps its
                lease until the answer (a finished job frees its slot at once: waiting for the
                ack's round trip idled every slot once per job)

Runtimes (`client.worker.runtime`) feed it events and carry out what it answers:

    event                                  call                      answer / effect
    a fetch may go out?                    fetch_due(), fetch_size() how many jobs to ask for
    a fetch came back                      take(jobs, now, now_wall) flights, buffered
    a slot is free, takes a buffered job   start(flight, now)        run it, or it was dropped
    a handler returned or raised           finish(flight, outcome, now)  report it (or not: abandoned)
    outcomes wait                          flush_due(...), report_requests(batch)  requests to send
    a report was answered                  settle(method, pairs, results)
    a heartbeat is due                     heartbeat_ids()           ids to name
    the server says a lease is gone        mark_lost(ids)
    a beat of the lease timer              drop_expiring(now), due_extensions(now)  leases to extend
    an extend was answered / failed        extended(...), extend_failed(...)
    stop                                   release_buffered(), abandon_running()  outcomes to report

Time comes in as arguments (monotonic seconds, and wall seconds where a server's expiry must be
read), so the tests drive it with scripted events and invented clocks (tests/unit/client/test_worker_core.py).
The core never blocks and never sends: `on_change` (the runtime's wake-up) is called whenever a
waiter's condition may have turned true. The caller serialises calls (the runtime's lock).

Bounds, with P the buffer's bound at the time (`prefetch_now`): running <= concurrency (a process
pool counts a whole batch handed to a child as running); running + buffered <= concurrency + P;
all leases held <= 2 * (concurrency + P): the reporting ones count too, so acks that lag a whole
buffer behind hold fetching back. A fetch goes out once a quarter of P is free (or a slot is idle).
`prefetch="auto"` sizes P to what the slots get through in PREFETCH_HORIZON_S at the handlers'
measured pace, within PREFETCH_DEFAULT_MAX jobs and PREFETCH_BYTES_MAX bytes of payload, and to
nothing before the first job finished.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack

from raftq.client.errors import JobError
from raftq.protocol import (BATCH_COUNT_MAX, DELAY_S_MAX, ERROR_TEXT_BYTES_MAX, FETCH_COUNT_MAX, LEASE_S_DEFAULT,
                            LEASE_S_MAX, LEASE_S_MIN,
                            RESULT_BYTES_MAX)

log = logging.getLogger("raftq.worker")

#: The server accepts BATCH_COUNT_MAX items per ack, fail, extend or release request and
#: FETCH_COUNT_MAX jobs per fetch.
REPORT_BATCH_MAX = EXTEND_BATCH_MAX = BATCH_COUNT_MAX
LEASE_COUNT_MAX = FETCH_COUNT_MAX
#: Results and error texts per ack/fail request: half the server's 8 MiB body bound, which leaves
#: room for ids, tokens and framing, so that big results never get a whole batch refused (413).
REPORT_BYTES_MAX = 4 << 20
#: One heartbeat names every buffered and running job: concurrency + prefetch stays within this.
CONCURRENCY_MAX = 1000
#: The default prefetch buffer holds at most this many jobs. A lease round trip takes a few ms
#: (more under load), and the buffer must cover it: `raftq bench` e2e, 4 no-op slots, 2 quiet
#: cores, --prefetch 16 -> 2.9k, 64 -> 6.9k, 256 -> 11.6k, 500 -> 12.3k jobs/s. Beyond 256 the
#: gain is small, and the memory is not (a buffer of 1 MiB payloads).
PREFETCH_DEFAULT_MAX = 256
#: ... and no more than the slots finish in this long at the handlers' measured pace, so that long
#: jobs are not held in one worker's buffer while other workers idle (Celery's fixed multiplier
#: of 4 does that: FEATURES.md pain point 4). Jobs of 1 s or more on 4 slots get no buffer at all.
PREFETCH_HORIZON_S = 0.1
#: ... and no more payload bytes than this (a buffer of 256 jobs of 1 MiB each would be 256 MiB).
PREFETCH_BYTES_MAX = 16 << 20
#: Weight of the newest handler run time (and payload size) in the running averages the bounds use.
RUN_S_AVERAGE_WEIGHT = 0.2
#: A buffered job whose lease (as this worker reckons it) has less than this left is not started:
#: its handler could not report before the lease ran out, and the next holder may already run it.
LEASE_START_MARGIN_S = 0.25
#: After a failed extend call, try again this much later rather than at the next heartbeat.
EXTEND_RETRY_S = 0.5
#: pool="processes": a runner sends its child about this much measured work per message, at most
#: PROCESS_BATCH_MAX jobs. A round trip through a pool process costs about as much as a 1 ms
#: job (pickling, two pipe hops, two thread wake-ups), so one job per message halves the pool.
PROCESS_BATCH_S = 0.02
PROCESS_BATCH_MAX = 64
#: SPEC: the delay of a retry at most 7 days.
RETRY_DELAY_S_MAX = DELAY_S_MAX


# ---------------------------------------------------------------------------- what handlers raise


class Retry(Exception):
    """Raised by a handler to ask for another attempt.

    The attempt counts towards the job's `max_attempts`: once they are spent the job goes to the
    dead-letter queue like any failure.

    Args:
        delay_s: seconds before the job is ready again; None lets the server pick its backoff.
        reason: a short text kept as the job's last error.
    """

    def __init__(self, delay_s: float | None = None, reason: str = "") -> None:
        if delay_s is not None and not 0 <= delay_s <= RETRY_DELAY_S_MAX:
            raise ValueError(f"Retry delay_s must be within [0, {RETRY_DELAY_S_MAX:g}] s, got {delay_s!r}")
        super().__init__(delay_s, reason)  # args pickle, so Retry crosses a process pool intact
        self.delay_s = delay_s
        self.reason = reason

    def __str__(self) -> str:
        when = "" if self.delay_s is None else f" in {self.delay_s:g} s"
        return f"retry requested{when}" + (f": {self.reason}" if self.reason else "")


class NonRetryable(Exception):
    """Base class for handler errors no retry can fix: the job goes to the dead-letter queue at once."""


class Reject(NonRetryable):
    """Raised by a handler to refuse a job for good (fail with retry=False: straight to the DLQ).

    Args:
        reason: why, kept as the job's last error.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


def outcome_of(exc: BaseException | None) -> str:
    """The outcome label of a handler run: "ok", "retried", "rejected" or "failed"."""
    if exc is None:
        return "ok"
    if isinstance(exc, Retry):
        return "retried"
    if isinstance(exc, NonRetryable):
        return "rejected"
    return "failed"


# ---------------------------------------------------------------------------- values


@dataclass
class WorkerStats:
    """Counters of one worker's life; read them after `run()` or from another thread.

    A handler run counts once its outcome's report is answered, not when the handler returns:
    until then the job is not done for the cluster either.
    """

    fetched: int = 0
    succeeded: int = 0  #: handler returned and its ack was answered (or refused, see `lost`)
    failed: int = 0  #: handler raised; failed back as retryable
    retried: int = 0  #: handler raised Retry
    rejected: int = 0  #: handler raised Reject / NonRetryable, or no handler: straight to the DLQ
    lost: int = 0  #: jobs the server said this worker no longer held, or whose ack/fail it refused
    released: int = 0  #: handed back unfinished at shutdown (buffered: no attempt counted; or still running)
    dropped: int = 0  #: buffered jobs never started: lease lost or about to run out (the server requeues them)
    inflight_max: int = 0  #: most leases held at once (buffered, running and reporting)

    @property
    def processed(self) -> int:
        """Handler runs that finished, whatever their outcome."""
        return self.succeeded + self.failed + self.retried + self.rejected


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a job this worker held: reported as an ack, a fail or a release."""

    kind: str  # ok | failed | retried | rejected | released (never started) | abandoned (running past grace)
    result: Any = None
    error: str = ""
    delay_s: float | None = None
    size_bytes: int = 0  # of the encoded result or the error text: requests are split by it


RELEASED = Outcome("released")
ABANDONED = Outcome("abandoned", error="worker shutting down: the job was still running after the grace period",
                    delay_s=0.0)

#: The states of a `Flight` (module docstring); DROPPED ones are no longer held.
BUFFERED, RUNNING, REPORTING, DROPPED = "buffered", "running", "reporting", "dropped"

_STAT_OF_KIND = {"ok": "succeeded", "failed": "failed", "retried": "retried", "rejected": "rejected"}


@dataclass(slots=True, eq=False)
class Flight:
    """One job this worker holds a lease on, from fetch until its outcome is answered."""

    job: Any
    lease_s: float  # the job's own lease length: each extension renews the lease by this much
    extend_at: float  # monotonic time at which to extend the lease next
    expires_at: float = float("inf")  # monotonic time at which the lease runs out, as reckoned here
    state: str = BUFFERED
    started_at: float = 0.0  # monotonic time its handler started
    lost: bool = False  # the server says another worker (or nobody) holds it now
    abandoned: bool = False  # handed back at shutdown while running; a late outcome is dropped


#: (method name, the (flight, outcome) pairs it reports, the items of the client call)
ReportRequest = tuple[str, list[tuple[Flight, Outcome]], list[tuple]]


# ---------------------------------------------------------------------------- the core


class WorkerCore:
    """The policy state of one worker; see the module docstring.

    Args:
        concurrency: handlers at once.
        prefetch: the buffer's bound in jobs (for "auto", PREFETCH_DEFAULT_MAX or less).
        paced: "auto": the bound shrinks to PREFETCH_HORIZON_S of measured work and PREFETCH_BYTES_MAX.
        ack_batch_max, ack_linger_s: when waiting outcomes go out (`flush_due`).
        on_change: called (with the caller's lock held) when a waiter's condition may have turned true.
    """

    def __init__(self, *, concurrency: int, prefetch: int, paced: bool, ack_batch_max: int,
                 ack_linger_s: float, on_change: Callable[[], None] = lambda: None) -> None:
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.paced = paced
        self.ack_batch_max = ack_batch_max
        self.ack_linger_s = ack_linger_s
        self.on_change = on_change
        self.stats = WorkerStats()
        self.flights: dict[str, Flight] = {}
        self.running = 0  # flights RUNNING
        self.buffered = 0  # flights BUFFERED
        self.fetch_waiting = False  # the fetcher waits for room: wake it when there is
        self.run_s_average: float | None = None  # handlers' run time, a running average (s)
        self.payload_bytes_average: float | None = None  # fetched payloads' encoded size, a running average

    # ------------------------------------------------------------------------ fetching

    def prefetch_now(self) -> int:
        """The buffer's bound now: `prefetch`, or when paced what the slots run in PREFETCH_HORIZON_S."""
        if not self.paced:
            return self.prefetch
        if self.run_s_average is None:
            return 0
        paced = self.concurrency * PREFETCH_HORIZON_S / max(self.run_s_average, 1e-6)
        by_bytes = PREFETCH_BYTES_MAX / max(self.payload_bytes_average or 0.0, 1.0)
        return min(self.prefetch, int(paced), int(by_bytes))

    def fetch_size(self, prefetch: int | None = None) -> int:
        """How many jobs a fetch may ask for now within the bounds (module docstring)."""
        prefetch = self.prefetch_now() if prefetch is None else prefetch
        return min(self.concurrency + prefetch - self.running - self.buffered,
                   2 * (self.concurrency + prefetch) - len(self.flights), LEASE_COUNT_MAX)

    def fetch_due(self) -> bool:
        """A fetch is worth its round trip: a slot is idle, or a quarter of the buffer is free.

        A quarter, not half: the buffer's head start while a request is out is what keeps the
        slots busy (`raftq bench`, 4 no-op slots: +11 % jobs/s over refilling at half).
        """
        prefetch = self.prefetch_now()
        size = self.fetch_size(prefetch)
        return size > 0 and (size >= max(1, prefetch // 4) or self.running + self.buffered < self.concurrency)

    def take(self, jobs: Sequence[Any], *, now: float, now_wall: float, state: str = BUFFERED) -> list[Flight]:
        """Records fetched jobs as held: buffered for a slot (or reporting, when handed straight back).

        `now` is monotonic, `now_wall` unix time. A job's lease span is the time it had left as
        the server answered (`lease_expires_in_s`): no clock has to agree. An older server gives
        only the end on the cluster's clock, read against `now_wall`. Extensions renew a lease by
        the job's own lease length (`lease_s`, as submitted), never by a length of the worker's."""
        flights = []
        for job in jobs:
            in_s = getattr(job, "lease_expires_in_s", None)
            span_s = in_s if in_s is not None else job.lease_expires_at - now_wall
            own_s = getattr(job, "lease_s", None)
            if own_s is None or not LEASE_S_MIN <= own_s <= LEASE_S_MAX:  # an older server
                own_s = span_s if LEASE_S_MIN <= span_s <= LEASE_S_MAX else LEASE_S_DEFAULT
            if not 0 < span_s <= LEASE_S_MAX:  # a clock far off the cluster's
                span_s = own_s
            flight = Flight(job, own_s, extend_at=now + span_s / 2, expires_at=now + span_s, state=state)
            self.flights[job.id] = flight
            flights.append(flight)
            if self.paced:
                size, average = payload_bytes(job.payload), self.payload_bytes_average
                self.payload_bytes_average = size if average is None else average + RUN_S_AVERAGE_WEIGHT * (size - average)
        if state == BUFFERED:
            self.buffered += len(flights)
        self.stats.fetched += len(jobs)
        self.stats.inflight_max = max(self.stats.inflight_max, len(self.flights))
        return flights

    def release_late(self, jobs: Sequence[Any], *, now: float, now_wall: float) -> list[tuple[Flight, Outcome]]:
        """Jobs fetched after the stop: hand them straight back (released, no attempt counted)."""
        flights = self.take(jobs, now=now, now_wall=now_wall, state=REPORTING)
        self.stats.released += len(flights)
        return [(flight, RELEASED) for flight in flights]

    # ------------------------------------------------------------------------ running

    def start(self, flight: Flight, now: float) -> bool:
        """A slot takes a buffered job: True when its handler may run (its lease is held and has time left)."""
        if flight.state != BUFFERED:  # handed back at shutdown, or dropped by the beater
            return False
        if flight.lost:
            self.drop(flight, "its lease was lost while it waited for a slot")
            return False
        left_s = flight.expires_at - now
        if left_s < LEASE_START_MARGIN_S:
            self.drop(flight, f"its lease runs out in {max(left_s, 0.0):.2f} s")
            return False
        flight.state = RUNNING
        flight.started_at = now
        self.buffered -= 1
        self.running += 1
        if self.buffered == 0 and self.fetch_waiting:
            self.on_change()  # a fetcher waiting for the buffer to drain
        return True

    def drop(self, flight: Flight, why: str) -> None:
        """Forgets a buffered job without running it; the server requeues it when its lease runs out."""
        assert flight.state == BUFFERED, flight.state
        flight.state = DROPPED
        self.buffered -= 1
        self.flights.pop(flight.job.id, None)
        self.stats.dropped += 1
        log.warning("job %s: not started: %s; the server requeues it", flight.job.id, why)
        self.on_change()

    def finish(self, flight: Flight, outcome: Outcome, now: float, run_s: float | None = None) -> bool:
        """A handler is done: True when its outcome is to be reported (False: shutdown handed the
        job back already). `run_s` is the handler's own run time when the caller measured it (a
        process-pool batch, whose jobs wait for each other in the child); else now - started."""
        if flight.abandoned:
            log.info("job %s finished after it was handed back (%s); outcome dropped", flight.job.id, outcome.kind)
            return False
        flight.state = REPORTING
        self.running -= 1
        if run_s is None:
            run_s = now - flight.started_at
        average = self.run_s_average
        self.run_s_average = run_s if average is None else average + RUN_S_AVERAGE_WEIGHT * (run_s - average)
        if self.idle_slots() or (self.fetch_waiting and self.fetch_due()):
            self.on_change()
        return True

    def process_batch_size(self, waiting: int) -> int:
        """Jobs a process-pool runner hands its child at once: about PROCESS_BATCH_S of measured
        work (one before the first job finished), at most PROCESS_BATCH_MAX, and no more than its
        share of the `waiting` buffered jobs, so that the other children are not left idle."""
        if self.run_s_average is None:
            return 1
        by_time = int(PROCESS_BATCH_S / max(self.run_s_average, 1e-6))
        share = -(-(waiting + 1) // self.concurrency)  # ceiling: this runner's share, itself included
        return max(1, min(PROCESS_BATCH_MAX, by_time, share))

    def idle(self) -> bool:
        """No lease held at all."""
        return not self.flights

    def idle_slots(self) -> bool:
        """No handler running and none about to start. (No handler running is not enough: a
        handler that never suspends leaves none running between two jobs of the asyncio pool.)"""
        return self.running == 0 and self.buffered == 0

    # ------------------------------------------------------------------------ stopping

    def release_buffered(self) -> list[tuple[Flight, Outcome]]:
        """Stop: every buffered job goes back at once (released: it never started, no attempt counted)."""
        buffered = [f for f in self.flights.values() if f.state == BUFFERED]
        for flight in buffered:
            flight.state = REPORTING
        self.stats.released += len(buffered)
        self.buffered = 0
        self.on_change()
        return [(flight, RELEASED) for flight in buffered]

    def abandon_running(self) -> list[tuple[Flight, Outcome]]:
        """Stop, past the grace period: every still-running job goes back as a retryable fail (it
        ran, so the attempt counts: a job that always outlives the grace period must still die)."""
        leftovers = [f for f in self.flights.values() if f.state == RUNNING]
        for flight in leftovers:
            flight.abandoned = True
            flight.state = REPORTING
            self.running -= 1
        self.stats.released += len(leftovers)
        self.on_change()
        return [(flight, ABANDONED) for flight in leftovers]

    # ------------------------------------------------------------------------ reporting

    def flush_due(self, count: int, oldest_at: float, now: float, stopping: bool) -> bool:
        """`count` waiting outcomes go out now: enough of them, the oldest (finished at `oldest_at`)
        waited its linger, nothing is running or buffered (no other outcome is coming soon), or
        the worker is stopping."""
        return (count >= self.ack_batch_max or self.idle_slots() or stopping
                or now >= oldest_at + self.ack_linger_s)

    @staticmethod
    def report_requests(batch: Sequence[tuple[Flight, Outcome]]) -> list[ReportRequest]:
        """Splits finished jobs into (method name, pairs, items) for release_many, ack_many and
        fail_many, each request within REPORT_BYTES_MAX of results or error texts."""
        acks = [(f, o) for f, o in batch if o.kind == "ok"]
        releases = [(f, o) for f, o in batch if o.kind == "released"]
        fails = [(f, o) for f, o in batch if o.kind not in ("ok", "released")]
        requests: list[ReportRequest] = []
        for pairs in chunks_by_size(releases, REPORT_BYTES_MAX):
            requests.append(("release_many", pairs, [(f.job.id, f.job.lease_token) for f, _ in pairs]))
        for pairs in chunks_by_size(acks, REPORT_BYTES_MAX):
            requests.append(("ack_many", pairs, [(f.job.id, f.job.lease_token, o.result) for f, o in pairs]))
        for pairs in chunks_by_size(fails, REPORT_BYTES_MAX):
            requests.append(("fail_many", pairs, [(f.job.id, f.job.lease_token, o.error, o.kind != "rejected", o.delay_s)
                                                  for f, o in pairs]))
        return requests

    def settle(self, method: str, pairs: Sequence[tuple[Flight, Outcome]], results: Sequence[Any]) -> None:
        """Counts reported jobs and forgets them (their leases are no longer held); a refused item
        is logged and counted for that job alone. `results`: None or an error per item."""
        verb = method.removesuffix("_many")
        for (flight, outcome), result in zip(pairs, results):
            self.flights.pop(flight.job.id, None)
            counter = _STAT_OF_KIND.get(outcome.kind)  # None: handed back unfinished, counted as released
            if counter is not None:
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            if result is None:
                continue
            if isinstance(result, JobError):
                if not flight.lost:
                    self.stats.lost += 1
                log.warning("%s of job %s refused (%s): the lease expired or moved; the job runs again "
                            "elsewhere", verb, flight.job.id, getattr(result, "code", result))
            else:
                log.error("%s of job %s not recorded: %s", verb, flight.job.id, result)
        self.on_change()

    # ------------------------------------------------------------------------ heartbeats and leases

    def heartbeat_ids(self) -> list[str]:
        """The jobs a heartbeat names: buffered and running ones. (A finished job's ack may be in
        flight, and the server would answer that this worker no longer holds it: a false "lost".)"""
        return [job_id for job_id, f in self.flights.items() if f.state in (BUFFERED, RUNNING) and not f.lost]

    def mark_lost(self, job_ids: Iterable[str], why: str) -> None:
        """The server says these leases are not ours any more: a buffered one is dropped, a running
        one's outcome will be refused."""
        for job_id in job_ids:
            flight = self.flights.get(job_id)
            if flight is None or flight.lost:
                continue
            flight.lost = True
            self.stats.lost += 1
            if flight.state == BUFFERED:
                self.drop(flight, why)
            else:
                log.warning("job %s: %s; its outcome will be refused, it may run again elsewhere", job_id, why)

    def drop_expiring(self, now: float) -> None:
        """Drops buffered jobs whose lease is about to run out (their extension failed)."""
        for flight in [f for f in self.flights.values()
                       if f.state == BUFFERED and f.expires_at - now < LEASE_START_MARGIN_S]:
            self.drop(flight, f"its lease runs out in {max(flight.expires_at - now, 0.0):.2f} s")

    def due_extensions(self, now: float) -> list[Flight]:
        """Leases to extend now (buffered and running alike), at most one request's worth."""
        due = [f for f in self.flights.values() if f.extend_at <= now and not f.lost and not f.abandoned]
        return due[:EXTEND_BATCH_MAX]  # the rest are still due at the next round, a moment later

    def extended(self, flights: Sequence[Flight], results: Sequence[Any], asked_at: float, now: float) -> None:
        """Notes the answer to an extend request sent at monotonic `asked_at`: per item the new
        expiry, or an error (a refused lease is lost; another error retries soon)."""
        lost = []
        for flight, result in zip(flights, results):
            if isinstance(result, JobError):
                lost.append(flight.job.id)
            elif isinstance(result, BaseException):
                flight.extend_at = now + EXTEND_RETRY_S
            else:
                flight.extend_at = now + flight.lease_s / 2
                # The server started the new lease after the request left: this end is on the safe side.
                flight.expires_at = asked_at + flight.lease_s
        if lost:
            self.mark_lost(lost, "lease extension refused")

    def extend_failed(self, flights: Sequence[Flight], now: float) -> None:
        """The whole extend request failed (no answer): try again soon."""
        for flight in flights:
            flight.extend_at = now + EXTEND_RETRY_S

    def shortest_lease_s(self) -> float:
        """The shortest own lease among the held jobs (LEASE_S_MAX when none)."""
        return min((f.lease_s for f in self.flights.values()), default=LEASE_S_MAX)

    def next_extension(self) -> float:
        """When the next lease is due for extension (monotonic s; inf when none)."""
        return min((f.extend_at for f in self.flights.values() if not f.lost and not f.abandoned),
                   default=float("inf"))


# ---------------------------------------------------------------------------- pure helpers


def outcome(job: Any, result: Any, exc: BaseException | None) -> Outcome:
    """The outcome of a handler run that returned `result` or raised `exc`."""
    kind = outcome_of(exc)
    if kind == "ok":
        result, size = checked_result(job, result)
        return Outcome("ok", result=result, size_bytes=size)
    text = str(exc) if kind == "retried" else error_text(exc)
    return Outcome(kind, error=text, delay_s=exc.delay_s if kind == "retried" else None, size_bytes=len(text))


def checked_result(job: Any, result: Any) -> tuple[Any, int]:
    """The result to store and its encoded size, or (None, 0) (with a warning) when the server could not keep it."""
    if result is None:
        return None, 0
    try:
        size = len(msgpack.packb(result))
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("job %s: result dropped: not msgpack data (%s)", job.id, exc)
        return None, 0
    if size > RESULT_BYTES_MAX:
        log.warning("job %s: result dropped: %d bytes is over the %d byte bound", job.id, size, RESULT_BYTES_MAX)
        return None, 0
    return result, size


def chunks_by_size(pairs: Sequence[tuple[Flight, Outcome]], size_max: int) -> Iterator[list]:
    """Consecutive runs of `pairs` whose outcomes' sizes add up to at most `size_max` (at least one each)."""
    chunk: list = []
    size = 0
    for pair in pairs:
        if chunk and size + pair[1].size_bytes > size_max:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += pair[1].size_bytes
    if chunk:
        yield chunk


def payload_bytes(payload: Any) -> int:
    """The encoded size of a fetched payload (about a microsecond for a small one)."""
    try:
        return len(msgpack.packb(payload, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return 0


def default_prefetch(concurrency: int) -> int:
    """The bound of the default (paced) prefetch buffer of a Worker with `concurrency` slots."""
    return min(PREFETCH_DEFAULT_MAX, CONCURRENCY_MAX - concurrency)


def error_text(exc: BaseException, bytes_max: int = ERROR_TEXT_BYTES_MAX) -> str:
    """`Type: message`, a blank line, then the traceback; the middle is cut to fit `bytes_max`.

    For an exception from a process pool the child's traceback is part of the chain.
    """
    text = f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(exc))
    data = text.encode()
    if len(data) <= bytes_max:
        return text
    marker = f"\n... [{len(data) - bytes_max} bytes cut] ...\n".encode()
    room = bytes_max - len(marker) - 16  # the count in the marker may grow by a digit or two
    head = room // 4  # the exception line and the outer frames; the tail keeps the innermost frames
    return (data[:head] + marker + data[len(data) - (room - head):]).decode(errors="ignore")
