"""The flags a benchmark run's processes share never leave the parent stuck.

With `multiprocessing.Event`, a role that exited while one of its threads waited on the run's
`stop` (a Worker stopped by an error, its conductor thread still waiting) left the parent in
`stop.set()` for good: `Event.set()` waits for every process counted as waiting to wake. The
default set hung that way in the middle of a run; `Flag` is what replaced the events.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

from raftq.bench.roles import Flag

SET_WITHIN_S = 5.0


def _wait_in_a_thread_then_exit(flag: Flag, waiting: Flag) -> None:
    threading.Thread(target=flag.wait, daemon=True).start()
    waiting.set()
    time.sleep(0.2)  # the thread is inside wait() when the process ends
    os._exit(0)


def test_setting_a_flag_a_dead_process_waited_on_returns() -> None:
    context = multiprocessing.get_context("spawn")
    flag, waiting = Flag(context), Flag(context)
    process = context.Process(target=_wait_in_a_thread_then_exit, args=(flag, waiting))
    process.start()
    assert waiting.wait(60.0), "the child never started waiting"
    process.join(60.0)
    assert process.exitcode == 0, f"expected the child to exit 0, saw {process.exitcode}"

    setter = threading.Thread(target=flag.set, daemon=True)
    setter.start()
    setter.join(SET_WITHIN_S)
    assert not setter.is_alive(), f"set() still blocked after {SET_WITHIN_S} s"
    assert flag.is_set() and flag.wait(0.0)


def test_a_wait_ends_at_its_timeout_or_when_set() -> None:
    flag = Flag(multiprocessing.get_context("spawn"))
    started = time.monotonic()
    assert flag.wait(0.05) is False and time.monotonic() - started >= 0.05
    threading.Timer(0.05, flag.set).start()
    assert flag.wait(10.0) is True
