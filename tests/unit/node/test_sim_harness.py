"""Unit tests of the simulator's parts: network, storage, invariant checker, lease model.

The simulator is only worth its seeds if it drops, delays and cuts what it says it does, loses
exactly the unsynced writes, and raises on each broken invariant; these tests pin that down on
small hand-made cases (the seeds themselves run in tests/sim/).
"""

from __future__ import annotations

import random

import pytest

from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue import results as res
from raftq.cluster.queue.commands import encode_command
from raftq.cluster.raft.messages import Entry, EntryKind, HardState
from tests.sim.invariants import Checker, LeaseModel, Violation
from tests.sim.network import NetworkConfig, SimNetwork
from tests.sim.storage import ChainedLog, SimStorage, agreement

NODES = ("n1", "n2", "n3")


def entry(index: int, term: int, data: bytes = b"") -> Entry:
    return Entry(index=index, term=term, kind=EntryKind.NORMAL, data=data or f"e{index}t{term}".encode())


def log_of(*terms: int) -> ChainedLog:
    log = ChainedLog()
    log.append([entry(i, t) for i, t in enumerate(terms, 1)])
    return log


def disk_of(*terms: int) -> SimStorage:
    """A disk whose synced log has entries of these terms (and no snapshot)."""
    storage = SimStorage()
    storage.write(None, [entry(i, t) for i, t in enumerate(terms, 1)])
    storage.sync()
    return storage


def network(**knobs: object) -> SimNetwork:
    return SimNetwork(random.Random(1), NODES, NetworkConfig(**knobs))


# ---------------------------------------------------------------------- network


def test_network_delivers_after_the_delay_in_send_order() -> None:
    net = network(delay_ticks_mean=2)
    for body in ("a", "b", "c"):
        net.send(body, "n1", "n2", now=0)
    assert net.deliver(1) == []
    assert [m for _, _, m, _ in net.deliver(2)] == ["a", "b", "c"]
    assert net.deliver(3) == []


def test_network_loses_everything_at_loss_one() -> None:
    net = network(loss_probability=1.0)
    for _ in range(20):
        net.send("x", "n1", "n2", now=0)
    assert net.deliver(10) == [] and net.stats["lost"] == 20


def test_network_duplicates() -> None:
    net = network(duplicate_probability=1.0)
    net.send("x", "n1", "n2", now=0)
    delivered = net.deliver(5)
    assert [(m, dup) for _, _, m, dup in delivered] == [("x", False), ("x", True)]


def test_network_jitter_and_holdback_reorder() -> None:
    net = network(delay_ticks_jitter=3, reorder_probability=0.5)
    for body in range(50):
        net.send(body, "n1", "n2", now=0)
    order = [m for _, _, m, _ in net.deliver(100)]
    assert sorted(order) == list(range(50)) and order != list(range(50))


def test_network_path_capacity_drops_the_excess() -> None:
    net = network(path_capacity_max=3)
    for body in range(5):
        net.send(body, "n1", "n2", now=0)
    net.send("other path", "n1", "n3", now=0)
    assert len(net.deliver(1)) == 4 and net.stats["full"] == 2


def test_network_cut_drops_at_send_and_in_flight() -> None:
    net = network()
    net.send("in flight", "n1", "n2", now=0)
    net.cut("n1", "n2")
    net.send("sent while cut", "n1", "n2", now=0)
    net.send("reverse is open", "n2", "n1", now=0)
    assert [m for _, _, m, _ in net.deliver(1)] == ["reverse is open"]
    net.heal()
    net.send("after heal", "n1", "n2", now=1)
    assert [m for _, _, m, _ in net.deliver(2)] == ["after heal"]


@pytest.mark.parametrize("shape, expected", [
    (lambda net: net.isolate("n1"), [("n1", "n2"), ("n1", "n3"), ("n2", "n1"), ("n3", "n1")]),
    (lambda net: net.bridge("n1", "n2"), [("n1", "n2"), ("n2", "n1")]),
    (lambda net: net.one_way("n3"), [("n1", "n3"), ("n2", "n3")]),
    (lambda net: net.split(["n2"]), [("n1", "n2"), ("n2", "n1"), ("n2", "n3"), ("n3", "n2")]),
])
def test_partition_shapes(shape, expected) -> None:
    net = network()
    shape(net)
    assert net.cut_paths() == expected


def test_down_node_receives_nothing() -> None:
    net = network()
    net.send("x", "n1", "n2", now=0)
    net.set_down("n2", True)
    assert net.deliver(1) == [] and net.stats["down"] == 1


# ---------------------------------------------------------------------- storage


def test_unsynced_writes_are_lost_on_crash() -> None:
    storage = SimStorage()
    storage.write(HardState(1, "n1"), [entry(1, 1)])
    storage.sync()
    storage.write(HardState(2, "n2"), [entry(2, 2)])
    assert storage.view.last_index == 2 and storage.hard_state == HardState(2, "n2")
    report = storage.crash(random.Random(0), keep_unsynced_prefix=False)
    assert report.unsynced_writes == 1 and report.kept_writes == 0
    hard_state, snapshot, log = storage.recovered_state()
    assert (hard_state, snapshot, log.entries) == (HardState(1, "n1"), None, [entry(1, 1)])


def test_crash_may_keep_a_prefix_of_unsynced_writes() -> None:
    kept = set()
    for seed in range(30):
        storage = SimStorage()
        for index in range(1, 4):
            storage.write(None, [entry(index, 1)])
        report = storage.crash(random.Random(seed), keep_unsynced_prefix=True)
        assert storage.view.last_index == storage.durable.last_index == report.kept_writes
        kept.add(report.kept_writes)
    assert kept == {0, 1, 2, 3}


def test_conflicting_append_overwrites_the_suffix() -> None:
    storage = SimStorage()
    storage.write(None, [entry(1, 1), entry(2, 1), entry(3, 1)])
    storage.write(None, [entry(2, 2)])
    storage.sync()
    assert [(e.index, e.term) for e in storage.durable.entries] == [(1, 1), (2, 2)]
    with pytest.raises(AssertionError):
        storage.write(None, [entry(5, 2)])  # a hole


def test_agreement_of_two_logs() -> None:
    assert agreement(log_of(1, 1, 2, 3), log_of(1, 1, 2, 2, 2)) == 3
    assert agreement(log_of(1, 1), log_of(1, 1, 2)) == 2
    assert agreement(log_of(2), log_of(1)) == 0


# ---------------------------------------------------------------------- checker


def test_two_leaders_in_one_term() -> None:
    checker = Checker(NODES)
    assert checker.observe_leader("n1", 3)
    assert not checker.observe_leader("n1", 3)
    with pytest.raises(Violation, match="at most one leader per term"):
        checker.observe_leader("n2", 3)


def test_log_matching() -> None:
    checker = Checker(NODES)
    durable = {n: disk_of() for n in NODES}
    fine = {"n1": log_of(1, 1, 2), "n2": log_of(1, 1, 3, 3), "n3": log_of(1)}
    checker.check_logs(fine, {n: 0 for n in NODES}, durable)
    a, b = log_of(1, 2), ChainedLog()
    b.append([entry(1, 1, b"different"), entry(2, 2)])
    with pytest.raises(Violation, match="log matching"):
        checker.check_logs({"n1": a, "n2": b}, {"n1": 0, "n2": 0}, durable)


def test_applying_a_different_entry_at_a_committed_index() -> None:
    checker = Checker(NODES)
    checker.on_apply("n1", Entry(1, 1, EntryKind.NOOP, b""), None, 0, term_bound=1)
    checker.on_apply("n2", Entry(1, 1, EntryKind.NOOP, b""), None, 0, term_bound=1)
    with pytest.raises(Violation, match="committed entries never change"):
        checker.on_apply("n3", Entry(1, 2, EntryKind.NOOP, b""), None, 0, term_bound=2)


def test_divergent_results_and_digests() -> None:
    checker = Checker(NODES)
    checker.on_apply("n1", Entry(1, 1, EntryKind.NOOP, b""), None, 5, term_bound=1)
    with pytest.raises(Violation, match="same sequence"):
        checker.on_apply("n2", Entry(1, 1, EntryKind.NOOP, b""), res.Ticked(0, 0, 0, 0), 5, term_bound=1)
    checker.on_applied_batch("n1", 1, "aaaa")
    with pytest.raises(Violation, match="same sequence"):
        checker.on_applied_batch("n2", 1, "bbbb")


def test_committed_entry_must_be_durable_on_a_majority() -> None:
    checker = Checker(NODES)
    checker.on_apply("n1", entry(1, 1), None, 0, term_bound=1)
    views = {"n1": log_of(1)}
    checker.check_logs(views, {"n1": 1}, {"n1": disk_of(1), "n2": disk_of(1), "n3": disk_of()})
    with pytest.raises(Violation, match="durable on a majority"):
        checker.check_logs(views, {"n1": 1}, {"n1": disk_of(1), "n2": disk_of(), "n3": disk_of()})


def test_node_with_commit_index_must_hold_the_committed_prefix() -> None:
    checker = Checker(NODES)
    checker.on_apply("n1", entry(1, 1), None, 0, term_bound=1)
    durable = {n: disk_of(1) for n in NODES}
    checker.check_logs({"n2": log_of(2)}, {"n2": 0}, durable)  # stale but not committed: fine
    with pytest.raises(Violation, match="committed entries never change"):
        checker.check_logs({"n2": log_of(2)}, {"n2": 1}, durable)


def test_leader_completeness_and_own_term_commits() -> None:
    checker = Checker(NODES)
    checker.on_apply("n1", entry(1, 1), None, 0, term_bound=1)
    checker.check_leader("n2", 1, 2, 1, log_of(1, 2))
    with pytest.raises(Violation, match="leader completeness"):
        checker.check_leader("n3", 1, 3, 0, log_of(2, 3))
    checker.check_leader("n1", 1, 4, 1, log_of(1, 1, 4))
    with pytest.raises(Violation, match="own term"):
        checker.check_leader("n1", 1, 4, 2, log_of(1, 1, 4))


# ---------------------------------------------------------------------- lease model


def _submit(model: LeaseModel, index: int, job_id: str, lease_ms: int = 1000) -> None:
    job = cmds.NewJob(job_id, b"", 0, 0, 3, lease_ms, None, 100, 1000)
    model.apply(index, cmds.Submit(0, "q", (job,)), res.Submitted((job_id,), (True,)), 0)


def _grant(model: LeaseModel, index: int, job_id: str, token: int, worker: str, now: int, lease_ms: int = 1000) -> None:
    leased = res.Leased((res.JobGrant(job_id, "q", b"", 1, token, now + lease_ms, 0, lease_ms),))
    model.apply(index, cmds.Lease(now, worker, ("q",), 1), leased, now)


def test_lease_model_accepts_a_regrant_after_expiry_or_ack() -> None:
    model = LeaseModel()
    _submit(model, 1, "j1")
    _grant(model, 2, "j1", 1, "w1", now=0)
    model.apply(3, cmds.Tick(1000, 0), res.Ticked(1, 0, 0, 0), 1000)
    _grant(model, 4, "j1", 2, "w2", now=1000)
    model.apply(5, cmds.Ack(1100, "w2", (cmds.AckItem("j1", 2, None),)), res.ItemOutcomes((res.OK,)), 1100)
    model.apply(6, cmds.Ack(1200, "w2", (cmds.AckItem("j1", 2, None),)), res.ItemOutcomes((res.OK,)), 1200)


def test_lease_model_catches_a_second_live_lease() -> None:
    model = LeaseModel()
    _submit(model, 1, "j1")
    _grant(model, 2, "j1", 1, "w1", now=0)
    model.apply(3, cmds.Tick(999, 0), res.Ticked(0, 0, 0, 0), 999)  # not expired yet
    with pytest.raises(Violation, match="at most one live lease per job"):
        _grant(model, 4, "j1", 2, "w2", now=999)


def test_lease_model_catches_foreign_and_expired_acks_and_old_tokens() -> None:
    model = LeaseModel()
    _submit(model, 1, "j1")
    _grant(model, 2, "j1", 5, "w1", now=0)
    with pytest.raises(Violation, match="foreign lease"):
        model.apply(3, cmds.Ack(10, "w2", (cmds.AckItem("j1", 5, None),)), res.ItemOutcomes((res.OK,)), 10)
    with pytest.raises(Violation, match="expired lease"):
        model.apply(3, cmds.Fail(1000, "w1", 0, (cmds.FailItem("j1", 5, "x", True, None),)),
                    res.ItemOutcomes((res.OK,)), 1000)
    model.apply(3, cmds.WorkerLost(10, "w1", 0), res.Released(1, 0), 10)
    with pytest.raises(Violation, match="fencing tokens increase"):
        _grant(model, 4, "j1", 5, "w2", now=20)


def test_lease_model_follows_renew_and_extend() -> None:
    model = LeaseModel()
    _submit(model, 1, "j1", lease_ms=1000)
    _grant(model, 2, "j1", 1, "w1", now=0)
    model.apply(3, cmds.RenewLeases(500), res.Renewed(1), 500)  # now lives until 1500
    model.apply(4, cmds.Ack(1200, "w1", (cmds.AckItem("j1", 1, None),)), res.ItemOutcomes((res.OK,)), 1200)
    _submit(model, 5, "j2")
    _grant(model, 6, "j2", 2, "w1", now=1300)
    model.apply(7, cmds.Extend(1400, "w1", (cmds.ExtendItem("j2", 2, 5000),)),
                res.ItemOutcomes((res.Extended(6400),)), 1400)
    model.apply(8, cmds.Tick(3000, 0), res.Ticked(0, 0, 0, 0), 3000)
    with pytest.raises(Violation, match="at most one live lease"):
        _grant(model, 9, "j2", 3, "w2", now=3000)


def test_checker_replays_commands_from_the_ledger() -> None:
    checker = Checker(NODES)
    job = cmds.NewJob("j1", b"", 0, 0, 3, 1000, None, 100, 1000)
    checker.on_apply("n1", entry(1, 1, encode_command(cmds.Submit(0, "q", (job,)))),
                     res.Submitted(("j1",), (True,)), 0, term_bound=1)
    leased = res.Leased((res.JobGrant("j1", "q", b"", 1, 1, 1000, 0, 500),))
    checker.on_apply("n1", entry(2, 1, encode_command(cmds.Lease(0, "w1", ("q",), 1))), leased, 0, term_bound=1)
    leased_again = res.Leased((res.JobGrant("j1", "q", b"", 2, 2, 1500, 0, 500),))
    with pytest.raises(Violation, match="at most one live lease"):
        checker.on_apply("n1", entry(3, 1, encode_command(cmds.Lease(500, "w2", ("q",), 1))), leased_again, 500,
                         term_bound=1)
