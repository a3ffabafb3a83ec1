"""Pool "asyncio": the fetcher, reporter, beater and slots as tasks on one event loop.

The roles and the shutdown order are those of the thread runtime (client/worker/runtime.py,
theory of operation); this module carries them out with `await`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from typing import Any, Callable

from raftq.client.worker import loops
from raftq.client.worker.core import Flight, Outcome
from raftq.client.worker.loops import FETCH_JOIN_S, FLUSH_S_MAX

log = logging.getLogger("raftq.worker")

#: The `Worker` a runtime drives (client/worker/runtime.py imports this module: a name only).
Worker = Any


class AsyncOutbox:
    """`ThreadOutbox` for the event loop: `put` runs on the loop, the reporter awaits `take`."""

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


class AsyncRuntime:
    """Pool "asyncio": the same roles as `ThreadRuntime`, as tasks on one event loop.

    A slot is a task that runs buffered jobs one after another until the buffer is empty; the
    fetcher starts slots (up to `concurrency`) when it brings jobs.
    """

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.w = worker
        self.loop = loop
        self.outbox = AsyncOutbox(worker)
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
        await bounded(fetcher, w.wait_s + FETCH_JOIN_S)  # first, as in ThreadRuntime.shutdown
        w._release_buffered(self.outbox.put)
        await self._until(lambda: w._running_count() == 0, timeout=w._grace_left_s())
        for flight in w._abandon_running(self.outbox.put):
            task = self.handler_tasks.pop(flight, None)
            if task is not None:
                task.cancel()
        self.outbox.close()
        await bounded(reporter, w.grace_s + FLUSH_S_MAX + FETCH_JOIN_S)
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

async def bounded(task: asyncio.Task, timeout: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        log.warning("%s did not stop within %g s; cancelled", task.get_name(), timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
