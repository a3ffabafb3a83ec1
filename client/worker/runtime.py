"""The worker runtime: pull jobs, run handlers, ack or fail them.

Theory of operation
-------------------
A `Worker` runs at most `concurrency` handlers at a time and keeps a bounded, paced buffer of
leased jobs ahead of them (on by default, SPEC "Backpressure"). What to fetch and when, which job
may start, which leases to extend, what to report and what each answer means is decided by the
sans-IO `WorkerCore` (client/worker/core.py, with its theory of operation); `Worker` (here)
holds the options, the life cycle and `Worker._lock`, held around every call into the core, and
runs one handler; the runtimes that drive the core and do the I/O are client/worker/threads.py
(pools "threads" and "processes") and client/worker/async_runtime.py (pool "asyncio").

The fetcher asks for what the core allows. It long-polls only when the buffer is empty: with
work in hand, a refill that finds the queue dry waits for the buffer to drain instead, so
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
import contextlib
import inspect
import logging
import os
import pickle
import random
import re
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence


from raftq.client._base import LeasedJob
from raftq.client.worker.core import (CONCURRENCY_MAX, REPORT_BATCH_MAX, Flight, Outcome, Reject, ReportRequest, WorkerCore,
                                WorkerStats, default_prefetch, outcome)
from raftq.client.worker.limits import NO_LIMITS, TimeLimits, await_with_limits, call_with_limits, check_limit
from raftq.client.worker.async_runtime import AsyncRuntime
from raftq.client.worker.loops import FLUSH_S_MAX
from raftq.client.worker.middleware import Middleware
from raftq.client.worker.threads import ThreadRuntime
from raftq.protocol import FETCH_WAIT_S_MAX

log = logging.getLogger("raftq.worker")

#: Defaults of the ack batching: flush at this many outcomes, or this long after the oldest one.
ACK_BATCH_MAX_DEFAULT = 100
ACK_LINGER_S_DEFAULT = 0.002
#: The linger delays every outcome under load; more than this is a misconfiguration.
ACK_LINGER_S_MAX = 1.0
#: SPEC (raftq.protocol): leases run 1 s – 12 h; the long poll waits at most 20 s.
WAIT_S_MAX = FETCH_WAIT_S_MAX

POOLS = ("threads", "processes", "asyncio")

#: What a handler receives: the job as fetched (.id, .queue, .payload, .attempt, .lease_token,
#: .lease_expires_at, .priority). Frozen and picklable, so it crosses a process pool as is.
Job = LeasedJob


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
        runtime = ThreadRuntime(self)
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
        runtime = AsyncRuntime(self, loop)
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


# ---------------------------------------------------------------------------- pure helpers


def _is_async(handler: Callable) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None))


def default_worker_id() -> str:
    """host-pid-random, in the alphabet the server accepts for worker ids."""
    host = re.sub(r"[^A-Za-z0-9_.:@-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{random.getrandbits(24):06x}"
