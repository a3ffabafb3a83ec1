"""Bounded tables and connections (issue 11, Build 6), against a real node process.

A node holds at most `--queues-max` queues (an empty queue with default settings does not stay),
and deletes a queue only when it holds no unfinished jobs, or when forced. It aborts connections
past its limit at once and connections that do not deliver a request
head in time (idle ones and slowloris ones that trickle bytes), counting both in
`raftq_connections_refused_total`; it keeps liveness for at most `--known-workers-max` workers,
forgetting the longest silent first.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request

import pytest

from raftq.cluster.localcluster import LocalCluster, http_json, wait_until

HEADER_TIMEOUT_S = 2.0
CONNECTIONS_MAX = 20


@pytest.fixture
def node(tmp_path):
    args = ["--connections-max", str(CONNECTIONS_MAX), "--header-timeout", str(HEADER_TIMEOUT_S),
            "--known-workers-max", "50", "--queues-max", "5"]
    with LocalCluster(str(tmp_path / "cluster"), size=1, extra_args=args) as cluster:
        yield cluster


def closed(sock: socket.socket) -> bool:
    """Whether the node has closed this connection (recv sees EOF or a reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def refused(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'raftq_connections_refused_total\{reason="(\w+)"\} (\S+)', text)}


def test_connections_past_the_limit_and_idle_ones_are_aborted_and_counted(node):
    url = node.urls[0]
    host, port = "127.0.0.1", node.nodes["n1"].port
    sockets = [socket.create_connection((host, port), timeout=5) for _ in range(2 * CONNECTIONS_MAX)]
    try:
        wait_until(lambda: sum(closed(s) for s in sockets[CONNECTIONS_MAX:]) == CONNECTIONS_MAX, timeout_s=10,
                   what="every connection past the limit closed", seen=lambda: [closed(s) for s in sockets])
        started = time.monotonic()
        wait_until(lambda: all(closed(s) for s in sockets[:CONNECTIONS_MAX]), timeout_s=30,
                   what="idle connections closed after the header timeout",
                   seen=lambda: [closed(s) for s in sockets[:CONNECTIONS_MAX]])
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 10
    finally:
        for s in sockets:
            s.close()
    counts = refused(url)
    assert counts.get("limit", 0) >= CONNECTIONS_MAX and counts.get("header_timeout", 0) >= CONNECTIONS_MAX, counts
    assert http_json(url + "/v1/cluster")[0] == 200, "the node still serves"


def test_a_slowloris_request_head_is_cut_off_even_while_bytes_trickle_in(node):
    port = node.nodes["n1"].port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        head = b"GET /v1/cluster HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: y\r\n" * 100
        for offset in range(len(head)):
            try:
                sock.sendall(head[offset:offset + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            if closed(sock):
                break
            sock.setblocking(True)
            time.sleep(0.1)  # the attacker's pace, not a wait for a condition
        elapsed = time.monotonic() - started
    assert elapsed < HEADER_TIMEOUT_S + 5, f"a trickled head held the connection {elapsed:.1f} s"
    assert refused(node.urls[0]).get("header_timeout", 0) >= 1


def test_made_up_worker_names_cannot_grow_the_workers_table(node):
    url = node.urls[0]
    for n in range(120):
        status, body = http_json(url + f"/v1/workers/made-up-{n}/heartbeat", method="POST", body={"jobs": []})
        assert status == 200, body
    status, body = http_json(url + "/v1/workers")
    names = [w["worker"] for w in body["workers"]]
    assert status == 200 and len(names) == 50, names
    assert "made-up-119" in names and "made-up-0" not in names, "the longest silent are forgotten first"


def test_queues_are_bounded_and_can_be_deleted(node):
    url = node.urls[0]
    for n in range(20):  # the attack: PUT {} under ever-new names
        status, body = http_json(url + f"/v1/queues/junk-{n}", method="PUT", body={})
        assert status == 200, body
    assert http_json(url + "/v1/queues")[1]["queues"] == {}, "empty default queues must not stay"
    for n in range(5):
        assert http_json(url + f"/v1/queues/q{n}", method="PUT", body={"max_depth": 10})[0] == 200
    status, body = http_json(url + "/v1/queues/q5", method="PUT", body={"max_depth": 10})
    assert (status, body["error"]["code"]) == (409, "too_many_queues"), body
    status, body = http_json(url + "/v1/queues/q6/jobs", method="POST", body={"jobs": [{"payload": 1}]})
    assert (status, body["error"]["code"]) == (409, "too_many_queues"), body
    assert http_json(url + "/v1/queues/q0/jobs", method="POST", body={"jobs": [{"payload": 1}]})[0] == 201

    status, body = http_json(url + "/v1/queues/q0", method="DELETE")
    assert (status, body["error"]["code"]) == (409, "conflict"), body
    status, body = http_json(url + "/v1/queues/q1", method="DELETE")
    assert status == 200, body
    assert http_json(url + "/v1/queues/q6/jobs", method="POST", body={"jobs": [{"payload": 1}]})[0] == 201
    status, body = http_json(url + "/v1/queues/q0?force=true", method="DELETE")
    assert status == 200, body
    assert sorted(http_json(url + "/v1/queues")[1]["queues"]) == ["q2", "q3", "q4", "q6"]
    assert http_json(url + "/v1/queues/nope", method="DELETE")[0] == 404
