"""The worker runtime: pull jobs, run handlers, ack or fail them.

    core.py      `WorkerCore`: the policy (buffer, pacing, leases, reports), sans-IO, driven by events
    runtime.py   `Worker`: the thread, process-pool and asyncio runtimes that drive the core
    processes.py the process pool: one child per runner, killed and replaced past a hard time limit
    limits.py    per-job time limits, and what each pool can enforce

Users need `Worker`, what handlers raise (`Retry`, `Reject`, `NonRetryable`), what time limits
raise in them (`SoftTimeLimitExceeded`, `TimeLimitExceeded`) and the middleware.
"""

from raftq.client.worker.core import (CONCURRENCY_MAX, ERROR_TEXT_BYTES_MAX, LEASE_START_MARGIN_S, PREFETCH_BYTES_MAX,
                                PREFETCH_DEFAULT_MAX, PREFETCH_HORIZON_S, REPORT_BYTES_MAX, NonRetryable, Reject, Retry,
                                WorkerCore, WorkerStats, default_prefetch, error_text, outcome_of)
from raftq.client.worker.limits import SoftTimeLimitExceeded, TimeLimitExceeded, TimeLimits
from raftq.client.worker.runtime import POOLS, Job, Middleware, PrometheusMiddleware, Worker, default_worker_id

__all__ = [
    "CONCURRENCY_MAX", "ERROR_TEXT_BYTES_MAX", "Job", "LEASE_START_MARGIN_S", "Middleware", "NonRetryable", "POOLS",
    "PREFETCH_BYTES_MAX", "PREFETCH_DEFAULT_MAX", "PREFETCH_HORIZON_S", "PrometheusMiddleware", "REPORT_BYTES_MAX",
    "Reject", "Retry", "SoftTimeLimitExceeded", "TimeLimitExceeded", "TimeLimits", "Worker", "WorkerCore", "WorkerStats", "default_prefetch", "default_worker_id", "error_text",
    "outcome_of",
]
