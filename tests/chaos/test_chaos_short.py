"""The short chaos run CI executes: every fault kind once against three real nodes, checked.

Goal: no acknowledged job is lost, nothing unexpected comes out, no job is delivered after a
2xx ack, no ack is accepted on an expired or foreign lease, and every replica ends with the same
state digest, after each of the nemesis' fault kinds (partitions, one-way cuts, black holes,
latency, bandwidth, sliced and truncated streams, client resets, kill -9 of one or all nodes,
loss of unsynced writes, SIGSTOP pauses including nats-server #7567, worker kill and pause, a
node whose wall clock is skewed or stepped leading, damage to a stopped node's files, the
leader's data filesystem filled: a small ext4 per node, so root is needed), and the
timing check: no delayed job or run-out lease comes early, none much late.

Takes about 3 minutes. The seed is fixed so that CI is repeatable; set RAFTQ_CHAOS_SEED to
try another one. On failure the summary names the violating job and the history lines, and the
run directory (node logs, history.jsonl, report.json) is kept under pytest's tmp_path.
"""

from __future__ import annotations

import copy
import os

import pytest

from raftq.chaos import checker, data_disks
from raftq.chaos.history import read_records
from raftq.chaos.nemesis import FAULTS
from raftq.chaos.runner import RunConfig, run

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("RAFTQ_CHAOS_SEED", "4242"))


def test_every_fault_kind_once_loses_no_acknowledged_job(tmp_path):
    print(f"chaos seed={SEED} (set RAFTQ_CHAOS_SEED to change it)")
    faults = list(FAULTS)
    no_disks = data_disks.unavailable_reason()
    if no_disks:  # the one kind that needs the machine's help: a filesystem per node to fill
        faults = [name for name in faults if not FAULTS[name].needs_data_disks]
        print(f"not running {', '.join(set(FAULTS) - set(faults))}: {no_disks}")
    config = RunConfig(duration_s=0, seed=SEED, faults=faults, hold_s=4.0, heal_s=1.5, out_dir=str(tmp_path / "run"))
    outcome = run(config)
    print(outcome.summary)
    assert set(outcome.schedule) == set(faults), f"fault kinds not run: {set(faults) - set(outcome.schedule)}"
    counts = outcome.result.counts
    assert counts["acked"] >= 500 and counts["completed"] >= counts["acked"], counts
    assert outcome.result.valid, outcome.summary

    # This very history, with one acknowledged job's deliveries cut out, must fail the check:
    # the pipeline would notice a lost job, not only the unit tests' hand-made histories.
    records = read_records(outcome.history_path)
    victim = next(r["job"] for r in records if r["op"] == "submit" and r["type"] == "ok")
    mutated = copy.deepcopy(records)
    for r in mutated:
        if r["op"] == "lease" and r["type"] == "ok":
            r["jobs"] = [j for j in r["jobs"] if j["id"] != victim]
    broken = checker.check(mutated, lease_s=config.workload.lease_s)
    assert [v.job for v in broken.violations_of("lost")] == [victim]
