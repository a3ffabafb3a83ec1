"""Guarantee 7 with a real node process: a torn tail is cut and logged; earlier damage stops the node.

The unit tests of the WAL cover the byte-level rules; this proves the node process acts on them:
it restarts with every earlier entry after a cut tail, and refuses to start, naming the file and
offset, when a record before the tail is damaged.
"""

from __future__ import annotations

import glob
import os

import pytest

from raftq import Client, errors
from raftq.cluster.localcluster import wait_until


def segments(cluster) -> list[str]:
    return sorted(glob.glob(os.path.join(cluster.nodes["n1"].data_dir, "wal", "wal-*.log")))


def submit_some(cluster, count: int) -> list[str]:
    with Client(cluster.urls) as client:
        return [client.submit("torn", {"n": n}) for n in range(count)]


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_torn_tail_is_cut_and_the_rest_kept(single_node, cut):
    ids = submit_some(single_node, 20)
    single_node.kill("n1")
    last = segments(single_node)[-1]
    with open(last, "rb") as f:  # the records end where the preallocated zeros start (wal.py)
        size = len(f.read().rstrip(b"\0"))
    with open(last, "r+b") as f:
        f.truncate(size - cut)
    single_node.start_node("n1")
    single_node.wait_for_leader(timeout_s=30)
    with Client(single_node.urls) as client:
        states = [_state(client, job_id) for job_id in ids]
    # The last record written before the kill is the Ready that carried the last submit (or a later
    # housekeeping entry); cutting it may drop at most that final, torn entry.
    assert states.count("ready") >= len(ids) - 1, states
    assert "missing" not in states[:-1], states
    text = wait_until(lambda: "torn" in single_node.log_text("n1").lower() or None, timeout_s=10,
                      what="a log line about the torn tail", seen=lambda: single_node.log_text("n1")[-2000:])
    assert os.path.basename(last) in single_node.log_text("n1")
    assert text


def _state(client: Client, job_id: str) -> str:
    try:
        return client.get(job_id)["state"]
    except errors.JobNotFound:
        return "missing"


def test_damage_before_the_tail_stops_the_node_naming_file_and_offset(single_node):
    submit_some(single_node, 20)
    single_node.kill("n1")
    first = segments(single_node)[0]
    offset = 40  # inside an early record: well before the tail
    with open(first, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    single_node.start_node("n1")
    process = single_node.nodes["n1"].process
    assert process is not None
    exit_code = process.wait(timeout=30)
    assert exit_code != 0
    log = single_node.log_text("n1")
    assert os.path.basename(first) in log, log[-2000:]
    assert "byte" in log or "offset" in log, log[-2000:]
