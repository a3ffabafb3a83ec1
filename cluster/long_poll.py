"""The fetch long poll (`POST /v1/lease` with `wait_s`), next to the node rather than in a view.

Theory of operation
-------------------
A fetch that finds nothing leasable waits, up to `wait_s` (at most FETCH_WAIT_S_MAX), for the
node's `jobs_changed()` future, which the drive loop resolves whenever an applied entry may have
made jobs leasable (a submit, an ack freeing a key's slot, an expiry, an installed snapshot), or
until a rate limit lets the next job go. Then it proposes a `Lease` like any command: the job is
the worker's only once that entry is applied, so a deposed leader never hands one out. If another
worker took the jobs first, it waits for the next change rather than spin on proposals.

One ready job wakes one fetch, not all of them. Every applied entry wakes every waiter, but a
waiter proposes a Lease only while the queues hold more ready jobs than the Lease proposals
already in flight may take (`FetchGate.reserved`, counted per job); the rest look again when those
proposals are applied. Without the gate 200 waiting long polls and one submit wrote 201 log
entries (200 Leases, 199 of them empty); with it, two. The count is over all queues at once, so a
waiter on another queue may wait one commit longer than it had to: never a lost wakeup, since a
waiter the gate held back is woken when the proposals before it end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue.state_machine import QueueStateMachine


class FetchGate:
    """Per node: the jobs Lease proposals in flight may take, and whether a waiter held back for them."""

    def __init__(self) -> None:
        self.reserved = 0
        self.held_back = False
        self.waiting = 0  # long polls waiting now (a metric)


class _Node(Protocol):
    queue: QueueStateMachine
    fetch_gate: FetchGate

    def wake_fetchers(self) -> None: ...
    draining: bool

    def require_leader(self) -> None: ...

    def jobs_changed(self) -> asyncio.Future: ...

    def now_ms(self) -> int: ...

    async def propose(self, command: cmds.Command) -> Any: ...


async def fetch(node: _Node, worker: str, queues: tuple[str, ...], *, max_jobs: int, wait_s: float) -> tuple:
    """Leases up to max_jobs jobs of `queues` to `worker`, waiting up to wait_s for one.

    Returns:
        The granted jobs (`JobGrant`s), empty when none came within wait_s.

    Raises:
        NotLeaderError, Unavailable, ProposalLost: as `Node.propose` and `Node.require_leader`.
    """
    deadline = time.monotonic() + wait_s
    while True:
        changed = node.jobs_changed()
        now_ms = node.now_ms()
        # 0: a job is leasable now; N: a rate limit lets one go in N ms; None: nothing until an
        # entry applies (a submit, an ack freeing a key's slot or a group's next job).
        wait_ms = node.queue.lease_wait_ms(queues, now_ms)
        if wait_ms == 0:
            gate = node.fetch_gate
            unclaimed = node.queue.ready_count(queues) - gate.reserved
            if unclaimed > 0:
                claim = min(max_jobs, unclaimed)
                gate.reserved += claim
                try:
                    result = await node.propose(
                        cmds.Lease(now_ms=now_ms, worker=worker, queues=queues, max_jobs=max_jobs))
                finally:
                    gate.reserved -= claim
                    if gate.held_back:
                        gate.held_back = False
                        node.wake_fetchers()
                if result.jobs:
                    return result.jobs
            else:
                gate.held_back = True  # the proposals in flight may take every ready job
            # Another worker took them first: wait for the next change rather than spin on proposals.
            wait_ms = None
        remaining = deadline - time.monotonic()
        if remaining <= 0 or node.draining:  # a stopping node answers now: the worker asks another
            return ()
        try:
            timeout_s = remaining if wait_ms is None else min(remaining, wait_ms / 1000)
            node.fetch_gate.waiting += 1
            try:
                await asyncio.wait_for(asyncio.shield(changed), timeout_s)
            finally:
                node.fetch_gate.waiting -= 1
        except asyncio.TimeoutError:
            if wait_ms is None or remaining <= wait_ms / 1000:
                return ()
        node.require_leader()
