"""Fakes the client tests share: an in-memory cluster the worker talks to (`FakeCluster`, its
asyncio twin `AsyncFake`, and `ApiServer`, the same served over real HTTP), a fake clock and
scripted nodes for the client's retry policy (`FakeClock`, `FakeNodes`), and real loopback nodes
(`RealNodes`). They behave as the server does where the tests rely on it (lease tokens, retry
delays, attempts, redirects); anything else is out of scope. Integration tests use real nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
from aiohttp import web

from raftq import Client, LeasedJob, MockTransport, Request, Response, errors
from raftq.protocol import FETCH_COUNT_MAX

#: Node URLs of the scripted clusters (FakeNodes).
A, B, C, D = "http://a:7001", "http://b:7002", "http://c:7003", "http://d:7004"

DEADLINE_S = 10.0


def wait_until(predicate, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def lease_error(job_id: str) -> errors.RaftqError:
    return errors.LeaseError(f"job {job_id}: lease_mismatch", code="lease_mismatch", status=409)


@dataclass
class FakeJob:
    id: str
    queue: str
    payload: Any
    max_attempts: int = 1
    lease_s: float = 30.0
    attempts: int = 0
    state: str = "ready"
    ready_at: float = 0.0
    lease_token: int = 0
    holder: str | None = None


@dataclass
class FakeCluster:
    """The server side of fetch / ack / fail / extend / heartbeat, thread-safe, recording every call."""

    jobs: dict[str, FakeJob] = field(default_factory=dict)
    fetches: list[tuple[int, int]] = field(default_factory=list)  # (max_jobs, leases held before)
    acks: list[tuple[str, Any]] = field(default_factory=list)
    ack_calls: list[int] = field(default_factory=list)
    fails: list[tuple[str, str, bool, float | None]] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    extends: list[tuple[str, int, float]] = field(default_factory=list)
    heartbeats: list[list[str]] = field(default_factory=list)
    held_max: int = 0
    fetch_errors: list[Exception] = field(default_factory=list)
    ack_errors: list[Exception] = field(default_factory=list)
    extend_error: Exception | None = None  # raised by every extend call while set
    on_heartbeat: Any = None
    on_extend: Any = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.job_ready = threading.Condition(self.lock)  # wakes long polls
        self.polling = 0
        self.tokens = itertools.count(1)
        self.ids = itertools.count(1)

    def add(self, queue: str, payload: Any, **options: Any) -> str:
        job_id = f"j{next(self.ids)}"
        with self.lock:
            self.jobs[job_id] = FakeJob(job_id, queue, payload, **options)
            self.job_ready.notify_all()
        return job_id

    def held(self, worker: str) -> int:
        return sum(1 for job in self.jobs.values() if job.state == "leased" and job.holder == worker)

    def state(self, job_id: str) -> str:
        return self.jobs[job_id].state

    # -- the client calls the worker makes

    def fetch(self, worker, queues, *, max_jobs=1, wait_s=0.0):
        if not 1 <= max_jobs <= FETCH_COUNT_MAX:  # as the server refuses it (400), changing nothing
            raise errors.InvalidRequest(f"field 'max_jobs' = {max_jobs} is out of range [1, {FETCH_COUNT_MAX}]")
        with self.lock:
            if self.fetch_errors:
                raise self.fetch_errors.pop(0)
            self.fetches.append((max_jobs, self.held(worker)))
            ready = self._ready(queues)
            if not ready and wait_s > 0:  # a long poll, as the server's
                self.polling += 1
                self.job_ready.wait_for(lambda: self._ready(queues), timeout=wait_s)
                self.polling -= 1
                ready = self._ready(queues)
            now = time.time()
            out = []
            for job in ready[:max_jobs]:
                job.state, job.holder, job.lease_token = "leased", worker, next(self.tokens)
                job.attempts += 1
                out.append(LeasedJob(id=job.id, queue=job.queue, payload=job.payload, attempt=job.attempts,
                                     lease_token=job.lease_token, lease_expires_at=now + job.lease_s, priority=0,
                                     lease_s=job.lease_s))
            self.held_max = max(self.held_max, self.held(worker))
            return out

    def _ready(self, queues) -> list[FakeJob]:
        now = time.time()
        return [j for j in self.jobs.values() if j.queue in queues and j.state == "ready" and j.ready_at <= now]

    def _holds(self, worker, job_id, lease) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.state == "leased" and job.holder == worker and job.lease_token == lease

    def ack_many(self, worker, items):
        with self.lock:
            if self.ack_errors:
                raise self.ack_errors.pop(0)
            self.ack_calls.append(len(items))
            results = []
            for job_id, lease, result in items:
                if not self._holds(worker, job_id, lease):
                    results.append(lease_error(job_id))
                    continue
                self.jobs[job_id].state = "done"
                self.acks.append((job_id, result))
                results.append(None)
            return results

    def fail_many(self, worker, items):
        with self.lock:
            results = []
            for job_id, lease, error, retry, delay_s in items:
                self.fails.append((job_id, error, retry, delay_s))
                if not self._holds(worker, job_id, lease):
                    results.append(lease_error(job_id))
                    continue
                job = self.jobs[job_id]
                if retry and job.attempts < job.max_attempts:
                    job.state, job.ready_at = "ready", time.time() + (delay_s or 0.0)
                    self.job_ready.notify_all()
                else:
                    job.state = "dead"
                job.holder = None
                results.append(None)
            return results

    def release_many(self, worker, items):
        with self.lock:
            results = []
            for job_id, lease in items:
                self.releases.append(job_id)
                if not self._holds(worker, job_id, lease):
                    results.append(lease_error(job_id))
                    continue
                job = self.jobs[job_id]
                job.state, job.ready_at, job.holder = "ready", time.time(), None
                job.attempts -= 1  # the server counts no attempt for a released lease
                self.job_ready.notify_all()
                results.append(None)
            return results

    def extend_many(self, worker, items):
        if self.extend_error is not None:
            raise self.extend_error
        with self.lock:
            results = []
            for job_id, lease, lease_s in items:
                self.extends.append((job_id, lease, lease_s))
                results.append(time.time() + lease_s if self._holds(worker, job_id, lease) else lease_error(job_id))
        if self.on_extend:
            self.on_extend(items)
        return results

    def heartbeat(self, worker, job_ids):
        with self.lock:
            self.heartbeats.append(list(job_ids))
            lost = [j for j in job_ids if not (self.jobs[j].state == "leased" and self.jobs[j].holder == worker)]
        if self.on_heartbeat:
            self.on_heartbeat(job_ids)
        return lost

    def steal(self, job_id: str) -> None:
        """Another worker now holds the job (as after a lease expiry)."""
        with self.lock:
            self.jobs[job_id].holder = "someone-else"
            self.jobs[job_id].lease_token = next(self.tokens)


class AsyncFake:
    """The same fake behind `async def` methods, as an AsyncClient would offer them; each call
    runs in a thread, so that a long poll suspends the caller instead of blocking its loop."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def __getattr__(self, name):
        method = getattr(self.cluster, name)

        async def call(*args, **kwargs):
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


class ApiServer:
    """A tiny real HTTP server (aiohttp, on its own thread and loop) speaking the worker paths of the
    API over a FakeCluster, so that tests can put the real Client / AsyncClient in between."""

    def __init__(self, cluster: FakeCluster | None = None) -> None:
        self.cluster = cluster if cluster is not None else FakeCluster()
        self.loop = asyncio.new_event_loop()
        self.url = ""

    def start(self) -> None:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        assert ready.wait(DEADLINE_S) and self.url, "the test server did not start (see the thread's exception)"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/lease", self.fetch)
        router.add_post("/v1/ack", self.ack)
        router.add_post("/v1/fail", self.fail)
        router.add_post("/v1/extend", self.extend)
        router.add_post("/v1/release", self.release)
        router.add_post("/v1/workers/{worker}/heartbeat", self.heartbeat)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            app = web.Application()
            self.add_routes(app.router)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        finally:
            ready.set()
        self.loop.run_forever()

    @staticmethod
    async def body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return {}
        return msgpack.unpackb(raw) if "msgpack" in request.headers.get("Content-Type", "") else json.loads(raw)

    @staticmethod
    def respond(request: web.Request, value: Any, status: int = 200) -> web.Response:
        if "msgpack" in request.headers.get("Accept", "") + request.headers.get("Content-Type", ""):
            return web.Response(body=msgpack.packb(value), status=status, content_type="application/msgpack")
        return web.json_response(value, status=status)

    def error(self, request: web.Request, status: int, code: str, message: str) -> web.Response:
        return self.respond(request, {"error": {"code": code, "message": message}}, status)

    @staticmethod
    def outcome(result: Any) -> Any:
        if isinstance(result, errors.RaftqError):
            return {"error": {"code": result.code, "message": str(result)}}
        return "ok" if result is None else {"ok": True, "lease_expires_at": result}

    async def fetch(self, request):
        body = await self.body(request)
        jobs = self.cluster.fetch(body["worker"], body["queues"], max_jobs=body["max_jobs"], wait_s=body["wait_s"])
        return self.respond(request, {"jobs": [self.leased_wire(job) for job in jobs]})

    @staticmethod
    def leased_wire(job: LeasedJob) -> dict:
        """A LeasedJob as the server's lease answer spells it (the token's wire name is `lease`)."""
        wire = dataclasses.asdict(job)
        wire["lease"] = wire.pop("lease_token")
        return wire

    async def ack(self, request):
        body = await self.body(request)
        items = [(a["id"], a["lease"], a.get("result")) for a in body["acks"]]
        results = self.cluster.ack_many(body["worker"], items)
        return self.respond(request, {"results": [self.outcome(r) for r in results]})

    async def fail(self, request):
        body = await self.body(request)
        items = [(f["id"], f["lease"], f["error"], f.get("retry", True), f.get("delay_s")) for f in body["fails"]]
        results = self.cluster.fail_many(body["worker"], items)
        return self.respond(request, {"results": [self.outcome(r) for r in results]})

    async def release(self, request):
        body = await self.body(request)
        results = self.cluster.release_many(body["worker"], [(x["id"], x["lease"]) for x in body["leases"]])
        return self.respond(request, {"results": [self.outcome(r) for r in results]})

    async def extend(self, request):
        body = await self.body(request)
        items = [(x["id"], x["lease"], x["lease_s"]) for x in body["leases"]]
        results = await asyncio.to_thread(self.cluster.extend_many, body["worker"], items)  # its hook may block
        return self.respond(request, {"results": [self.outcome(r) for r in results]})

    async def heartbeat(self, request):
        body = await self.body(request)
        lost = await asyncio.to_thread(self.cluster.heartbeat, request.match_info["worker"], body["jobs"])
        return self.respond(request, {"ok": True, "lost": lost})






class FakeClock:
    """A monotonic clock that only moves when the client sleeps (or a fake node takes time)."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now_s += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class FakeNodes:
    """MockTransport handler playing nodes by base URL.

    Roles: "leader" (answers through `serve`), "follower" (307 to the leader), "down" (connection
    refused), "slow" (times out after the request's timeout), "untrusted" (a TLS handshake that
    fails after HANDSHAKE_S, or times out first when the request's timeout is shorter), "no_leader"
    (503 + Retry-After).
    """

    HANDSHAKE_S = 0.3

    def __init__(self, clock: FakeClock, roles: dict[str, str], *, leader: str = B, leader_id: str = "n2") -> None:
        self.clock = clock
        self.roles = roles
        self.leader = leader
        self.leader_id = leader_id
        self.requests: list[Request] = []
        self.serve: Callable[[Request], Response] = default_answer
        #: The base URLs every node names in GET /v1/cluster (default: all of them).
        self.listed: list[str] | None = None

    def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        role = self.roles[request.url.split("/v1/")[0]]
        if role == "down":
            raise errors.ConnectError("connection refused")
        if role == "slow" or (role == "untrusted" and request.timeout_s < self.HANDSHAKE_S):
            self.clock.now_s += request.timeout_s
            raise TimeoutError("timed out")  # MockTransport turns it into errors.Timeout
        if role == "untrusted":
            self.clock.now_s += self.HANDSHAKE_S
            raise errors.ConnectError("TLS: the node's certificate is not trusted")
        if request.path == "/v1/cluster" and role == "follower":
            listed = self.listed if self.listed is not None else list(self.roles)
            return Response.msgpack({"node": role, "leader_url": None, "nodes": [{"url": url} for url in listed]})
        if role == "follower":
            return Response.error(307, "not_leader", f"{self.leader_id} leads",
                                  headers={"Location": self.leader + request.path, "X-Raftq-Leader": self.leader_id})
        if role == "no_leader":
            return Response.error(503, "no_leader", "no leader is known yet", headers={"Retry-After": "1"})
        return self.serve(request)

    def urls(self) -> list[str]:
        return [request.url for request in self.requests]

    def bodies(self) -> list[Any]:
        return [request.decoded() for request in self.requests]


def default_answer(request: Request) -> Response:
    """What a healthy leader answers to each core path."""
    body = request.decoded()
    path = request.path
    if path.endswith("/jobs") and request.method == "POST":
        return Response.msgpack({"ids": [f"id-{job['idempotency_key'][:6]}" for job in body["jobs"]]}, 201)
    if path == "/v1/lease":
        return Response.msgpack({"jobs": [leased("j1", body["queues"][0])]})
    if path in ("/v1/ack", "/v1/fail"):
        return Response.msgpack({"results": ["ok"] * len(body["acks" if path == "/v1/ack" else "fails"])})
    if path == "/v1/extend":
        return Response.msgpack({"results": [{"ok": True, "lease_expires_at": 2e9} for _ in body["leases"]]})
    if path == "/v1/queues":
        return Response.msgpack({"queues": {"q": {"ready": 1}}})
    if path.endswith("/heartbeat"):
        return Response.msgpack({"ok": True, "lost": []})
    return Response.msgpack({"ok": True})


def leased(job_id: str, queue: str, payload: Any = None) -> dict:
    return {"id": job_id, "queue": queue, "payload": payload if payload is not None else {"n": 1}, "attempt": 1,
            "lease": 7, "lease_expires_at": 1_700_000_030.5, "priority": 3}


def make_client(nodes: FakeNodes, urls: list[str] | None = None, **options: Any) -> Client:
    options.setdefault("deadline", 30.0)
    return Client(urls or list(nodes.roles), transport=MockTransport(nodes), clock=nodes.clock.now,
                  sleep=nodes.clock.sleep, rng=random.Random(7), **options)




class RealNodes:
    """Two aiohttp apps on 127.0.0.1 port 0: a follower that redirects, and a leader that answers msgpack."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.seen: list[tuple[str, str, str]] = []  # (node, method, path)
        self.leader_peers: set[Any] = set()  # client (host, port) of each connection to the leader
        self.leader_url = self.follower_url = ""

    async def start(self) -> None:
        leader = web.Application()
        leader.router.add_post("/v1/queues/{queue}/jobs", self.submit)
        leader.router.add_post("/v1/lease", self.fetch)
        leader.router.add_get("/v1/jobs/{id}", self.job)
        follower = web.Application()
        follower.router.add_get("/v1/cluster", self.listing)
        follower.router.add_route("*", "/{tail:.*}", self.redirect)
        self.leader_url = await self._serve(leader)
        self.follower_url = await self._serve(follower)

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def redirect(self, request: web.Request) -> web.Response:
        self.seen.append(("follower", request.method, request.path))
        return web.Response(status=307, headers={"Location": self.leader_url + request.path_qs,
                                                 "X-Raftq-Leader": "n1"},
                            body=msgpack.packb({"error": {"code": "not_leader", "message": "n1 leads"}}),
                            content_type="application/msgpack")

    async def listing(self, request: web.Request) -> web.Response:
        self.seen.append(("follower", request.method, request.path))
        return self.msgpack({"nodes": [{"url": self.leader_url}, {"url": self.follower_url}]})

    async def submit(self, request: web.Request) -> web.Response:
        self.seen.append(("leader", request.method, request.path))
        self.leader_peers.add(request.transport.get_extra_info("peername"))
        assert request.content_type == "application/msgpack"
        assert request.headers["Authorization"] == "Bearer t0ken"
        body = msgpack.unpackb(await request.read(), raw=False)
        return self.msgpack({"ids": [f"id{n}" for n, _ in enumerate(body["jobs"])]}, 201)

    async def fetch(self, request: web.Request) -> web.Response:
        self.seen.append(("leader", request.method, request.path))
        body = msgpack.unpackb(await request.read(), raw=False)
        return self.msgpack({"jobs": [leased("j1", body["queues"][0], {"blob": b"\x00\xff", "text": "é"})]})

    async def job(self, request: web.Request) -> web.Response:
        self.seen.append(("leader", request.method, request.path))
        return self.msgpack({"error": {"code": "not_found", "message": f"no job {request.match_info['id']}"}}, 404)

    @staticmethod
    def msgpack(value: Any, status: int = 200) -> web.Response:
        return web.Response(body=msgpack.packb(value, use_bin_type=True), status=status,
                            content_type="application/msgpack")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


