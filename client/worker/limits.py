"""Per-job time limits: a soft limit raises in the handler, a hard limit ends its run.

Theory of operation
-------------------
A job's limits are `TimeLimits(soft_s, hard_s)`, counted from the moment its handler starts.
They come from the handler (`handler.time_limits(job)`: an App task's `time_limit` and
`soft_time_limit`, or what `apply_async` put in the payload) and, for what the handler leaves
unset, from the Worker's own `time_limit` and `soft_time_limit` options. What each pool can do:

    pool        soft_time_limit                           time_limit (hard)
    processes   SIGALRM in the child raises               the parent kills the child and starts a
                SoftTimeLimitExceeded in the handler,     new one (processes.py); the job fails with
                even inside time.sleep or a socket read   TimeLimitExceeded, the other children and
                                                          their jobs go on
    threads     SoftTimeLimitExceeded is raised in the    TimeLimitExceeded is raised the same way:
                handler's thread at its next Python       a thread cannot be killed, so a handler
                instruction; a blocking C call (a long    stuck in C, or one that catches it, runs on
                sleep, a read with no timeout) delays it  (use pool="processes" where that matters)
    asyncio     the handler is cancelled at its current   the same, at the hard limit (if it caught
                await (it sees CancelledError) and the    the first cancellation); a plain function
                job fails with SoftTimeLimitExceeded      run in a thread follows the threads row

Either exception is an ordinary failure: the attempt counts and the job is retried with the
server's backoff until its attempts are spent (then it goes to the dead-letter queue). A handler
may catch SoftTimeLimitExceeded to clean up, as in Celery.

Threads: one daemon watchdog thread holds the armed deadlines and raises the limit's exception in
the job's thread with `PyThreadState_SetAsyncExc` (the documented C API; it delivers at the next
bytecode boundary). `call_with_limits` disarms under the watchdog's lock and then clears any
exception still pending for its thread, so a limit never fires into the runtime's own code once
the handler has returned.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


class SoftTimeLimitExceeded(Exception):
    """Raised in a handler that ran past its job's soft time limit (catch it to clean up)."""


class TimeLimitExceeded(Exception):
    """A handler ran past its job's hard time limit (pool="processes": its process was killed)."""


@dataclass(frozen=True)
class TimeLimits:
    """A job's limits in seconds from its handler's start; None is no limit."""

    soft_s: float | None = None
    hard_s: float | None = None

    def __bool__(self) -> bool:
        return self.soft_s is not None or self.hard_s is not None

    def over(self, other: "TimeLimits") -> "TimeLimits":
        """These limits, with `other`'s where these name none."""
        return TimeLimits(self.soft_s if self.soft_s is not None else other.soft_s,
                          self.hard_s if self.hard_s is not None else other.hard_s)


NO_LIMITS = TimeLimits()


def check_limit(name: str, value: Any) -> float | None:
    """`value` as a limit in seconds (None stays None).

    Raises:
        ValueError: not a positive finite number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def soft_message(limits: TimeLimits) -> str:
    return f"soft time limit of {limits.soft_s:g} s exceeded"


def hard_message(limits: TimeLimits, what: str) -> str:
    return f"hard time limit of {limits.hard_s:g} s exceeded; {what}"


# ---------------------------------------------------------------------------- threads


_set_async_exc = ctypes.pythonapi["PyThreadState_SetAsyncExc"]
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
_clear_async_exc = ctypes.pythonapi["PyThreadState_SetAsyncExc"]  # a second prototype: NULL clears
_clear_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)
_clear_async_exc.restype = ctypes.c_int


class _Watchdog:
    """The daemon thread that raises a limit's exception in the thread of a handler past it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, int] = {}  # token -> thread id, while the handler runs
        self._deadlines: list[tuple[float, int, type[BaseException]]] = []  # heap of (at, token, what)
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None

    def arm(self, thread_id: int, limits: TimeLimits, now: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = thread_id
            if limits.soft_s is not None:
                heapq.heappush(self._deadlines, (now + limits.soft_s, token, SoftTimeLimitExceeded))
            if limits.hard_s is not None:
                heapq.heappush(self._deadlines, (now + limits.hard_s, token, TimeLimitExceeded))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="raftq-time-limits", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            thread_id = self._armed.pop(token)
        # Fired just before the pop and not yet delivered: drop it, the handler is over.
        _clear_async_exc(thread_id, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._deadlines and self._deadlines[0][1] not in self._armed:
                    heapq.heappop(self._deadlines)  # disarmed: its handler returned in time
                if not self._deadlines:
                    self._cond.wait()
                    continue
                at, token, what = self._deadlines[0]
                left = at - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._deadlines)
                _set_async_exc(self._armed[token], what)


_watchdog = _Watchdog()


def call_with_limits(handler: Callable[[Any], Any], job: Any, limits: TimeLimits) -> Any:
    """`handler(job)` on this thread, with the limits' exceptions raised in it when due."""
    if not limits:
        return handler(job)
    token = _watchdog.arm(threading.get_ident(), limits, time.monotonic())
    try:
        return handler(job)
    except SoftTimeLimitExceeded as exc:
        if not exc.args:  # raised by the watchdog, which can only pass a type
            exc.args = (soft_message(limits),)
        raise
    except TimeLimitExceeded as exc:
        if not exc.args:
            exc.args = (hard_message(limits, "a thread cannot be killed, so it was raised in the handler"),)
        raise
    finally:
        _watchdog.disarm(token)


# ---------------------------------------------------------------------------- asyncio


async def await_with_limits(awaitable: Awaitable[Any], limits: TimeLimits) -> Any:
    """Awaits a handler's coroutine, cancelling it at each limit (asyncio's own timeouts)."""
    if not limits:
        return await awaitable
    hard = asyncio.timeout(limits.hard_s)
    soft = asyncio.timeout(limits.soft_s)
    try:
        async with hard:
            async with soft:
                return await awaitable
    except TimeoutError as exc:  # chained: the error text shows where the handler was cancelled
        if soft.expired():
            raise SoftTimeLimitExceeded(soft_message(limits)) from exc
        if hard.expired():
            raise TimeLimitExceeded(hard_message(limits, "the handler was cancelled")) from exc
        raise  # the handler's own TimeoutError
