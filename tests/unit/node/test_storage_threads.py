"""StorageThreads: a stop waits for a storage thread whose caller was cancelled."""

from __future__ import annotations

import asyncio
import threading

from raftq.cluster.storage_threads import StorageThreads


async def test_idle_waits_for_a_thread_whose_caller_was_cancelled():
    threads, release, finished = StorageThreads(), threading.Event(), threading.Event()

    def write() -> str:
        release.wait(30)
        finished.set()
        return "written"

    caller = asyncio.create_task(threads.run(write))
    await asyncio.sleep(0)  # the thread has been handed the work
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    assert caller.cancelled()

    idle = asyncio.create_task(threads.idle())
    await asyncio.sleep(0.05)
    assert not idle.done(), "idle() returned while the thread was still writing"
    release.set()
    await asyncio.wait_for(idle, 30)
    assert finished.is_set()


async def test_run_returns_the_result_and_raises_the_error():
    threads = StorageThreads()
    assert await threads.run(sum, [1, 2]) == 3

    def fail() -> None:
        raise OSError(28, "No space left on device")

    try:
        await threads.run(fail)
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("the thread's error did not reach the caller")
    await asyncio.wait_for(threads.idle(), 5)
