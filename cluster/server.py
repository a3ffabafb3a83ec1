"""The asyncio shell around the Raft core and the queue state machine.

Theory of operation
-------------------
One task, `_drive`, owns the `RaftNode`, the WAL and the `QueueStateMachine`. Everything else
(HTTP handlers, the peer transport, the leader's housekeeping) talks to it through bounded inboxes
and futures, so no Raft rule and no state change happens outside `_drive`:

    handler ── propose(cmd) ──► _proposals ─┐
    peer    ── deliver(msgs) ─► _inbox ─────┼─► _drive: step / propose / tick
    handler ── read_barrier() ► _reads ─────┘        │
                                                     ▼ Ready
                              persist entries + hard state, fsync (worker thread)   ← group commit
                              send messages
                              apply committed entries → settle the proposers' futures
                              advance

Group commit falls out of this shape: while one fsync runs in its thread, new proposals pile up in
`_proposals`, and the next Ready carries all of them to the next fsync.

A request's answer waits until its entry is applied, so a 2xx means the entry is committed: on a
majority's disk (guarantee 1). Reads take a ReadIndex barrier so a deposed leader never answers
from stale state.

Snapshots (Raft §7) are `snapshotting.py`'s: the drive loop asks it after each applied batch and
each tick whether one is due, hands it the snapshot events between Readys (compaction once a
snapshot is durable) and `Ready.snapshot` (install). The leader-only loop is `housekeeping.py`'s;
status and metrics read the node through `node_view.py`.

Time. Every command's `now_ms` is `now_ms()`: the cluster's clock as `leader_clock.py` reads it
for the leader, advanced by its monotonic time since it took office, never by its wall clock.

Fail-stop storage (SPEC guarantee 10). A node that cannot write, sync, rename or delete its WAL or
hard state must not lead or vote: an entry it acknowledges may not be on its disk. Any such error
in `_drive` logs one ERROR line naming the file and the error, stops the drive loop (so no
heartbeat, vote or append leaves the node again), closes the peer transport and resolves
`failure`, on which `cluster.main` exits non-zero; a healthy node takes over within an election
timeout. At start a small probe file is written and fsynced, so a node whose disk is still full
refuses to start with the same line. A snapshot is only an optimisation: `snapshotting.py` warns,
counts and tries again later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from raftq.cluster import constants, long_poll, recovery
from raftq.cluster import metrics as node_metrics
from raftq.cluster.config import NodeConfig
from raftq.cluster.errors import NotLeaderError, NotServingYet, ProposalLost, Unavailable
from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue.results import Rejected, Released, Ticked
from raftq.cluster.housekeeping import LeaderHousekeeping
from raftq.cluster.leader_clock import LeaderClock
from raftq.cluster.node_view import NodeView
from raftq.cluster.queue.state_machine import QueueStateMachine
from raftq.cluster.raft.errors import ChangeRefused, NotLeader, ProposalDropped
from raftq.cluster.raft.membership import Membership
from raftq.cluster.raft.messages import Entry, Message, MessageType, SnapshotPoint, snapshot_stored
from raftq.cluster.raft.node import RaftConfig, RaftNode, Ready, Role
from raftq.cluster.ready_handler import Apply, InstallSnapshot, Persist, Send, ServeReads, UseMembership, handle_ready
from raftq.cluster.snapshot_transfer import SnapshotReceiver, SnapshotSender
from raftq.cluster.snapshotting import Snapshotting, StartupError
from raftq.cluster.storage.errors import DiskWriteError, StorageError, storage_failure_line
from raftq.cluster.storage.node_storage import NodeStorage
from raftq.cluster.storage.snapshots import SnapshotMeta, SnapshotStore
from raftq.cluster.storage_threads import StorageThreads
from raftq.cluster.transport.interfaces import Transport
from raftq.cluster.storage.wal import WriteAheadLog

log = logging.getLogger("raftq.node")

#: Messages and proposals handled per drive-loop turn before the loop persists and sends; bounds
#: the latency one turn can add while still batching many proposals into one fsync.
DRIVE_BATCH_MAX = 4096
#: Written and fsynced in the data directory at start: a node whose disk is full refuses to start
#: rather than fail its first append (and a few pages of headroom let that append through).
DISK_PROBE_BYTES = 64 << 10
DISK_PROBE_FILE_NAME = "disk-probe"
#: URLs remembered for peer senders outside the membership (see Node.learn_peer_url).
LEARNED_URLS_MAX = 16


__all__ = ["Node", "StartupError"]


def probe_disk(data_dir: str) -> None:
    """Writes, fsyncs and deletes a small file in data_dir.

    Raises:
        DiskWriteError: the disk refused (full, read-only, failing); names the probe file.
    """
    path = os.path.join(data_dir, DISK_PROBE_FILE_NAME)
    try:
        with open(path, "wb") as f:
            f.write(bytes(DISK_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise DiskWriteError(path, exc) from exc
    try:
        os.unlink(path)
    except OSError as exc:
        raise DiskWriteError(path, exc) from exc


@dataclass(slots=True)
class _Pending:
    term: int
    future: asyncio.Future
    #: A command as proposed (of `_APPLIED_AS_PROPOSED`), and its encoding: applying that very
    #: entry needs no decode (`_apply`).
    command: cmds.Command | None = None
    data: bytes | None = None


#: The commands a leader applies as it proposed them rather than decoding its own entry: those
#: whose decode costs (a batch of jobs or items), built at the edge with the very field types a
#: decode gives (test_submit_bodies holds every Submit and Ack the edge builds to its decode).
_APPLIED_AS_PROPOSED = (cmds.Submit, cmds.Ack)


class Node:
    """One broker: Raft core + WAL + queue state machine + the leader's housekeeping."""

    def __init__(self, config: NodeConfig, *, storage: NodeStorage | None = None,
                 transport: Transport | None = None) -> None:
        """A node of `config`; `start()` runs it.

        Args:
            config: validated here.
            storage: its log and snapshots; None opens them in `config.data_dir` at start (and
                the node closes them at stop; storage handed in stays the caller's to close).
            transport: how its messages reach its peers; None sends over HTTP to `config.peers`.
        """
        config.validate()
        self.config = config
        self._storage = storage
        self._owns_storage = storage is None
        self.queue = QueueStateMachine(
            retention_ms=config.retention_ms, idempotency_window_ms=config.idempotency_window_ms
        )
        self.raft: RaftNode | None = None
        self.wal: WriteAheadLog | None = None
        self.snapshots: SnapshotStore | None = None
        self.transport: Transport | None = transport
        self.snapshot_sender: SnapshotSender | None = None
        self.snapshot_receiver: SnapshotReceiver | None = None
        self._inbox: list[Message] = []
        self._proposals: list[tuple[bytes, asyncio.Future, cmds.Command]] = []
        #: membership changes and transfers for the drive loop: (call on the core, future, wait for commit)
        self._changes: list[tuple[Callable[[RaftNode], Any], asyncio.Future, bool]] = []
        #: URLs senders outside the membership gave for themselves (a leader replicating to this
        #: node before it knows the membership that added it); bounded
        self._learned_urls: dict[str, str] = {}
        self._reads: list[asyncio.Future] = []
        self._pending: dict[int, _Pending] = {}
        self._read_waiters: dict[int, asyncio.Future] = {}
        self._read_ids = itertools.count(1)
        self._applied_waiters: list[tuple[int, asyncio.Future]] = []
        #: requests held while no leader is known (`wait_for_leader`), woken by any change
        self._leader_waiters: list[asyncio.Future] = []
        #: stepped down without knowing a new leader, and heard of none since (see wait_for_leader)
        self._deposed_alone = False
        self._wakeup = asyncio.Event()
        self._storage_threads = StorageThreads()
        self.snapshotting = Snapshotting(config, self._wakeup, self._storage_threads)
        self._jobs_changed: asyncio.Future | None = None
        self.fetch_gate = long_poll.FetchGate()  # Lease proposals in flight: one ready job wakes one fetch
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        #: Set at SIGTERM (`drain`): long polls answer at once with what they have.
        self.draining = False
        self._role: Role | None = None
        self._leader_id: str | None = None
        self.leader_changes_count = 0
        self.clock = LeaderClock()
        #: resolved with the storage error that stopped the node (fail-stop); `cluster.main` exits on it
        self.failure: asyncio.Future | None = None
        self.housekeeping = LeaderHousekeeping(config, self)
        self.view = NodeView(self)
        self.metrics = node_metrics.NodeMetrics(self.view)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        data_dir = self.config.data_dir
        os.makedirs(data_dir, exist_ok=True)
        self.failure = asyncio.get_running_loop().create_future()
        await asyncio.to_thread(probe_disk, data_dir)
        if self._storage is None:
            self._storage = await asyncio.to_thread(
                NodeStorage.open, data_dir, wal_segment_bytes=self.config.wal_segment_bytes, logger=log)
        self.snapshots, self.wal = self._storage.snapshots, self._storage.log
        self.snapshotting.store, self.snapshotting.wal = self.snapshots, self.wal
        started = time.monotonic()
        snapshot, entries = await asyncio.to_thread(self.snapshotting.recover, self.queue)
        raft_config = RaftConfig(
            node_id=self.config.node_id,
            peer_ids=tuple(sorted(self.config.peers)),
            election_ticks=self.config.election_ticks,
            heartbeat_ticks=self.config.heartbeat_ticks,
        )
        self.raft = RaftNode(
            raft_config, hard_state=self.wal.hard_state, entries=entries, rng=random.Random(), snapshot=snapshot,
            membership=self._membership_at_snapshot(), load_entries=self._stored_entries,
        )
        membership = self.raft.membership
        if self.config.peers and set(self.config.peers) | {self.config.node_id} != set(membership.ids):
            log.warning("the data directory's membership (%s) differs from --peers (%s): using the data "
                        "directory's", ",".join(membership.ids), ",".join(sorted(self.config.peers)))
        log.info(
            "node started in %.2f s: snapshot at %d, %d log entries after it, term %d, data dir %s",
            time.monotonic() - started, snapshot.index, self.wal.last_index - snapshot.index,
            self.wal.hard_state.term, data_dir,
        )
        self.snapshot_receiver = SnapshotReceiver(
            self.snapshots, installed=self._snapshot_received)
        # Every node gets a transport, even a cluster of one: members may be added to it later.
        from raftq.cluster import tls
        from raftq.cluster.transport.http import HttpTransport

        peer_tls = tls.peer_client_context(self.config)
        peers = self._peer_urls(membership)
        if self.transport is None:
            self.transport = HttpTransport(self.config.node_id, peers, secret=self.config.cluster_secret,
                                           ssl_context=peer_tls, own_url=self.config.url)
        else:
            self.transport.set_peers(peers)
        await self.transport.start()
        self.snapshot_sender = SnapshotSender(
            self.config.node_id, peers, self.snapshots, secret=self.config.cluster_secret,
            current_term=lambda: self.raft.term if self.raft is not None else 0,
            report=self.snapshotting.transfer_reported, ssl_context=peer_tls)
        self._tasks.append(asyncio.create_task(self._drive(), name="raft-drive"))
        self._tasks.append(asyncio.create_task(self.housekeeping.run(lambda: self._stopping),
                                               name="leader-housekeeping"))
        self._tasks.append(asyncio.create_task(self._watch_loop_lag(), name="loop-lag"))

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._storage_threads.idle()
        self._fail_waiters(Unavailable("node is shutting down"))
        await self.snapshotting.close()
        if self.snapshot_sender is not None:
            await self.snapshot_sender.close()
        if self.snapshot_receiver is not None:
            await self.snapshot_receiver.close()
        if self.transport is not None:
            await self.transport.close()
        if self._storage is not None and self._owns_storage:
            await asyncio.to_thread(self._storage.close)

    # ------------------------------------------------------------------ what the API calls

    @property
    def role(self) -> Role | None:
        return self._role

    @property
    def leader_id(self) -> str | None:
        return self._leader_id

    @property
    def is_leader(self) -> bool:
        return self._role == Role.LEADER

    def leader_url(self) -> str | None:
        if self._leader_id is None:
            return None
        return self.member_url(self._leader_id)

    def member_url(self, node_id: str) -> str | None:
        """Where clients reach node_id: this node's URL, a --public-urls entry, the membership's."""
        if node_id == self.config.node_id:
            return self.config.url
        url = self.config.public_urls.get(node_id)
        member = self.raft.membership.get(node_id) if self.raft is not None else None
        return url or (member.url if member is not None and member.url else None) \
            or self.config.peers.get(node_id) or self._learned_urls.get(node_id)

    @property
    def pending_proposals_count(self) -> int:
        """Proposals waiting for their entry to commit (bounded by `pending_proposals_max`)."""
        return len(self._pending) + len(self._proposals)

    def peer_send_queue_counts(self) -> dict[str, int]:
        """Raft messages queued per peer, when the transport tells (the HTTP one does)."""
        queued_counts = getattr(self.transport, "queued_counts", None)
        return queued_counts() if queued_counts is not None else {}

    @property
    def is_serving(self) -> bool:
        """Leads and has applied every entry before its own term's no-op (the core's rule)."""
        return self.is_leader and self.raft is not None and self.raft.ready_to_serve(self.queue.last_applied)

    def require_leader(self) -> None:
        """Raises unless this node leads and has applied everything committed before its term.

        A new leader's state machine may lag its log; until it has applied its own no-op entry,
        answers from its state (a lease token check, a job's state) could be stale.

        Raises:
            NotLeaderError: this node does not lead.
            NotServingYet: it leads but is still applying earlier entries (an Unavailable).
        """
        if not self.is_leader:
            raise NotLeaderError(self._leader_id, self.leader_url())
        if not self.is_serving:
            raise NotServingYet("new leader is applying earlier entries; retry shortly")

    @property
    def leader_hold_s(self) -> float:
        """How long a request that finds no leader is held for one: the election timeout's lower
        bound (most elections end within it; see `wait_for_leader`)."""
        return self.config.election_ticks * self.config.tick_interval_s

    async def wait_for_leader(self, timeout_s: float) -> bool:
        """Waits up to timeout_s until a leader that can answer is known: another node, or this
        one serving. True when one is.

        Why (hashicorp/consul's RPC hold, etcd's proposal forwarding do the same): without it, a
        node in an election answers 503 + Retry-After at once, so a client failing over waits out
        a whole Retry-After (1 s) after the election ended; held, it is redirected the moment the
        new leader is known. Raft never waits on this: it only reads what the drive loop set.
        A leader that stepped down for want of a majority (check-quorum: it is cut off or alone)
        does not hold until it hears of a leader again: its clients are better off elsewhere now.
        """
        if self._deposed_alone:
            return False  # it stepped down unable to reach a majority: it would hold in vain
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._leader_answers():
            remaining_s = deadline - loop.time()
            if remaining_s <= 0 or self._stopping:
                return False
            waiter = loop.create_future()
            self._leader_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining_s)
            except asyncio.TimeoutError:
                return self._leader_answers()
        return True

    def _leader_answers(self) -> bool:
        if self._leader_id is None:
            return False
        return self._leader_id != self.config.node_id or self.is_serving

    def _wake_leader_waiters(self) -> None:
        waiters, self._leader_waiters = self._leader_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def propose(self, command: cmds.Command) -> Any:
        """Replicates one command and returns its apply result once it is applied here.

        Raises:
            NotLeaderError: this node does not lead.
            Unavailable: too many proposals pending, or the entry did not commit in time.
            ProposalLost: a new leader overwrote the entry; the outcome is known not to have happened.
        """
        if not self.is_leader:
            raise NotLeaderError(self._leader_id, self.leader_url())
        if len(self._pending) + len(self._proposals) >= self.config.pending_proposals_max:
            self.metrics.proposals_refused.inc()
            raise Unavailable("too many requests waiting for replication")
        future = asyncio.get_running_loop().create_future()
        self._proposals.append((cmds.encode_command(command), future, command))
        self._wakeup.set()
        return await self._await(future, "the entry did not commit in time")

    async def read_barrier(self) -> None:
        """Waits until this node's state reflects every entry committed before the call (ReadIndex).

        Raises:
            NotLeaderError: this node does not lead (or lost leadership meanwhile).
            Unavailable: the barrier did not complete in time.
        """
        self.require_leader()
        future = asyncio.get_running_loop().create_future()
        self._reads.append(future)
        self._wakeup.set()
        await self._await(future, "could not confirm leadership in time")

    async def add_member(self, node_id: str, url: str) -> None:
        """Adds node_id as a learner (the leader promotes it once caught up); returns once the
        change is committed and applied here.

        Raises:
            NotLeaderError, Unavailable: as propose().
            ChangeRefused: the core refused (retryable or not, see its attribute).
        """
        await self._change(lambda raft: raft.add_learner(node_id, url))

    async def remove_member(self, node_id: str) -> None:
        """Removes node_id (not this leader: transfer first); returns once committed and applied."""
        await self._change(lambda raft: raft.remove_member(node_id))

    async def transfer_leadership(self, to: str | None) -> str:
        """Starts handing leadership to `to` (None: the most caught-up voter); returns the target.
        The transfer ends when the target wins its election, or is abandoned after an election
        timeout (the caller watches `leader_id`)."""
        return await self._change(lambda raft: raft.transfer_leadership(to), wait_for_commit=False)

    async def _change(self, change: Callable[[RaftNode], Any], *, wait_for_commit: bool = True) -> Any:
        if not self.is_leader:
            raise NotLeaderError(self._leader_id, self.leader_url())
        future = asyncio.get_running_loop().create_future()
        self._changes.append((change, future, wait_for_commit))
        self._wakeup.set()
        return await self._await(future, "the membership change did not commit in time")

    def deliver(self, messages: Sequence[Message]) -> bool:
        """Hands peer messages to the drive loop; False when the inbox is full (the peer resends)."""
        if len(self._inbox) + len(messages) > DRIVE_BATCH_MAX * 4:
            return False
        self._inbox.extend(messages)
        self._wakeup.set()
        return True

    def wake_fetchers(self) -> None:
        """Wakes every long poll now (one the fetch gate held back looks again)."""
        self._notify_jobs_changed()

    def drain(self) -> None:
        """The process is stopping: long polls answer now; requests in flight finish as usual."""
        self.draining = True
        self._notify_jobs_changed()

    def jobs_changed(self) -> asyncio.Future:
        """A future resolved the next time jobs may have become leasable (long-poll wakeup)."""
        if self._jobs_changed is None:  # made when someone waits: most applies have no one to wake
            self._jobs_changed = asyncio.get_running_loop().create_future()
        return self._jobs_changed

    def touch_worker(self, worker: str) -> None:
        """Records that a worker is alive (lease requests and heartbeats); leader-local knowledge."""
        self.housekeeping.touch_worker(worker)

    def status(self) -> dict:
        """The `/v1/cluster` answer: this node's view of the cluster."""
        return self.view.status()

    async def status_with_digest(self) -> dict:
        """`status()` plus the state digest at its applied index (hashed off the loop)."""
        return await self.view.status_with_digest()

    def workers_table(self) -> list[dict]:
        """Workers the leader knows: last heartbeat age and the jobs each holds."""
        return self.housekeeping.workers_table()

    def now_ms(self) -> int:
        """The cluster's time to stamp into a command now (leader_clock.py); off the leader, the
        applied clock."""
        applied_ms = self.queue.clock_ms
        if not self.is_leader:
            return applied_ms
        if applied_ms == 0 and self.is_serving:
            # A brand-new cluster: no command ever applied, so nothing waits on the clock yet.
            # Starting it at the wall clock's time only makes its numbers readable.
            applied_ms = int(time.time() * 1000)
        return self.clock.read(applied_ms)

    def entropy(self) -> int:
        """A fresh 64-bit random draw for a command (backoff jitter is drawn by the leader)."""
        return self.housekeeping.entropy()

    async def _await(self, future: asyncio.Future, timeout_message: str) -> Any:
        # Awaited directly in a context timeout (not wait_for around a shield, three loop turns):
        # the request resumes in the loop turn after the drive loop resolves the future, which is
        # what lets it answer before the drive loop's next sends (`_handle_ready`). A request
        # that gives up cancels its future; the drive loop skips a cancelled one (not proposed
        # yet) and ignores it when its entry applies.
        try:
            async with asyncio.timeout(self.config.proposal_timeout_s):
                return await future
        except TimeoutError:
            raise Unavailable(timeout_message) from None

    # ------------------------------------------------------------------ the drive loop

    async def _drive(self) -> None:
        try:
            await self._drive_loop()
        except (OSError, StorageError) as exc:  # DiskWriteError, WalFailedError, a failed install
            await self._fail_stop(exc)

    async def _fail_stop(self, error: BaseException) -> None:
        """Stops a node that cannot persist: one ERROR line, no more messages out, `failure` resolved."""
        log.error("%s", storage_failure_line(error))
        self._stopping = True
        # Lead no more (the core is gone with the drive loop): requests that arrive until the process
        # exits are refused at once instead of queueing proposals nobody will drive, which held the
        # exit up for the shutdown grace period while the node still answered as leader.
        self._role = Role.FOLLOWER
        self._leader_id = None
        self._fail_waiters(Unavailable("node stopped: it cannot write to its disk"))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.transport is not None:
            await self.transport.close()
        if self.snapshot_sender is not None:
            await self.snapshot_sender.close()
        if self.failure is not None and not self.failure.done():
            self.failure.set_result(error)

    async def _drive_loop(self) -> None:
        raft = self.raft
        assert raft is not None
        loop = asyncio.get_running_loop()
        tick_interval = self.config.tick_interval_s
        next_tick = time.monotonic() + tick_interval
        # One timer per tick wakes the loop for it, not a timeout per turn: every commit passes
        # here, and a turn a message or a proposal started needs no timer of its own.
        tick_timer: asyncio.TimerHandle | None = None

        def tick_due() -> None:
            nonlocal tick_timer
            tick_timer = None
            self._wakeup.set()

        try:
            while not self._stopping:
                if tick_timer is None:  # fired (maybe a little early: then it is set again) or a tick passed
                    tick_timer = loop.call_later(max(0.0, next_tick - time.monotonic()), tick_due)
                await self._wakeup.wait()
                self._wakeup.clear()
                self._drive_inputs(raft)
                await self.snapshotting.handle_events(raft)
                if time.monotonic() >= next_tick:
                    raft.tick()
                    next_tick = time.monotonic() + tick_interval
                    if tick_timer is not None:
                        tick_timer.cancel()
                        tick_timer = None
                    self.snapshotting.maybe_start(raft, self.queue)  # the interval trigger needs a clock
                while raft.has_ready():
                    await self._handle_ready(raft, raft.ready())
                self._observe_role(raft)
        finally:
            if tick_timer is not None:
                tick_timer.cancel()

    def _drive_inputs(self, raft: RaftNode) -> None:
        inbox, self._inbox = self._inbox, []
        for message in inbox:
            try:
                raft.step(message)
            except Exception as exc:  # a bad peer message must not stop the node
                log.warning("dropped message from %s: %s", getattr(message, "from_id", "?"), exc)
        proposals, self._proposals = self._proposals, []
        for data, future, command in proposals:
            if future.done():
                continue
            try:
                index, term = raft.propose(data)
            except NotLeader as exc:
                future.set_exception(NotLeaderError(exc.leader_id, self.leader_url()))
                continue
            except ProposalDropped:
                self.metrics.proposals_refused.inc()
                future.set_exception(Unavailable("replication is behind; too much uncommitted data"))
                continue
            self._pending[index] = _Pending(term, future, command if type(command) in _APPLIED_AS_PROPOSED else None,
                                            data)
        changes, self._changes = self._changes, []
        for change, future, wait_for_commit in changes:
            if future.done():
                continue
            try:
                outcome = change(raft)
            except NotLeader as exc:
                future.set_exception(NotLeaderError(exc.leader_id, self.leader_url()))
                continue
            except ChangeRefused as exc:
                future.set_exception(exc)
                continue
            if wait_for_commit:
                index, term = outcome
                self._pending[index] = _Pending(term, future)
            else:
                future.set_result(outcome)
        reads, self._reads = self._reads, []
        for future in reads:
            if future.done():
                continue
            read_id = next(self._read_ids)
            try:
                raft.read_index(read_id)
            except NotLeader as exc:
                future.set_exception(NotLeaderError(exc.leader_id, self.leader_url()))
                continue
            self._read_waiters[read_id] = future

    async def _handle_ready(self, raft: RaftNode, ready: Ready) -> None:
        """Carries out one Ready in the order `ready_handler` gives (the simulator's too)."""
        answered = False  # this Ready applied entries, which answers the requests waiting on them
        persisted: tuple[float, int] | None = None  # (seconds, entries), observed once the Ready is done
        for action in handle_ready(ready):
            if isinstance(action, InstallSnapshot):
                self.queue = await self.snapshotting.install(action.point)
                raft.restore_membership(
                    Membership.decode(self.queue.membership) if self.queue.membership is not None else None)
                self._notify_jobs_changed()
            elif isinstance(action, UseMembership):
                self._use_membership(action.membership)
            elif isinstance(action, Persist):
                started = time.perf_counter()
                if action.hard_state is None and \
                        sum(len(entry.data) for entry in action.entries) <= constants.PERSIST_INLINE_BYTES_MAX:
                    self._persist(action)  # the drive loop waits for the disk either way
                else:
                    await self._storage_threads.run(self._persist, action)
                # Observed at the end: a follower's answer goes out right after its sync.
                persisted = (time.perf_counter() - started, len(action.entries))
            elif isinstance(action, Send):
                if answered:
                    # A Send after Apply only tells followers the commit index: let the requests
                    # just answered write their responses first (one loop turn, no timer).
                    await asyncio.sleep(0)
                self._send(action.messages)
            elif isinstance(action, Apply):
                self._apply(action.entries)
                answered = True
                self.snapshotting.maybe_start(raft, self.queue)
                if self._leader_waiters and self.is_serving:  # a new leader applied its no-op
                    self._wake_leader_waiters()
            elif isinstance(action, ServeReads):
                for read_id, read_index in action.read_states:
                    future = self._read_waiters.pop(read_id, None)
                    if future is not None and not future.done():
                        self._applied_waiters.append((read_index, future))
            else:
                raft.advance(action.ready)
                self._settle_applied_waiters()
        if persisted is not None:
            self.metrics.observe_persist(*persisted)

    def _membership_at_snapshot(self) -> Membership:
        """The membership the recovered snapshot recorded; else, for a node joining a cluster,
        none (it waits to be added); else the one --peers bootstraps (all voters)."""
        return recovery.membership_at_start(self.queue.membership, joining=bool(self.config.join_url),
                                            founders={self.config.node_id: self.config.url, **self.config.peers})

    def _peer_urls(self, membership: Membership) -> dict[str, str]:
        """Where to send to each member but this node (learned URLs for senders outside it)."""
        urls = {node_id: url for node_id, url in self._learned_urls.items() if membership.get(node_id) is None}
        for member in membership.members:
            if member.node_id != self.config.node_id:
                urls[member.node_id] = member.url or self.config.peers.get(member.node_id, "")
        return {node_id: url for node_id, url in urls.items() if url}

    def learn_peer_url(self, node_id: str, url: str) -> None:
        """A peer request named its sender's URL: remember it for a sender outside the membership
        (see `_learned_urls`). The cluster secret has authenticated the request already."""
        raft = self.raft
        if raft is None or node_id == self.config.node_id or raft.membership.get(node_id) is not None \
                or self._learned_urls.get(node_id) == url or not url.startswith(("http://", "https://")):
            return
        if len(self._learned_urls) >= LEARNED_URLS_MAX:
            self._learned_urls.pop(next(iter(self._learned_urls)))
        self._learned_urls[node_id] = url
        self._use_peers(raft.membership)

    def _use_peers(self, membership: Membership) -> None:
        peers = self._peer_urls(membership)
        if self.transport is not None:
            self.transport.set_peers(peers)
        if self.snapshot_sender is not None:
            self.snapshot_sender.set_peers(peers)

    def _use_membership(self, membership: Membership) -> None:
        """A new membership is in effect (appended, truncated or restored): reach its members."""
        self._use_peers(membership)
        log.info("membership: voters %s, learners %s%s", ",".join(membership.voters) or "none",
                 ",".join(membership.learners) or "none",
                 "" if membership.get(self.config.node_id) else " (this node is not a member)")

    def _send(self, messages: Sequence[Message]) -> None:
        if self.transport is None:
            return
        snapshot_requests = [m for m in messages if m.type is MessageType.SNAP]
        if snapshot_requests:
            assert self.snapshot_sender is not None
            for message in snapshot_requests:
                self.snapshot_sender.request(message.to_id)
            messages = [m for m in messages if m.type is not MessageType.SNAP]
        raft = self.raft
        self.transport.send(messages, raft.appends_may_wait() if raft is not None else ())

    # ------------------------------------------------------------------ applying

    def _snapshot_received(self, leader: str, term: int, meta: SnapshotMeta) -> None:
        """The receiver holds a complete, verified snapshot file: let the core decide."""
        self._inbox.append(snapshot_stored(leader, self.config.node_id, term, SnapshotPoint(meta.index, meta.term)))
        self._wakeup.set()

    def _persist(self, persist: Persist) -> None:
        """The only code touching the WAL after start, one call at a time: on the loop for a
        small Ready, else in a worker thread (constants.PERSIST_INLINE_BYTES_MAX). The hard state
        is durable when save_hard_state returns; entries are synced whenever there are any."""
        wal = self.wal
        assert wal is not None
        if persist.hard_state is not None:
            wal.save_hard_state(persist.hard_state)
        if persist.entries:
            wal.append(persist.entries)
            wal.sync()

    def _stored_entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi read back from the WAL: the core's cold entries, which a follower that
        fell behind needs (raft/log.py, "Cold entries"). On the loop, like the small syncs: the
        drive loop is the WAL's only user, and these are recent records, in the page cache."""
        assert self.wal is not None
        entries = self.wal.entries(lo, hi + 1)
        self.metrics.log_entries_read_back_total.inc(len(entries))
        return entries

    def _apply(self, entries: Sequence[Entry]) -> None:
        changed = False
        self.snapshotting.note_applied(entries)
        for entry in entries:
            pending = self._pending.pop(entry.index, None)
            # The leader applies a submit or ack it proposed from the command itself when the entry
            # is the very bytes object it proposed (so their decode is that command); decoding a
            # 1,000-job submit again would cost the loop about a millisecond.
            known = pending.command if pending is not None and pending.data is entry.data else None
            result = self.queue.apply(entry, known)
            if isinstance(result, (Ticked, Released, Rejected)):
                self._log_housekeeping(entry, result)
            if pending is not None and not pending.future.done():
                if pending.term == entry.term:
                    pending.future.set_result(result)
                else:
                    pending.future.set_exception(ProposalLost("a new leader replaced the entry; retry"))
            changed = True
        if self.queue.metric_samples:
            samples, self.queue.metric_samples = self.queue.metric_samples, []
            self.metrics.observe_samples(samples)
            dead = Counter(queue for kind, queue, _ in samples if kind == "dead_lettered")
            for queue, count in sorted(dead.items()):
                log.info("%d jobs of queue %s dead-lettered", count, queue)
        if changed:
            self._notify_jobs_changed()

    def _notify_jobs_changed(self) -> None:
        changed, self._jobs_changed = self._jobs_changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    @staticmethod
    def _log_housekeeping(entry: Entry, result: Any) -> None:
        """Requeues and dead-letters the broker decided, one line per entry (never one per job)."""
        if isinstance(result, Ticked) and result.expired:
            log.info("entry %d: %d leases expired (requeued or dead-lettered)", entry.index, result.expired)
        elif isinstance(result, Released):
            log.warning("entry %d: lost worker's jobs released: %d requeued, %d dead-lettered",
                        entry.index, result.requeued, result.dead_lettered)
        elif isinstance(result, Rejected):
            log.error("entry %d is not a command this version understands: %s", entry.index, result.reason)

    def _settle_applied_waiters(self) -> None:
        if not self._applied_waiters:
            return
        applied = self.queue.last_applied
        still_waiting = []
        for index, future in self._applied_waiters:
            if future.done():
                continue
            if index <= applied:
                future.set_result(None)
            else:
                still_waiting.append((index, future))
        self._applied_waiters = still_waiting

    def _observe_role(self, raft: RaftNode) -> None:
        role, leader_id = raft.role, raft.leader_id
        if role == self._role and leader_id == self._leader_id:
            return
        was_leader = self._role == Role.LEADER
        if leader_id != self._leader_id and leader_id is not None:
            self.leader_changes_count += 1
        if was_leader and role != Role.LEADER:
            self._deposed_alone = leader_id is None
        elif leader_id is not None:
            self._deposed_alone = False
        self._role, self._leader_id = role, leader_id
        log.info("role %s, term %d, leader %s", role.name.lower(), raft.term, leader_id or "unknown")
        self._wake_leader_waiters()
        if was_leader and role != Role.LEADER:
            self._fail_waiters(NotLeaderError(leader_id, self.leader_url()))
        if role == Role.LEADER and not was_leader:
            self.clock.take_office()
            self.housekeeping.take_office()

    def _fail_waiters(self, error: Exception) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        for future in self._read_waiters.values():
            if not future.done():
                future.set_exception(error)
        self._read_waiters.clear()
        for _, future in self._applied_waiters:
            if not future.done():
                future.set_exception(error)
        self._applied_waiters.clear()
        for _, future, _ in self._proposals:
            if not future.done():
                future.set_exception(error)
        self._proposals.clear()

    async def _watch_loop_lag(self) -> None:
        interval_s = node_metrics.LOOP_LAG_SAMPLE_S
        while not self._stopping:
            started = time.monotonic()
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            self.metrics.observe_loop_lag(now, max(0.0, now - started - interval_s))
