"""Deterministic simulation: many seeds of the Raft core + queue state machine under faults.

Each seed runs a few hundred ticks of partitions, crashes (with unsynced writes lost), loss,
delay, duplication and reordering, with invariants checked after every step, then heals and
checks liveness, convergence and that no acknowledged submit was lost (see tests/sim/cluster.py).

    RAFTQ_SIM_SEEDS=2000 RAFTQ_SIM_START=10000 python -m pytest tests/sim/test_sim.py -q
    python -m tests.sim --seeds 10000 --set spare_nodes=2 --jobs 2    # membership changes

A failure names `seed=N`, the invariant, the one-line replay command and the end of the trace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim import SimConfig, replay_command, run_seed
from tests.sim.faults import FINAL_FAULTS

#: Seeds per run of the suite (3 nodes); 5-node and liveness runs take a tenth each.
SEEDS_COUNT = int(os.environ.get("RAFTQ_SIM_SEEDS", "500"))
SEEDS_START = int(os.environ.get("RAFTQ_SIM_START", "0"))
TRACE_TAIL_LINES = 60
REPO_ROOT = Path(__file__).resolve().parents[2]


def check_seed(seed: int, config: SimConfig) -> None:
    result = run_seed(seed, config)
    if result.ok:
        return
    traced = run_seed(seed, config, trace=True)  # same seed, same run: now with its trace
    tail = "\n".join((traced.trace or [])[-TRACE_TAIL_LINES:])
    pytest.fail(
        f"seed={seed} FAILED at tick {result.tick}: {result.failure}\n"
        f"replay: {replay_command(seed, config)}\n{result.details}"
        f"--- last {TRACE_TAIL_LINES} trace lines ---\n{tail}",
        pytrace=False,
    )


@pytest.mark.parametrize("seed", range(SEEDS_START, SEEDS_START + SEEDS_COUNT))
def test_three_nodes(seed: int) -> None:
    check_seed(seed, SimConfig(nodes=3))


@pytest.mark.parametrize("seed", range(SEEDS_START, SEEDS_START + max(1, SEEDS_COUNT // 10)))
def test_five_nodes(seed: int) -> None:
    check_seed(seed, SimConfig(nodes=5))


@pytest.mark.parametrize("final_fault", sorted({f for f in FINAL_FAULTS if f is not None}))
@pytest.mark.parametrize("seed", range(SEEDS_START, SEEDS_START + max(1, SEEDS_COUNT // 50)))
def test_liveness_with_a_permanent_minority_fault(seed: int, final_fault: str) -> None:
    """VOPR liveness mode: the faults stop except one that cuts a minority for good (a node that
    can send but not receive, an isolated follower, a bridge); the majority must still elect a
    leader, commit, and converge."""
    check_seed(seed, SimConfig(final_fault=final_fault, pre_vote=True, check_quorum=True))


@pytest.mark.parametrize("seed", range(SEEDS_START, SEEDS_START + max(1, SEEDS_COUNT // 10)))
def test_membership_changes(seed: int) -> None:
    """Two spare nodes wait outside the membership; the leader adds, promotes (by itself),
    removes and hands leadership on while nodes crash and the network cuts them, checking at
    every step one server at a time, no two leaders whose majorities could be disjoint, and
    committed entries durable on a majority of the voters they were committed under."""
    check_seed(seed, SimConfig(spare_nodes=2))


def test_membership_changes_are_exercised() -> None:
    totals: dict[str, int] = {}
    for seed in range(SEEDS_START, SEEDS_START + 20):
        for key, value in run_seed(seed, SimConfig(spare_nodes=2)).stats.items():
            if key in ("members_added", "members_promoted", "members_removed", "leader_transfers"):
                totals[key] = totals.get(key, 0) + value
    assert all(totals.get(key, 0) >= 5 for key in
               ("members_added", "members_promoted", "members_removed", "leader_transfers")), totals


def test_network_faults_only_never_lose_an_acknowledged_submit() -> None:
    for seed in range(SEEDS_START, SEEDS_START + 10):
        check_seed(seed, SimConfig(crashes=False))


def test_snapshots_are_exercised() -> None:
    """Most seeds must compact and install snapshots, with transfers failing and nodes crashing
    amid them; otherwise the seeds above test the snapshot code only by luck."""
    totals: dict[str, int] = {}
    seeds_with_install = 0
    for seed in range(20):  # fixed seeds: a coverage check, not an exploration
        result = run_seed(seed, SimConfig())
        assert result.ok, f"seed={seed}: {result.failure}"
        seeds_with_install += bool(result.stats["snapshots_installed"])
        for key in ("snapshots_taken", "snapshots_installed", "snapshot_restarts", "transfers_failed",
                    "entries_compacted", "nemesis_snapshot_faults", "log_resets"):
            totals[key] = totals.get(key, 0) + result.stats[key]
    assert seeds_with_install >= 10, seeds_with_install
    assert all(totals.values()), totals


def test_flow_control_and_schedules_are_exercised() -> None:
    """The flow invariants must check real grants, acks and fires, or they test nothing."""
    totals: dict[str, int] = {}
    for seed in range(4):  # fixed seeds, long runs: a coverage check, not an exploration
        result = run_seed(seed, SimConfig(steps=1500))
        assert result.ok, f"seed={seed}: {result.failure}"
        for key, value in result.stats.items():
            if key.startswith("flow_"):
                totals[key] = totals.get(key, 0) + value
    assert set(totals) == {"flow_keyed_grants", "flow_fifo_grants", "flow_fifo_acks", "flow_rate_grants",
                           "flow_fires"}, totals
    assert all(count >= 10 for count in totals.values()), totals


def test_same_seed_same_trace() -> None:
    first = run_seed(7, SimConfig(), trace=True)
    second = run_seed(7, SimConfig(), trace=True)
    untraced = run_seed(7, SimConfig())
    assert first.trace and first.trace == second.trace
    assert first.stats == untraced.stats, "tracing must not change the run"


def test_trace_does_not_depend_on_string_hashing() -> None:
    """Sets of str iterate in a per-process order; a run must never depend on it."""
    digests = set()
    for hash_seed in ("0", "1"):
        completed = subprocess.run(
            [sys.executable, "-m", "tests.sim", "--seed", "3", "--trace-digest"],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True,
            check=False, timeout=120,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        digests.add(completed.stdout.strip())
    assert len(digests) == 1, digests
