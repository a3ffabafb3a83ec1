"""raftq client library: `Client` (sync) and `AsyncClient` (asyncio), twins with the same calls.

    from raftq import Client, AsyncClient, LeasedJob, errors

    with Client(["http://127.0.0.1:7001", "http://127.0.0.1:7002", "http://127.0.0.1:7003"]) as client:
        job_id = client.submit("emails", {"to": "a@example.com"})
        for job in client.fetch("worker-1", ["emails"], max_jobs=10, wait_s=5):
            client.ack("worker-1", job.id, job.lease_token)
        client.wait(job_id, timeout=10)["state"]     # "done": a long poll, answered at the final state

`JobHandle` (what `App` tasks' `submit`/`delay` return) is a job id with `.state` and `.result(timeout=)`.

`MockTransport(handler)` answers requests in tests, for either twin; `Request`/`Response` are
the tiny pair it passes. `RetryPolicy` tunes backoff. Errors live in `raftq.errors`. The worker
runtime (`Worker`, `Retry`, ...) and the task API (`App`) are re-exported from their modules.

Theory of operation
-------------------
The package is only a client: it imports nothing of the broker, the chaos suite or the benchmark
(tests/unit/test_layout.py), and it shares the wire facts with the server through
`raftq.protocol` alone. Three layers, each policy written once and driven by thin I/O loops:

    _base.py     every call as a sans-IO plan (send this, sleep that): leader redirects, failover
                 across nodes, backoff within a deadline, msgpack on the wire. `Client` and
                 `AsyncClient` each drive the same plans with their own transport.
    worker/      `WorkerCore`, the worker's policy as a state machine (what to fetch and when, the
                 paced buffer, lease extensions, batched acks, hand-back on stop); the thread,
                 process and asyncio runtimes drive it.
    app.py       the task layer (`App`, `@app.task`, handles you can wait on), on top of both.

Nothing a worker holds is trusted to its own clock: leases are planned with the time the server
said was left (`lease_expires_in_s`), and every report presents the lease's fencing token.
"""

from raftq.client import errors
from raftq.client._async_client import AiohttpTransport, AsyncClient
from raftq.client._base import BATCH_COUNT_MAX, ClientState, LeasedJob, RetryPolicy
from raftq.client._client import Client, JobHandle
from raftq.client._transports import (AsyncBaseTransport, AsyncHTTPTransport, BaseTransport, HTTPTransport,
                                      MockTransport, Request, Response)
from raftq.client.app import App
from raftq.client.worker import (Middleware, NonRetryable, PrometheusMiddleware, Reject, Retry, SoftTimeLimitExceeded,
                           TimeLimitExceeded, Worker)

__all__ = [
    "AiohttpTransport",
    "App",
    "AsyncBaseTransport",
    "AsyncClient",
    "AsyncHTTPTransport",
    "BATCH_COUNT_MAX",
    "BaseTransport",
    "Client",
    "ClientState",
    "HTTPTransport",
    "JobHandle",
    "LeasedJob",
    "Middleware",
    "MockTransport",
    "NonRetryable",
    "PrometheusMiddleware",
    "Reject",
    "Request",
    "Response",
    "Retry",
    "RetryPolicy",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "Worker",
    "errors",
]
