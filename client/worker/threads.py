"""Pools "threads" and "processes": the fetcher, runners, reporter and beater on threads of their own.

The roles, the process pool's batches and the shutdown order are described in
client/worker/runtime.py (theory of operation); this module carries them out with blocking calls.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from typing import Any

from raftq.client.worker import loops
from raftq.client.worker.core import Flight, Outcome, outcome
from raftq.client.worker.loops import FETCH_JOIN_S, FLUSH_S_MAX
from raftq.client.worker.processes import ChildProcess

log = logging.getLogger("raftq.worker")

#: The `Worker` a runtime drives (client/worker/runtime.py imports this module: a name only).
Worker = Any


class ThreadOutbox:
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


class ThreadRuntime:
    """Pools "threads" and "processes": the fetcher, runners, reporter and beater threads."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.work: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()  # the buffer, in fetch order
        self.outbox = ThreadOutbox(worker)
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
