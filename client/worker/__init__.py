"""The worker runtime: pull jobs, run handlers, ack or fail them.

    core.py      `WorkerCore`: the policy (buffer, pacing, leases, reports), sans-IO, driven by events
    runtime.py   `Worker`: the thread, process-pool and asyncio runtimes that drive the core

Users need `Worker`, what handlers raise (`Retry`, `Reject`, `NonRetryable`) and the middleware.
"""

from client.worker.core import (CONCURRENCY_MAX, ERROR_TEXT_BYTES_MAX, LEASE_START_MARGIN_S, PREFETCH_BYTES_MAX,
                                PREFETCH_DEFAULT_MAX, PREFETCH_HORIZON_S, REPORT_BYTES_MAX, NonRetryable, Reject, Retry,
                                WorkerCore, WorkerStats, default_prefetch, error_text, outcome_of)
from client.worker.runtime import POOLS, Job, Middleware, PrometheusMiddleware, Worker, default_worker_id

__all__ = [
    "CONCURRENCY_MAX", "ERROR_TEXT_BYTES_MAX", "Job", "LEASE_START_MARGIN_S", "Middleware", "NonRetryable", "POOLS",
    "PREFETCH_BYTES_MAX", "PREFETCH_DEFAULT_MAX", "PREFETCH_HORIZON_S", "PrometheusMiddleware", "REPORT_BYTES_MAX",
    "Reject", "Retry", "Worker", "WorkerCore", "WorkerStats", "default_prefetch", "default_worker_id", "error_text",
    "outcome_of",
]
