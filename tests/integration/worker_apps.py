"""Task modules that integration tests run in real worker processes (`raftq worker ...`)."""

import os
import time

from client import App

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
