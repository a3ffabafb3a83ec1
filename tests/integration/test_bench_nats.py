"""`raftq bench nats` runs one figure on a real three-server NATS JetStream cluster (R3, fsync always).

Only a short run: the figures are compared by hand, back to back with `raftq bench` (README,
Benchmarks); this checks that the comparison still starts, elects, publishes and reports.
"""

from __future__ import annotations

import pytest

from raftq.bench import nats_peer


def test_one_job_publishes_on_a_three_server_jetstream_cluster(capsys):
    reason = nats_peer.unavailable_reason(nats_peer.server_binary())
    if reason is not None:
        pytest.skip(f"NATS is benchmark-only and not installed here: {reason}")
    assert nats_peer.main(["--figure", "submit1", "--jobs", "50", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "sync_interval: always" in out and "[1/1] submit1:" in out and "median of 1: jobs_per_s" in out, out


def test_with_msg_id_the_stream_deduplicates_what_it_measures(capsys):
    """--msg-id publishes one id twice before measuring and stops unless the second is a duplicate."""
    reason = nats_peer.unavailable_reason(nats_peer.server_binary())
    if reason is not None:
        pytest.skip(f"NATS is benchmark-only and not installed here: {reason}")
    assert nats_peer.main(["--figure", "submit1", "--jobs", "50", "--runs", "1", "--msg-id"]) == 0
    out = capsys.readouterr().out
    assert "Nats-Msg-Id on every publish, duplicate window 1 h" in out and "[1/1] submit1:" in out, out
