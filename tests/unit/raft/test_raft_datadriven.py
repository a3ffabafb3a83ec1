"""Data-driven Raft interaction tests: tests/testdata/raft/*.txt (etcd interaction_test.go idea).

Each file drives an in-memory cluster of RaftNodes through directives (see RaftEnv's handlers,
each with an Example) and compares the printed activity with the expected output. Run with
`--rewrite` to regenerate, then review the diff like code.

The environment plays the shell exactly as the contract says: persist hard state and entries,
then put messages on the network, then apply committed entries, then advance. It also checks
safety after every directive: at most one leader per term, and an applied index never gets two
different entries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from raftq.cluster.raft.errors import RaftError
from raftq.cluster.raft.messages import Entry, EntryKind, HardState, Message, MessageType
from raftq.cluster.raft.node import RaftConfig, RaftNode, Ready, Role
from tests.datadriven import TestCase, run_file

TESTDATA = Path(__file__).resolve().parents[2] / "testdata" / "raft"


# ---------------------------------------------------------------------- rendering

def fmt_entry(entry: Entry) -> str:
    if entry.kind is EntryKind.NOOP:
        return f"{entry.index}/{entry.term} NOOP"
    text = entry.data.decode("ascii", "replace") if entry.data.isascii() else entry.data.hex()
    return f"{entry.index}/{entry.term} {text!r}"


def fmt_entries(entries: tuple[Entry, ...] | list[Entry]) -> str:
    if len(entries) > 6:  # long batches: first two, count, last
        head = f"{fmt_entry(entries[0])}, {fmt_entry(entries[1])}"
        return f"{head}, ... ({len(entries) - 3} more), {fmt_entry(entries[-1])}"
    return ", ".join(fmt_entry(e) for e in entries)


def fmt_message(m: Message) -> str:
    head = f"{m.from_id}->{m.to_id} {m.type.name} term={m.term}"
    t = m.type
    if t in (MessageType.VOTE, MessageType.PRE_VOTE):
        body = f" last={m.index}/{m.log_term}"
    elif t is MessageType.APP:
        body = f" prev={m.index}/{m.log_term} commit={m.commit}"
        body += f" entries=[{fmt_entries(m.entries)}]" if m.entries else ""
    elif t is MessageType.APP_RESP:
        outcome = f" reject hint={m.reject_hint}/{m.hint_term}" if m.reject else f" commit={m.commit}"
        body = f" index={m.index}{outcome}"
    elif t is MessageType.HEARTBEAT:
        body = f" commit={m.commit}"
    else:
        body = " reject" if m.reject else ""
    if m.context is not None:
        body += f" ctx={m.context}"
    return head + body


def fmt_node(node: RaftNode) -> str:
    return (f"{node.node_id}: {node.role.name} term={node.term} lead={node.leader_id} vote={node.voted_for} "
            f"commit={node.commit_index} applied={node.applied_index} last={node.last_index}")


# ---------------------------------------------------------------------- the environment

@dataclass
class Disk:
    """What one node has persisted (a perfect disk: everything written survives a restart)."""

    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)

    def save(self, ready: Ready) -> None:
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state
        if ready.entries:
            first = ready.entries[0].index
            assert first <= len(self.entries) + 1, f"gap: writing {first} after {len(self.entries)}"
            del self.entries[first - 1:]
            self.entries.extend(ready.entries)


class RaftEnv:
    """An in-memory cluster driven one directive at a time."""

    def __init__(self) -> None:
        self.nodes: dict[str, RaftNode] = {}
        self.configs: dict[str, RaftConfig] = {}
        self.disks: dict[str, Disk] = {}
        self.rngs: dict[str, random.Random] = {}
        self.network: list[Message] = []
        self.cut: set[frozenset[str]] = set()
        self.verbose = True
        self.out: list[str] = []
        self.seen_state: dict[str, tuple] = {}
        self.leaders_by_term: dict[int, str] = {}
        self.applied_by_index: dict[int, Entry] = {}

    def handle(self, case: TestCase) -> str:
        self.out = []
        handler: Callable[[TestCase], None] | None = getattr(self, "do_" + case.directive.replace("-", "_"), None)
        assert handler is not None, f"{case.where()}: unknown directive {case.directive!r}"
        handler(case)
        self.check_safety()
        return "\n".join(self.out)

    # -------------------------------------------------------------- output helpers

    def log(self, line: str) -> None:
        if self.verbose:
            self.out.append(line)

    def report_changes(self) -> None:
        for node_id, node in self.nodes.items():
            state = (node.role, node.term, node.leader_id)
            if self.seen_state.get(node_id) != state:
                self.seen_state[node_id] = state
                self.log(f"  {node_id} is {node.role.name} term={node.term} lead={node.leader_id}")

    def check_safety(self) -> None:
        for node_id, node in self.nodes.items():
            if node.role is Role.LEADER:
                other = self.leaders_by_term.setdefault(node.term, node_id)
                assert other == node_id, f"two leaders in term {node.term}: {other} and {node_id}"

    def node_ids(self, case: TestCase) -> list[str]:
        words = [w for w in case.words() if w in self.nodes]
        return words or list(self.nodes)

    # -------------------------------------------------------------- setup

    def do_log_level(self, case: TestCase) -> None:
        # Example: `log-level none` silences activity (setup); `log-level info` turns it back on.
        self.verbose = case.words()[0] != "none"

    def do_add_nodes(self, case: TestCase) -> None:
        # Example: `add-nodes 3 prevote=true checkquorum=true election=10 heartbeat=1 seed=1`
        # creates n1..n3, empty logs. Other knobs: max-entries= max-bytes= inflight= max-uncommitted=.
        count = int(case.words()[0])
        ids = [f"n{i}" for i in range(1, count + 1)]
        for node_id in ids:
            config = RaftConfig(
                node_id=node_id, peer_ids=tuple(p for p in ids if p != node_id),
                election_ticks=int(case.arg("election", "10")), heartbeat_ticks=int(case.arg("heartbeat", "1")),
                pre_vote=case.arg("prevote", "true") == "true", check_quorum=case.arg("checkquorum", "true") == "true",
                max_entries_per_append=int(case.arg("max-entries", "512")),
                max_append_bytes=int(case.arg("max-bytes", str(1 << 20))),
                max_inflight_appends=int(case.arg("inflight", "64")),
                max_uncommitted_bytes=int(case.arg("max-uncommitted", str(64 << 20))),
            )
            self.configs[node_id] = config
            self.disks[node_id] = Disk()
            self.rngs[node_id] = random.Random(f"{case.arg('seed', '1')}-{node_id}")
            self.start(node_id)
        self.report_changes()

    def start(self, node_id: str) -> None:
        disk = self.disks[node_id]
        self.nodes[node_id] = RaftNode(self.configs[node_id], hard_state=disk.hard_state,
                                       entries=list(disk.entries), rng=self.rngs[node_id])

    def do_restart(self, case: TestCase) -> None:
        # Example: `restart n1` crashes n1 (losing volatile state: commit, unsent messages) and
        # starts it again from its disk.
        for node_id in self.node_ids(case):
            self.start(node_id)
            self.log(f"  {node_id} restarted: {fmt_node(self.nodes[node_id])}")
        self.report_changes()

    # -------------------------------------------------------------- time

    def do_tick(self, case: TestCase) -> None:
        # Example: `tick n1 count=3` ticks n1 three times.
        for node_id in self.node_ids(case):
            for _ in range(int(case.arg("count", "1"))):
                self.nodes[node_id].tick()
        self.report_changes()

    def do_tick_election(self, case: TestCase) -> None:
        # Example: `tick-election n3` ticks n3 until its election timer fires: a follower or
        # candidate campaigns, a leader runs its check-quorum.
        for node_id in self.node_ids(case):
            node = self.nodes[node_id]
            for _ in range(node.election_ticks_remaining):
                node.tick()
        self.report_changes()

    def do_campaign(self, case: TestCase) -> None:
        # Example: `campaign n1` makes n1 campaign now (its election timer fires).
        for node_id in self.node_ids(case):
            assert self.nodes[node_id].role is not Role.LEADER, f"{node_id} is the leader"
        self.do_tick_election(case)

    def do_tick_heartbeat(self, case: TestCase) -> None:
        # Example: `tick-heartbeat n1` ticks n1 heartbeat_ticks times (a leader then heartbeats).
        for node_id in self.node_ids(case):
            for _ in range(self.configs[node_id].heartbeat_ticks):
                self.nodes[node_id].tick()
        self.report_changes()

    # -------------------------------------------------------------- client requests

    def do_propose(self, case: TestCase) -> None:
        # Example: `propose n1 v1` proposes b"v1" on n1; `propose n1 w count=20` proposes w1..w20.
        node_id, data = case.words()[0], case.words()[1]
        count = case.arg("count")
        payloads = [data] if count is None else [f"{data}{i}" for i in range(1, int(count) + 1)]
        placed = []
        for payload in payloads:
            try:
                placed.append(self.nodes[node_id].propose(payload.encode()))
            except RaftError as exc:
                self.out.append(f"error: {type(exc).__name__}: {exc}")
                return
        first, last = placed[0], placed[-1]
        span = f"{first[0]}" if first == last else f"{first[0]}..{last[0]}"
        self.out.append(f"index={span} term={last[1]}")

    def do_read_index(self, case: TestCase) -> None:
        # Example: `read-index n1 ctx=7` asks n1 for a read point; it shows up as a read state.
        node_id = case.words()[0]
        try:
            self.nodes[node_id].read_index(int(case.arg("ctx", "1")))
        except RaftError as exc:
            self.out.append(f"error: {type(exc).__name__}: {exc}")

    # -------------------------------------------------------------- the shell

    def do_process_ready(self, case: TestCase) -> None:
        # Example: `process-ready n1 n2` persists, sends, applies and advances one Ready of each.
        for node_id in self.node_ids(case):
            self.process_ready(node_id)
        self.report_changes()

    def process_ready(self, node_id: str) -> bool:
        node = self.nodes[node_id]
        if not node.has_ready():
            return False
        ready = node.ready()
        self.log(f"> {node_id} handling Ready")
        self.disks[node_id].save(ready)  # 1. persist before anything leaves the node
        if ready.hard_state is not None:
            self.log(f"  hard_state term={ready.hard_state.term} vote={ready.hard_state.voted_for}")
        if ready.entries:
            self.log(f"  entries: {fmt_entries(ready.entries)}")
        if ready.committed_entries:
            self.log(f"  committed: {fmt_entries(ready.committed_entries)}")
            self.check_applied(ready.committed_entries, node)
        for context, index in ready.read_states:
            self.log(f"  read_state ctx={context} index={index}")
        if ready.messages:
            self.log("  messages:")
            for message in ready.messages:
                self.log(f"    {fmt_message(message)}")
            self.network.extend(ready.messages)  # 2. then send
        node.advance(ready)  # 3. apply happened above (check_applied); 4. advance
        return True

    def check_applied(self, entries: tuple[Entry, ...], node: RaftNode) -> None:
        assert entries[0].index == node.applied_index + 1, "committed entries must follow the applied index"
        for entry in entries:
            assert entry.index <= len(self.disks[node.node_id].entries), "applied before persisted"
            first = self.applied_by_index.setdefault(entry.index, entry)
            assert first == entry, f"index {entry.index} applied as {first} and as {entry}"

    def do_deliver_msgs(self, case: TestCase) -> None:
        # Example: `deliver-msgs n2` delivers the messages in flight to n2 (all nodes if none is
        # named); `deliver-msgs drop=(n2,n3)` loses the messages in flight to n2 and n3.
        drop = set(case.vals("drop"))
        if drop:
            kept = []
            for message in self.network:
                if message.to_id in drop:
                    self.log(f"  dropped {fmt_message(message)}")
                else:
                    kept.append(message)
            self.network = kept
            return
        self.deliver(set(self.node_ids(case)))
        self.report_changes()

    def do_duplicate_msgs(self, case: TestCase) -> None:
        # Example: `duplicate-msgs n2` puts a second copy of every message in flight to n2 right
        # after the first (the HTTP transport may deliver a message twice).
        targets = set(self.node_ids(case))
        doubled = []
        for message in self.network:
            doubled.append(message)
            if message.to_id in targets:
                doubled.append(message)
        self.network = doubled

    def do_reorder_msgs(self, case: TestCase) -> None:
        # Example: `reorder-msgs n2` reverses the order of the messages in flight to n2 (requests
        # on different HTTP connections may overtake each other).
        targets = set(self.node_ids(case))
        picked = [m for m in self.network if m.to_id in targets][::-1]
        self.network = [picked.pop(0) if m.to_id in targets else m for m in self.network]

    def deliver(self, targets: set[str]) -> bool:
        batch = [m for m in self.network if m.to_id in targets]
        self.network = [m for m in self.network if m.to_id not in targets]
        for message in batch:
            if frozenset((message.from_id, message.to_id)) in self.cut:
                self.log(f"  dropped {fmt_message(message)} (partitioned)")
                continue
            self.log(f"> {message.to_id} receiving {fmt_message(message)}")
            self.nodes[message.to_id].step(message)
        return bool(batch)

    def do_stabilize(self, case: TestCase) -> None:
        # Example: `stabilize` handles Readys and delivers messages until nothing moves;
        # `stabilize n1 n2` only involves those nodes (messages to others stay in flight).
        targets = self.node_ids(case)
        for _ in range(1000):
            progressed = False
            for node_id in targets:
                progressed |= self.process_ready(node_id)
            self.report_changes()
            progressed |= self.deliver(set(targets))
            self.report_changes()
            if not progressed:
                return
        raise AssertionError("stabilize did not converge")

    # -------------------------------------------------------------- faults

    def do_isolate(self, case: TestCase) -> None:
        # Example: `isolate n1` cuts every link of n1 (messages across a cut are dropped on delivery).
        for node_id in case.words():
            self.cut.update(frozenset((node_id, other)) for other in self.nodes if other != node_id)

    def do_partition(self, case: TestCase) -> None:
        # Example: `partition n1,n2 n3,n4,n5` cuts every link between the groups.
        groups = [word.split(",") for word in case.words()]
        for i, group in enumerate(groups):
            for other_group in groups[i + 1:]:
                self.cut.update(frozenset((a, b)) for a in group for b in other_group)

    def do_heal(self, case: TestCase) -> None:
        # Example: `heal` restores every link.
        self.cut.clear()

    # -------------------------------------------------------------- inspection

    def do_raft_state(self, case: TestCase) -> None:
        # Example: `raft-state` prints role, term, leader, vote and indexes of every node.
        for node_id in self.node_ids(case):
            self.out.append(fmt_node(self.nodes[node_id]))

    def do_raft_log(self, case: TestCase) -> None:
        # Example: `raft-log n1` prints the entries n1 has persisted.
        node_id = case.words()[0]
        self.out.extend(fmt_entry(e) for e in self.disks[node_id].entries)
        if not self.disks[node_id].entries:
            self.out.append("(empty)")

    def do_status(self, case: TestCase) -> None:
        # Example: `status n1` prints the leader's view of each follower (match, next, state).
        for peer, view in self.nodes[case.words()[0]].progress_details.items():
            self.out.append(f"{peer}: match={view.match_index} next={view.next_index} "
                            f"{view.state.value} inflight={view.inflight_count} active={view.recent_active}")


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.txt")), ids=lambda p: p.name)
def test_raft_interactions(path: Path, request: pytest.FixtureRequest) -> None:
    env = RaftEnv()
    run_file(path, env.handle, rewrite=request.config.getoption("--rewrite"))


def test_testdata_present() -> None:
    assert len(list(TESTDATA.glob("*.txt"))) >= 6


def test_runner_compares_rewrites_and_keeps_blank_line_output(tmp_path: Path) -> None:
    path = tmp_path / "case.txt"
    path.write_text("# header\n\necho a b=(1,2)\n----\nwrong\n\necho-blank\n----\n")
    outputs = {"echo": "a 1,2", "echo-blank": "x\n\ny"}

    def handler(case: TestCase) -> str:
        return outputs[case.directive] if case.directive == "echo-blank" else f"{case.words()[0]} {','.join(case.vals('b'))}"

    with pytest.raises(AssertionError, match=r"case.txt:3: output of 'echo' differs"):
        run_file(path, handler)
    run_file(path, handler, rewrite=True)
    assert path.read_text() == "# header\n\necho a b=(1,2)\n----\na 1,2\n\necho-blank\n----\n----\nx\n\ny\n----\n----\n"
    run_file(path, handler)  # the rewritten file passes, blank line and all
