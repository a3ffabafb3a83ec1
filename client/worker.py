"""The worker runtime: pull jobs, run handlers, ack or fail them.

Theory of operation
-------------------
A `Worker` runs at most `concurrency` handlers at a time. Beside them it keeps a local buffer of
leased jobs waiting for a slot, so that one lease request (a replicated log entry, a few ms)
brings many jobs instead of one per free slot. The buffer is on by default (SPEC "Backpressure"):
with `prefetch="auto"` it holds at most PREFETCH_DEFAULT_MAX jobs and PREFETCH_BYTES_MAX bytes of
payload, and no more than the slots get through in PREFETCH_HORIZON_S at the handlers' measured
pace (none before the first job finished): short jobs get a deep buffer, long ones almost none,
so that a worker never sits on work that other workers could start. `prefetch=N` is a fixed
buffer of N jobs; `prefetch=0` fetches only for free slots. Every job is in one of these states from its fetch until its outcome is
answered:

    buffered    leased, waiting in the buffer for a slot
    running     its handler runs
    reporting   finished; its ack or fail is queued or on the wire, and it keeps its lease until
                the answer (a finished job frees its slot at once: waiting for the ack's round
                trip idled every slot once per job)

Bounds, with P the buffer's bound at the time: running <= concurrency; running + buffered <=
concurrency + P; all leases held <= 2 * (concurrency + P): the reporting ones count too, so acks
that lag a whole buffer behind hold fetching back. (A bound of `concurrency` reporting jobs would
squeeze the buffer whenever more than that wait for an ack: at 10k jobs/s, an ack round trip of 10
ms has 100 on the way.) The fetcher asks for as many jobs as these bounds leave room for, once a
quarter of P is free (or a slot is idle): a request brings at least that many, and the buffer stays
three quarters full ahead of the slots while the request is out. It long-polls only when the buffer
is empty: with work in hand, a refill that finds the queue dry waits for the buffer to drain
instead, so that the fetch in flight at shutdown is never a long poll while jobs sit in the buffer.
With `prefetch=0` it fetches only for free slots, as the runtime did before it had a buffer.

Buffered jobs keep their leases: the beater names them in heartbeats and extends them like
running ones. A buffered job is never started on a lease that is lost or has less than
`LEASE_START_MARGIN_S` left (say its extension failed while the cluster was unreachable): it is
dropped, and the server requeues it when the lease runs out.

With the sync pools ("threads", "processes") four roles run on their own threads:

    fetcher    fills the buffer (see above); in burst mode it stops the worker once a fetch
               comes back empty with nothing in flight.
    runners    `concurrency` daemon threads taking jobs from the buffer, one handler each at a
               time: called directly ("threads") or in a process pool ("processes", below).
    reporter   sends finished outcomes in batches: one `ack_many` and one `fail_many` request
               once `ack_batch_max` outcomes wait, or `ack_linger_s` after the oldest one
               finished, or at once when no job is running or buffered (nothing else is coming
               soon), whichever comes first. Under load outcomes also gather while a request is out.
    beater     a heartbeat every `heartbeat_s` naming the jobs buffered and running, from a thread
               of its own so a busy handler cannot starve it (FEATURES.md pain point 7); it also
               extends every lease that has run past about half its span.

Process pool: each runner owns one message to a pool process at a time, and it carries a batch:
the next buffered job plus as many more as make about PROCESS_BATCH_S of measured work (one job
until a job has finished, at most PROCESS_BATCH_MAX, at most the runner's share of what waits).
The child runs them in turn and sends back every outcome with its own run time in one message,
so the pacing average stays per job. A round trip through the pool costs about as much as a 1 ms
job; batching is what lets 1 ms jobs use the cores (README "Benchmarks"). Jobs of a batch count
as running from the moment they are handed over; their leases are kept alive like any other.

With pool="asyncio" the same roles are tasks on one event loop and the client is an
`AsyncClient`; there the heartbeat shares the loop, so a handler that blocks the loop delays it.

Shutdown (SIGTERM/SIGINT under `run()`, `stop()`, or the end of a burst): stop fetching and wait
for the fetch in flight (a long poll only when nothing is buffered; jobs it brings are handed
straight back), hand every buffered job back at once, let the running handlers finish until
`grace_s` after the stop, hand the rest back, flush the outcomes, stop the heartbeats. A buffered
job goes back with `/v1/release`: ready for another worker at once, and the attempt it was leased
for does not count (it never started). A job still running past the grace period goes back as a
fail with retry and no delay: its attempt counts, because it did run (a job that always outlives
the grace period must still reach the dead-letter queue). A second signal exits the process at once.

Every call goes through the client, which follows the leader. A transient error (no answer, 503)
in fetch or in reporting is retried with backoff; a refused ack (409: the lease expired or moved
to another worker) is logged and counted for that job alone, because the job is someone else's
now.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import logging
import multiprocessing
import os
import pickle
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import msgpack

from client._base import LeasedJob
from client.errors import JobError, RaftqError, ServerError, TransportError
from raftq.protocol import (BATCH_COUNT_MAX, DELAY_S_MAX, ERROR_TEXT_BYTES_MAX, FETCH_COUNT_MAX, FETCH_WAIT_S_MAX,
                            LEASE_S_MAX, LEASE_S_MIN, RESULT_BYTES_MAX)

log = logging.getLogger("raftq.worker")

#: The server's bounds (raftq.protocol): at most ERROR_TEXT_BYTES_MAX of error text per failed job
#: (the worker cuts the middle of a long traceback itself so the head and the innermost frames
#: survive); a result over RESULT_BYTES_MAX gets the whole ack batch refused with 413 (so an
#: oversized one is dropped here, with a warning, rather than sink its neighbours); BATCH_COUNT_MAX
#: items per ack, fail or extend request, FETCH_COUNT_MAX jobs per fetch.
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
#: Defaults of the ack batching: flush at this many outcomes, or this long after the oldest one.
ACK_BATCH_MAX_DEFAULT = 100
ACK_LINGER_S_DEFAULT = 0.002
#: The linger delays every outcome under load; more than this is a misconfiguration.
ACK_LINGER_S_MAX = 1.0
#: SPEC (raftq.protocol): leases run 1 s – 12 h; the delay of a retry at most 7 days; the long
#: poll waits at most 20 s.
RETRY_DELAY_S_MAX = DELAY_S_MAX
WAIT_S_MAX = FETCH_WAIT_S_MAX
#: Pause after a transient error: doubles from the minimum to the cap, with jitter so that many
#: workers do not hit a newly elected leader in step.
BACKOFF_S_MIN = 0.1
BACKOFF_S_MAX = 5.0
#: Pause after an empty fetch that came back sooner than asked (a server that does not long-poll),
#: so that an idle worker never spins.
IDLE_POLL_S = 0.1
#: After a failed extend call, try again this much later rather than at the next heartbeat.
EXTEND_RETRY_S = 0.5
#: pool="processes": a runner sends its child about this much measured work per message, at most
#: PROCESS_BATCH_MAX jobs. A round trip through ProcessPoolExecutor costs about as much as a 1 ms
#: job (pickling, two pipe hops, two thread wake-ups), so one job per message halves the pool.
PROCESS_BATCH_S = 0.02
PROCESS_BATCH_MAX = 64
#: At shutdown, how long reporting may keep retrying a transient error after the grace period.
FLUSH_S_MAX = 10.0
#: How long shutdown waits for a fetch still in its long poll, beyond `wait_s`.
FETCH_JOIN_S = 15.0

POOLS = ("threads", "processes", "asyncio")

#: What a handler receives: the job as fetched (.id, .queue, .payload, .attempt, .lease,
#: .lease_expires_at, .priority). Frozen and picklable, so it crosses a process pool as is.
Job = LeasedJob
_TRANSIENT = (TransportError, ServerError)


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


# ---------------------------------------------------------------------------- middleware


class Middleware:
    """Hooks around the worker loop; every method is a no-op to override (dramatiq's shape).

    Hooks run on the worker's threads (on the event loop with pool="asyncio"), so keep them quick.
    An exception in a hook is logged and ignored: a broken metric must not stop the work.
    """

    def before_fetch(self, worker: "Worker") -> None:
        """Called before each fetch request."""

    def after_fetch(self, worker: "Worker", jobs: Sequence[Any]) -> None:
        """Called with the jobs a fetch returned (possibly none)."""

    def before_process(self, worker: "Worker", job: Any) -> None:
        """Called just before the handler runs."""

    def after_process(self, worker: "Worker", job: Any, result: Any, exc: BaseException | None) -> None:
        """Called when the handler returned `result` (exc is None) or raised `exc`."""

    def on_shutdown(self, worker: "Worker") -> None:
        """Called once, when the worker has stopped."""


class PrometheusMiddleware(Middleware):
    """Prometheus metrics for a worker.

    raftq_worker_jobs_processed_total{queue,outcome} counts handler runs by outcome (see
    `outcome_of`); raftq_worker_job_duration_seconds{queue} is the handler's run time.

    Args:
        registry: a prometheus_client CollectorRegistry (default: the global one).
    """

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.REGISTRY
        self.processed = prom.Counter("raftq_worker_jobs_processed_total", "Jobs run by this worker, by outcome.",
                                      ["queue", "outcome"], registry=self.registry)
        self.duration = prom.Histogram("raftq_worker_job_duration_seconds", "Handler run time.", ["queue"],
                                       registry=self.registry)
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics over HTTP on `addr:port` from a daemon thread."""
        import prometheus_client as prom

        prom.start_http_server(port, addr=addr, registry=self.registry)

    def before_process(self, worker: "Worker", job: Any) -> None:
        with self._lock:
            self._started[job.id] = time.perf_counter()

    def after_process(self, worker: "Worker", job: Any, result: Any, exc: BaseException | None) -> None:
        with self._lock:
            started = self._started.pop(job.id, None)
        self.processed.labels(job.queue, outcome_of(exc)).inc()
        if started is not None:
            self.duration.labels(job.queue).observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------- state


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
class _Outcome:
    kind: str  # ok | failed | retried | rejected | released (never started) | abandoned (running past grace)
    result: Any = None
    error: str = ""
    delay_s: float | None = None
    size_bytes: int = 0  # of the encoded result or the error text: requests are split by it


_RELEASED = _Outcome("released")
_ABANDONED = _Outcome("abandoned", error="worker shutting down: the job was still running after the grace period",
                      delay_s=0.0)

#: The states of a `_Flight` (see the module docstring); DROPPED ones are no longer held.
BUFFERED, RUNNING, REPORTING, DROPPED = "buffered", "running", "reporting", "dropped"


@dataclass(slots=True, eq=False)
class _Flight:
    """One job this worker holds a lease on, from fetch until its outcome is answered."""

    job: Any
    extend_at: float  # monotonic time at which to extend the lease next
    expires_at: float = float("inf")  # monotonic time at which the lease runs out, as reckoned here
    state: str = BUFFERED
    started_at: float = 0.0  # monotonic time its handler started
    lost: bool = False  # the server says another worker (or nobody) holds it now
    abandoned: bool = False  # handed back at shutdown while running; a late outcome is dropped


# ---------------------------------------------------------------------------- the worker


class Worker:
    """Runs handlers for jobs pulled from a raftq cluster.

    Args:
        client: a `client.Client` (pools "threads" and "processes") or `client.AsyncClient`
            (pool "asyncio"). The worker does not close it.
        handlers: {queue name: callable(job)}; `job` is a `Job` with .id, .queue, .payload,
            .attempt, .lease and .lease_expires_at (unix s, as fetched). The return value
            (msgpack data, at most 64 KiB) is kept as the job's result. With pool="asyncio"
            handlers are `async def` (a plain function runs in a thread); with pool="processes"
            they must be importable top-level functions, and job and result must pickle.
        queues: the queues to fetch from (default: every queue in `handlers`).
        concurrency: handlers run at once.
        prefetch: jobs leased ahead and buffered until a slot is free. "auto" (the default):
            up to 256 jobs and 16 MiB of payload, and no more than the slots get through in
            about 0.1 s at the handlers' measured pace, so long jobs are not held back in a
            buffer while other workers idle; an int N: a fixed buffer of N; 0: fetch only for
            free slots (for long jobs where every job should start on the first free worker).
            Leases held are at most `concurrency + prefetch` buffered or running, plus as many
            again whose ack is on its way.
        pool: "threads", "processes" or "asyncio".
        lease_s: how long each lease extension lasts; a job (buffered or running) is extended
            when it has held its lease for about half its span.
        heartbeat_s: seconds between heartbeats (the server requeues a silent worker's jobs).
        wait_s: long-poll wait of a fetch made with nothing buffered, up to 20 s.
        burst: stop once a fetch comes back empty with nothing in flight.
        grace_s: at shutdown, how long running handlers may take to finish.
        ack_batch_max: outcomes per ack (or fail) request; a request goes out as soon as this
            many are waiting, within [1, 1000].
        ack_linger_s: ... or this long after the oldest waiting one finished, or at once when
            no job is running or buffered; 0 sends whatever is waiting whenever the reporter is
            free.
        worker_id: this worker's name on the server (default: host-pid-random).
        middleware: `Middleware` instances, called in order (after_* hooks in reverse).

    Raises:
        ValueError: for a bad option, a queue without a handler, or (pool="processes") a
            handler that does not pickle.
    """

    def __init__(self, client: Any, handlers: Mapping[str, Callable[[Any], Any]], *,
                 queues: Sequence[str] | None = None, concurrency: int = 4, prefetch: int | str = "auto",
                 pool: str = "threads", lease_s: float = 30.0, heartbeat_s: float = 2.0, wait_s: float = 5.0,
                 burst: bool = False, grace_s: float = 30.0, ack_batch_max: int = ACK_BATCH_MAX_DEFAULT,
                 ack_linger_s: float = ACK_LINGER_S_DEFAULT, worker_id: str | None = None,
                 middleware: Iterable[Middleware] = ()) -> None:
        self.client = client
        self.handlers = dict(handlers)
        self.queues = tuple(queues) if queues is not None else tuple(self.handlers)
        self.concurrency = concurrency
        paced = prefetch == "auto"
        self.prefetch = default_prefetch(concurrency) if paced else prefetch  # the buffer's bound
        self._prefetch_paced = paced  # bounded further by PREFETCH_HORIZON_S
        self.pool = pool
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.wait_s = wait_s
        self.burst = burst
        self.grace_s = grace_s
        self.ack_batch_max = ack_batch_max
        self.ack_linger_s = ack_linger_s
        self.worker_id = worker_id or default_worker_id()
        self.middleware = tuple(middleware)
        self._validate()
        self.stats = WorkerStats()
        # The fields below and `stats` are guarded by `_lock`. `_cond` wakes the fetcher and
        # shutdown, `_report_cond` the thread runtime's reporter; on a per-job path they are
        # notified only when their waiter's condition may have turned true.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._report_cond = threading.Condition(self._lock)
        self._flights: dict[str, _Flight] = {}
        self._running = 0  # flights RUNNING
        self._buffered = 0  # flights BUFFERED
        self._fetch_waiting = False  # the fetcher waits for room: wake it when there is
        self._run_s_average: float | None = None  # handlers' run time, a running average (s)
        self._payload_bytes_average: float | None = None  # fetched payloads' encoded size, a running average
        self._generation = 0  # bumped by `_changed`: a flight left, a slot freed, a stop
        self._stopping = threading.Event()
        self._stop_reason = ""
        self._stopped_at = 0.0
        self._signals_seen = 0
        self._started = False
        self._fatal: BaseException | None = None
        self._wake: Callable[[], None] = lambda: None  # the asyncio runtime's wake-up, from any thread

    def _validate(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not 1 <= self.concurrency <= CONCURRENCY_MAX:
            raise ValueError(f"concurrency must be within [1, {CONCURRENCY_MAX}], got {self.concurrency!r}")
        if not (isinstance(self.prefetch, int) and 0 <= self.prefetch <= CONCURRENCY_MAX - self.concurrency):
            raise ValueError(f"prefetch must be within [0, {CONCURRENCY_MAX - self.concurrency}] (concurrency + "
                             f"prefetch at most {CONCURRENCY_MAX}), got {self.prefetch!r}")
        if not self.queues:
            raise ValueError("no queues to work on: pass handlers (and optionally queues)")
        missing = [name for name in self.queues if name not in self.handlers]
        if missing:
            raise ValueError(f"no handler for queue(s) {', '.join(missing)}")
        if not LEASE_S_MIN <= self.lease_s <= LEASE_S_MAX:
            raise ValueError(f"lease_s must be within [{LEASE_S_MIN:g}, {LEASE_S_MAX:g}], got {self.lease_s!r}")
        if not 0 < self.heartbeat_s:
            raise ValueError(f"heartbeat_s must be positive, got {self.heartbeat_s!r}")
        if not 0 <= self.wait_s <= WAIT_S_MAX:
            raise ValueError(f"wait_s must be within [0, {WAIT_S_MAX:g}], got {self.wait_s!r}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must not be negative, got {self.grace_s!r}")
        if not 1 <= self.ack_batch_max <= REPORT_BATCH_MAX:
            raise ValueError(f"ack_batch_max must be within [1, {REPORT_BATCH_MAX}], got {self.ack_batch_max!r}")
        if not 0 <= self.ack_linger_s <= ACK_LINGER_S_MAX:
            raise ValueError(f"ack_linger_s must be within [0, {ACK_LINGER_S_MAX:g}], got {self.ack_linger_s!r}")
        if self.pool == "processes":
            for name, handler in self.handlers.items():
                try:
                    pickle.dumps(handler)
                except Exception as exc:
                    raise ValueError(f"pool='processes' needs handlers that pickle (importable top-level "
                                     f"functions); the handler of queue {name!r} does not: {exc}") from None

    # ------------------------------------------------------------------------ public

    def run(self) -> WorkerStats:
        """Work until stopped: by SIGTERM/SIGINT (when called on the main thread), `stop()`, or the
        end of a burst. Blocks; with pool="asyncio" runs `arun()` in a new event loop.

        Returns:
            The final `WorkerStats`.

        Raises:
            RequestError: the cluster refused the worker's requests as malformed or unauthorized
                (the worker shuts down cleanly first).
        """
        if self.pool == "asyncio":
            return asyncio.run(self.arun())
        self._begin()
        runtime = _ThreadRuntime(self)
        with self._signal_handlers():
            try:
                runtime.start()
                while not self._stopping.wait(1.0):
                    pass
            finally:
                runtime.shutdown()
        return self._end()

    async def arun(self) -> WorkerStats:
        """The pool="asyncio" worker as a coroutine, for use inside a running event loop.

        Installs SIGTERM/SIGINT handlers on the loop when it runs on the main thread.
        Returns and raises like `run()`.
        """
        if self.pool != "asyncio":
            raise RuntimeError(f"arun() is for pool='asyncio'; this worker's pool is {self.pool!r}: call run()")
        self._begin()
        loop = asyncio.get_running_loop()
        runtime = _AsyncRuntime(self, loop)
        installed = self._install_loop_signals(loop)
        try:
            await runtime.run()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
        return self._end()

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the worker to shut down gracefully; safe from any thread and from signal handlers."""
        with self._lock:
            if not self._stopping.is_set():
                self._stop_reason = reason
                self._stopped_at = time.monotonic()
                self._stopping.set()
            self._changed()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping.is_set()

    def inflight_ids(self) -> list[str]:
        """Ids of the jobs this worker holds leases on now (buffered, running or reporting)."""
        with self._lock:
            return list(self._flights)

    # ------------------------------------------------------------------------ life cycle

    def _begin(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs once; make a new one")
        self._started = True
        log.info("worker %s: started on %s (pool=%s, concurrency=%d, prefetch=%d%s)", self.worker_id,
                 ",".join(self.queues), self.pool, self.concurrency, self.prefetch, ", burst" if self.burst else "")

    def _end(self) -> WorkerStats:
        self._hooks("on_shutdown")
        s = self.stats
        log.info("worker %s: stopped (%s): %d processed (%d ok, %d failed, %d retried, %d rejected), "
                 "%d lost, %d released, %d dropped", self.worker_id, self._stop_reason, s.processed, s.succeeded,
                 s.failed, s.retried, s.rejected, s.lost, s.released, s.dropped)
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _guarded(self, role: str, target: Callable[[], Any]) -> Any:
        """Runs a role's loop; a bug in it stops the worker loudly instead of leaving it hung."""
        try:
            return target()
        except Exception as exc:
            log.exception("worker %s: the %s loop failed", self.worker_id, role)
            self._fatal_error(exc)

    async def _aguarded(self, role: str, target: Callable[[], Any]) -> Any:
        try:
            return await target()
        except Exception as exc:
            log.exception("worker %s: the %s loop failed", self.worker_id, role)
            self._fatal_error(exc)

    def _fatal_error(self, exc: BaseException) -> None:
        """Stops the worker; run() raises `exc` once shut down."""
        self._fatal = exc
        self.stop(f"fatal: {exc}")

    @contextlib.contextmanager
    def _signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _install_loop_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum, None)
            except (NotImplementedError, RuntimeError):  # Windows loops, or a loop off the main thread
                continue
            installed.append(signum)
        return installed

    def _on_signal(self, signum: int, frame: Any = None) -> None:
        name = signal.Signals(signum).name
        self._signals_seen += 1
        if self._signals_seen > 1:
            log.warning("worker %s: second %s: exiting now; %d leased job(s) return to their queue when the "
                        "server notices (heartbeat timeout or lease expiry)", self.worker_id, name, len(self._flights))
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(128 + signum)
        log.info("worker %s: %s: stopping; buffered jobs go back now, running ones get %g s to finish (send it "
                 "again to exit at once)", self.worker_id, name, self.grace_s)
        self.stop(f"{name} received")

    # ------------------------------------------------------------------------ slots and buffer (shared by runtimes)

    def _changed(self) -> None:
        """Wakes every waiter; call with `_lock` held."""
        self._generation += 1
        self._cond.notify_all()
        self._report_cond.notify_all()
        self._wake()

    def _prefetch_now(self) -> int:
        """The buffer's bound now: `prefetch`, or by default what the slots run in PREFETCH_HORIZON_S."""
        if not self._prefetch_paced:
            return self.prefetch
        if self._run_s_average is None:
            return 0
        paced = self.concurrency * PREFETCH_HORIZON_S / max(self._run_s_average, 1e-6)
        by_bytes = PREFETCH_BYTES_MAX / max(self._payload_bytes_average or 0.0, 1.0)
        return min(self.prefetch, int(paced), int(by_bytes))

    def _process_batch_size(self, waiting: int) -> int:
        """Jobs a process-pool runner hands its child at once: about PROCESS_BATCH_S of measured
        work (one before the first job finished), at most PROCESS_BATCH_MAX, and no more than its
        share of the jobs waiting, so that the other children are not left idle."""
        with self._lock:
            average = self._run_s_average
        if average is None:
            return 1
        by_time = int(PROCESS_BATCH_S / max(average, 1e-6))
        share = -(-(waiting + 1) // self.concurrency)  # ceiling: this runner's share, itself included
        return max(1, min(PROCESS_BATCH_MAX, by_time, share))

    def _fetch_size(self, prefetch: int | None = None) -> int:
        """How many jobs a fetch may ask for now within the bounds (module docstring); with `_lock`."""
        prefetch = self._prefetch_now() if prefetch is None else prefetch
        return min(self.concurrency + prefetch - self._running - self._buffered,
                   2 * (self.concurrency + prefetch) - len(self._flights), LEASE_COUNT_MAX)

    def _fetch_due(self) -> bool:
        """A fetch is worth its round trip: a slot is idle, or a quarter of the buffer is free.

        A quarter, not half: the buffer's head start while a request is out is what keeps the
        slots busy (`raftq bench`, 4 no-op slots: +11 % jobs/s over refilling at half).
        """
        prefetch = self._prefetch_now()
        size = self._fetch_size(prefetch)
        return size > 0 and (size >= max(1, prefetch // 4) or self._running + self._buffered < self.concurrency)

    def _take(self, jobs: Sequence[Any], *, state: str = BUFFERED) -> list[_Flight]:
        """Records fetched jobs as held: buffered for a slot (or reporting, when handed straight back)."""
        now_wall, now = time.time(), time.monotonic()
        flights = []
        with self._lock:
            for job in jobs:
                span_s = job.lease_expires_at - now_wall
                if not 0 < span_s <= LEASE_S_MAX:  # a clock far off the server's: trust our own setting
                    span_s = self.lease_s
                flight = _Flight(job, extend_at=now + span_s / 2, expires_at=now + span_s, state=state)
                self._flights[job.id] = flight
                flights.append(flight)
                if self._prefetch_paced:
                    size, average = _payload_bytes(job.payload), self._payload_bytes_average
                    self._payload_bytes_average = (size if average is None
                                                   else average + RUN_S_AVERAGE_WEIGHT * (size - average))
            if state == BUFFERED:
                self._buffered += len(flights)
            self.stats.fetched += len(jobs)
            self.stats.inflight_max = max(self.stats.inflight_max, len(self._flights))
        return flights

    def _start(self, flight: _Flight) -> bool:
        """A slot takes a buffered job: True when its handler may run (its lease is held and has time left)."""
        with self._lock:
            if flight.state != BUFFERED:  # handed back at shutdown, or dropped by the beater
                return False
            if flight.lost:
                self._drop(flight, "its lease was lost while it waited for a slot")
                return False
            left_s = flight.expires_at - time.monotonic()
            if left_s < LEASE_START_MARGIN_S:
                self._drop(flight, f"its lease runs out in {max(left_s, 0.0):.2f} s")
                return False
            flight.state = RUNNING
            flight.started_at = time.monotonic()
            self._buffered -= 1
            self._running += 1
            if self._buffered == 0 and self._fetch_waiting:
                self._changed()  # a fetcher waiting for the buffer to drain
            return True

    def _drop(self, flight: _Flight, why: str) -> None:
        """Forgets a buffered job without running it; the server requeues it when its lease runs out."""
        assert flight.state == BUFFERED, flight.state
        flight.state = DROPPED
        self._buffered -= 1
        self._flights.pop(flight.job.id, None)
        self.stats.dropped += 1
        log.warning("job %s: not started: %s; the server requeues it", flight.job.id, why)
        self._changed()

    def _finish(self, flight: _Flight, outcome: _Outcome, report: Callable[[tuple[_Flight, _Outcome]], None],
                run_s: float | None = None) -> None:
        """A handler is done: count it and queue its outcome, unless shutdown handed the job back already.

        `run_s` is the handler's own run time when the caller measured it (a process-pool batch,
        whose jobs wait for each other in the child); else the time since the job started."""
        with self._lock:
            if flight.abandoned:
                log.info("job %s finished after it was handed back (%s); outcome dropped", flight.job.id, outcome.kind)
                return
            flight.state = REPORTING
            self._running -= 1
            if run_s is None:
                run_s = time.monotonic() - flight.started_at
            average = self._run_s_average
            self._run_s_average = run_s if average is None else average + RUN_S_AVERAGE_WEIGHT * (run_s - average)
            report((flight, outcome))
            if self._idle_slots() or (self._fetch_waiting and self._fetch_due()):
                self._changed()

    def _release_buffered(self, report: Callable[[tuple[_Flight, _Outcome]], None]) -> list[_Flight]:
        """Shutdown: hands every buffered job back at once (fail, retry, no delay)."""
        with self._lock:
            buffered = [f for f in self._flights.values() if f.state == BUFFERED]
            for flight in buffered:
                flight.state = REPORTING
                self.stats.released += 1
                report((flight, _RELEASED))
            self._buffered = 0
            self._changed()
        if buffered:
            log.info("worker %s: %d buffered job(s) handed back for another worker", self.worker_id, len(buffered))
        return buffered

    def _abandon_running(self, report: Callable[[tuple[_Flight, _Outcome]], None]) -> list[_Flight]:
        """Shutdown past grace: hands every still-running job back as retryable."""
        with self._lock:
            leftovers = [f for f in self._flights.values() if f.state == RUNNING]
            for flight in leftovers:
                flight.abandoned = True
                flight.state = REPORTING
                self._running -= 1
                self.stats.released += 1
                report((flight, _ABANDONED))
            self._changed()
        if leftovers:
            log.warning("worker %s: %d job(s) still running %.1f s after the stop (grace %g s): handed back for a "
                        "retry (%s)", self.worker_id, len(leftovers), time.monotonic() - self._stopped_at, self.grace_s,
                        ", ".join(f.job.id for f in leftovers[:10]))
        return leftovers

    def _release(self, jobs: Sequence[Any], report: Callable[[tuple[_Flight, _Outcome]], None]) -> None:
        """Jobs fetched after the stop: hand them straight back."""
        with self._lock:
            for flight in self._take(jobs, state=REPORTING):
                self.stats.released += 1
                report((flight, _RELEASED))

    def _running_count(self) -> int:
        with self._lock:
            return self._running

    def _grace_left_s(self) -> float:
        return max(0.0, self._stopped_at + self.grace_s - time.monotonic())

    def _idle(self) -> bool:
        with self._lock:
            return not self._flights

    # ------------------------------------------------------------------------ processing (shared)

    def _hooks(self, name: str, *args: Any) -> None:
        middleware = reversed(self.middleware) if name.startswith("after_") else self.middleware
        for item in middleware:
            try:
                getattr(item, name)(self, *args)
            except Exception:
                log.exception("middleware %s.%s failed; ignored", type(item).__name__, name)

    def _handler_for(self, job: Any) -> Callable[[Any], Any]:
        handler = self.handlers.get(job.queue)
        if handler is None:
            raise Reject(f"worker {self.worker_id} has no handler for queue {job.queue!r}")
        return handler

    def _process(self, job: Any, invoke: Callable[[Callable, Any], Any]) -> _Outcome:
        """Runs one job's handler through `invoke` (a direct call, or a process pool), with hooks."""
        self._hooks("before_process", job)
        result = exc = None
        try:
            result = invoke(self._handler_for(job), job)
        except BaseException as error:  # a handler's failure, even SystemExit, is the job's outcome
            exc = error
        self._hooks("after_process", job, result, exc)
        return _outcome(job, result, exc)

    async def _process_async(self, job: Any) -> _Outcome:
        self._hooks("before_process", job)
        result = exc = None
        try:
            handler = self._handler_for(job)
            if _is_async(handler):
                result = await handler(job)
            else:
                result = await asyncio.to_thread(handler, job)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            exc = error
        self._hooks("after_process", job, result, exc)
        return _outcome(job, result, exc)

    # ------------------------------------------------------------------------ reporting (shared)

    def _flush_due(self, count: int, oldest_at: float) -> bool:
        """Waiting outcomes go out now: enough of them, the oldest waited its linger, nothing is
        running or buffered (no other outcome is coming soon), or the worker is stopping. With `_lock`."""
        return (count >= self.ack_batch_max or self._idle_slots() or self._stopping.is_set()
                or time.monotonic() >= oldest_at + self.ack_linger_s)

    def _idle_slots(self) -> bool:
        """No handler running and none about to start. (No handler running is not enough: a
        handler that never suspends leaves none running between two jobs of the asyncio pool.)"""
        return self._running == 0 and self._buffered == 0

    def _report_requests(self, batch: Sequence[tuple[_Flight, _Outcome]]):
        """Splits finished jobs into (method name, pairs, items) for ack_many, fail_many and
        release_many, each request within REPORT_BYTES_MAX of results or error texts."""
        acks = [(f, o) for f, o in batch if o.kind == "ok"]
        releases = [(f, o) for f, o in batch if o.kind == "released"]
        fails = [(f, o) for f, o in batch if o.kind not in ("ok", "released")]
        requests = []
        for pairs in _chunks_by_size(releases, REPORT_BYTES_MAX):
            requests.append(("release_many", pairs, [(f.job.id, f.job.lease) for f, _ in pairs]))
        for pairs in _chunks_by_size(acks, REPORT_BYTES_MAX):
            requests.append(("ack_many", pairs, [(f.job.id, f.job.lease, o.result) for f, o in pairs]))
        for pairs in _chunks_by_size(fails, REPORT_BYTES_MAX):
            requests.append(("fail_many", pairs, [(f.job.id, f.job.lease, o.error, o.kind != "rejected", o.delay_s)
                                                  for f, o in pairs]))
        return requests

    def _settle(self, method: str, pairs: Sequence[tuple[_Flight, _Outcome]], results: Sequence[Any]) -> None:
        """Counts reported jobs and forgets them (their leases are no longer held); a refused item
        is logged and counted for that job alone."""
        verb = method.removesuffix("_many")
        with self._lock:
            for (flight, outcome), result in zip(pairs, results):
                self._flights.pop(flight.job.id, None)
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
            self._changed()

    def _give_up_reporting(self) -> bool:
        """Reporting retries transient errors for ever, except during shutdown, where it is bounded."""
        return self._stopping.is_set() and time.monotonic() > self._stopped_at + self.grace_s + FLUSH_S_MAX

    # ------------------------------------------------------------------------ heartbeats and leases (shared)

    def _heartbeat_ids(self) -> list[str]:
        # Buffered and running jobs: a finished job's ack may be in flight, and the server would
        # answer that this worker no longer holds it (a false "lost").
        with self._lock:
            return [job_id for job_id, f in self._flights.items() if f.state in (BUFFERED, RUNNING) and not f.lost]

    def _mark_lost(self, job_ids: Iterable[str], why: str) -> None:
        with self._lock:
            for job_id in job_ids:
                flight = self._flights.get(job_id)
                if flight is None or flight.lost:
                    continue
                flight.lost = True
                self.stats.lost += 1
                if flight.state == BUFFERED:
                    self._drop(flight, why)
                else:
                    log.warning("job %s: %s; its outcome will be refused, it may run again elsewhere", job_id, why)

    def _drop_expiring(self, now: float) -> None:
        """Drops buffered jobs whose lease is about to run out (their extension failed)."""
        with self._lock:
            for flight in [f for f in self._flights.values()
                           if f.state == BUFFERED and f.expires_at - now < LEASE_START_MARGIN_S]:
                self._drop(flight, f"its lease runs out in {max(flight.expires_at - now, 0.0):.2f} s")

    def _due_extensions(self, now: float) -> list[_Flight]:
        with self._lock:
            due = [f for f in self._flights.values() if f.extend_at <= now and not f.lost and not f.abandoned]
        return due[:EXTEND_BATCH_MAX]  # the rest are still due at the next round, a moment later

    def _extended(self, flights: Sequence[_Flight], results: Sequence[Any], asked_at: float) -> None:
        """Notes the answer to an extend request sent at monotonic `asked_at`."""
        now = time.monotonic()
        lost = []
        with self._lock:
            for flight, result in zip(flights, results):
                if isinstance(result, JobError):
                    lost.append(flight.job.id)
                elif isinstance(result, BaseException):
                    flight.extend_at = now + EXTEND_RETRY_S
                else:
                    flight.extend_at = now + self.lease_s / 2
                    # The server started the new lease after the request left: this end is on the safe side.
                    flight.expires_at = asked_at + self.lease_s
        if lost:
            self._mark_lost(lost, "lease extension refused")

    def _extend_failed(self, flights: Sequence[_Flight], exc: BaseException) -> None:
        log.warning("worker %s: extending %d lease(s) failed (%s); retrying", self.worker_id, len(flights), exc)
        retry_at = time.monotonic() + EXTEND_RETRY_S
        with self._lock:
            for flight in flights:
                flight.extend_at = retry_at

    def _next_extension(self) -> float:
        with self._lock:
            return min((f.extend_at for f in self._flights.values() if not f.lost and not f.abandoned),
                       default=float("inf"))


_STAT_OF_KIND = {"ok": "succeeded", "failed": "failed", "retried": "retried", "rejected": "rejected"}


# ---------------------------------------------------------------------------- the sync runtime


class _Outbox:
    """The thread runtime's finished outcomes, waiting for the reporter (guarded by the worker's lock)."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.items: list[tuple[_Flight, _Outcome]] = []
        self.oldest_at = 0.0
        self.closed = False

    def put(self, item: tuple[_Flight, _Outcome]) -> None:
        w = self.w
        with w._lock:
            self.items.append(item)
            if len(self.items) == 1:
                self.oldest_at = time.monotonic()
                w._report_cond.notify()
            elif len(self.items) == w.ack_batch_max or w._idle_slots():
                w._report_cond.notify()

    def close(self) -> None:
        with self.w._lock:
            self.closed = True
            self.w._report_cond.notify()

    def take(self) -> tuple[list[tuple[_Flight, _Outcome]], bool]:
        """The next batch to report (blocks until there is one), and whether it is the last."""
        w = self.w
        with w._lock:
            w._report_cond.wait_for(lambda: self.items or self.closed)
            while not self.closed and not w._flush_due(len(self.items), self.oldest_at):
                w._report_cond.wait(max(0.0, self.oldest_at + w.ack_linger_s - time.monotonic()))
            batch = self.items[:w.ack_batch_max]
            del self.items[:w.ack_batch_max]
            if self.items:
                self.oldest_at = time.monotonic()
            return batch, self.closed and not self.items


class _ThreadRuntime:
    """Pools "threads" and "processes": the fetcher, runners, reporter and beater threads."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.work: queue.SimpleQueue[_Flight | None] = queue.SimpleQueue()  # the buffer, in fetch order
        self.outbox = _Outbox(worker)
        self.beats_stop = threading.Event()
        self.executor: concurrent.futures.ProcessPoolExecutor | None = None
        self.executor_lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}

    def start(self) -> None:
        if self.w.pool == "processes":
            self.executor = _new_process_pool(self.w.concurrency)
        roles = [("fetch", self._fetch_loop), ("report", self._report_loop), ("beat", self._beat_loop)]
        roles += [(f"run-{i}", self._run_loop) for i in range(self.w.concurrency)]
        for role, target in roles:
            # Daemon threads: a handler still stuck after the grace period must not keep the process alive.
            thread = threading.Thread(target=self.w._guarded, args=(role, target), name=f"raftq-{role}", daemon=True)
            self.threads[role] = thread
            thread.start()

    def shutdown(self) -> None:
        w = self.w
        w.stop(w._stop_reason or "stop requested")
        # The fetch in flight ends first: otherwise it could lease again the very jobs handed back
        # below (ready at once) and hand them back a second time, an attempt each. It is a long
        # poll only when nothing is buffered, so buffered jobs go back within a round trip.
        self._join("fetch", w.wait_s + FETCH_JOIN_S)
        w._release_buffered(self.outbox.put)
        with w._lock:
            w._cond.wait_for(lambda: w._running == 0, timeout=w._grace_left_s())
        leftovers = w._abandon_running(self.outbox.put)
        for _ in range(w.concurrency):
            self.work.put(None)
        self.outbox.close()
        self._join("report", w.grace_s + FLUSH_S_MAX + FETCH_JOIN_S)
        self.beats_stop.set()
        self._join("beat", FETCH_JOIN_S)
        if self.executor is not None:
            _stop_process_pool(self.executor, force=bool(leftovers))

    def _join(self, role: str, timeout: float) -> None:
        thread = self.threads.get(role)
        if thread is None:  # start() failed before it got there
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("worker %s: the %s thread did not stop within %g s; leaving it",
                        self.w.worker_id, role, timeout)

    # ------------------------------------------------------------------------ fetcher

    def _wait_for_fetcher(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        w = self.w
        with w._lock:
            w._fetch_waiting = True
            try:
                w._cond.wait_for(lambda: w._stopping.is_set() or predicate(), timeout=timeout)
            finally:
                w._fetch_waiting = False

    def _fetch_loop(self) -> None:
        w, failures = self.w, 0
        while True:
            self._wait_for_fetcher(w._fetch_due)
            with w._lock:
                if w._stopping.is_set():
                    return
                size, generation, buffered = w._fetch_size(), w._generation, w._buffered
            # A long poll only with nothing buffered (module docstring).
            wait_s = 0.0 if w.burst or buffered else w.wait_s
            w._hooks("before_fetch")
            started = time.monotonic()
            try:
                jobs = w.client.fetch(w.worker_id, w.queues, max_jobs=size, wait_s=wait_s)
            except _TRANSIENT as exc:
                failures += 1
                delay_s = _backoff_s(failures)
                log.warning("worker %s: fetch failed (%s); retrying in %.1f s", w.worker_id, exc, delay_s)
                w._stopping.wait(delay_s)
                continue
            except RaftqError as exc:
                log.error("worker %s: the cluster refused to lease jobs (%s); stopping", w.worker_id, exc)
                w._fatal_error(exc)
                return
            failures = 0
            w._hooks("after_fetch", jobs)
            with w._lock:  # atomic with shutdown's hand-back: a job is either released here or seen there
                if w._stopping.is_set():
                    w._release(jobs, self.outbox.put)
                    return
                for flight in w._take(jobs):
                    self.work.put(flight)
            if jobs:
                continue
            if w.burst:
                if w._idle():
                    w.stop("burst: the queues are empty")
                    return
                # Something in flight may finish and free a retry; then look again.
                self._wait_for_fetcher(lambda: w._generation != generation, timeout=max(w.wait_s, IDLE_POLL_S))
            elif buffered:
                self._wait_for_fetcher(lambda: w._buffered == 0)  # the queue ran dry: long-poll once drained
            elif time.monotonic() - started < min(wait_s, IDLE_POLL_S):
                w._stopping.wait(IDLE_POLL_S)

    # ------------------------------------------------------------------------ runners

    def _run_loop(self) -> None:
        if self.executor is not None:
            return self._run_batches_loop()
        w = self.w
        while (flight := self.work.get()) is not None:
            if not w._start(flight):
                continue
            outcome = w._process(flight.job, self._invoke)
            w._finish(flight, outcome, self.outbox.put)

    def _run_batches_loop(self) -> None:
        """pool="processes": each runner hands a pool process a batch of buffered jobs in one
        message and gets their outcomes back in one (module docstring, "Process pool")."""
        w = self.w
        last = False
        while not last:
            flight = self.work.get()
            if flight is None:
                return
            batch = [flight]
            size = w._process_batch_size(self.work.qsize())
            while len(batch) < size:
                try:
                    extra = self.work.get_nowait()
                except queue.Empty:
                    break
                if extra is None:  # shutdown's sentinel: run what was taken, then stop
                    last = True
                    break
                batch.append(extra)
            started = [f for f in batch if w._start(f)]
            if started:
                self._run_batch(started)

    def _run_batch(self, flights: list[_Flight]) -> None:
        w = self.w
        answers: list[tuple[Any, BaseException | None, float | None] | None] = [None] * len(flights)
        calls, positions = [], []
        for position, flight in enumerate(flights):
            w._hooks("before_process", flight.job)
            try:
                calls.append((w._handler_for(flight.job), flight.job))
                positions.append(position)
            except Reject as exc:  # no handler for its queue
                answers[position] = (None, exc, 0.0)
        if calls:
            try:
                done = [_with_child_traceback(*answer) for answer in self._invoke(_run_in_child, calls)]
            except BaseException as exc:  # the pool broke (a child died): the batch fails as retryable
                done = [(None, exc, None)] * len(calls)
            for position, answer in zip(positions, done):
                answers[position] = answer
        for flight, (result, exc, run_s) in zip(flights, answers):
            w._hooks("after_process", flight.job, result, exc)
            w._finish(flight, _outcome(flight.job, result, exc), self.outbox.put, run_s=run_s)

    def _invoke(self, handler: Callable[[Any], Any], job: Any) -> Any:
        executor = self.executor
        if executor is None:
            return handler(job)
        try:
            return executor.submit(handler, job).result()
        except BrokenProcessPool:
            # A child died (os._exit, OOM kill, segfault): the job fails as retryable, the pool is renewed.
            with self.executor_lock:
                if self.executor is executor and not self.w.stopping:
                    log.error("worker %s: a pool process died; starting a new pool", self.w.worker_id)
                    self.executor = _new_process_pool(self.w.concurrency)
                    _stop_process_pool(executor, force=True)
            raise

    # ------------------------------------------------------------------------ reporter

    def _report_loop(self) -> None:
        while True:
            batch, last = self.outbox.take()
            for method, pairs, request in self.w._report_requests(batch):
                self.w._settle(method, pairs, self._send(method, request))
            if last:
                return

    def _send(self, method: str, request: list[tuple]) -> list[Any]:
        w, failures = self.w, 0
        while True:
            try:
                return getattr(w.client, method)(w.worker_id, request)
            except _TRANSIENT as exc:
                failures += 1
                if w._give_up_reporting():
                    log.error("worker %s: %s of %d job(s) failed at shutdown (%s); their leases will expire",
                              w.worker_id, method, len(request), exc)
                    return [exc] * len(request)
                delay_s = _backoff_s(failures)
                log.warning("worker %s: %s failed (%s); retrying in %.1f s", w.worker_id, method, exc, delay_s)
                time.sleep(delay_s)
            except RaftqError as exc:
                log.error("worker %s: %s of %d job(s) refused: %s", w.worker_id, method, len(request), exc)
                return [exc] * len(request)

    # ------------------------------------------------------------------------ beater

    def _beat_loop(self) -> None:
        w = self.w
        next_beat = time.monotonic()
        while not self.beats_stop.is_set():
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + w.heartbeat_s
                try:
                    lost = w.client.heartbeat(w.worker_id, w._heartbeat_ids())
                except RaftqError as exc:
                    log.warning("worker %s: heartbeat failed: %s", w.worker_id, exc)
                else:
                    w._mark_lost(lost, "the server says this worker no longer holds it")
            due = w._due_extensions(time.monotonic())
            if due:
                asked_at = time.monotonic()
                try:
                    results = w.client.extend_many(w.worker_id, [(f.job.id, f.job.lease, w.lease_s) for f in due])
                except RaftqError as exc:
                    w._extend_failed(due, exc)
                else:
                    w._extended(due, results, asked_at)
            w._drop_expiring(time.monotonic())
            self.beats_stop.wait(max(0.005, min(next_beat, w._next_extension()) - time.monotonic()))


def _run_in_child(calls: list[tuple[Callable[[Any], Any], Any]]) -> list[tuple[Any, Any, str, float]]:
    """Runs in a pool process: each (handler, job) in turn; (result, exception, traceback text, run s) per job.

    Exceptions do not keep their traceback or cause through pickling, so the child's traceback
    travels as text beside it (`_with_child_traceback` puts it back). A result or exception that
    does not pickle would fail the whole batch's message: it is replaced by an error for its job.
    """
    answers = []
    for handler, job in calls:
        started = time.perf_counter()
        try:
            answers.append((handler(job), None, "", time.perf_counter() - started))
        except BaseException as exc:  # a handler's failure, even SystemExit, is the job's outcome
            answers.append((None, exc, "".join(traceback.format_exception(exc)), time.perf_counter() - started))
    try:
        pickle.dumps(answers)
    except Exception:
        answers = [_picklable(answer) for answer in answers]
    return answers


def _picklable(answer: tuple[Any, Any, str, float]) -> tuple[Any, Any, str, float]:
    try:
        pickle.dumps(answer)
        return answer
    except Exception as exc:
        result, error, tb_text, run_s = answer
        what = "result" if error is None else f"exception {type(error).__name__}: {error}"
        return None, RuntimeError(f"the handler's {what} cannot be sent back from the pool process: {exc}"), \
            tb_text, run_s


def _with_child_traceback(result: Any, exc: BaseException | None, tb_text: str,
                          run_s: float) -> tuple[Any, BaseException | None, float]:
    if exc is not None and tb_text:
        exc.__cause__ = _ChildTraceback(tb_text)
    return result, exc, run_s


class _ChildTraceback(Exception):
    """The traceback of an exception raised in a pool process, as text (as concurrent.futures shows it)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _new_process_pool(size: int) -> concurrent.futures.ProcessPoolExecutor:
    # "spawn": forking a process that already runs threads can copy a held lock into the child.
    return concurrent.futures.ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context("spawn"))


def _stop_process_pool(executor: concurrent.futures.ProcessPoolExecutor, *, force: bool) -> None:
    if force:
        # No public way to stop a busy pool before Python 3.14's terminate_workers(); the children
        # run handlers we already handed back, so ending them is right.
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()
    executor.shutdown(wait=not force, cancel_futures=True)


# ---------------------------------------------------------------------------- the asyncio runtime


class _AsyncOutbox:
    """`_Outbox` for the event loop: `put` runs on the loop, the reporter awaits `take`."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.items: list[tuple[_Flight, _Outcome]] = []
        self.oldest_at = 0.0
        self.closed = False
        self.event = asyncio.Event()  # set when the reporter should look again

    def put(self, item: tuple[_Flight, _Outcome]) -> None:
        self.items.append(item)
        if len(self.items) == 1:
            self.oldest_at = time.monotonic()
            self.event.set()
        elif len(self.items) == self.w.ack_batch_max or self.w._idle_slots():
            self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    async def take(self) -> tuple[list[tuple[_Flight, _Outcome]], bool]:
        w = self.w
        while not self.items and not self.closed:
            self.event.clear()
            await self.event.wait()
        while not self.closed and not w._flush_due(len(self.items), self.oldest_at):
            self.event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.event.wait(), max(0.0, self.oldest_at + w.ack_linger_s - time.monotonic()))
        batch = self.items[:w.ack_batch_max]
        del self.items[:w.ack_batch_max]
        if self.items:
            self.oldest_at = time.monotonic()
        return batch, self.closed and not self.items


class _AsyncRuntime:
    """Pool "asyncio": the same roles as `_ThreadRuntime`, as tasks on one event loop.

    A slot is a task that runs buffered jobs one after another until the buffer is empty; the
    fetcher starts slots (up to `concurrency`) when it brings jobs.
    """

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.w = worker
        self.loop = loop
        self.outbox = _AsyncOutbox(worker)
        self.buffer: collections.deque[_Flight] = collections.deque()
        self.slot_tasks: set[asyncio.Task] = set()
        self.slots = 0  # slot tasks alive (the set drops a task only in a later loop step)
        self.handler_tasks: dict[_Flight, asyncio.Task] = {}
        self.waiters: set[asyncio.Future] = set()

    async def run(self) -> None:
        w = self.w
        loop_thread = threading.get_ident()

        def wake() -> None:
            if threading.get_ident() == loop_thread:
                self._wake_all()
            else:
                self.loop.call_soon_threadsafe(self._wake_all)

        w._wake = wake
        fetcher, reporter, beater = (asyncio.create_task(w._aguarded(role, loop), name=f"raftq-{role}")
                                     for role, loop in (("fetch", self._fetch_loop), ("report", self._report_loop),
                                                        ("beat", self._beat_loop)))
        try:
            await self._until(w._stopping.is_set)
        finally:
            w.stop(w._stop_reason or "stop requested")
            await self._shutdown(fetcher, reporter, beater)

    async def _shutdown(self, fetcher: asyncio.Task, reporter: asyncio.Task, beater: asyncio.Task) -> None:
        w = self.w
        await _bounded(fetcher, w.wait_s + FETCH_JOIN_S)  # first, as in _ThreadRuntime.shutdown
        w._release_buffered(self.outbox.put)
        await self._until(lambda: w._running_count() == 0, timeout=w._grace_left_s())
        for flight in w._abandon_running(self.outbox.put):
            task = self.handler_tasks.pop(flight, None)
            if task is not None:
                task.cancel()
        self.outbox.close()
        await _bounded(reporter, w.grace_s + FLUSH_S_MAX + FETCH_JOIN_S)
        beater.cancel()
        await asyncio.gather(beater, *self.slot_tasks, return_exceptions=True)

    def _wake_all(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Waits until `predicate()` holds (re-checked at every change) or `timeout` passes."""
        deadline = None if timeout is None else self.loop.time() + timeout
        while not predicate():
            remaining = None if deadline is None else deadline - self.loop.time()
            if remaining is not None and remaining <= 0:
                return False
            waiter = self.loop.create_future()
            self.waiters.add(waiter)
            try:
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                self.waiters.discard(waiter)
        return True

    async def _fetcher_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        w = self.w
        w._fetch_waiting = True
        try:
            await self._until(lambda: w._stopping.is_set() or predicate(), timeout=timeout)
        finally:
            w._fetch_waiting = False

    async def _fetch_loop(self) -> None:
        w, failures = self.w, 0
        while True:
            await asyncio.sleep(0)  # a client answering without suspending must not starve the loop
            await self._fetcher_until(w._fetch_due)
            if w._stopping.is_set():
                return
            size, generation, buffered = w._fetch_size(), w._generation, w._buffered
            wait_s = 0.0 if w.burst or buffered else w.wait_s  # a long poll only with nothing buffered
            w._hooks("before_fetch")
            started = time.monotonic()
            try:
                jobs = await w.client.fetch(w.worker_id, w.queues, max_jobs=size, wait_s=wait_s)
            except _TRANSIENT as exc:
                failures += 1
                delay_s = _backoff_s(failures)
                log.warning("worker %s: fetch failed (%s); retrying in %.1f s", w.worker_id, exc, delay_s)
                await self._until(w._stopping.is_set, timeout=delay_s)
                continue
            except RaftqError as exc:
                log.error("worker %s: the cluster refused to lease jobs (%s); stopping", w.worker_id, exc)
                w._fatal_error(exc)
                return
            failures = 0
            w._hooks("after_fetch", jobs)
            if w._stopping.is_set():
                w._release(jobs, self.outbox.put)
                return
            if jobs:
                self.buffer.extend(w._take(jobs))
                self._start_slots()
            elif w.burst:
                if w._idle():
                    w.stop("burst: the queues are empty")
                    return
                await self._fetcher_until(lambda: w._generation != generation, timeout=max(w.wait_s, IDLE_POLL_S))
            elif buffered:
                await self._fetcher_until(lambda: w._buffered == 0)  # the queue ran dry: long-poll once drained
            elif time.monotonic() - started < min(wait_s, IDLE_POLL_S):
                await self._until(w._stopping.is_set, timeout=IDLE_POLL_S)

    def _start_slots(self) -> None:
        # A live slot may be about to take the next job itself; a slot started for nothing ends at once.
        for _ in range(min(self.w.concurrency - self.slots, len(self.buffer))):
            self.slots += 1
            task = asyncio.create_task(self._slot_loop())
            self.slot_tasks.add(task)
            task.add_done_callback(self.slot_tasks.discard)

    async def _slot_loop(self) -> None:
        w = self.w
        try:
            while self.buffer:
                flight = self.buffer.popleft()
                if not w._start(flight):
                    continue
                self.handler_tasks[flight] = asyncio.current_task()
                try:
                    outcome = await w._process_async(flight.job)
                finally:
                    self.handler_tasks.pop(flight, None)
                w._finish(flight, outcome, self.outbox.put)
                await asyncio.sleep(0)  # a handler that never suspends must not starve the fetcher and reporter
        finally:
            self.slots -= 1

    async def _report_loop(self) -> None:
        while True:
            batch, last = await self.outbox.take()
            for method, pairs, request in self.w._report_requests(batch):
                self.w._settle(method, pairs, await self._send(method, request))
            if last:
                return

    async def _send(self, method: str, request: list[tuple]) -> list[Any]:
        w, failures = self.w, 0
        while True:
            try:
                return await getattr(w.client, method)(w.worker_id, request)
            except _TRANSIENT as exc:
                failures += 1
                if w._give_up_reporting():
                    log.error("worker %s: %s of %d job(s) failed at shutdown (%s); their leases will expire",
                              w.worker_id, method, len(request), exc)
                    return [exc] * len(request)
                delay_s = _backoff_s(failures)
                log.warning("worker %s: %s failed (%s); retrying in %.1f s", w.worker_id, method, exc, delay_s)
                await asyncio.sleep(delay_s)
            except RaftqError as exc:
                log.error("worker %s: %s of %d job(s) refused: %s", w.worker_id, method, len(request), exc)
                return [exc] * len(request)

    async def _beat_loop(self) -> None:
        w = self.w
        next_beat = time.monotonic()
        while True:
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + w.heartbeat_s
                try:
                    lost = await w.client.heartbeat(w.worker_id, w._heartbeat_ids())
                except RaftqError as exc:
                    log.warning("worker %s: heartbeat failed: %s", w.worker_id, exc)
                else:
                    w._mark_lost(lost, "the server says this worker no longer holds it")
            due = w._due_extensions(time.monotonic())
            if due:
                asked_at = time.monotonic()
                try:
                    results = await w.client.extend_many(w.worker_id, [(f.job.id, f.job.lease, w.lease_s) for f in due])
                except RaftqError as exc:
                    w._extend_failed(due, exc)
                else:
                    w._extended(due, results, asked_at)
            w._drop_expiring(time.monotonic())
            await asyncio.sleep(max(0.005, min(next_beat, w._next_extension()) - time.monotonic()))


async def _bounded(task: asyncio.Task, timeout: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        log.warning("%s did not stop within %g s; cancelled", task.get_name(), timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------- pure helpers


def _outcome(job: Any, result: Any, exc: BaseException | None) -> _Outcome:
    kind = outcome_of(exc)
    if kind == "ok":
        result, size = _checked_result(job, result)
        return _Outcome("ok", result=result, size_bytes=size)
    text = str(exc) if kind == "retried" else error_text(exc)
    return _Outcome(kind, error=text, delay_s=exc.delay_s if kind == "retried" else None, size_bytes=len(text))


def _checked_result(job: Any, result: Any) -> tuple[Any, int]:
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


def _chunks_by_size(pairs: Sequence[tuple[_Flight, _Outcome]], size_max: int) -> Iterator[list]:
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


def _payload_bytes(payload: Any) -> int:
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


def _backoff_s(failures: int) -> float:
    """Capped exponential backoff with jitter in [50 %, 100 %]."""
    ceiling = min(BACKOFF_S_MAX, BACKOFF_S_MIN * 2 ** min(failures - 1, 16))
    return ceiling * random.uniform(0.5, 1.0)


def _is_async(handler: Callable) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None))


def default_worker_id() -> str:
    """host-pid-random, in the alphabet the server accepts for worker ids."""
    host = re.sub(r"[^A-Za-z0-9_.:@-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{random.getrandbits(24):06x}"
