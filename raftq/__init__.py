"""raftq: a replicated job queue for Python.

    from raftq import App, Client, AsyncClient

Everything the project ships lives under this one namespace, so nothing clashes with a user's own
modules: `raftq.client` (the client library and worker runtime), `raftq.cluster` (the broker node),
`raftq.chaos` (the fault-injection suite), `raftq.bench` (the benchmark), `raftq.protocol` (the wire
facts both sides share) and `raftq.command` (the `raftq` command). In the repository these are the
top-level folders `client/`, `cluster/`, `chaos/`, `bench/` and `raftq/`; pyproject.toml maps them.

The client's public names are re-exported here lazily, on first use, so that a broker process
importing `raftq.protocol` does not load the client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: The public client API, importable as `from raftq import <name>`.
__all__ = [
    "AiohttpTransport",
    "App",
    "AsyncBaseTransport",
    "AsyncClient",
    "AsyncHTTPTransport",
    "BaseTransport",
    "Client",
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

if TYPE_CHECKING:
    from raftq.client import (AiohttpTransport, App, AsyncBaseTransport, AsyncClient, AsyncHTTPTransport,
                              BaseTransport, Client,
                              HTTPTransport, JobHandle, LeasedJob, Middleware, MockTransport, NonRetryable,
                              PrometheusMiddleware, Reject, Request, Response, Retry, RetryPolicy,
                              SoftTimeLimitExceeded, TimeLimitExceeded, Worker, errors)


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("raftq.client"), name)
    raise AttributeError(f"module 'raftq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
