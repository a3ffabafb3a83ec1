"""The worker runtime: pull jobs, run handlers, ack or fail them.

    core.py      `WorkerCore`: the policy (buffer, pacing, leases, reports), sans-IO, driven by events
    runtime.py   `Worker`: options, life cycle, signals, the core's lock, running one handler
    threads.py   pools "threads" and "processes": the roles on threads, blocking calls
    async_runtime.py  pool "asyncio": the roles as tasks on one event loop
    processes.py the process pool: one child per runner, killed and replaced past a hard time limit
    limits.py    per-job time limits, and what each pool can enforce
    loops.py     the fetcher, reporter and beater, written once as generators of steps
    middleware.py  hooks around the worker loop, and the Prometheus middleware

Users need `Worker`, what handlers raise (`Retry`, `Reject`, `NonRetryable`), what time limits
raise in them (`SoftTimeLimitExceeded`, `TimeLimitExceeded`) and the middleware.
"""

from raftq.client.worker.core import (CONCURRENCY_MAX, ERROR_TEXT_BYTES_MAX, LEASE_START_MARGIN_S, PREFETCH_BYTES_MAX,
                                PREFETCH_DEFAULT_MAX, PREFETCH_HORIZON_S, REPORT_BYTES_MAX, NonRetryable, Reject, Retry,
                                WorkerCore, WorkerStats, default_prefetch, error_text, outcome_of)
from raftq.client.worker.limits import SoftTimeLimitExceeded, TimeLimitExceeded, TimeLimits
from raftq.client.worker.middleware import Middleware, PrometheusMiddleware
from raftq.client.worker.runtime import POOLS, Job, Worker, default_worker_id

__all__ = [
    "CONCURRENCY_MAX", "ERROR_TEXT_BYTES_MAX", "Job", "LEASE_START_MARGIN_S", "Middleware", "NonRetryable", "POOLS",
    "PREFETCH_BYTES_MAX", "PREFETCH_DEFAULT_MAX", "PREFETCH_HORIZON_S", "PrometheusMiddleware", "REPORT_BYTES_MAX",
    "Reject", "Retry", "SoftTimeLimitExceeded", "TimeLimitExceeded", "TimeLimits", "Worker", "WorkerCore", "WorkerStats", "default_prefetch", "default_worker_id", "error_text",
    "outcome_of",
]
