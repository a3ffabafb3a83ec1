"""Logs cannot be forged (issue 11, Build 7): untrusted text goes into a log line escaped.

A client puts CR LF and NUL into a request path (`%0d%0a`, `%00`); the node refuses the request
and logs the refusal, in text and in JSON format. Every record stays one line, no NUL reaches the
file, and no line starts with the text the client tried to inject.
"""

from __future__ import annotations

import json

import pytest

from raftq.cluster.localcluster import LocalCluster, http_json, wait_until

INJECTED = "/v1/jobs/x%0d%0a2026-01-01%2000:00:00,000%20ERROR%20node=n1%20FORGED%00line%E2%80%A8more"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_injected_line_break_stays_inside_its_log_line(tmp_path, log_format):
    with LocalCluster(str(tmp_path / "cluster"), size=1, extra_args=["--log-format", log_format]) as cluster:
        url = cluster.urls[0]
        status, body = http_json(url + INJECTED)
        assert status == 400, body
        raw = wait_until(lambda: (text := open(cluster.nodes["n1"].log_path, "rb").read()) and b"FORGED" in text
                         and text, timeout_s=10, what="the refusal in the log")
    assert b"\0" not in raw
    lines = raw.decode().splitlines()
    assert not [line for line in lines if "FORGED" in line and not ("refused" in line)], lines[-5:]
    assert not [line for line in lines if line.startswith("2026-01-01")], lines[-5:]
    refusal = next(line for line in lines if "FORGED" in line)
    if log_format == "json":
        for line in lines:
            json.loads(line)  # every line is one whole JSON object
        assert "\\r\\n2026-01-01" in json.loads(refusal)["msg"]
    else:
        assert "\\r\\n2026-01-01" in refusal and "\\x00line" in refusal, refusal
