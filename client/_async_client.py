"""The `AsyncClient`: the shared plan (`client._base`) driven over aiohttp.

Same names, arguments, results and errors as `Client`; the methods are `async def`, closing is
`aclose()` and the context manager is `async with`. The aiohttp session is made on the first
request, inside the running event loop, so a client may be built before the loop starts (as the
worker runtime does); it must then be used from that one loop.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from typing import Any, Awaitable, Callable, Sequence

import aiohttp

from raftq.client import errors
from raftq.client._base import (Call, ClientState, LeasedJob, RetryPolicy, Send, _BaseClient, job_options, queue_settings,
                          result_of, schedule_spec, single)
from raftq.client._client import Client
from raftq.client._transports import (CONNECTIONS_MAX, AsyncBaseTransport, AsyncHTTPTransport, Request, Response,
                                      base_url, tls_context, transport_error)


class AiohttpTransport(AsyncBaseTransport):
    """HTTP/1.1 over one aiohttp ClientSession; never follows redirects itself (the plan does)."""

    def __init__(self, *, connections_max: int = CONNECTIONS_MAX, ssl_context: ssl.SSLContext | None = None) -> None:
        """ssl_context: for https:// nodes (default `tls_context()`)."""
        self._connections_max = connections_max
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: Request) -> Response:
        if self._session is None:
            if self._ssl_context is None and request.url.startswith("https://"):
                self._ssl_context = tls_context()
            connector = aiohttp.TCPConnector(limit=self._connections_max, ssl=self._ssl_context or True)
            self._session = aiohttp.ClientSession(connector=connector)
        try:
            async with self._session.request(
                request.method, request.url, data=request.content or None, headers=dict(request.headers),
                timeout=aiohttp.ClientTimeout(total=request.timeout_s), allow_redirects=False,
            ) as answer:
                content = await answer.read()
                return Response(answer.status, dict(answer.headers), content)
        except asyncio.TimeoutError as exc:  # before ClientError: ServerTimeoutError is both
            raise errors.Timeout(f"no answer within {request.timeout_s:.3g} s", node=base_url(request.url)) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise (transport_error(exc.certificate_error, request) or errors.ConnectError(str(exc))) from exc
        except aiohttp.ClientConnectorError as exc:
            raise (transport_error(exc.os_error, request) or errors.ConnectError(str(exc))) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise errors.ConnectError(f"connection reset ({exc})", node=base_url(request.url)) from exc
        except aiohttp.ClientError as exc:
            raise errors.TransportError(f"{type(exc).__name__}: {exc}", node=base_url(request.url)) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class AsyncClient(_BaseClient):
    """The asyncio twin of `Client`: the same calls as `async def` (see `Client` for each).

    Example:
        async with AsyncClient("http://127.0.0.1:7001,http://127.0.0.1:7002") as client:
            jobs = await client.fetch("w1", ["emails"], max_jobs=10, wait_s=20)
    """

    def __init__(self, nodes: str | Sequence[str], *, token: str | None = None, timeout: float = 10.0,
                 deadline: float = 30.0, ca_file: str | None = None, verify: bool = True,
                 transport: AsyncBaseTransport | None = None,
                 retry: RetryPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, rng: random.Random | None = None) -> None:
        """As `Client`, except that `transport` defaults to `AsyncHTTPTransport()` (an
        `AsyncBaseTransport`; `AiohttpTransport()` is the other one) and `sleep` to `asyncio.sleep`
        (an async function).

        Raises:
            ValueError: as `Client`.
        """
        super().__init__(nodes, token=token, timeout=timeout, deadline=deadline, retry=retry, clock=clock, rng=rng)
        self._transport = transport if transport is not None else AsyncHTTPTransport(
            ssl_context=tls_context(ca_file, verify=verify) if ca_file or not verify else None)
        self._sleep = sleep

    async def _send(self, call: Call) -> Any:
        """Drives the plan: sends what it says, sleeps when it says, returns its result."""
        self._open()
        plan = self._plan(call)
        reply = None
        while True:
            try:
                step = plan.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, Send):
                try:
                    reply = await self._transport.handle_async_request(step.request)
                except errors.TransportError as exc:
                    reply = exc
            else:
                await self._sleep(step.seconds)
                reply = None

    # ------------------------------------------------------------------ life cycle

    async def aclose(self) -> None:
        if self._state is not ClientState.CLOSED:
            self._state = ClientState.CLOSED
            await self._transport.aclose()

    async def __aenter__(self) -> "AsyncClient":
        self._open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ producers

    async def submit(self, queue: str, payload: Any, *, priority: int | None = None, delay_s: float | None = None,
                     max_attempts: int | None = None, lease_s: float | None = None,
                     idempotency_key: str | None = None, backoff_base_s: float | None = None,
                     backoff_cap_s: float | None = None, key: str | None = None,
                     group: str | None = None) -> str:
        options = job_options(priority=priority, delay_s=delay_s, max_attempts=max_attempts, lease_s=lease_s,
                              backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s, key=key, group=group)
        (call,) = self._submit_calls(queue, [payload], [idempotency_key], options)
        return (await self._send(call))[0]

    async def submit_many(self, queue: str, payloads: Sequence[Any], *, priority: int | None = None,
                          delay_s: float | None = None, max_attempts: int | None = None,
                          lease_s: float | None = None, idempotency_keys: Sequence[str | None] | None = None,
                          backoff_base_s: float | None = None, backoff_cap_s: float | None = None,
                          key: str | None = None, group: str | None = None) -> list[str]:
        options = job_options(priority=priority, delay_s=delay_s, max_attempts=max_attempts, lease_s=lease_s,
                              backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s, key=key, group=group)
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(payloads)
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} idempotency keys for {len(payloads)} payloads")
        return [job_id for call in self._submit_calls(queue, payloads, keys, options)
                for job_id in await self._send(call)]

    # ------------------------------------------------------------------ workers

    async def fetch(self, worker: str, queues: Sequence[str], *, max_jobs: int = 1,
                    wait_s: float = 0.0) -> list[LeasedJob]:
        return await self._send(self._fetch_call(worker, queues, max_jobs, wait_s))

    async def ack(self, worker: str, job_id: str, lease_token: int, result: Any = None) -> None:
        single(await self._send(self._ack_calls(worker, [(job_id, lease_token, result)])[0]))

    async def ack_many(self, worker: str, items: Sequence[tuple[str, int, Any]]) -> list[None | errors.RaftqError]:
        return [outcome for call in self._ack_calls(worker, items) for outcome in await self._send(call)]

    async def fail(self, worker: str, job_id: str, lease_token: int, error: str, *, retry: bool = True,
                   delay_s: float | None = None) -> None:
        single(await self._send(self._fail_calls(worker, [(job_id, lease_token, error, retry, delay_s)])[0]))

    async def fail_many(self, worker: str, items: Sequence[tuple[str, int, str, bool, float | None]]
                        ) -> list[None | errors.RaftqError]:
        return [outcome for call in self._fail_calls(worker, items) for outcome in await self._send(call)]

    async def extend(self, worker: str, job_id: str, lease_token: int, lease_s: float) -> float:
        return single(await self._send(self._extend_calls(worker, [(job_id, lease_token, lease_s)])[0]))

    async def extend_many(self, worker: str, items: Sequence[tuple[str, int, float]]
                          ) -> list[float | errors.RaftqError]:
        return [outcome for call in self._extend_calls(worker, items) for outcome in await self._send(call)]

    async def release_many(self, worker: str, items: Sequence[tuple[str, int]]) -> list[None | errors.RaftqError]:
        return [outcome for call in self._release_calls(worker, items) for outcome in await self._send(call)]

    async def heartbeat(self, worker: str, job_ids: Sequence[str]) -> list[str]:
        return await self._send(self._heartbeat_call(worker, job_ids))

    # ------------------------------------------------------------------ inspection and admin

    async def get(self, job_id: str) -> dict:
        return await self._send(self._get_call(job_id))

    async def wait(self, job_id: str, timeout: float | None = None) -> dict:
        plan = self._wait_plan(job_id, timeout)
        record = None
        while True:
            try:
                call = plan.send(record)
            except StopIteration as done:
                return done.value
            record = await self._send(call)

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Waits for the job to finish and returns its result; raises as `JobHandle.result`."""
        return result_of(await self.wait(job_id, timeout), timeout)

    async def cancel(self, job_id: str) -> None:
        await self._send(self._cancel_call(job_id))

    async def queues(self) -> dict:
        return await self._send(self._queues_call())

    async def delete_queue(self, queue: str, *, force: bool = False) -> dict:
        """As `Client.delete_queue`."""
        return await self._send(self._delete_queue_call(queue, force))

    async def configure_queue(self, queue: str, *, max_depth: int | None = None, rate_per_s: float | None = None,
                              burst: int | None = None, max_running_per_key: int | None = None,
                              fifo: bool = False) -> dict:
        return await self._send(self._configure_queue_call(queue, queue_settings(
            max_depth=max_depth, rate_per_s=rate_per_s, burst=burst, max_running_per_key=max_running_per_key,
            fifo=fifo)))

    async def queue_details(self) -> dict:
        return await self._send(self._queues_call(detail=True))

    # ------------------------------------------------------------------ schedules

    async def put_schedule(self, name: str, queue: str, payload: Any = None, *, cron: str | None = None,
                           every_s: float | None = None, timezone: str | None = None, overlap: str | None = None,
                           catch_up: str | None = None, priority: int | None = None,
                           max_attempts: int | None = None, lease_s: float | None = None) -> dict:
        return await self._send(self._schedule_call("PUT", name, body=schedule_spec(
            queue, payload, cron=cron, every_s=every_s, timezone=timezone, overlap=overlap, catch_up=catch_up,
            priority=priority, max_attempts=max_attempts, lease_s=lease_s)))

    async def schedule(self, name: str) -> dict:
        return await self._send(self._schedule_call("GET", name))

    async def schedules(self) -> list[dict]:
        return await self._send(self._schedules_call())

    async def delete_schedule(self, name: str) -> None:
        await self._send(self._schedule_call("DELETE", name))

    async def pause_schedule(self, name: str) -> dict:
        return await self._send(self._schedule_call("POST", name, "pause", body={}))

    async def resume_schedule(self, name: str) -> dict:
        return await self._send(self._schedule_call("POST", name, "resume", body={}))

    async def dead(self, queue: str, *, limit: int = 100, after: str | None = None) -> list[dict]:
        return await self._send(self._dead_call(queue, limit, after))

    async def redrive(self, queue: str, ids: Sequence[str] | None = None) -> int:
        return await self._send(self._redrive_call(queue, ids))

    async def purge_dead(self, queue: str) -> int:
        return await self._send(self._purge_dead_call(queue))

    async def cluster(self) -> dict:
        return await self._send(self._cluster_call())

    async def add_member(self, node_id: str, url: str) -> dict:
        return await self._send(self._add_member_call(node_id, url))

    async def remove_member(self, node_id: str) -> dict:
        return await self._send(self._remove_member_call(node_id))

    async def transfer_leadership(self, to: str | None = None) -> dict:
        return await self._send(self._transfer_call(to))

    async def workers(self) -> list[dict]:
        return await self._send(self._workers_call())


def _share_docstrings(twin: type, original: type) -> None:
    """Gives each public method of the twin the sync original's docstring (one text, two twins)."""
    for name, method in vars(twin).items():
        source = getattr(original, name, None)
        if callable(method) and method.__doc__ is None and source is not None and source.__doc__:
            method.__doc__ = source.__doc__
    twin.aclose.__doc__ = "Closes the aiohttp session; the client cannot be used again (a second aclose does nothing)."


_share_docstrings(AsyncClient, Client)
