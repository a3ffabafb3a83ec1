"""Bad input gets the right 4xx with an error body, and changes nothing (SPEC "Interface").

One real node; after every bad request the state digest is the same as before.
"""

from __future__ import annotations

import json
import urllib.request

import msgpack
import pytest

from raftq.cluster.localcluster import http_json

BIG = "x" * (1 << 20)


def raw_request(url: str, data: bytes, content_type: str, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


JOBS = "/v1/queues/q1/jobs"

# (name, method, path, body (json-able, or bytes with content type), expected status)
CASES = [
    ("bad msgpack", "POST", JOBS, (b"\xc1\xff\x00", "application/msgpack"), 400),
    ("bad json", "POST", JOBS, (b"{jobs:", "application/json"), 400),
    ("body not a map", "POST", JOBS, [1, 2, 3], 400),
    ("missing jobs", "POST", JOBS, {}, 400),
    ("jobs not a list", "POST", JOBS, {"jobs": "nope"}, 400),
    ("empty jobs", "POST", JOBS, {"jobs": []}, 400),
    ("job not a map", "POST", JOBS, {"jobs": [5]}, 400),
    ("missing payload", "POST", JOBS, {"jobs": [{"priority": 1}]}, 400),
    ("priority too high", "POST", JOBS, {"jobs": [{"payload": 1, "priority": 10}]}, 400),
    ("priority wrong type", "POST", JOBS, {"jobs": [{"payload": 1, "priority": "high"}]}, 400),
    ("negative delay", "POST", JOBS, {"jobs": [{"payload": 1, "delay_s": -1}]}, 400),
    ("huge delay", "POST", JOBS, {"jobs": [{"payload": 1, "delay_s": 8 * 86400}]}, 400),
    ("zero max attempts", "POST", JOBS, {"jobs": [{"payload": 1, "max_attempts": 0}]}, 400),
    ("lease too short", "POST", JOBS, {"jobs": [{"payload": 1, "lease_s": 0.1}]}, 400),
    ("key not a string", "POST", JOBS, {"jobs": [{"payload": 1, "idempotency_key": 7}]}, 400),
    ("bad queue name", "POST", "/v1/queues/bad%20name!/jobs", {"jobs": [{"payload": 1}]}, 400),
    ("queue name too long", "POST", "/v1/queues/" + "q" * 129 + "/jobs", {"jobs": [{"payload": 1}]}, 400),
    ("oversize payload", "POST", JOBS, {"jobs": [{"payload": BIG}]}, 413),
    ("oversize batch", "POST", JOBS, {"jobs": [{"payload": i} for i in range(1001)]}, 413),
    ("oversize body", "POST", JOBS, (b"\x91" + b"\xc0" * (9 << 20), "application/msgpack"), 413),
    ("lease without worker", "POST", "/v1/lease", {"queues": ["q1"]}, 400),
    ("lease bad queues", "POST", "/v1/lease", {"worker": "w", "queues": "q1"}, 400),
    ("lease max_jobs zero", "POST", "/v1/lease", {"worker": "w", "queues": ["q1"], "max_jobs": 0}, 400),
    ("lease wait too long", "POST", "/v1/lease", {"worker": "w", "queues": ["q1"], "wait_s": 60}, 400),
    ("ack without lease", "POST", "/v1/ack", {"worker": "w", "acks": [{"id": "x"}]}, 400),
    ("ack lease wrong type", "POST", "/v1/ack", {"worker": "w", "acks": [{"id": "x", "lease": "abc"}]}, 400),
    ("fail error wrong type", "POST", "/v1/fail", {"worker": "w", "fails": [{"id": "x", "lease": 1, "error": 5}]}, 400),
    ("extend without lease_s", "POST", "/v1/extend", {"worker": "w", "leases": [{"id": "x", "lease": 1}]}, 400),
    ("release without lease", "POST", "/v1/release", {"worker": "w", "leases": [{"id": "x"}]}, 400),
    ("release leases not a list", "POST", "/v1/release", {"worker": "w", "leases": {"id": "x"}}, 400),
    ("release without worker", "POST", "/v1/release", {"leases": [{"id": "x", "lease": 1}]}, 400),
    ("unknown job", "GET", "/v1/jobs/doesnotexist", None, 404),
    ("cancel unknown job", "POST", "/v1/jobs/doesnotexist/cancel", None, 404),
    ("unknown path", "GET", "/v1/nothing-here", None, 404),
    ("wrong method", "GET", "/v1/ack", None, 405),
    ("redrive ids not a list", "POST", "/v1/queues/q1/dead/redrive", {"ids": "all"}, 400),
    ("dead limit not a number", "GET", "/v1/queues/q1/dead?limit=many", None, 400),
    ("heartbeat jobs not a list", "POST", "/v1/workers/w1/heartbeat", {"jobs": 3}, 400),
    ("job with key and group", "POST", JOBS, {"jobs": [{"payload": 1, "key": "a", "group": "b"}]}, 400),
    ("job key too long", "POST", JOBS, {"jobs": [{"payload": 1, "key": "k" * 129}]}, 400),
    ("job group not a string", "POST", JOBS, {"jobs": [{"payload": 1, "group": 5}]}, 400),
    ("rate not a number", "PUT", "/v1/queues/q1", {"rate_per_s": "fast"}, 400),
    ("rate zero", "PUT", "/v1/queues/q1", {"rate_per_s": 0}, 400),
    ("burst without rate", "PUT", "/v1/queues/q1", {"burst": 5}, 400),
    ("burst zero", "PUT", "/v1/queues/q1", {"rate_per_s": 5, "burst": 0}, 400),
    ("per-key limit zero", "PUT", "/v1/queues/q1", {"max_running_per_key": 0}, 400),
    ("fifo not a bool", "PUT", "/v1/queues/q1", {"fifo": "yes"}, 400),
]


def digest(url: str) -> str:
    status, body = http_json(url + "/v1/cluster?digest=1")
    assert status == 200, body
    return body["digest"]


def test_bad_requests_get_4xx_and_change_nothing(single_node):
    url = single_node.urls[0]
    status, body = http_json(url + JOBS, method="POST", body={"jobs": [{"payload": {"seed": 1}}]})
    assert status == 201, body
    before = digest(url)
    seen = []
    for name, method, path, body, expected in CASES:
        if isinstance(body, tuple):
            status, answer = raw_request(url + path, body[0], body[1], method)
        else:
            status, answer = http_json(url + path, method=method, body=body, timeout=10)
        seen.append((name, status, answer.get("error", {}).get("code")))
        assert status == expected, f"{name}: expected {expected}, got {status} {answer}"
        error = answer.get("error")
        assert isinstance(error, dict) and error.get("code") and error.get("message"), f"{name}: error body {answer}"
        assert digest(url) == before, f"{name}: state changed"
    assert len(CASES) >= 20
    status, body = http_json(url + "/v1/cluster")
    assert status == 200 and body["role"] == "leader", "the node survived every bad request"


@pytest.mark.parametrize("content_type", ["application/msgpack", "application/json"])
def test_both_encodings_round_trip(single_node, content_type):
    url = single_node.urls[0]
    body = {"jobs": [{"payload": {"to": "a@example.com", "n": [1, 2.5, None, True]}}]}
    data = msgpack.packb(body) if content_type == "application/msgpack" else json.dumps(body).encode()
    request = urllib.request.Request(url + JOBS, data=data, method="POST",
                                     headers={"Content-Type": content_type, "Accept": content_type})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        assert response.headers["Content-Type"].startswith(content_type)
        raw = response.read()
    answer = msgpack.unpackb(raw) if content_type == "application/msgpack" else json.loads(raw)
    (job_id,) = answer["ids"]
    status, record = http_json(url + f"/v1/jobs/{job_id}")
    assert status == 200 and record["state"] == "ready"
    assert record["payload"] == {"to": "a@example.com", "n": [1, 2.5, None, True]}
