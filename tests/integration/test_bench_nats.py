"""`raftq bench nats` runs one figure on a real three-server NATS JetStream cluster (R3, fsync always).

Only short runs: this checks that the comparison still starts, elects, publishes and reports, and
that `--pairs` reports raftq's figure over NATS's for what it ran (README, Benchmarks).
"""

from __future__ import annotations

import re

import pytest

from raftq.bench import main as bench
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


def test_pairs_run_raftq_and_nats_in_turn_and_report_each_ratio(capsys):
    """--pairs runs raftq bench's matching scenario and NATS alternately, the first of each pair
    alternating, and reports raftq's figure over NATS's for each pair and their median."""
    reason = nats_peer.unavailable_reason(nats_peer.server_binary())
    if reason is not None:
        pytest.skip(f"NATS is benchmark-only and not installed here: {reason}")
    assert bench.main(["nats", "--figure", "through", "--jobs", "200", "--pairs", "2"]) == 0
    out = capsys.readouterr().out
    pairs = re.findall(r"\[pair (\d)/2, (raftq|NATS) first\] through: per s raftq ([\d,.]+), NATS ([\d,.]+): ([\d.]+)x; "
                       r"RSS MiB raftq ([\d,.]+), NATS ([\d,.]+): ([\d.]+)x", out)
    assert [(number, first) for number, first, *_ in pairs] == [("1", "raftq"), ("2", "NATS")], out
    rate_ratios = []
    for _, _, ours, theirs, ratio, ours_rss, theirs_rss, rss_ratio in pairs:
        ours, theirs, ours_rss, theirs_rss = (float(value.replace(",", "")) for value in (ours, theirs, ours_rss, theirs_rss))
        assert float(ratio) == pytest.approx(ours / theirs, abs=0.01) and float(rss_ratio) == pytest.approx(
            ours_rss / theirs_rss, abs=0.01), out
        assert ours_rss > 3 * 20, f"three raftq nodes use more than 20 MiB each: {out}"
        rate_ratios.append(ours / theirs)
    median = re.search(r"raftq / NATS, per s \(higher is better\), over 2 pairs: median ([\d.]+)x", out)
    assert median and float(median.group(1)) == pytest.approx(sum(rate_ratios) / 2, abs=0.01), out
