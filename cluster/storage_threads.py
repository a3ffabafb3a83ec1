"""Storage work the drive loop hands to worker threads, and waiting for all of it at stop.

Cancelling a coroutine that awaits a thread does not stop the thread; worse, a plain
`await loop.run_in_executor(...)` cancels the future it awaits, so a stop that then waits for
that future returns at once while the thread still writes. The node would close the storage
under it ("WriteAheadLog used by two threads at once", or a WAL closed mid-write). So the drive
loop awaits its storage threads through `StorageThreads.run`, which shields them, and the node's
stop waits for `idle()` before it closes anything the threads use.
"""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

T = TypeVar("T")


class StorageThreads:
    def __init__(self) -> None:
        self._running: set[asyncio.Future] = set()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in the default executor; cancelling the caller leaves it running, tracked."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return await asyncio.shield(future)

    async def idle(self) -> None:
        """Returns once no thread started by `run` is running (their errors are the callers')."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
