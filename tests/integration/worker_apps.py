"""Task modules that integration tests run in real worker processes (`raftq worker ...`)."""

import os
import time

from client import App

app = App(os.environ.get("RAFTQ_NODES", "http://127.0.0.1:7001").split(","))


@app.task(queue="stall", max_attempts=5)
def stall(n):
    """Holds its lease until the process is killed."""
    time.sleep(3600)
