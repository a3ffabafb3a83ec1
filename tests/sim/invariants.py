"""Safety invariants the simulator checks after every step (STYLE §11.3, REPLICATION.md §3.1).

- Election safety (Raft §5.2): at most one leader per term, ever (crashed nodes' past included),
  and each node grants at most one vote per term, across restarts (watched on the vote answers
  the shells send, so a vote forgotten by a crash shows even when no second leader results).
- Log matching (Raft §5.3): two logs holding an entry with the same index and term hold the same
  entries up to it. Checked on the shells' written logs (the core's log once its Ready is handled)
  wherever they overlap: a log that starts past 1 (compacted, or reset by an installed snapshot)
  carries the chain hash at its start, so the comparison still covers the compacted prefix.
- Committed entries are immutable (Raft §5.4, Leader Completeness + State Machine Safety): every
  entry applied by any node goes into one ledger (index -> entry); any later apply of that index,
  by any node or incarnation, must carry the same entry. A node whose commit index is c holds the
  ledger's entries up to c (in its log, or under the chain value its log starts from). Every
  ledger entry is durable on a majority, so no combination of crashes can lose it: in the node's
  newest snapshot, or in the synced log that a restart would keep after that snapshot
  (`storage.log_continues`).
- Snapshots (Raft §7) hold committed state: a snapshot's chain hash is the ledger's at its index,
  and its state is the one every replica had there: the digest of a snapshot taken, and of a state
  machine restored from one (installed from a leader, or at a restart), equals the digest recorded
  for that applied index (`digests`, kept for every index some node finished a batch at; a
  snapshot is only taken at such an index, so the index is always known).
- Leader Completeness (Raft §5.4): a node that becomes leader in a term higher than every term
  that existed when an entry was first applied holds that entry.
- A leader advances its commit index only to an entry of its own term (Raft §5.4.2, Figure 8);
  earlier entries are committed implicitly. Observed from outside: while a node leads one term,
  every commit index it reaches names an entry of that term.
- Replicas apply the same sequence: the same result at every index on every replica, and equal
  `QueueStateMachine.digest()` at equal `last_applied`.
- Leases: at most one live lease per job. A model of lease ownership replays the committed ledger
  (grant, ack, fail, extend, tick expiry, worker lost, cancel, renew) independently of the state
  machine's code: a grant while the model still holds a lease on that job, a fencing token that does
  not increase, or an ack/fail/extend accepted on a foreign or expired lease is a violation.
- Per replica: a job leased to two workers; the state machine's own `check_invariants()`.

A violation raises `Violation`; the simulator turns it into a failing seed with its replay command.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue.commands import CommandDecodeError, decode_command
from raftq.cluster.queue import results as res
from raftq.cluster.raft.membership import Membership
from raftq.cluster.raft.messages import Entry, EntryKind

from .storage import ChainedLog, SimStorage, StoredSnapshot, agreement, log_continues

__all__ = ["Violation", "Checker", "LeaseModel"]


class Violation(AssertionError):
    """Raised when a safety invariant breaks. `invariant` names it; the message says how."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


def describe_entry(entry: Entry) -> str:
    if entry.kind == EntryKind.NOOP:
        return f"{entry.index}/{entry.term} NOOP"
    try:
        command = decode_command(entry.data)
    except CommandDecodeError:
        return f"{entry.index}/{entry.term} <{len(entry.data)} bytes, not a command>"
    return f"{entry.index}/{entry.term} {describe_command(command)}"


def describe_command(command: Any) -> str:
    name = type(command).__name__
    if isinstance(command, cmds.Submit):
        return f"Submit({command.queue}: {','.join(j.id for j in command.jobs)} now={command.now_ms})"
    if isinstance(command, cmds.Lease):
        return f"Lease({command.worker} {','.join(command.queues)} max={command.max_jobs} now={command.now_ms})"
    if isinstance(command, (cmds.Ack, cmds.Fail, cmds.Extend)):
        items = ",".join(f"{i.id}#{i.lease_token}" for i in command.items)
        return f"{name}({command.worker} {items} now={command.now_ms})"
    if isinstance(command, cmds.WorkerLost):
        return f"WorkerLost({command.worker} now={command.now_ms})"
    if isinstance(command, cmds.Cancel):
        return f"Cancel({command.id} now={command.now_ms})"
    return f"{name}(now={command.now_ms})"


# ---------------------------------------------------------------------- lease model


@dataclass(slots=True)
class _Hold:
    token: int
    worker: str
    expires_at_ms: int
    index: int  # ledger index of the grant


class LeaseModel:
    """Lease ownership replayed from the committed ledger, independent of the state machine."""

    def __init__(self) -> None:
        self.lease_ms: dict[str, int] = {}  # job id -> lease_ms of each attempt (its Submit, else its first grant)
        self.holds: dict[str, _Hold] = {}  # job id -> the lease the model says is live
        self.done_token: dict[str, int] = {}  # job id -> token of the lease whose ack finished it
        self.last_token = 0
        self.grants_count = 0

    def apply(self, index: int, command: Any, result: Any, clock_ms: int) -> None:
        """Replays one committed command; raises Violation when the result breaks lease rules."""
        if isinstance(command, cmds.Submit):
            if isinstance(result, res.Submitted):
                for job, created in zip(command.jobs, result.created):
                    if created:
                        self.lease_ms[job.id] = job.lease_ms
        elif isinstance(command, cmds.Lease):
            for job in getattr(result, "jobs", ()):
                self._grant(index, command, job, clock_ms)
        elif isinstance(command, (cmds.Ack, cmds.Fail, cmds.Extend)):
            outcomes = getattr(result, "outcomes", ())
            for item, outcome in zip(command.items, outcomes):
                if not isinstance(outcome, res.ItemError):
                    self._accepted(index, command, item, outcome, clock_ms)
        elif isinstance(command, cmds.Tick):
            for job_id in [j for j, hold in self.holds.items() if hold.expires_at_ms <= clock_ms]:
                del self.holds[job_id]
        elif isinstance(command, cmds.WorkerLost):
            for job_id in [j for j, hold in self.holds.items() if hold.worker == command.worker]:
                del self.holds[job_id]
        elif isinstance(command, cmds.RenewLeases):
            for job_id, hold in self.holds.items():
                hold.expires_at_ms = max(hold.expires_at_ms, clock_ms + self.lease_ms.get(job_id, 0))
        elif isinstance(command, cmds.Cancel):
            if not isinstance(result, res.ItemError):
                self.holds.pop(command.id, None)

    def _grant(self, index: int, command: cmds.Lease, job: res.JobGrant, clock_ms: int) -> None:
        self.grants_count += 1
        if job.lease_token <= self.last_token:
            raise Violation("fencing tokens increase", f"index {index} granted token {job.lease_token} "
                            f"for {job.id} after token {self.last_token}")
        self.last_token = job.lease_token
        held = self.holds.get(job.id)
        if held is not None:
            raise Violation(
                "at most one live lease per job",
                f"index {index} leased {job.id} to {command.worker} (token {job.lease_token}, clock {clock_ms}) "
                f"while token {held.token} of {held.worker} (granted at index {held.index}) lives until "
                f"{held.expires_at_ms} and was never acked, failed, expired by a Tick or released",
            )
        expected = clock_ms + self.lease_ms.get(job.id, job.lease_expires_at_ms - clock_ms)
        if job.lease_expires_at_ms != expected:
            raise Violation("lease expiry", f"index {index} leased {job.id} until {job.lease_expires_at_ms}, "
                            f"expected clock {clock_ms} + lease_ms = {expected}")
        # A job the model saw no Submit of (a schedule created it) tells its lease length at its
        # first grant; RenewLeases renews by it.
        self.lease_ms.setdefault(job.id, job.lease_expires_at_ms - clock_ms)
        self.holds[job.id] = _Hold(job.lease_token, command.worker, job.lease_expires_at_ms, index)

    def _accepted(self, index: int, command: Any, item: Any, outcome: Any, clock_ms: int) -> None:
        name = type(command).__name__
        if isinstance(command, cmds.Ack) and self.done_token.get(item.id) == item.lease_token:
            return  # a repeated ack of the lease that finished the job: answered OK, no change
        held = self.holds.get(item.id)
        if held is None or held.token != item.lease_token or held.worker != command.worker:
            raise Violation(
                "no ack on a foreign lease",
                f"index {index} accepted {name} of {item.id} with token {item.lease_token} from {command.worker}; "
                f"the live lease is {held}",
            )
        if clock_ms >= held.expires_at_ms:
            raise Violation("no ack on an expired lease", f"index {index} accepted {name} of {item.id} "
                            f"token {item.lease_token} at clock {clock_ms} >= expiry {held.expires_at_ms}")
        if isinstance(command, cmds.Extend):
            if not isinstance(outcome, res.Extended) or outcome.expires_at_ms != clock_ms + item.lease_ms:
                raise Violation("lease expiry", f"index {index} extend of {item.id} answered {outcome}, "
                                f"expected expiry {clock_ms + item.lease_ms}")
            held.expires_at_ms = outcome.expires_at_ms
            return
        del self.holds[item.id]
        if isinstance(command, cmds.Ack):
            self.done_token[item.id] = item.lease_token


# ---------------------------------------------------------------------- the checker


class Checker:
    """Holds what every node was ever seen to do and checks it against the invariants.

    Args:
        node_ids: every node.
    """

    def __init__(self, node_ids: Sequence[str]) -> None:
        self.node_ids = tuple(node_ids)
        self.quorum = len(node_ids) // 2 + 1
        self.leaders_by_term: dict[int, str] = {}
        self.votes: dict[tuple[str, int], str] = {}  # (voter, term) -> candidate granted
        self.ledger = ChainedLog()  # every entry applied by some node, in index order
        self.results: list[Any] = []  # the apply result at each ledger index
        self.clocks: list[int] = []  # the state machine clock after each ledger index
        self.digests: dict[int, tuple[str, str]] = {}  # last_applied -> (digest, first node)
        self.leases = LeaseModel()
        from .flow_model import FlowModel  # it raises this module's Violation

        self.flow = FlowModel()
        self.commands_count: dict[str, int] = {}
        # term_bounds[i]: a term >= the term of the leader that committed ledger entry i + 1 (the
        # highest term any node had when it was first applied; never decreasing).
        self.term_bounds: list[int] = []
        self._completeness_checked: dict[tuple[str, int], None] = {}  # (node, term) already checked
        self._leader_commits: dict[str, tuple[int, int, int]] = {}  # node -> (incarnation, term, commit)
        #: (index, membership) of each CONFIG entry in the ledger, in order
        self.memberships: list[tuple[int, Membership]] = []

    # ------------------------------------------------------------------ election safety

    def committed_membership(self, founders: Sequence[str]) -> Membership:
        """The membership of the newest CONFIG entry applied anywhere (the founders before one)."""
        return self.memberships[-1][1] if self.memberships else Membership.of_voters({n: "" for n in founders})

    @staticmethod
    def check_leader_memberships(memberships: dict[str, Membership]) -> None:
        """Nodes that lead at the same time (in different terms) must have overlapping majorities:
        two disjoint majorities could commit different entries at one index."""
        names = sorted(memberships)
        for position, a in enumerate(names):
            for b in names[position + 1:]:
                if disjoint_majorities_possible(memberships[a].voters, memberships[b].voters):
                    raise Violation("no two disjoint majorities",
                                    f"leaders {a} (voters {memberships[a].voters}) and {b} (voters "
                                    f"{memberships[b].voters}) could each commit with a majority of its own")

    def observe_leader(self, node_id: str, term: int) -> bool:
        """Records that node_id is leader of term. Returns True the first time for that term."""
        known = self.leaders_by_term.get(term)
        if known is None:
            self.leaders_by_term[term] = node_id
            return True
        if known != node_id:
            raise Violation("at most one leader per term", f"term {term} has leaders {known} and {node_id}")
        return False

    def observe_vote(self, voter: str, term: int, candidate: str) -> None:
        """Records a granted (real, not pre-) vote that a shell sent."""
        known = self.votes.setdefault((voter, term), candidate)
        if known != candidate:
            raise Violation("one vote per term", f"{voter} granted its term-{term} vote to {known} and to {candidate}")

    # ------------------------------------------------------------------ apply

    def on_apply(self, node_id: str, entry: Entry, result: Any, clock_ms: int, term_bound: int) -> None:
        """One committed entry applied by node_id (any incarnation); term_bound is the highest
        term of any node that is up."""
        index = entry.index
        known_count = self.ledger.last_index
        if index <= known_count:
            known = self.ledger.entry(index)
            if known != entry:
                raise Violation(
                    "committed entries never change",
                    f"{node_id} applied {describe_entry(entry)} but index {index} was applied before as "
                    f"{describe_entry(known)}",
                )
            if self.results[index - 1] != result:
                raise Violation(
                    "replicas apply the same sequence",
                    f"{node_id} got {result!r} at index {index}; the first replica got {self.results[index - 1]!r}",
                )
            if self.clocks[index - 1] != clock_ms:
                raise Violation("replicas apply the same sequence",
                                f"{node_id} clock {clock_ms} after index {index}, first replica {self.clocks[index - 1]}")
            return
        if index != known_count + 1:
            raise Violation("entries apply in order", f"{node_id} applied {index} but the ledger ends at {known_count}")
        self.ledger.append((entry,))
        self.results.append(result)
        self.clocks.append(clock_ms)
        self.term_bounds.append(max(term_bound, self.term_bounds[-1] if self.term_bounds else 0))
        if entry.kind == EntryKind.CONFIG:
            self._on_config(entry)
        elif entry.kind != EntryKind.NOOP:
            try:
                command = decode_command(entry.data)
            except CommandDecodeError:
                command = None
            if command is not None:
                name = type(command).__name__
                self.commands_count[name] = self.commands_count.get(name, 0) + 1
                self.flow.apply(index, command, result, clock_ms, self.leases.holds)
                self.leases.apply(index, command, result, clock_ms)

    def _on_config(self, entry: Entry) -> None:
        """One server at a time (thesis §4.1): a committed membership differs from the one before
        it by at most one voter, and ids removed stay removed."""
        membership = Membership.decode(entry.data)
        if self.memberships:
            before = self.memberships[-1][1]
            changed = set(before.voters) ^ set(membership.voters)
            if len(changed) > 1 or len(set(before.ids) ^ set(membership.ids)) > 1:
                raise Violation("one server at a time",
                                f"entry {entry.index}: voters {before.voters} -> {membership.voters}, "
                                f"members {before.ids} -> {membership.ids}")
            if set(before.removed) - set(membership.removed) or set(membership.ids) & set(before.removed):
                raise Violation("removed ids stay removed", f"entry {entry.index}: {before} -> {membership}")
        self.memberships.append((entry.index, membership))


    def on_applied_batch(self, node_id: str, last_applied: int, digest: str) -> None:
        """A node finished applying a Ready's committed entries; its state digest at last_applied."""
        known = self.digests.get(last_applied)
        if known is None:
            self.digests[last_applied] = (digest, node_id)
        elif known[0] != digest:
            raise Violation(
                "replicas apply the same sequence",
                f"state digest of {node_id} at last_applied {last_applied} is {digest[:12]}, "
                f"{known[1]} had {known[0][:12]}",
            )

    def on_snapshot_taken(self, node_id: str, snapshot: StoredSnapshot) -> None:
        """node_id wrote a snapshot of its state machine at snapshot.index (from its log's chain there)."""
        self.on_applied_batch(node_id, snapshot.index, hashlib.sha256(snapshot.data).hexdigest())
        self._check_snapshot_chain(node_id, snapshot, "took")

    def _check_snapshot_chain(self, node_id: str, snapshot: StoredSnapshot, how: str) -> None:
        if snapshot.index > self.ledger.last_index or self.ledger.hash_at(snapshot.index) != snapshot.chain:
            raise Violation("snapshots hold committed entries",
                            f"{node_id} {how} snapshot {snapshot.describe()}, whose log prefix is not the committed "
                            f"one (the ledger ends at {self.ledger.last_index})")

    def check_restored(self, node_id: str, index: int, digest: str, how: str) -> None:
        """node_id's state machine was just restored from a snapshot at index (installed from a
        leader, or at a restart): it must be the state the replicas had at that index."""
        known = self.digests.get(index)
        if known is None:
            raise Violation("a restored snapshot is the replicas' state",
                            f"{node_id} {how} at {index}, an index no replica was seen to reach")
        if known[0] != digest:
            raise Violation("a restored snapshot is the replicas' state",
                            f"{node_id} {how} at {index}: state digest {digest[:12]}, but {known[1]} had "
                            f"{known[0][:12]} at that index")

    def check_leader(self, node_id: str, incarnation: int, term: int, commit: int, view: ChainedLog) -> None:
        """Leader Completeness and own-term commits, for a node that leads `term` (at a step end,
        when its written log is its whole log)."""
        if (node_id, term) not in self._completeness_checked:
            self._completeness_checked[(node_id, term)] = None
            required = bisect.bisect_left(self.term_bounds, term)  # entries committed in lower terms
            # The chain at the log's start covers its compacted prefix, so check there at least.
            at = max(required, view.base)
            if required and (view.last_index < required or view.hash_at(at) != self.ledger.hash_at(at)):
                raise Violation(
                    "leader completeness",
                    f"{node_id} leads term {term} but {self._divergence(view)} (entries up to {required} "
                    f"were committed in terms below {term})",
                )
        before = self._leader_commits.get(node_id)
        self._leader_commits[node_id] = (incarnation, term, commit)
        if before is None or before[:2] != (incarnation, term) or commit <= before[2]:
            return
        commit_term = view.term(commit)  # commit >= view.base: the base's term is known
        if commit_term != term:
            raise Violation(
                "a leader commits only entries of its own term",
                f"{node_id}, leader of term {term}, moved its commit index {before[2]} -> {commit}, "
                f"an entry of term {commit_term} (Raft §5.4.2, Figure 8)",
            )

    def forget_leader(self, node_id: str) -> None:
        self._leader_commits.pop(node_id, None)

    @staticmethod
    def check_replica_leases(node_id: str, leased_by_worker: dict[str, list[str]]) -> None:
        owner: dict[str, str] = {}
        for worker, job_ids in leased_by_worker.items():
            for job_id in job_ids:
                if job_id in owner:
                    raise Violation("at most one live lease per job",
                                    f"{node_id}: job {job_id} leased to {owner[job_id]} and {worker}")
                owner[job_id] = worker

    # ------------------------------------------------------------------ logs

    def check_logs(self, views: dict[str, ChainedLog], commits: dict[str, int],
                   storages: dict[str, SimStorage], *, voter_sets: list[tuple[str, ...]] | None = None) -> None:
        """Log matching between live logs, committed prefixes, and durability of the ledger.

        Args:
            views: node -> its written log, for nodes that are up (the core's log after its Readys).
            commits: node -> its core's commit index, for nodes that are up.
            storages: node -> its disk, for every node (up or down): synced log and snapshots.
            voter_sets: with membership changes, the voter sets the newest committed entry may
                have been committed under (it must be durable on a majority of one of them);
                None: every node votes.
        """
        names = sorted(views)
        for position, a in enumerate(names):
            for b in names[position + 1 :]:
                self._check_matching(a, views[a], b, views[b])
        ledger = self.ledger
        for node_id in names:
            view = views[node_id]
            k = min(commits[node_id], view.last_index, ledger.last_index)
            if k and view.hash_at(k) != ledger.hash_at(k):
                raise Violation("committed entries never change",
                                f"{node_id} has commit index {commits[node_id]} but {self._divergence(view)}")
        if not ledger.last_index:
            return
        prefixes = {n: self._durable_prefix(n, storages[n]) for n in self.node_ids}
        durable_majority = max(
            sorted((prefixes[n] for n in voters), reverse=True)[len(voters) // 2]
            for voters in (voter_sets or [self.node_ids]) if voters)
        if durable_majority < ledger.last_index:
            holders = [n for n in self.node_ids if prefixes[n] > durable_majority]
            raise Violation(
                "committed entries are durable on a majority",
                f"entry {describe_entry(ledger.entry(durable_majority + 1))} was applied, but only "
                f"{holders} hold it in synced storage (quorum {self.quorum}; durable prefixes {prefixes})",
            )

    def _durable_prefix(self, node_id: str, storage: SimStorage) -> int:
        """How many ledger entries node_id would hold after a crash now: its newest snapshot, plus
        the synced log if a restart keeps it (it continues the snapshot)."""
        log = storage.durable
        snapshot = storage.newest_snapshot
        if snapshot is None:
            assert log.base == 0, f"{node_id}'s log starts at {log.base + 1} without a snapshot"
            return agreement(log, self.ledger) or 0
        self._check_snapshot_chain(node_id, snapshot, "holds")
        if not log_continues(log, snapshot):
            return snapshot.index
        k = agreement(log, self.ledger)
        if k is None or k < snapshot.index:
            raise Violation("log matching", f"{node_id}'s synced log holds {snapshot.index}/{snapshot.term} like its "
                            f"snapshot, but other entries up to it: {self._divergence(log)}")
        return k

    def _divergence(self, log: ChainedLog) -> str:
        """Where `log` first differs from the ledger, in words."""
        ledger = self.ledger
        k = agreement(log, ledger)
        if k is None:
            return (f"its log {log.base + 1}..{log.last_index} starts past the committed entries "
                    f"(1..{ledger.last_index})")
        if k < log.base:
            return (f"its log, which starts after {log.base}/{log.base_term}, differs from the committed entries at "
                    f"or before that point (the chain hash there)")
        at = k + 1
        mine = describe_entry(log.entry(at)) if at <= log.last_index else "nothing"
        committed = describe_entry(ledger.entry(at)) if at <= ledger.last_index else "nothing"
        return f"it holds {mine} at index {at}, where {committed} was committed"

    @staticmethod
    def _check_matching(a: str, log_a: ChainedLog, b: str, log_b: ChainedLog) -> None:
        agree = agreement(log_a, log_b)
        if agree is None:
            return  # one log ends before the other starts: nothing to compare
        # Above the agreement point the logs must differ in term at every index both know (a
        # log's start counts: its base term is known).
        top = min(log_a.last_index, log_b.last_index)
        for index in range(agree + 1, top + 1):
            term = log_a.term(index)
            if term == log_b.term(index):
                raise Violation(
                    "log matching",
                    f"{a} and {b} both hold term {term} at index {index} but differ at or before index "
                    f"{agree + 1}: {_describe_at(log_a, agree + 1)} vs {_describe_at(log_b, agree + 1)}",
                )


def disjoint_majorities_possible(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether a majority of voters a and a majority of voters b can have no member in common."""
    only_a, only_b, shared = set(a) - set(b), set(b) - set(a), set(a) & set(b)
    return max(0, len(a) // 2 + 1 - len(only_a)) + max(0, len(b) // 2 + 1 - len(only_b)) <= len(shared)


def _describe_at(log: ChainedLog, index: int) -> str:
    if index == log.base:
        return f"{index}/{log.base_term} (the log's start, compacted)"
    if log.base < index <= log.last_index:
        return describe_entry(log.entry(index))
    return "nothing"
