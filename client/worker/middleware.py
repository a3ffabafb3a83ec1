"""Hooks around the worker loop (dramatiq's shape), and the Prometheus middleware built on them."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from raftq.client.worker.core import outcome_of

log = logging.getLogger("raftq.worker")

#: The `Worker` the hooks receive (client/worker/runtime.py imports this module: a name only).
Worker = Any


class Middleware:
    """Hooks around the worker loop; every method is a no-op to override (dramatiq's shape).

    Hooks run on the worker's threads (on the event loop with pool="asyncio"), so keep them quick.
    An exception in a hook is logged and ignored: a broken metric must not stop the work.
    """

    def before_fetch(self, worker: "Worker") -> None:
        """Called before each fetch request."""

    def after_fetch(self, worker: "Worker", jobs: Sequence[Any]) -> None:
        """Called with the jobs a fetch returned (possibly none)."""

    def before_process(self, worker: "Worker", job: Any) -> None:
        """Called just before the handler runs."""

    def after_process(self, worker: "Worker", job: Any, result: Any, exc: BaseException | None) -> None:
        """Called when the handler returned `result` (exc is None) or raised `exc`."""

    def on_shutdown(self, worker: "Worker") -> None:
        """Called once, when the worker has stopped."""


class PrometheusMiddleware(Middleware):
    """Prometheus metrics for a worker.

    raftq_worker_jobs_processed_total{queue,outcome} counts handler runs by outcome (see
    `outcome_of`); raftq_worker_job_duration_seconds{queue} is the handler's run time.

    Args:
        registry: a prometheus_client CollectorRegistry (default: the global one).
    """

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client as prom

        self.registry = registry if registry is not None else prom.REGISTRY
        self.processed = prom.Counter("raftq_worker_jobs_processed_total", "Jobs run by this worker, by outcome.",
                                      ["queue", "outcome"], registry=self.registry)
        self.duration = prom.Histogram("raftq_worker_job_duration_seconds", "Handler run time.", ["queue"],
                                       registry=self.registry)
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics over HTTP on `addr:port` from a daemon thread."""
        import prometheus_client as prom

        prom.start_http_server(port, addr=addr, registry=self.registry)

    def before_process(self, worker: "Worker", job: Any) -> None:
        with self._lock:
            self._started[job.id] = time.perf_counter()

    def after_process(self, worker: "Worker", job: Any, result: Any, exc: BaseException | None) -> None:
        with self._lock:
            started = self._started.pop(job.id, None)
        self.processed.labels(job.queue, outcome_of(exc)).inc()
        if started is not None:
            self.duration.labels(job.queue).observe(time.perf_counter() - started)
