"""The worker runtime: pull jobs, run handlers, ack or fail them.

Theory of operation
-------------------
A `Worker` runs at most `concurrency` handlers at a time and keeps a bounded, paced buffer of
leased jobs ahead of them (on by default, SPEC "Backpressure"). What to fetch and when, which job
may start, which leases to extend, what to report and what each answer means is decided by the
sans-IO `WorkerCore` (client/worker/core.py, with its theory of operation); this module drives
it with threads or an event loop and does the I/O, holding `Worker._lock` around every call into
the core. The fetcher asks for what the core allows. It long-polls only when the buffer is empty:
with work in hand, a refill that finds the queue dry waits for the buffer to drain instead, so
that the fetch in flight at shutdown is never a long poll while jobs sit in the buffer.

With the sync pools ("threads", "processes") four roles run on their own threads:

    fetcher    fills the buffer (see above); in burst mode it stops the worker once a fetch
               comes back empty with nothing in flight.
    runners    `concurrency` daemon threads taking jobs from the buffer, one handler each at a
               time: called directly ("threads") or in a pool process ("processes", below).
    reporter   sends finished outcomes in batches: one `ack_many` and one `fail_many` request
               once `ack_batch_max` outcomes wait, or `ack_linger_s` after the oldest one
               finished, or at once when no job is running or buffered (nothing else is coming
               soon), whichever comes first. Under load outcomes also gather while a request is out.
    beater     a heartbeat every `heartbeat_s` naming the jobs buffered and running, from a thread
               of its own so a busy handler cannot starve it (FEATURES.md pain point 7); it also
               extends every lease that has run past about half its span, by the job's own lease length.

Process pool: each runner owns one pool process (client/worker/processes.py) and hands it a
batch in one message: the next buffered job plus as many more as make about PROCESS_BATCH_S of
measured work (one job until a job has finished, at most PROCESS_BATCH_MAX, at most the runner's
share of what waits). The child runs them in turn and answers each job, with its own run time,
as it finishes, so the pacing average stays per job and the parent can time each job against its
hard limit (past it, that child alone is killed and replaced). A round trip through a pool
process costs about as much as a 1 ms job; batching is what lets 1 ms jobs use the cores (README
"Benchmarks"). Jobs of a batch count as running from the moment they are handed over; their
leases are kept alive like any other. Time limits: client/worker/limits.py.

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
import contextlib
import functools
import inspect
import logging
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
from typing import Any, Callable, Iterable, Mapping, Sequence


from raftq.client._base import LeasedJob
from raftq.client.worker import loops
from raftq.client.worker.core import (CONCURRENCY_MAX, REPORT_BATCH_MAX, Flight, Outcome, Reject, ReportRequest, WorkerCore,
                                WorkerStats, default_prefetch, outcome, outcome_of)
from raftq.client.worker.limits import NO_LIMITS, TimeLimits, await_with_limits, call_with_limits, check_limit
from raftq.client.worker.processes import ChildProcess
from raftq.protocol import FETCH_WAIT_S_MAX

log = logging.getLogger("raftq.worker")

#: Defaults of the ack batching: flush at this many outcomes, or this long after the oldest one.
ACK_BATCH_MAX_DEFAULT = 100
ACK_LINGER_S_DEFAULT = 0.002
#: The linger delays every outcome under load; more than this is a misconfiguration.
ACK_LINGER_S_MAX = 1.0
#: SPEC (raftq.protocol): leases run 1 s – 12 h; the long poll waits at most 20 s.
WAIT_S_MAX = FETCH_WAIT_S_MAX
#: At shutdown, how long reporting may keep retrying a transient error after the grace period.
FLUSH_S_MAX = 10.0
#: How long shutdown waits for a fetch still in its long poll, beyond `wait_s`.
FETCH_JOIN_S = 15.0

POOLS = ("threads", "processes", "asyncio")

#: What a handler receives: the job as fetched (.id, .queue, .payload, .attempt, .lease_token,
#: .lease_expires_at, .priority). Frozen and picklable, so it crosses a process pool as is.
Job = LeasedJob


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


# ---------------------------------------------------------------------------- the worker


class Worker:
    """Runs handlers for jobs pulled from a raftq cluster.

    Args:
        client: a `client.Client` (pools "threads" and "processes") or `client.AsyncClient`
            (pool "asyncio"). The worker does not close it.
        handlers: {queue name: callable(job)}; `job` is a `Job` with .id, .queue, .payload,
            .attempt, .lease_token, .lease_s and .lease_expires_at (unix s, as fetched). The return value
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
        time_limit, soft_time_limit: seconds a handler may run before its job fails with
            TimeLimitExceeded (hard) or SoftTimeLimitExceeded raised in it (soft), for jobs whose
            handler names none (`handler.time_limits(job)`, as App tasks do). What each pool can
            enforce: client/worker/limits.py and the README ("Time limits").

    Raises:
        ValueError: for a bad option, a queue without a handler, or (pool="processes") a
            handler that does not pickle.
    """

    def __init__(self, client: Any, handlers: Mapping[str, Callable[[Any], Any]], *,
                 queues: Sequence[str] | None = None, concurrency: int = 4, prefetch: int | str = "auto",
                 pool: str = "threads", heartbeat_s: float = 2.0, wait_s: float = 5.0,
                 burst: bool = False, grace_s: float = 30.0, ack_batch_max: int = ACK_BATCH_MAX_DEFAULT,
                 ack_linger_s: float = ACK_LINGER_S_DEFAULT, worker_id: str | None = None,
                 middleware: Iterable[Middleware] = (), time_limit: float | None = None,
                 soft_time_limit: float | None = None) -> None:
        self.client = client
        self.handlers = dict(handlers)
        self.queues = tuple(queues) if queues is not None else tuple(self.handlers)
        self.concurrency = concurrency
        paced = prefetch == "auto"
        self.prefetch = default_prefetch(concurrency) if paced else prefetch  # the buffer's bound
        self.pool = pool
        self.heartbeat_s = heartbeat_s
        self.wait_s = wait_s
        self.burst = burst
        self.grace_s = grace_s
        self.ack_batch_max = ack_batch_max
        self.ack_linger_s = ack_linger_s
        self.worker_id = worker_id or default_worker_id()
        self.middleware = tuple(middleware)
        self.time_limits = TimeLimits(check_limit("soft_time_limit", soft_time_limit),
                                      check_limit("time_limit", time_limit))
        self._validate()
        # `core` (with its stats) and the fields below are guarded by `_lock`. `_cond` wakes the
        # fetcher and shutdown, `_report_cond` the thread runtime's reporter; the core calls
        # `_changed` only when a waiter's condition may have turned true.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._report_cond = threading.Condition(self._lock)
        self.core = WorkerCore(concurrency=self.concurrency, prefetch=self.prefetch, paced=paced,
                               ack_batch_max=self.ack_batch_max, ack_linger_s=self.ack_linger_s,
                               on_change=self._changed)
        self.stats = self.core.stats
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
            return list(self.core.flights)

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
                        "server notices (heartbeat timeout or lease expiry)", self.worker_id, name, len(self.core.flights))
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

    # The runtimes' view of the core: each call under `_lock`, with the clock read here.

    @property
    def _running(self) -> int:
        return self.core.running

    @property
    def _buffered(self) -> int:
        return self.core.buffered

    @property
    def _fetch_waiting(self) -> bool:
        return self.core.fetch_waiting

    @_fetch_waiting.setter
    def _fetch_waiting(self, waiting: bool) -> None:
        self.core.fetch_waiting = waiting

    def _process_batch_size(self, waiting: int) -> int:
        with self._lock:
            return self.core.process_batch_size(waiting)

    def _fetch_size(self) -> int:
        return self.core.fetch_size()

    def _fetch_due(self) -> bool:
        return self.core.fetch_due()

    def _take(self, jobs: Sequence[Any]) -> list[Flight]:
        with self._lock:
            return self.core.take(jobs, now=time.monotonic(), now_wall=time.time())

    def _start(self, flight: Flight) -> bool:
        with self._lock:
            return self.core.start(flight, time.monotonic())

    def _finish(self, flight: Flight, outcome: Outcome, report: Callable[[tuple[Flight, Outcome]], None],
                run_s: float | None = None) -> None:
        with self._lock:
            if self.core.finish(flight, outcome, time.monotonic(), run_s):
                report((flight, outcome))

    def _release_buffered(self, report: Callable[[tuple[Flight, Outcome]], None]) -> None:
        with self._lock:
            handed_back = self.core.release_buffered()
            for item in handed_back:
                report(item)
        if handed_back:
            log.info("worker %s: %d buffered job(s) handed back for another worker", self.worker_id, len(handed_back))

    def _abandon_running(self, report: Callable[[tuple[Flight, Outcome]], None]) -> list[Flight]:
        with self._lock:
            leftovers = self.core.abandon_running()
            for item in leftovers:
                report(item)
        if leftovers:
            log.warning("worker %s: %d job(s) still running %.1f s after the stop (grace %g s): handed back for a "
                        "retry (%s)", self.worker_id, len(leftovers), time.monotonic() - self._stopped_at, self.grace_s,
                        ", ".join(f.job.id for f, _ in leftovers[:10]))
        return [flight for flight, _ in leftovers]

    def _release(self, jobs: Sequence[Any], report: Callable[[tuple[Flight, Outcome]], None]) -> None:
        with self._lock:
            for item in self.core.release_late(jobs, now=time.monotonic(), now_wall=time.time()):
                report(item)

    def _running_count(self) -> int:
        with self._lock:
            return self.core.running

    def _grace_left_s(self) -> float:
        return max(0.0, self._stopped_at + self.grace_s - time.monotonic())

    def _idle(self) -> bool:
        with self._lock:
            return self.core.idle()

    def _idle_slots(self) -> bool:
        return self.core.idle_slots()

    def _flush_due(self, count: int, oldest_at: float) -> bool:
        return self.core.flush_due(count, oldest_at, time.monotonic(), self._stopping.is_set())

    def _report_requests(self, batch: Sequence[tuple[Flight, Outcome]]) -> list[ReportRequest]:
        return self.core.report_requests(batch)

    def _settle(self, method: str, pairs: Sequence[tuple[Flight, Outcome]], results: Sequence[Any]) -> None:
        with self._lock:
            self.core.settle(method, pairs, results)

    def _give_up_reporting(self) -> bool:
        """Reporting retries transient errors for ever, except during shutdown, where it is bounded."""
        return self._stopping.is_set() and time.monotonic() > self._stopped_at + self.grace_s + FLUSH_S_MAX

    def _heartbeat_ids(self) -> list[str]:
        with self._lock:
            return self.core.heartbeat_ids()

    def _mark_lost(self, job_ids: Iterable[str], why: str) -> None:
        with self._lock:
            self.core.mark_lost(job_ids, why)

    def _drop_expiring(self, now: float) -> None:
        with self._lock:
            self.core.drop_expiring(now)

    def _shortest_lease_s(self) -> float:
        with self._lock:
            return self.core.shortest_lease_s()

    def _due_extensions(self, now: float) -> list[Flight]:
        with self._lock:
            return self.core.due_extensions(now)

    def _extended(self, flights: Sequence[Flight], results: Sequence[Any], asked_at: float) -> None:
        with self._lock:
            self.core.extended(flights, results, asked_at, time.monotonic())

    def _extend_failed(self, flights: Sequence[Flight], exc: BaseException) -> None:
        log.warning("worker %s: extending %d lease(s) failed (%s); retrying", self.worker_id, len(flights), exc)
        with self._lock:
            self.core.extend_failed(flights, time.monotonic())

    def _next_extension(self) -> float:
        with self._lock:
            return self.core.next_extension()

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

    def _limits_for(self, handler: Callable[[Any], Any], job: Any) -> TimeLimits:
        """The job's time limits: the handler's (`time_limits(job)`), else the worker's."""
        named = getattr(handler, "time_limits", None)
        return (named(job) if named is not None else NO_LIMITS).over(self.time_limits)

    def _process(self, job: Any) -> Outcome:
        """Runs one job's handler on this thread, with hooks and time limits."""
        self._hooks("before_process", job)
        result = exc = None
        try:
            handler = self._handler_for(job)
            result = call_with_limits(handler, job, self._limits_for(handler, job))
        except BaseException as error:  # a handler's failure, even SystemExit, is the job's outcome
            exc = error
        self._hooks("after_process", job, result, exc)
        return outcome(job, result, exc)

    async def _process_async(self, job: Any) -> Outcome:
        self._hooks("before_process", job)
        result = exc = None
        try:
            handler = self._handler_for(job)
            limits = self._limits_for(handler, job)
            # A plain function runs in a thread, under the threads' limits: cancelling the await of
            # a thread would report the job while its thread still runs.
            plain = handler.plain_body(job) if hasattr(handler, "plain_body") else (
                None if _is_async(handler) else handler)
            if plain is None:
                result = await await_with_limits(handler(job), limits)
            else:
                result = await asyncio.to_thread(call_with_limits, plain, job, limits)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            exc = error
        self._hooks("after_process", job, result, exc)
        return outcome(job, result, exc)


# ---------------------------------------------------------------------------- the sync runtime


class _Outbox:
    """The thread runtime's finished outcomes, waiting for the reporter (guarded by the worker's lock)."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.items: list[tuple[Flight, Outcome]] = []
        self.oldest_at = 0.0
        self.closed = False

    def put(self, item: tuple[Flight, Outcome]) -> None:
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

    def take(self) -> tuple[list[tuple[Flight, Outcome]], bool]:
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
        self.work: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()  # the buffer, in fetch order
        self.outbox = _Outbox(worker)
        self.beats_stop = threading.Event()
        self.children: list[ChildProcess] = []  # pool="processes": runner i drives children[i]
        self.threads: dict[str, threading.Thread] = {}

    def start(self) -> None:
        w = self.w
        if w.pool == "processes":
            # Started together, then waited for: no job is leased before the pool can run it.
            self.children = [ChildProcess(f"raftq-pool-{i}", list(w.handlers.values())) for i in range(w.concurrency)]
            for child in self.children:
                child.wait_ready()
        roles = [("fetch", lambda: self._drive(loops.fetch_loop(w, self._deliver))),
                 ("report", lambda: self._drive(loops.report_loop(w))),
                 ("beat", lambda: self._drive(loops.beat_loop(w), stop=self.beats_stop))]
        roles += [(f"run-{i}", functools.partial(self._run_loop, i)) for i in range(w.concurrency)]
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
        for child in self.children:
            # Forced when a handler outlived the grace period: its job is already handed back.
            child.close(force=bool(leftovers))

    def _join(self, role: str, timeout: float) -> None:
        thread = self.threads.get(role)
        if thread is None:  # start() failed before it got there
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("worker %s: the %s thread did not stop within %g s; leaving it",
                        self.w.worker_id, role, timeout)

    # ------------------------------------------------------------------------ the loops' steps

    def _drive(self, loop: loops.Loop, stop: threading.Event | None = None) -> None:
        """Carries out a loop's steps (client/worker/loops.py) with blocking calls on this thread."""
        w = self.w
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = loop.throw(error) if error is not None else loop.send(reply)
            except StopIteration:
                return
            reply, error = None, None
            if isinstance(step, loops.Call):
                try:
                    reply = getattr(w.client, step.method)(*step.args, **(step.kwargs or {}))
                except Exception as exc:  # the loop decides: retry, give up, or let it end the role
                    error = exc
            elif isinstance(step, loops.WaitFor):
                with w._lock:
                    w._fetch_waiting = w._fetch_waiting or step.fetcher
                    try:
                        w._cond.wait_for(lambda: w._stopping.is_set() or step.predicate(), timeout=step.timeout_s)
                    finally:
                        if step.fetcher:
                            w._fetch_waiting = False
            elif isinstance(step, loops.Sleep):
                if stop is None:
                    time.sleep(step.seconds)
                elif stop.wait(step.seconds):
                    loop.close()
                    return
            else:
                reply = self.outbox.take()

    def _deliver(self, jobs: list[Any]) -> bool:
        """Fetched jobs into the runners' queue; True (and handed back) when the worker is stopping."""
        w = self.w
        with w._lock:  # atomic with shutdown's hand-back: a job is either released here or seen there
            if w._stopping.is_set():
                w._release(jobs, self.outbox.put)
                return True
            for flight in w._take(jobs):
                self.work.put(flight)
        return False

    # ------------------------------------------------------------------------ runners

    def _run_loop(self, index: int) -> None:
        if self.children:
            return self._run_batches_loop(self.children[index])
        w = self.w
        while (flight := self.work.get()) is not None:
            if not w._start(flight):
                continue
            w._finish(flight, w._process(flight.job), self.outbox.put)

    def _run_batches_loop(self, child: ChildProcess) -> None:
        """pool="processes": each runner hands its pool process a batch of buffered jobs in one
        message and finishes each job as its answer comes back (module docstring, "Process pool")."""
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
                self._run_batch(child, started)

    def _run_batch(self, child: ChildProcess, flights: list[Flight]) -> None:
        w = self.w
        calls, sent = [], []
        for flight in flights:
            w._hooks("before_process", flight.job)
            try:
                handler = w._handler_for(flight.job)
                calls.append((handler, flight.job, w._limits_for(handler, flight.job)))
                sent.append(flight)
            except Exception as exc:  # no handler for its queue, or limits it cannot have
                self._finish_one(flight, (None, exc, 0.0))

        def on_answer(index: int, answer: tuple[Any, BaseException | None, float | None]) -> None:
            self._finish_one(sent[index], answer)

        if calls:
            child.run(calls, on_answer)

    def _finish_one(self, flight: Flight, answer: tuple[Any, BaseException | None, float | None]) -> None:
        result, exc, run_s = answer
        self.w._hooks("after_process", flight.job, result, exc)
        self.w._finish(flight, outcome(flight.job, result, exc), self.outbox.put, run_s=run_s)


# ---------------------------------------------------------------------------- the asyncio runtime


class _AsyncOutbox:
    """`_Outbox` for the event loop: `put` runs on the loop, the reporter awaits `take`."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.items: list[tuple[Flight, Outcome]] = []
        self.oldest_at = 0.0
        self.closed = False
        self.event = asyncio.Event()  # set when the reporter should look again

    def put(self, item: tuple[Flight, Outcome]) -> None:
        self.items.append(item)
        if len(self.items) == 1:
            self.oldest_at = time.monotonic()
            self.event.set()
        elif len(self.items) == self.w.ack_batch_max or self.w._idle_slots():
            self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    async def take(self) -> tuple[list[tuple[Flight, Outcome]], bool]:
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
        self.buffer: collections.deque[Flight] = collections.deque()
        self.slot_tasks: set[asyncio.Task] = set()
        self.slots = 0  # slot tasks alive (the set drops a task only in a later loop step)
        self.handler_tasks: dict[Flight, asyncio.Task] = {}
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
        roles = (("fetch", loops.fetch_loop(w, self._deliver)), ("report", loops.report_loop(w)),
                 ("beat", loops.beat_loop(w)))
        fetcher, reporter, beater = (asyncio.create_task(w._aguarded(role, functools.partial(self._drive, loop)),
                                                         name=f"raftq-{role}") for role, loop in roles)
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

    async def _drive(self, loop: loops.Loop) -> None:
        """Carries out a loop's steps (client/worker/loops.py) with `await` on this event loop."""
        w = self.w
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = loop.throw(error) if error is not None else loop.send(reply)
            except StopIteration:
                return
            reply, error = None, None
            if isinstance(step, loops.Call):
                try:
                    reply = await getattr(w.client, step.method)(*step.args, **(step.kwargs or {}))
                except Exception as exc:  # the loop decides: retry, give up, or let it end the role
                    error = exc
            elif isinstance(step, loops.WaitFor):
                w._fetch_waiting = w._fetch_waiting or step.fetcher
                try:
                    await self._until(lambda: w._stopping.is_set() or step.predicate(), timeout=step.timeout_s)
                finally:
                    if step.fetcher:
                        w._fetch_waiting = False
            elif isinstance(step, loops.Sleep):
                await asyncio.sleep(step.seconds)
            else:
                reply = await self.outbox.take()

    def _deliver(self, jobs: list[Any]) -> bool:
        """Fetched jobs into the buffer, with slot tasks to run them; True (and handed back) when stopping."""
        w = self.w
        if w._stopping.is_set():
            w._release(jobs, self.outbox.put)
            return True
        if jobs:
            self.buffer.extend(w._take(jobs))
            self._start_slots()
        return False

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

async def _bounded(task: asyncio.Task, timeout: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        log.warning("%s did not stop within %g s; cancelled", task.get_name(), timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------- pure helpers


def _is_async(handler: Callable) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None))


def default_worker_id() -> str:
    """host-pid-random, in the alphabet the server accepts for worker ids."""
    host = re.sub(r"[^A-Za-z0-9_.:@-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{random.getrandbits(24):06x}"
