"""Task modules that integration tests run in real worker processes (`raftq worker ...`)."""

import asyncio
import os
import signal
import time

from raftq import App, SoftTimeLimitExceeded

app = App(os.environ.get("RAFTQ_NODES", "http://127.0.0.1:7001").split(","))


@app.task(queue="stall", max_attempts=5)
def stall(n):
    """Holds its lease until the process is killed."""
    time.sleep(3600)


# Plain handlers for the pool behaviour suite (test_worker_pools.py): top-level, so that the
# process pool can pickle them by reference.

def square(job):
    return job.payload["n"] ** 2


def explode(job):
    raise ValueError(f"bad n {job.payload['n']}")


def hold_while_file_exists(job):
    """Runs until the file the payload names is removed (a process-pool child cannot wait on the
    test's threading.Event); gives up after a minute so that a broken test cannot hang a child."""
    deadline = time.monotonic() + 60
    while os.path.exists(job.payload["path"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "held"


# Tasks for the time-limit tests (test_worker_pools.py): each pool runs them through the App's dispatch.

@app.task(queue="limits", soft_time_limit=0.5, max_attempts=1)
def cleans_up_at_soft_limit():
    """Python code that never ends on its own, and catches the soft limit to finish cleanly."""
    try:
        while True:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "cleaned up"


@app.task(queue="limits", max_attempts=1)
def spins():
    """Python code that never ends on its own; its limits come from apply_async."""
    while True:
        time.sleep(0.01)


@app.task(queue="limits", max_attempts=1)
async def naps():
    """An async task that never ends on its own (pool="asyncio" only)."""
    await asyncio.sleep(3600)


@app.task(queue="limits", max_attempts=1)
def quick(n):
    return n * n


@app.task(queue="limits", max_attempts=1)
def blocks_in_c():
    """Stuck in one C call: no exception can reach it, only a kill (pool="processes")."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(3600)


@app.task(queue="limits", max_attempts=1)
def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()
