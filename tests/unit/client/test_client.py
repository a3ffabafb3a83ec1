"""The sync Client against MockTransport nodes (retry rules, leader memory, errors), then against
a tiny real aiohttp server, to show the HTTP/1.1 transport works.

Time is a FakeClock: backoff "sleeps" only move it, so no test waits for real.
The AsyncClient twin runs the same scenarios in test_async_client.py, reusing the fakes here.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading
from typing import Any

import msgpack
import pytest

from raftq import Client, LeasedJob, MockTransport, Request, Response, RetryPolicy, errors
from raftq.client._base import BATCH_COUNT_MAX, fresh_keys
from tests.unit.client.fakes import (A, B, C, D, FakeClock, FakeNodes, RealNodes, closed_port_url, default_answer,
                                      leased, make_client)



# ---------------------------------------------------------------------------- the clock (fakes.py has the nodes)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------------------- leader tracking


def test_redirect_is_followed_and_the_leader_remembered(clock):
    nodes = FakeNodes(clock, {A: "follower", B: "leader", C: "follower"})
    with make_client(nodes) as client:
        job_id = client.submit("emails", {"to": "a"})
        assert nodes.urls() == [f"{A}/v1/queues/emails/jobs", f"{B}/v1/queues/emails/jobs"]
        assert (client.leader, client.leader_url) == ("n2", B)
        client.ack("w1", job_id, 7)
        assert nodes.urls()[2:] == [f"{B}/v1/ack"], "the second call goes straight to the leader"
    assert clock.slept == [], "a redirect is followed without a pause"


def test_a_leader_not_in_the_node_list_is_learned(clock):
    nodes = FakeNodes(clock, {A: "follower", D: "leader"}, leader=D, leader_id="n4")
    with make_client(nodes, urls=[A]) as client:
        client.submit("q", 1)
        assert client.nodes == (A, D) and client.leader_url == D


def test_a_redirect_to_a_node_the_cluster_does_not_list_gets_neither_request_nor_token(clock):
    evil = "http://203.0.113.9:7001"
    nodes = FakeNodes(clock, {A: "follower", evil: "leader"}, leader=evil, leader_id="n9")
    nodes.listed = [A]
    with make_client(nodes, urls=[A], token="s3cret", deadline=5.0) as client:
        with pytest.raises(errors.NoLeader, match="neither the given nodes nor the cluster's own list"):
            client.submit("q", 1)
        assert [r.url for r in nodes.requests if r.url.startswith(evil)] == [], "the token went to the stranger"
        assert evil not in client.nodes
    assert {r.path for r in nodes.requests} == {"/v1/queues/q/jobs", "/v1/cluster"}


def test_a_redirect_to_a_node_the_cluster_lists_is_followed_with_the_token(clock):
    nodes = FakeNodes(clock, {A: "follower", D: "leader"}, leader=D, leader_id="n4")
    with make_client(nodes, urls=[A], token="s3cret") as client:
        client.submit("q", 1)
        client.submit("q", 2)
    assert [r.url for r in nodes.requests] == [f"{A}/v1/queues/q/jobs", f"{A}/v1/cluster", f"{D}/v1/queues/q/jobs",
                                               f"{D}/v1/queues/q/jobs"], "one listing, then straight to the leader"
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in nodes.requests)


def test_cluster_status_does_not_move_the_leader_memory(clock):
    nodes = FakeNodes(clock, {A: "follower", B: "leader"})
    nodes.roles[A] = "leader"  # /v1/cluster is answered by any node; pretend A answers first
    with make_client(nodes) as client:
        client.cluster()
        assert client.leader_url is None


# ---------------------------------------------------------------------------- failover and backoff


@pytest.mark.parametrize("role", ["down", "slow"])
def test_failover_to_the_next_node_on_connection_error_or_timeout(clock, role):
    nodes = FakeNodes(clock, {A: role, B: "leader", C: "follower"})
    with make_client(nodes, timeout=2.0) as client:
        client.submit("q", {"n": 1})
        assert nodes.urls() == [f"{A}/v1/queues/q/jobs", f"{B}/v1/queues/q/jobs"]
        assert clock.slept == [], "failing over to an untried node is immediate"
        client.queues()
        assert nodes.urls()[-1] == f"{B}/v1/queues"


def test_a_dead_leader_is_forgotten_and_the_next_node_tried(clock):
    nodes = FakeNodes(clock, {A: "leader", B: "follower", C: "follower"}, leader=A, leader_id="n1")
    with make_client(nodes) as client:
        client.submit("q", 1)
        assert client.leader_url == A
        nodes.roles.update({A: "down", C: "leader"})
        nodes.leader, nodes.leader_id = C, "n3"
        client.submit("q", 2)
        assert nodes.urls()[1:] == [f"{A}/v1/queues/q/jobs", f"{B}/v1/queues/q/jobs", f"{C}/v1/queues/q/jobs"]
        assert (client.leader, client.leader_url) == ("n3", C)


def test_503_rotates_and_the_round_pause_honours_retry_after(clock):
    nodes = FakeNodes(clock, {A: "no_leader", B: "no_leader"})

    def election_ends_after_two_rounds(request: Request) -> Response:
        if len(nodes.requests) == 4:  # A, B, A, B answered 503; then A wins the election
            nodes.roles[A] = "leader"
        return nodes(request)

    with Client([A, B], transport=MockTransport(election_ends_after_two_rounds), clock=clock.now,
                sleep=clock.sleep) as client:
        client.submit("q", 1)
    assert [url.split("/v1/")[0] for url in nodes.urls()] == [A, B, A, B, A]
    assert len(clock.slept) == 2 and all(s >= 1.0 for s in clock.slept), "Retry-After: 1 is the floor"


def test_backoff_is_full_jitter_below_a_growing_cap(clock):
    nodes = FakeNodes(clock, {A: "down"})
    policy = RetryPolicy(backoff_base_s=0.1, backoff_cap_s=0.8)
    with make_client(nodes, deadline=20.0, retry=policy) as client, pytest.raises(errors.ConnectError):
        client.queues()
    caps = [min(0.8, 0.1 * 2 ** n) for n in range(len(clock.slept))]
    assert len(clock.slept) > 10 and all(0 <= s <= cap for s, cap in zip(clock.slept, caps)), clock.slept
    assert len(set(clock.slept)) == len(clock.slept), "jittered, not fixed"


def test_queue_full_on_submit_is_waited_out_honouring_retry_after(clock):
    nodes = FakeNodes(clock, {A: "leader", B: "follower"}, leader=A)
    full = iter([True, True, False])
    nodes.serve = lambda r: (Response.error(429, "queue_full", "queue q is full (10 jobs)", {"Retry-After": "1"})
                             if next(full) else default_answer(r))
    with make_client(nodes) as client:
        client.submit("q", 1)
    assert nodes.urls() == [f"{A}/v1/queues/q/jobs"] * 3, "429 stays on the leader"
    assert len(clock.slept) == 2 and min(clock.slept) >= 1.0


def test_queue_full_is_raised_at_once_when_not_opted_in(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = lambda r: Response.error(429, "queue_full", "queue q is full", {"Retry-After": "2"})
    with make_client(nodes, retry=RetryPolicy(retry_queue_full=False)) as client:
        with pytest.raises(errors.QueueFull) as caught:
            client.submit("q", 1)
        assert (caught.value.status, caught.value.retry_after, len(nodes.requests)) == (429, 2.0, 1)
    with make_client(nodes) as client:  # only submit opts in: a 429 elsewhere is not retried
        with pytest.raises(errors.QueueFull):
            client.fetch("w1", ["q"])
        assert len(nodes.requests) == 2


# ---------------------------------------------------------------------------- the deadline


def test_deadline_exceeded_is_one_clear_error(clock):
    nodes = FakeNodes(clock, {A: "down", B: "down"})
    with make_client(nodes, deadline=3.0) as client, pytest.raises(errors.ConnectError) as caught:
        client.submit("q", 1)
    message = str(caught.value)
    assert message.startswith(f"no raftq node answered at {A}, {B}: connection refused (deadline 3.0 s, ")
    assert "\n" not in message and caught.value.status is None and caught.value.code == "connect"
    assert isinstance(caught.value.__cause__, errors.ConnectError)
    assert sum(clock.slept) < 3.0 and clock.now_s - 1000.0 < 3.0


def test_deadline_names_each_node_when_reasons_differ(clock):
    nodes = FakeNodes(clock, {A: "down", B: "slow"})
    with make_client(nodes, timeout=1.0, deadline=2.5) as client, pytest.raises(errors.Timeout) as caught:
        client.queues()
    assert re.match(rf"no raftq node answered: {A}: connection refused; {B}: no answer within [0-9.]+ s "
                    r"\(deadline 2.5 s, \d+ attempts\)$", str(caught.value)), str(caught.value)


@pytest.mark.parametrize("deadline_s", [2.0, 2.5, 3.0, 3.5, 4.0, 5.0])
def test_a_last_attempt_the_deadline_cut_short_does_not_hide_why_the_nodes_failed(clock, deadline_s):
    # Every node refuses the client's TLS after a while; the attempt the deadline leaves too
    # little time for times out instead: that says nothing new about its node.
    nodes = FakeNodes(clock, {A: "untrusted", B: "untrusted"})
    with make_client(nodes, timeout=1.0, deadline=deadline_s) as client, pytest.raises(errors.ConnectError) as caught:
        client.submit("q", 1)
    assert re.match(rf"no raftq node answered at {A}, {B}: TLS: the node's certificate is not trusted "
                    rf"\(deadline {deadline_s:.1f} s, \d+ attempts\)$", str(caught.value)), str(caught.value)
    assert any(r.timeout_s < FakeNodes.HANDSHAKE_S for r in nodes.requests), "some attempt was cut short"


def test_deadline_with_503_everywhere_raises_no_leader_with_retry_after(clock):
    nodes = FakeNodes(clock, {A: "no_leader", B: "no_leader"})
    with make_client(nodes, deadline=5.0) as client, pytest.raises(errors.NoLeader) as caught:
        client.submit("q", 1)
    error = caught.value
    assert (error.status, error.code, error.retry_after) == (503, "no_leader", 1.0)
    assert "could not serve it before the deadline" in str(error) and "(deadline 5.0 s" in str(error)
    assert isinstance(error, errors.Unavailable) and isinstance(error, errors.ServerError)


def test_a_retry_after_past_the_deadline_gives_up_at_once(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = lambda r: Response.error(503, "unavailable", "overloaded", {"Retry-After": "60"})
    with make_client(nodes, deadline=5.0) as client, pytest.raises(errors.Unavailable):
        client.queues()
    assert (len(nodes.requests), clock.slept) == (1, [])


def test_a_redirect_loop_ends_in_backoff_and_no_leader(clock):
    nodes = FakeNodes(clock, {A: "follower", B: "follower"})

    def ping_pong(request: Request) -> Response:
        nodes.leader = A if request.url.startswith(B) else B  # each names the other
        return nodes(request)

    with Client([A, B], transport=MockTransport(ping_pong), clock=clock.now, sleep=clock.sleep,
                deadline=4.0) as client, pytest.raises(errors.NoLeader) as caught:
        client.submit("q", 1)
    assert "redirected 4 times in a row" in str(caught.value) or "just failed: redirected" in str(caught.value)
    rounds = len(clock.slept)
    assert rounds >= 1 and len(nodes.requests) <= (rounds + 1) * (RetryPolicy().redirects_max + 2)


# ---------------------------------------------------------------------------- idempotency


def test_idempotency_key_is_kept_across_retries_and_fresh_per_submit(clock):
    nodes = FakeNodes(clock, {A: "leader", B: "follower"}, leader=A)
    lost = iter([True, False, False, False])

    def first_answer_lost(request: Request) -> Response:
        if next(lost):
            clock.now_s += request.timeout_s
            raise errors.Timeout("no answer")
        return default_answer(request)

    nodes.serve = first_answer_lost
    with make_client(nodes) as client:
        client.submit("q", {"n": 1})
        client.submit("q", {"n": 1})
        client.submit("q", {"n": 1}, idempotency_key="welcome-42")
    keys = [body["jobs"][0]["idempotency_key"] for body in nodes.bodies() if "jobs" in body]
    sent_to_leader = [body["jobs"][0]["idempotency_key"] for request, body in zip(nodes.requests, nodes.bodies())
                      if request.url.startswith(A)]
    assert len(keys) == 5 and keys[0] == keys[1] == keys[2], "one submit's retries share its key"
    assert keys[3] != keys[0] and re.fullmatch(r"[A-Za-z0-9_-]{24}", keys[0]), keys[0]
    assert keys[4] == "welcome-42" and sent_to_leader[-1] == "welcome-42"


def test_fresh_keys_are_24_url_safe_characters_of_18_random_bytes_each():
    keys = fresh_keys(1000)
    assert len(set(keys)) == 1000, "keys repeat"
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9_-]{24}", key), f"not 24 URL-safe base64 characters: {key!r}"
        assert len(base64.urlsafe_b64decode(key)) == 18, key


def test_submit_many_chunks_with_a_key_per_job(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    with make_client(nodes) as client:
        ids = client.submit_many("bulk", list(range(2500)), priority=9, lease_s=5)
    jobs = [body["jobs"] for body in nodes.bodies()]
    assert [len(chunk) for chunk in jobs] == [BATCH_COUNT_MAX, BATCH_COUNT_MAX, 500]
    flat = [job for chunk in jobs for job in chunk]
    assert [job["payload"] for job in flat] == list(range(2500)) and len(ids) == 2500
    assert len({job["idempotency_key"] for job in flat}) == 2500
    assert all(job["priority"] == 9 and job["lease_s"] == 5 and "delay_s" not in job for job in flat)
    with make_client(nodes) as client:
        assert client.submit_many("bulk", []) == []
        with pytest.raises(ValueError):
            client.submit_many("bulk", [1, 2], idempotency_keys=["k1"])


# ---------------------------------------------------------------------------- answers


def batch_answer(request: Request) -> Response:
    items = len(next(value for key, value in request.decoded().items() if key != "worker"))
    outcomes: list[Any] = ["ok" if request.path != "/v1/extend" else {"ok": True, "lease_expires_at": 1.7e9},
                           {"error": {"code": "lease_expired", "message": "lease 7 of j2 expired"}},
                           {"error": {"code": "not_found", "message": "no job j3"}},
                           {"error": {"code": "lease_mismatch", "message": "j4 is leased to w2"}}]
    return Response.msgpack({"results": outcomes[:items]})


def test_batch_outcomes_map_per_item(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = batch_answer
    items = [("j1", 7, None), ("j2", 7, {"r": 1}), ("j3", 7, None), ("j4", 7, None)]
    with make_client(nodes) as client:
        acked = client.ack_many("w1", items)
        failed = client.fail_many("w1", [(job_id, lease, "boom", True, None) for job_id, lease, _ in items])
        extended = client.extend_many("w1", [(job_id, lease, 30.0) for job_id, lease, _ in items])
    for outcomes in (acked, failed):
        assert outcomes[0] is None
    assert extended[0] == 1.7e9
    for outcomes in (acked, failed, extended):
        assert [type(o) for o in outcomes[1:]] == [errors.LeaseError, errors.JobNotFound, errors.LeaseError]
        assert [(o.code, o.status) for o in outcomes[1:]] == [("lease_expired", 409), ("not_found", 404),
                                                            ("lease_mismatch", 409)]
        assert str(outcomes[1]) == "lease 7 of j2 expired"
    assert nodes.bodies()[0]["acks"][1] == {"id": "j2", "lease": 7, "result": {"r": 1}}
    assert "result" not in nodes.bodies()[0]["acks"][0]
    assert nodes.bodies()[1]["fails"][0] == {"id": "j1", "lease": 7, "error": "boom", "retry": True}


def test_single_item_calls_raise_their_item_error(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    with make_client(nodes) as client:
        nodes.serve = lambda r: Response.msgpack({"results": [{"error": {"code": "lease_expired", "message": "late"}}]})
        for call in (lambda: client.ack("w1", "j1", 7), lambda: client.fail("w1", "j1", 7, "boom", retry=False),
                     lambda: client.extend("w1", "j1", 7, 30.0)):
            with pytest.raises(errors.LeaseError) as caught:
                call()
            assert (caught.value.code, caught.value.status, caught.value.node) == ("lease_expired", 409, A)
        nodes.serve = default_answer
        assert client.ack("w1", "j1", 7) is None
        assert client.extend("w1", "j1", 7, 30.0) == 2e9
        client.fail("w1", "j1", 7, "boom", retry=False, delay_s=2.5)
    assert nodes.bodies()[-1]["fails"] == [{"id": "j1", "lease": 7, "error": "boom", "retry": False, "delay_s": 2.5}]


ERROR_CASES = [
    (400, "invalid", errors.InvalidRequest, errors.RequestError),
    (401, "unauthorized", errors.Unauthorized, errors.RequestError),
    (403, "forbidden", errors.Unauthorized, errors.RequestError),
    (404, "not_found", errors.JobNotFound, errors.JobError),
    (409, "lease_mismatch", errors.LeaseError, errors.JobError),
    (409, "lease_expired", errors.LeaseError, errors.JobError),
    (409, "conflict", errors.Conflict, errors.JobError),
    (413, "too_large", errors.PayloadTooLarge, errors.RequestError),
    (429, "queue_full", errors.QueueFull, errors.ServerError),
    (405, "method_not_allowed", errors.RequestError, errors.RequestError),
    (500, "internal", errors.ServerError, errors.ServerError),
]


@pytest.mark.parametrize("status, code, cls, family", ERROR_CASES)
def test_every_error_status_maps_to_its_class_without_retry(clock, status, code, cls, family):
    nodes = FakeNodes(clock, {A: "leader", B: "follower"}, leader=A)
    nodes.serve = lambda r: Response.error(status, code, f"{code} happened")
    with make_client(nodes) as client, pytest.raises(cls) as caught:
        client.get("j1")
    error = caught.value
    assert type(error) is cls and isinstance(error, family) and isinstance(error, errors.RaftqError)
    assert (error.status, error.code, str(error), error.node) == (status, code, f"{code} happened", A)
    assert len(nodes.requests) == 1, "4xx (and 500) are not retried"


@pytest.mark.parametrize("status, code, cls", [(503, "unavailable", errors.Unavailable),
                                               (503, "timeout", errors.Unavailable),
                                               (503, "no_leader", errors.NoLeader),
                                               (502, None, errors.Unavailable)])
def test_503_family_is_retried_then_mapped(clock, status, code, cls):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = lambda r: (Response.error(status, code, "busy", {"Retry-After": "1"}) if code
                             else Response(status, {"Content-Type": "text/html"}, b"<h1>Bad Gateway</h1>"))
    with make_client(nodes, deadline=3.0) as client, pytest.raises(cls) as caught:
        client.queues()
    assert type(caught.value) is cls and caught.value.status == status and len(nodes.requests) > 1
    if code is None:
        assert "Bad Gateway" in str(caught.value)


def test_an_unreadable_answer_is_a_decode_error(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    nodes.serve = lambda r: Response(200, {"Content-Type": "text/plain"}, b"hello")
    with make_client(nodes) as client:
        with pytest.raises(errors.DecodeError):
            client.queues()
        nodes.serve = lambda r: Response.msgpack({"no_ids": []}, 201)
        with pytest.raises(errors.DecodeError, match="unexpected body"):
            client.submit("q", 1)
        nodes.serve = lambda r: Response(200, {"Content-Type": "application/json"}, b'{"queues": {"q": {}}}')
        assert client.queues() == {"q": {}}, "a JSON answer is read too"


def test_error_pickles_with_its_fields():
    import pickle

    error = errors.QueueFull("full", status=429, retry_after=2.0, node=A)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.code, copy.status, copy.retry_after, copy.node, str(copy)) == \
        (errors.QueueFull, "queue_full", 429, 2.0, A, "full")


# ---------------------------------------------------------------------------- requests and life cycle


def test_requests_carry_msgpack_auth_and_the_core_paths(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    answers = {"/v1/workers/w%2F1/heartbeat": {"ok": True, "lost": ["j9"]}, "/v1/queues": {"queues": {"q": {}}},
               "/v1/queues/q/dead?limit=5&after=j0": {"jobs": [{"id": "d1"}]}, "/v1/jobs/a%2Fb": {"id": "a/b"},
               "/v1/queues/q/dead/redrive": {"redriven": 2}, "/v1/queues/q/dead/purge": {"purged": 3},
               "/v1/cluster": {"node": "n1"}, "/v1/workers": {"workers": []}}
    nodes.serve = lambda r: Response.msgpack(answers[r.path]) if r.path in answers else default_answer(r)
    with make_client(nodes, token="s3cret", timeout=4.0) as client:
        (job,) = client.fetch("w1", "emails", max_jobs=3, wait_s=2.5)
        assert job == LeasedJob("j1", "emails", {"n": 1}, 1, 7, 1_700_000_030.5, 3)
        assert client.heartbeat("w/1", ["j8", "j9"]) == ["j9"]
        assert client.get("a/b") == {"id": "a/b"}
        assert client.cancel("j1") is None
        assert client.queues() == {"q": {}}
        assert client.dead("q", limit=5, after="j0") == [{"id": "d1"}]
        assert client.redrive("q", ["d1", "d2"]) == 2 and client.redrive("q") == 2
        assert client.purge_dead("q") == 3 and client.cluster() == {"node": "n1"} and client.workers() == []
        assert client.configure_queue("q", max_depth=10) == {"ok": True}
    lease, *rest = nodes.requests
    assert lease.decoded() == {"worker": "w1", "queues": ["emails"], "max_jobs": 3, "wait_s": 2.5}
    assert lease.timeout_s == 4.0 + 2.5, "a long poll adds wait_s to the request timeout"
    assert lease.headers["Content-Type"] == lease.headers["Accept"] == "application/msgpack"
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in nodes.requests)
    assert [(r.method, r.path) for r in rest] == [
        ("POST", "/v1/workers/w%2F1/heartbeat"), ("GET", "/v1/jobs/a%2Fb"), ("POST", "/v1/jobs/j1/cancel"),
        ("GET", "/v1/queues"), ("GET", "/v1/queues/q/dead?limit=5&after=j0"), ("POST", "/v1/queues/q/dead/redrive"),
        ("POST", "/v1/queues/q/dead/redrive"), ("POST", "/v1/queues/q/dead/purge"), ("GET", "/v1/cluster"),
        ("GET", "/v1/workers"), ("PUT", "/v1/queues/q")]
    assert rest[0].decoded() == {"jobs": ["j8", "j9"]} and rest[5].decoded() == {"ids": ["d1", "d2"]}
    assert rest[6].decoded() == {} and rest[1].content == b"" and "Content-Type" not in rest[1].headers


def test_use_after_close_raises_and_close_is_idempotent(clock):
    closed = []

    class Recording(MockTransport):
        def close(self) -> None:
            closed.append(True)

    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    client = Client([A], transport=Recording(nodes))
    with client:
        client.queues()
    client.close()
    assert closed == [True]
    with pytest.raises(errors.ClientClosed):
        client.queues()
    with pytest.raises(errors.ClientClosed):
        with client:
            pass
    assert not isinstance(errors.ClientClosed("x"), errors.RaftqError), "local misuse is not a cluster error"


def test_bad_arguments_fail_before_any_request(clock):
    nodes = FakeNodes(clock, {A: "leader"}, leader=A)
    for bad in ([], "", ["127.0.0.1:7001"], ["http://a:1/v1"]):
        with pytest.raises(ValueError):
            Client(bad)
    with pytest.raises(ValueError):
        Client([A], timeout=0)
    assert Client(f"{A}/, {B}").nodes == (A, B)
    with make_client(nodes) as client, pytest.raises(TypeError, match="msgpack"):
        client.submit("q", object())
    assert nodes.requests == []


# ---------------------------------------------------------------------------- a real HTTP server


@pytest.fixture
def real_nodes():
    """RealNodes served from a loop on a background thread, for the blocking client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    nodes = RealNodes()
    asyncio.run_coroutine_threadsafe(nodes.start(), loop).result(10)
    yield nodes
    asyncio.run_coroutine_threadsafe(nodes.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_real_http_redirect_failover_and_msgpack(real_nodes):
    down = closed_port_url()
    with Client([down, real_nodes.follower_url], token="t0ken", timeout=5.0, deadline=10.0) as client:
        assert client.submit_many("emails", [{"to": "a"}, {"to": "b"}]) == ["id0", "id1"]
        assert client.leader_url == real_nodes.leader_url and client.leader == "n1"
        (job,) = client.fetch("w1", ["emails"], wait_s=0.1)
        assert job.payload == {"blob": b"\x00\xff", "text": "é"} and job.lease_token == 7
        with pytest.raises(errors.JobNotFound, match="no job nope"):
            client.get("nope")
    assert real_nodes.seen == [("follower", "POST", "/v1/queues/emails/jobs"), ("follower", "GET", "/v1/cluster"),
                               ("leader", "POST", "/v1/queues/emails/jobs"), ("leader", "POST", "/v1/lease"),
                               ("leader", "GET", "/v1/jobs/nope")]


def test_real_http_keeps_connections_alive_and_is_thread_safe(real_nodes):
    with Client([real_nodes.leader_url], token="t0ken") as client:
        for n in range(5):
            client.submit("q", n)
        assert len(real_nodes.leader_peers) == 1, "one keep-alive connection for sequential calls"
        results: list[Any] = []

        def submit_some() -> None:
            results.extend(client.submit("q", n) for n in range(10))

        threads = [threading.Thread(target=submit_some) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert results == ["id0"] * 80
    assert len(real_nodes.leader_peers) <= 8


class ClosingServer:
    """Answers one request per connection, then closes it without saying so (no Connection: close),
    like a node that dropped an idle keep-alive connection: the client's pooled connection goes stale."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = msgpack.packb({"queues": {}})
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed by the test
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                self.requests += 1
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/msgpack\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def test_a_stale_pooled_connection_is_replaced_without_failing_over():
    server = ClosingServer()
    slept: list[float] = []
    try:
        with Client([server.url], timeout=5.0, deadline=10.0, sleep=slept.append) as client:
            for _ in range(3):
                assert client.queues() == {}
    finally:
        server.listener.close()
    assert server.requests == 3, "each call reached the node once"
    assert slept == [], "the transport reconnected at once; the retry plan never saw a failure"


def test_lease_answer_time_left_is_kept_for_workers_whatever_the_clocks(clock):
    """`lease_expires_in_s` (the time a lease had left as the server answered) reaches the job, so
    a worker plans its extends without comparing its wall clock to the cluster's."""
    nodes = FakeNodes(clock, {A: "leader", B: "follower", C: "follower"}, leader=A, leader_id="n1")
    answer = {**leased("j1", "q"), "lease_expires_at": 1_700_000_030.5, "lease_expires_in_s": 29.75}
    nodes.serve = lambda r: Response.msgpack({"jobs": [answer]}) if r.path == "/v1/lease" else default_answer(r)
    with make_client(nodes) as client:
        (job,) = client.fetch("w1", ["q"])
    assert (job.lease_expires_at, job.lease_expires_in_s) == (1_700_000_030.5, 29.75)
