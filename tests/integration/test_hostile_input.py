"""Hostile input never hurts (SPEC "Interface", "Security"): three real nodes, a client token.

`test_the_attacks_of_issue_11_get_4xx` sends every input issue 11 found getting a 500 or doing
harm, each with the status it must get now. `test_fuzz_routes_never_5xx` is a property-based
fuzz test (hypothesis): generated requests to every /v1 and /raft route, with and without the
token or cluster secret, JSON, msgpack and other content types, valid-looking and broken bodies;
no answer is a 5xx, and at the end every node is alive and the three state digests are equal.
The attacks above are its explicit examples too.

In CI it runs RAFTQ_FUZZ_EXAMPLES (default 300) examples; a longer run:

    RAFTQ_FUZZ_EXAMPLES=20000 deploy/test.sh tests/integration/test_hostile_input.py -k fuzz

One thing is left out by design: valid Raft messages *with* the right cluster secret. A holder of
the secret is a peer, and a peer can make the cluster do anything; the fuzz test sends such a
peer only undecodable bodies.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raftq.cluster.localcluster import LocalCluster, http_json
from raftq.cluster.raft.codec import encode_messages
from raftq.cluster.raft.messages import Entry, EntryKind, Message, MessageType
from raftq.cluster.snapshot_transfer import FROM_HEADER, OFFSET_HEADER, SNAPSHOT_HEADER, TERM_HEADER
from raftq.cluster.transport.http import SECRET_HEADER

TOKEN = "fuzz-token-0123456789"
JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"


@dataclass
class Cluster:
    local: LocalCluster
    leader_url: str

    @property
    def secret(self) -> str:
        return self.local.secret


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    with LocalCluster(str(base / "cluster"), size=3, token=TOKEN, extra_args=["--worker-timeout", "2"]) as local:
        leader = local.wait_for_leader()
        yield Cluster(local, local.nodes[leader].url)


def send(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def auth(content_type: str | None = JSON_TYPE) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": JSON_TYPE}
    if content_type:
        headers["Content-Type"] = content_type
    return headers


def submit_one(cluster: Cluster, queue: str = "q") -> str:
    status, body = http_json(cluster.leader_url + f"/v1/queues/{queue}/jobs", method="POST",
                             body={"jobs": [{"payload": {"n": 1}}]}, headers=auth())
    assert status == 201, body
    return body["ids"][0]


def lease_one(cluster: Cluster, worker: str = "w1") -> dict:
    status, body = http_json(cluster.leader_url + "/v1/lease", method="POST",
                             body={"worker": worker, "queues": ["q"], "max_jobs": 1}, headers=auth())
    assert status == 200 and body["jobs"], body
    return body["jobs"][0]


def deep_json(depth: int) -> bytes:
    return b'{"jobs": [{"payload": ' + b"[" * depth + b"]" * depth + b"}]}"


def forged_messages(cluster: Cluster) -> dict[str, bytes]:
    term = max(s["term"] for s in cluster.local.statuses().values() if s)
    leader = next(n for n, s in cluster.local.statuses().items() if s and s["role"] == "leader")
    follower = next(n for n in cluster.local.nodes if n != leader)
    bogus = msgpack.packb([1, 0, 0, "q", []])  # a made-up Submit command's shape
    append = Message(MessageType.APP, leader, follower, term + 1, log_term=term, index=10**6,
                     entries=(Entry(10**6 + 1, term + 1, EntryKind.NORMAL, bogus),), commit=10**6 + 1)
    heartbeat = Message(MessageType.HEARTBEAT, follower, leader, term + 100, commit=10**6)
    return {"heartbeat": encode_messages([heartbeat]), "append": encode_messages([append])}


# (name, method, path, body, extra headers (replacing the defaults), expected status); the body is
# bytes as sent. Paths with {job} get a fresh job id leased to worker w1 (its lease in {lease}).
def attacks(cluster: Cluster) -> list[tuple[str, str, str, bytes, dict[str, str], int]]:
    forged = forged_messages(cluster)
    leader = next(n for n, node in cluster.local.nodes.items() if node.url == cluster.leader_url)
    peer = next(n for n in cluster.local.nodes if n != leader)
    snapshot = {"Content-Type": "application/octet-stream", FROM_HEADER: peer, TERM_HEADER: "99",
                OFFSET_HEADER: "0", SNAPSHOT_HEADER: f"5-1-{10**18}-{'a' * 64}"}
    text_plain = {"Content-Type": "text/plain", "Origin": "http://evil.example",
                  "Authorization": f"Bearer {TOKEN}"}
    jobs = json.dumps({"jobs": [{"payload": 1}]}).encode()
    return [
        ("forged heartbeat at term+100, no secret", "POST", "/raft/messages", forged["heartbeat"],
         {"Content-Type": MSGPACK_TYPE}, 401),
        ("forged append with a made-up Submit, no secret", "POST", "/raft/messages", forged["append"],
         {"Content-Type": MSGPACK_TYPE}, 401),
        ("forged heartbeat as text/plain from a web page", "POST", "/raft/messages", forged["heartbeat"],
         {"Content-Type": "text/plain", "Origin": "http://evil.example"}, 401),
        ("1 MiB chunk of a 10^18-byte snapshot, no secret", "POST", "/raft/snapshot", b"\0" * (1 << 20),
         snapshot, 401),
        ("10^18-byte snapshot with the secret", "POST", "/raft/snapshot", b"\0" * 1024,
         {**snapshot, SECRET_HEADER: cluster.secret}, 413),
        ("text/plain submit from a web page", "POST", "/v1/queues/q/jobs", jobs, text_plain, 415),
        ("text/plain dead-letter purge", "POST", "/v1/queues/q/dead/purge", b"", text_plain, 415),
        ("text/plain redrive", "POST", "/v1/queues/q/dead/redrive", b"{}", text_plain, 415),
        ("untyped cancel (no body)", "POST", "/v1/jobs/{job}/cancel", b"", {"Authorization": f"Bearer {TOKEN}"},
         415),
        ("DNS rebinding: Host evil.example", "GET", "/v1/queues", b"",
         {**auth(None), "Host": "evil.example:7001"}, 421),
        ("JSON nested 100,000 deep", "POST", "/v1/queues/q/jobs", deep_json(100_000), auth(), 400),
        ("payload nested 500 deep", "POST", "/v1/queues/q/jobs", deep_json(500), auth(), 400),
        ("msgpack nested 2,000 deep", "POST", "/v1/queues/q/jobs", b"\x81\xa4jobs\x91\x81\xa7payload"
         + b"\x91" * 2000 + b"\xc0", auth(MSGPACK_TYPE), 400),
        ("lone surrogate in idempotency_key", "POST", "/v1/queues/q/jobs",
         b'{"jobs": [{"payload": 1, "idempotency_key": "\\ud800"}]}', auth(), 400),
        ("lone surrogate in a fail's error", "POST", "/v1/fail",
         b'{"worker": "w1", "fails": [{"id": "{job}", "lease": {lease}, "error": "\\ud800"}]}', auth(), 400),
        ("ack result 10^30", "POST", "/v1/ack",
         b'{"worker": "w1", "acks": [{"id": "{job}", "lease": {lease}, "result": 1' + b"0" * 30 + b"}]}",
         auth(), 400),
        ("ack result lone surrogate", "POST", "/v1/ack",
         b'{"worker": "w1", "acks": [{"id": "{job}", "lease": {lease}, "result": "\\udfff"}]}', auth(), 400),
        ("ack batch: one valid item, one with lease 2^70", "POST", "/v1/ack",
         b'{"worker": "w1", "acks": [{"id": "{job}", "lease": {lease}}, {"id": "{job}", "lease": '
         + str(2**70).encode() + b"}]}", auth(), 400),
        ("NaN payload", "POST", "/v1/queues/q/jobs", b'{"jobs": [{"payload": NaN}]}', auth(), 400),
        ("Infinity deep in a payload", "POST", "/v1/queues/q/jobs",
         b'{"jobs": [{"payload": {"a": [1, -Infinity]}}]}', auth(), 400),
        ("1e999 payload", "POST", "/v1/queues/q/jobs", b'{"jobs": [{"payload": 1e999}]}', auth(), 400),
        ("msgpack NaN payload", "POST", "/v1/queues/q/jobs",
         msgpack.packb({"jobs": [{"payload": float("nan")}]}), auth(MSGPACK_TYPE), 400),
        ("msgpack bytes as a map key", "POST", "/v1/queues/q/jobs",
         msgpack.packb({"jobs": [{"payload": {b"k": 1}}]}, use_bin_type=True), auth(MSGPACK_TYPE), 400),
        ("lease_s 1e308", "POST", "/v1/queues/q/jobs", b'{"jobs": [{"payload": 1, "lease_s": 1e308}]}',
         auth(), 400),
        ("misspelled queue setting", "PUT", "/v1/queues/q", b'{"max_dept": 5}', auth(), 400),
    ]


def run_attack(cluster: Cluster, name: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> int:
    if b"{job}" in body or "{job}" in path:
        submit_one(cluster)
        leased = lease_one(cluster)
        body = body.replace(b"{job}", leased["id"].encode()).replace(b"{lease}", str(leased["lease"]).encode())
        path = path.replace("{job}", leased["id"])
    status, _ = send(cluster.leader_url + path, method, body or None, headers)
    return status


def digests(cluster: Cluster) -> dict[str, str]:
    return cluster.local.wait_converged(timeout_s=60)


def test_the_attacks_of_issue_11_get_4xx(cluster):
    before_term = cluster.local.status("n1")["term"]
    seen = {}
    for name, method, path, body, headers, _expected in attacks(cluster):
        seen[name] = run_attack(cluster, name, method, path, body, headers)
    expected = {name: status for name, *_, status in attacks(cluster)}
    assert seen == expected
    assert all(node.alive for node in cluster.local.nodes.values())
    digests(cluster)
    assert cluster.local.status("n1")["term"] == before_term, "a refused request moved the term"


def test_a_refused_ack_batch_changes_nothing(cluster):
    submit_one(cluster)
    leased = lease_one(cluster, worker="w2")
    body = {"worker": "w2", "acks": [{"id": leased["id"], "lease": leased["lease"]}, {"id": leased["id"], "lease": -1}]}
    status, answer = http_json(cluster.leader_url + "/v1/ack", method="POST", body=body, headers=auth())
    assert status == 400, answer
    status, job = http_json(cluster.leader_url + f"/v1/jobs/{leased['id']}", headers=auth())
    assert (status, job["state"]) == (200, "leased"), job


# ---------------------------------------------------------------------- the fuzz test

ROUTES = [
    ("POST", "/v1/queues/{queue}/jobs"), ("POST", "/v1/lease"), ("POST", "/v1/ack"), ("POST", "/v1/fail"),
    ("POST", "/v1/extend"), ("POST", "/v1/workers/{worker}/heartbeat"), ("GET", "/v1/workers"),
    ("GET", "/v1/jobs/{job}"), ("POST", "/v1/jobs/{job}/cancel"), ("GET", "/v1/queues"),
    ("PUT", "/v1/queues/{queue}"), ("DELETE", "/v1/queues/{queue}"), ("GET", "/v1/queues/{queue}/dead"),
    ("POST", "/v1/queues/{queue}/dead/redrive"), ("POST", "/v1/queues/{queue}/dead/purge"),
    ("GET", "/v1/cluster"), ("GET", "/v1/overview"), ("GET", "/metrics"), ("GET", "/"),
    ("POST", "/raft/messages"), ("POST", "/raft/snapshot"),
]
# Field names a valid body of some route uses, so generated maps often look almost right.
FIELDS = ["jobs", "payload", "priority", "delay_s", "max_attempts", "lease_s", "idempotency_key", "worker",
          "queues", "max_jobs", "wait_s", "acks", "fails", "leases", "id", "lease", "result", "error", "retry",
          "ids", "max_depth", "backoff_base_s", "backoff_cap_s"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["q", "w1", "", "\ud800", "a" * 300, "00000000000000000000001"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5),
                      max_leaves=20)
name_segments = st.sampled_from(["q", "w1", "x", "%0d%0aforged", "%00", "a" * 200, "..", "%2F", "%ED%A0%80"]) \
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12).map(lambda text: quote(text, safe="")) \
    .filter(bool)


def encode_json(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", errors="surrogatepass")


def encode_msgpack(value) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"  # unencodable: send the one byte msgpack never uses


# Bodies shaped like a route's own, with generated field values: these reach the deeper checks.
job_specs = st.fixed_dictionaries({"payload": values}, optional={
    name: scalars for name in ("priority", "delay_s", "max_attempts", "lease_s", "idempotency_key", "key", "group")})
items = st.fixed_dictionaries({"id": scalars, "lease": scalars}, optional={
    name: scalars for name in ("result", "error", "retry", "delay_s", "lease_s")})
shaped = st.one_of(
    st.fixed_dictionaries({"jobs": st.lists(job_specs, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"worker": scalars, "queues": st.lists(scalars, max_size=3)},
                          optional={"max_jobs": scalars, "wait_s": st.floats(0, 0.2)}),
    st.fixed_dictionaries({"worker": st.just("w1")}).flatmap(
        lambda base: st.sampled_from(["acks", "fails", "leases", "jobs", "ids"]).flatmap(
            lambda key: st.lists(items, min_size=1, max_size=3).map(lambda listed: {**base, key: listed}))),
    st.dictionaries(st.sampled_from(["max_depth", "rate_per_s", "burst", "max_running_per_key", "fifo", "max_dept"]),
                    scalars, max_size=3),
)
bodies = st.one_of(
    shaped.map(lambda v: ("json", encode_json(v))),
    shaped.map(lambda v: ("msgpack", encode_msgpack(v))),
    values.map(lambda v: ("json", encode_json(v))),
    values.map(lambda v: ("msgpack", encode_msgpack(v))),
    st.binary(max_size=64).map(lambda b: ("raw", b)),
    st.just(("empty", b"")),
)
content_types = st.sampled_from([JSON_TYPE, MSGPACK_TYPE, "text/plain", "application/x-www-form-urlencoded",
                                 "application/octet-stream", None, "application/json; charset=utf-8"])


@st.composite
def requests(draw):
    method, template = draw(st.sampled_from(ROUTES))
    path = template.format(queue=draw(name_segments), worker=draw(name_segments), job=draw(name_segments))
    kind, body = draw(bodies)
    content_type = draw(content_types)
    if content_type is None:
        content_type = {"json": JSON_TYPE, "msgpack": MSGPACK_TYPE}.get(kind)
    headers = {"Accept": draw(st.sampled_from([JSON_TYPE, MSGPACK_TYPE, "*/*"]))}
    if content_type:
        headers["Content-Type"] = content_type
    if draw(st.sampled_from([True, True, True, False])):  # mostly with the token: past auth, into the views
        headers["Authorization"] = f"Bearer {TOKEN}"
    host = draw(st.sampled_from([None] * 12 + ["evil.example", "localhost:1", "[::1]:7001", "127.0.0.1"]))
    if host is not None:
        headers["Host"] = host
    secret = draw(st.sampled_from(["none", "wrong", "right"]))
    node = draw(st.sampled_from(["n1", "n2", "n3"]))
    return method, path, body, headers, secret, node, template.startswith("/raft/snapshot")


EXAMPLES = int(os.environ.get("RAFTQ_FUZZ_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
@example(request=("POST", "/v1/queues/q/jobs", deep_json(100_000), auth(), "none", "n1", False))
@example(request=("POST", "/v1/queues/q/jobs", b'{"jobs": [{"payload": 1, "idempotency_key": "\\ud800"}]}',
                  auth(), "none", "n1", False))
@example(request=("POST", "/v1/ack", b'{"worker": "w", "acks": [{"id": "x", "lease": 1, "result": 1'
                  + b"0" * 30 + b"}]}", auth(), "none", "n1", False))
@example(request=("POST", "/v1/ack", b'{"worker": "w", "acks": [{"id": "x", "lease": 1}, {"id": "y", "lease": '
                  + str(2**70).encode() + b"}]}", auth(), "none", "n1", False))
@example(request=("POST", "/v1/queues/q/jobs", b'{"jobs": [{"payload": NaN}]}', auth(), "none", "n2", False))
@example(request=("POST", "/v1/queues/q/dead/purge", b"", {"Content-Type": "text/plain"}, "none", "n1", False))
@example(request=("POST", "/raft/messages", b"\x91\x93\x01\x02\x03", {"Content-Type": "text/plain"}, "none", "n1",
                  False))
@example(request=("POST", "/raft/snapshot", b"\0" * 1000, {}, "right", "n2", True))
@example(request=("GET", "/v1/jobs/%0d%0aforged", b"", auth(None), "none", "n1", False))
def test_fuzz_routes_never_5xx(cluster, request):
    method, path, body, headers, secret, node, is_snapshot = request
    headers = dict(headers)
    if path.startswith("/raft/"):
        if secret == "right":
            headers[SECRET_HEADER] = cluster.secret
            if path == "/raft/messages":
                body = b"\xc1" + body  # a peer's garbage, never a valid message (see the docstring)
        elif secret == "wrong":
            headers[SECRET_HEADER] = "not-the-secret-0123"
    if is_snapshot:
        headers.update({FROM_HEADER: "n1", TERM_HEADER: "1", OFFSET_HEADER: "0",
                        SNAPSHOT_HEADER: f"1-1-{len(body) + 100}-{'b' * 64}"})
    status, answer = send(cluster.local.nodes[node].url + path, method, body if method != "GET" else None, headers)
    assert status < 500, f"{method} {path} {headers} {body[:200]!r} -> {status} {answer[:300]!r}"


def test_after_the_fuzz_every_node_lives_and_agrees(cluster):
    """Runs after the fuzz test in this module (same cluster): no node exited, digests equal."""
    dead = [node_id for node_id, node in cluster.local.nodes.items() if not node.alive]
    assert dead == [], {node_id: cluster.local.log_text(node_id)[-2000:] for node_id in dead}
    digests(cluster)
