"""The node takes its storage and transport: three real `Node`s (real WAL and snapshot files in
a temporary folder, real fsync, the same drive loop and Ready handler as a broker process) in one
event loop, joined by a `MemoryNetwork` instead of HTTP.

They elect a leader, commit a submit on a majority, and a node cut off from the others neither
stops the majority nor diverges once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from raftq.cluster.config import NodeConfig
from raftq.cluster.queue import commands as cmds
from raftq.cluster.server import Node
from raftq.cluster.storage.node_storage import NodeStorage
from raftq.cluster.transport.memory import MemoryNetwork

NODE_IDS = ("n1", "n2", "n3")
DEADLINE_S = 30.0


def _config(node_id: str, tmp_path) -> NodeConfig:
    return NodeConfig(
        node_id=node_id, data_dir=str(tmp_path / node_id), port=7700 + int(node_id[1:]),
        peers={peer: f"http://127.0.0.1:{7700 + int(peer[1:])}" for peer in NODE_IDS if peer != node_id},
        cluster_secret="in-memory-network-test-secret", tick_interval_s=0.01,
    )


async def _poll(predicate, what: str, seen):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)  # polling a condition with a deadline
    raise AssertionError(f"waited {DEADLINE_S} s for {what}; seen {seen()}")


@contextlib.asynccontextmanager
async def _three_nodes(tmp_path):
    """Three started nodes joined by a MemoryNetwork: (network, nodes, storages) by node id;
    stopped and their storage closed on the way out."""
    network = MemoryNetwork()
    storages = {n: NodeStorage.open(str(tmp_path / n), wal_segment_bytes=1 << 20, logger=logging.getLogger("test"))
                for n in NODE_IDS}
    nodes = {n: Node(_config(n, tmp_path), storage=storages[n], transport=network.transport(n)) for n in NODE_IDS}
    for node_id, node in nodes.items():
        network.attach(node_id, node.deliver)
    for node in nodes.values():
        await node.start()
    try:
        yield network, nodes, storages
    finally:
        for node in nodes.values():
            await node.stop()
        for storage in storages.values():
            storage.close()


def _submit(job_id: str) -> cmds.Submit:
    job = cmds.NewJob(id=job_id, payload=b"\x01", priority=0, delay_ms=0, max_attempts=5, lease_ms=30_000,
                      idempotency_key=None, backoff_base_ms=1000, backoff_cap_ms=300_000)
    return cmds.Submit(now_ms=1_000, queue="q", jobs=(job,))


async def test_three_nodes_on_an_in_memory_network_replicate(tmp_path):
    async with _three_nodes(tmp_path) as (network, nodes, storages):
        def roles():
            return {n: (node.role.name if node.role else None) for n, node in nodes.items()}

        leader_id = await _poll(lambda: next((n for n, node in nodes.items() if node.is_serving), None),
                                "a leader that serves", roles)
        await nodes[leader_id].propose(_submit("j1"))

        def applied():
            return {n: node.queue.last_applied for n, node in nodes.items()}

        target = nodes[leader_id].queue.last_applied
        await _poll(lambda: all(i >= target for i in applied().values()), "every node to apply the submit", applied)
        assert all(node.queue.get_job("j1") is not None for node in nodes.values())
        assert storages[leader_id].log.last_index >= target, "the leader's WAL holds what it applied"

        # Cut one follower off: the other two still commit; back, it catches up to the same state.
        follower = next(n for n in NODE_IDS if n != leader_id)
        network.cut.add(follower)
        leader = await _poll(lambda: next((node for node in nodes.values() if node.is_serving), None),
                             "a serving leader with one node cut off", roles)
        await leader.propose(_submit("j2"))
        network.cut.clear()
        target = leader.queue.last_applied
        await _poll(lambda: len(set(applied().values())) == 1 and min(applied().values()) >= target,
                    "the cut node to catch up", applied)
        digests = {n: node.queue.digest() for n, node in nodes.items()}
        assert len(set(digests.values())) == 1, digests
        assert all(node.queue.get_job("j2") is not None for node in nodes.values())
        assert network.delivered_count > 0


async def test_a_request_that_finds_no_leader_is_held_until_one_answers(tmp_path):
    """`wait_for_leader` (the API holds a request on it in an election): with every node cut off
    it gives up after its timeout; started while no leader is known, it returns as soon as a
    leader that answers exists (another node, or this one once it serves)."""
    async with _three_nodes(tmp_path) as (network, nodes, storages):
        def leaders():
            return {n: node.leader_id for n, node in nodes.items()}

        leader_id = await _poll(lambda: next((n for n, node in nodes.items() if node.is_serving), None),
                                "a leader that serves", leaders)
        network.cut.update(NODE_IDS)  # nobody hears anybody: every node loses its leader
        await _poll(lambda: all(node.leader_id is None for node in nodes.values()), "no leader anywhere", leaders)
        # The old leader stepped down unable to reach a majority: it does not hold at all.
        assert await nodes[leader_id].wait_for_leader(DEADLINE_S) is False
        follower_id = next(n for n in NODE_IDS if n != leader_id)
        node = nodes[follower_id]
        started = time.monotonic()
        assert await node.wait_for_leader(0.3) is False
        assert time.monotonic() - started >= 0.3

        held = asyncio.create_task(node.wait_for_leader(DEADLINE_S))
        await asyncio.sleep(0)  # let it start waiting
        assert not held.done(), "returned although no leader is known"
        network.cut.clear()
        assert await held is True
        assert node.leader_id is not None
        assert node.leader_id != follower_id or node.is_serving, "held until this node serves, not just until it leads"

        # Let the new leader's entries settle everywhere before the teardown: a node stopped while
        # a WAL write runs in its thread would have its storage closed under that write.
        def applied():
            return {n: (other.queue.last_applied, other.raft.last_index if other.raft else None)
                    for n, other in nodes.items()}

        await _poll(lambda: len({a for a, _ in applied().values()} | {i for _, i in applied().values()}) == 1
                    and any(other.is_serving for other in nodes.values()), "every node to apply the same index",
                    applied)


async def test_a_leader_applies_its_own_submit_and_ack_without_decoding_them(tmp_path, monkeypatch):
    """The leader applies a submit or an ack from the command it proposed (the entry is its very
    bytes); the followers decode it; all three end in the same state."""
    from raftq.cluster.queue import state_machine

    decoded = []

    def counting_decode(data):
        command = cmds.decode_command(data)
        if type(command) in (cmds.Submit, cmds.Ack):
            decoded.append(command)
        return command

    monkeypatch.setattr(state_machine, "decode_command", counting_decode)
    async with _three_nodes(tmp_path) as (network, nodes, storages):
        leader = await _poll(lambda: next((node for node in nodes.values() if node.is_serving), None),
                             "a leader that serves", lambda: {n: node.role for n, node in nodes.items()})
        submit = _submit("j1")
        result = await leader.propose(submit)
        assert result.ids == ("j1",)
        (grant,) = (await leader.propose(cmds.Lease(now_ms=1_001, worker="w1", queues=("q",), max_jobs=1))).jobs
        ack = cmds.Ack(now_ms=1_002, worker="w1", items=(cmds.AckItem("j1", grant.lease_token, None),))
        await leader.propose(ack)
        target = leader.queue.last_applied

        def applied():
            return {n: node.queue.last_applied for n, node in nodes.items()}

        await _poll(lambda: all(i >= target for i in applied().values()), "every node to apply the ack", applied)
        assert (decoded.count(submit), decoded.count(ack), len(decoded)) == (2, 2, 4), \
            f"each follower decodes the entries, the leader does not; decoded: {decoded}"
        assert all(node.queue.job_state("j1") == "done" for node in nodes.values())
        assert len({node.queue.digest() for node in nodes.values()}) == 1


async def test_a_leader_whose_disk_refuses_fail_stops_and_fails_every_waiting_proposal(tmp_path):
    """The WAL's sync fails (ENOSPC) while a second proposal is queued behind the one being
    written: the node stops (its `failure` resolves with the disk's error, so the process exits)
    and both proposals fail, the queued one included. (A real full disk: test_disk_full.py.)"""
    import errno
    import threading

    from raftq.cluster.errors import Unavailable
    from raftq.cluster.storage.errors import DiskWriteError

    async with _three_nodes(tmp_path) as (network, nodes, storages):
        leader = await _poll(lambda: next((node for node in nodes.values() if node.is_serving), None),
                             "a leader that serves", lambda: {n: node.role for n, node in nodes.items()})
        wal = leader.wal
        second_queued = threading.Event()

        def failing_sync():  # runs in the persist thread: a large Ready is written off the loop
            second_queued.wait(DEADLINE_S)
            raise DiskWriteError(wal.directory, OSError(errno.ENOSPC, "No space left on device"))

        wal.sync = failing_sync
        big = cmds.Submit(now_ms=1_000, queue="q", jobs=tuple(
            cmds.NewJob(id=f"big{i}", payload=b"x" * 1024, priority=0, delay_ms=0, max_attempts=5,
                        lease_ms=30_000, idempotency_key=None, backoff_base_ms=1000, backoff_cap_ms=300_000)
            for i in range(100)))
        first = asyncio.create_task(leader.propose(big))
        await _poll(lambda: leader.pending_proposals_count == 1 and not leader._proposals,
                    "the first proposal to be taken by the drive loop", lambda: leader.pending_proposals_count)
        second = asyncio.create_task(leader.propose(_submit("queued")))
        await asyncio.sleep(0)  # the second proposal is queued: it waits for the next drive-loop turn
        second_queued.set()
        failure = await asyncio.wait_for(leader.failure, DEADLINE_S)
        assert isinstance(failure, DiskWriteError) and failure.errno == errno.ENOSPC, failure
        for task in (first, second):
            try:
                await asyncio.wait_for(task, DEADLINE_S)
            except Unavailable:
                continue
            raise AssertionError(f"a proposal waiting on a node that fail-stopped did not fail: {task}")
        assert leader.pending_proposals_count == 0
        del wal.sync  # the teardown closes the log, which syncs
