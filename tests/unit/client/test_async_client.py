"""The AsyncClient twin: the same scenarios as test_client.py through `await`, then a real aiohttp
server in the test's own loop (redirect once, msgpack, a refused node), to show the aiohttp path works.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from raftq.client import (AiohttpTransport, AsyncClient, AsyncHTTPTransport, ClientState, LeasedJob, MockTransport,
                          Request, Response, errors)
from tests.unit.client.fakes import A, B, C, FakeClock, FakeNodes, RealNodes, closed_port_url, default_answer
from tests.unit.client.test_client import ERROR_CASES, batch_answer


def make_client(nodes: FakeNodes, **options: Any) -> AsyncClient:
    options.setdefault("deadline", 30.0)
    return AsyncClient(list(nodes.roles), transport=MockTransport(nodes), clock=nodes.clock.now,
                       sleep=nodes.clock.asleep, rng=random.Random(7), **options)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_redirect_is_followed_and_the_leader_remembered(clock):
    nodes = FakeNodes(clock, {A: "follower", B: "leader", C: "follower"})
    async with make_client(nodes) as client:
        await client.submit("emails", {"to": "a"})
        await client.queues()
        assert (client.leader, client.leader_url) == ("n2", B)
    assert nodes.urls() == [f"{A}/v1/queues/emails/jobs", f"{B}/v1/queues/emails/jobs", f"{B}/v1/queues"]
    assert clock.slept == []


@pytest.mark.parametrize("role", ["down", "slow"])
async def test_failover_to_the_next_node(clock, role):
    nodes = FakeNodes(clock, {A: role, B: "leader"})
    async with make_client(nodes, timeout=2.0) as client:
        (job,) = await client.fetch("w1", ["emails"], max_jobs=2, wait_s=1.0)
    assert job == LeasedJob("j1", "emails", {"n": 1}, 1, 7, 1_700_000_030.5, 3)
    assert nodes.urls() == [f"{A}/v1/lease", f"{B}/v1/lease"] and clock.slept == []
    assert nodes.requests[0].timeout_s == 3.0


async def test_retry_after_is_honoured_between_rounds(clock):
    nodes = FakeNodes(clock, {A: "no_leader", B: "no_leader"})

    async def election_ends_after_one_round(request: Request) -> Response:  # an async handler works too
        if len(nodes.requests) == 2:
            nodes.roles[A] = "leader"
        return nodes(request)

    async with AsyncClient([A, B], transport=MockTransport(election_ends_after_one_round), clock=clock.now,
                           sleep=clock.asleep) as client:
        assert await client.heartbeat("w1", ["j1"]) == []
    assert len(clock.slept) == 1 and clock.slept[0] >= 1.0


async def test_deadline_exceeded_is_one_clear_error(clock):
    nodes = FakeNodes(clock, {A: "down", B: "down"})
    async with make_client(nodes, deadline=3.0) as client:
        with pytest.raises(errors.ConnectError) as caught:
            await client.submit("q", 1)
    assert str(caught.value).startswith(f"no raftq node answered at {A}, {B}: connection refused (deadline 3.0 s, ")
    assert sum(clock.slept) < 3.0


async def test_idempotency_key_is_kept_across_retries_and_fresh_per_submit(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    lost = iter([True, False, False])

    def first_answer_lost(request: Request) -> Response:
        if next(lost):
            raise errors.ConnectError("connection reset")
        return default_answer(request)

    nodes.serve = first_answer_lost
    async with make_client(nodes) as client:
        await client.submit("q", 1)
        await client.submit_many("q", [1])
    keys = [body["jobs"][0]["idempotency_key"] for body in nodes.bodies()]
    assert keys[0] == keys[1] != keys[2]


async def test_batch_outcomes_map_per_item(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = batch_answer
    items = [("j1", 7, None), ("j2", 7, None), ("j3", 7, None)]
    async with make_client(nodes) as client:
        acked = await client.ack_many("w1", items)
        extended = await client.extend_many("w1", [(job_id, lease, 30.0) for job_id, lease, _ in items])
        failed = await client.fail_many("w1", [(job_id, lease, "boom", False, 1.0) for job_id, lease, _ in items])
        with pytest.raises(errors.LeaseError):
            nodes.serve = lambda r: Response.msgpack({"results": [{"error": {"code": "lease_mismatch",
                                                                               "message": "not yours"}}]})
            await client.ack("w1", "j1", 7)
    assert acked[0] is None and failed[0] is None and extended[0] == 1.7e9
    for outcomes in (acked, extended, failed):
        assert [type(o) for o in outcomes[1:]] == [errors.LeaseError, errors.JobNotFound]


@pytest.mark.parametrize("status, code, cls, family", ERROR_CASES)
async def test_every_error_status_maps_to_its_class(clock, status, code, cls, family):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = lambda r: Response.error(status, code, f"{code} happened")
    async with make_client(nodes) as client:
        with pytest.raises(cls) as caught:
            await client.cancel("j1")
    assert type(caught.value) is cls and (caught.value.status, caught.value.code) == (status, code)
    assert len(nodes.requests) == 1


async def test_use_after_close_raises(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    client = make_client(nodes)
    assert client.state is ClientState.UNOPENED
    assert await client.queues() == {"q": {"ready": 1}}
    await client.aclose()
    await client.aclose()
    assert client.state is ClientState.CLOSED
    with pytest.raises(errors.ClientClosed):
        await client.get("j1")
    with pytest.raises(errors.ClientClosed):
        async with client:
            pass


def test_a_sync_client_refuses_an_async_handler(clock):
    from raftq import Client

    async def handler(request: Request) -> Response:
        return default_answer(request)

    with Client([A], transport=MockTransport(handler)) as client, pytest.raises(TypeError, match="AsyncClient"):
        client.queues()


@pytest.mark.parametrize("transport", [None, AiohttpTransport], ids=["default AsyncHTTPTransport", "AiohttpTransport"])
async def test_real_http_redirect_failover_and_msgpack(transport):
    nodes = RealNodes()
    await nodes.start()
    try:
        async with AsyncClient([closed_port_url(), nodes.follower_url], token="t0ken", timeout=5.0,
                               deadline=10.0, transport=transport() if transport else None) as client:
            assert await client.submit("emails", {"to": "a"}) == "id0"
            assert (client.leader_url, client.leader) == (nodes.leader_url, "n1")
            (job,) = await client.fetch("w1", ["emails"], wait_s=0.1)
            assert job.payload == {"blob": b"\x00\xff", "text": "é"}
            with pytest.raises(errors.JobNotFound, match="no job nope"):
                await client.get("nope")
            used = client._transport
            assert isinstance(used, transport or AsyncHTTPTransport)
            kept = used._session if transport else [c for idle in used._idle.values() for c in idle]
            assert kept, "a connection (aiohttp: a session) is kept for the next call"
        if transport:
            assert kept.closed, "aclose closes the aiohttp session"
        else:
            assert used._idle == {} and all(c._writer is None for c in kept), "aclose closes the idle connections"
    finally:
        await nodes.stop()
    assert nodes.seen == [("follower", "POST", "/v1/queues/emails/jobs"), ("follower", "GET", "/v1/cluster"),
                          ("leader", "POST", "/v1/queues/emails/jobs"),
                          ("leader", "POST", "/v1/lease"), ("leader", "GET", "/v1/jobs/nope")]
