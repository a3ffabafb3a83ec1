"""What a restarting node starts from: the rules, without the disk.

Theory of operation
-------------------
At start a node holds a hard state, snapshots and a log on disk. The newest valid snapshot is
restored into the state machine, and the log must reach back to it: if the log starts after the
snapshot's next index, the entries between are gone and starting anyway would silently lose
acknowledged jobs, so the node refuses (`RecoveryRefused`). A log that does not continue the
snapshot (it lacks the snapshot's last entry with the same term, and does not start right after
it) holds entries past a point this node never committed beyond: they are dropped. The core is
given the log from `compact_keep_entries` before the snapshot, so it can still serve a follower
just behind the snapshot from the log. The membership is the one the snapshot recorded; a node
that never applied one is either joining (none: it waits to be added) or a founder (the voters
its configuration names).

The node (cluster/snapshotting.py, cluster/server.py) and the deterministic simulator
(tests/sim/cluster.py) both decide a restart with these functions; only reading the disk differs.
"""

from __future__ import annotations

from typing import Callable, Mapping

from raftq.cluster.raft.membership import Membership
from raftq.cluster.raft.messages import SnapshotPoint


class RecoveryRefused(Exception):
    """The data on disk cannot be started from without losing committed entries."""


def check_log_reaches(snapshot_index: int | None, log_first_index: int) -> None:
    """Raises RecoveryRefused when entries between the snapshot (None: none) and the log are gone.

    `log_first_index` is the log's first held index (0 for an empty log)."""
    if log_first_index == 0:
        return
    reaches_back_to = (snapshot_index or 0) + 1
    if log_first_index > reaches_back_to:
        if snapshot_index is None:
            raise RecoveryRefused(f"the log starts at {log_first_index} and no valid snapshot covers the entries before it")
        raise RecoveryRefused(f"the snapshot ends at index {snapshot_index} but the log starts at {log_first_index}: "
                              f"the entries between are gone")


def log_continues(snapshot: SnapshotPoint, log_first_index: int, log_last_index: int,
                  term_at: Callable[[int], int | None]) -> bool:
    """Whether the log holds the snapshot's last entry with the same term, or starts right after it.

    `term_at(index)` is the log's term at an index, or None where the log no longer knows it."""
    if log_first_index == 0 or log_last_index < snapshot.index:
        return False
    term = term_at(snapshot.index)
    if term is None:
        return log_first_index == snapshot.index + 1
    return term == snapshot.term


def first_entry_to_load(snapshot_index: int, log_first_index: int, keep_entries: int) -> int:
    """The first log index the core is given after restoring the snapshot at `snapshot_index`."""
    return max(log_first_index, snapshot_index + 1 - keep_entries, 1)


def membership_at_start(recorded: bytes | None, *, joining: bool,
                        founders: Mapping[str, str] | None) -> Membership | None:
    """The membership the restored state recorded; else an empty one for a joining node (nobody's
    voter, it waits to be added); else the founders (node id -> URL), all voters, or None to let
    the core bootstrap them from its configured peers."""
    if recorded is not None:
        return Membership.decode(recorded)
    if joining:
        return Membership()
    return None if founders is None else Membership.of_voters(dict(founders))
