"""Time limits on threads and on an event loop (client/worker/limits.py); the process pool's are
tested against a real node in tests/integration/test_worker_pools.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from raftq.client.worker import SoftTimeLimitExceeded, TimeLimitExceeded, TimeLimits
from raftq.client.worker.limits import await_with_limits, call_with_limits


def spin(job):
    while True:
        time.sleep(0.005)


def test_a_thread_past_its_soft_limit_gets_the_exception_with_its_message():
    with pytest.raises(SoftTimeLimitExceeded, match="soft time limit of 0.05 s exceeded") as caught:
        call_with_limits(spin, None, TimeLimits(soft_s=0.05))
    assert any(frame.name == "spin" for frame in __import__("traceback").extract_tb(caught.tb))


def test_a_thread_that_catches_the_soft_limit_meets_the_hard_one():
    def stubborn(job):
        try:
            spin(job)
        except SoftTimeLimitExceeded:
            spin(job)

    with pytest.raises(TimeLimitExceeded, match="hard time limit of 0.1 s exceeded"):
        call_with_limits(stubborn, None, TimeLimits(soft_s=0.02, hard_s=0.1))


def test_a_limit_never_fires_into_the_caller_after_the_handler_returned():
    # Handlers that end right at their limit, on several threads: any exception that escaped the
    # disarm would surface here, after call_with_limits returned.
    escaped = []

    def many():
        for _ in range(200):
            try:
                call_with_limits(lambda job: time.sleep(0.001), None, TimeLimits(soft_s=0.001))
            except SoftTimeLimitExceeded:
                pass  # fired while the handler ran: the job's outcome
            try:
                for _ in range(1000):
                    pass
            except BaseException as exc:  # noqa: BLE001
                escaped.append(exc)

    threads = [threading.Thread(target=many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert escaped == []


async def test_an_async_handler_is_cancelled_at_its_limits():
    with pytest.raises(SoftTimeLimitExceeded, match="soft time limit of 0.05 s"):
        await await_with_limits(asyncio.sleep(60), TimeLimits(soft_s=0.05))

    async def own_timeout():
        raise TimeoutError("the handler's own")

    with pytest.raises(TimeoutError, match="the handler's own"):
        await await_with_limits(own_timeout(), TimeLimits(hard_s=5))
    assert await await_with_limits(asyncio.sleep(0, "done"), TimeLimits(soft_s=5, hard_s=10)) == "done"
