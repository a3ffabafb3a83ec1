"""What the leader knows about each follower's log (etcd `tracker/progress.go`, ideas only).

A follower is in one of three states:

- PROBE: the leader does not know where the follower's log ends. It sends one append at a
  time (from `next_index`) and waits for the answer, or for the next heartbeat answer, before
  sending another. A rejection moves `next_index` back using the follower's hint.
- REPLICATE: the last append matched, so the leader streams appends optimistically, moving
  `next_index` past what it sent, with at most `inflight_count_max` appends and
  `inflight_bytes_max` bytes of entries unanswered (etcd's MaxInflightMsgs / MaxInflightBytes:
  the count bounds the follower's inbox, the bytes bound what a slow link holds in buffers).
  A rejection (a lost or reordered append) drops back to PROBE from `match_index + 1`.
- SNAPSHOT: the entries the follower needs next were compacted away, so the leader's shell is
  sending it a snapshot ending at `pending_snapshot`. Nothing else is sent until the follower
  answers from past that index, or the shell reports the transfer's end (then PROBE).

`match_index` only grows within a term: an answer for an index at or below it is stale (the
transport may reorder and duplicate), and a rejection of an index at or below it is ignored.
"""

from __future__ import annotations

import collections
import enum

from raftq.cluster.records import record


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@record
class ProgressView:
    """Read-only copy of a follower's progress (for metrics, status pages and tests)."""

    match_index: int
    next_index: int
    state: ProgressState
    inflight_count: int
    recent_active: bool
    inflight_bytes: int = 0


class Progress:
    """Replication progress of one follower, kept by the leader. See the module docstring."""

    __slots__ = ("match_index", "next_index", "state", "probe_sent", "inflight", "inflight_count_max",
                 "inflight_bytes", "inflight_bytes_max", "recent_active", "pending_snapshot")

    def __init__(self, next_index: int, inflight_count_max: int, inflight_bytes_max: int = 0) -> None:
        self.match_index = 0
        self.next_index = next_index
        self.state = ProgressState.PROBE
        #: PROBE only: an append is out; send no other until an answer or heartbeat answer.
        self.probe_sent = False
        #: REPLICATE only: (last index, entry bytes) of each unanswered append, oldest first.
        self.inflight: collections.deque[tuple[int, int]] = collections.deque()
        self.inflight_count_max = inflight_count_max
        #: Sum of the entry bytes in `inflight`; 0 in inflight_bytes_max means no byte bound.
        self.inflight_bytes = 0
        self.inflight_bytes_max = inflight_bytes_max
        #: Heard from within the current check-quorum window.
        self.recent_active = False
        #: SNAPSHOT only: the last index of the snapshot being sent.
        self.pending_snapshot = 0

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.SNAPSHOT:
            return True
        if len(self.inflight) >= self.inflight_count_max:
            return True
        return 0 < self.inflight_bytes_max <= self.inflight_bytes

    def _forget_inflight(self) -> None:
        self.inflight.clear()
        self.inflight_bytes = 0

    def _forget_oldest_inflight(self) -> None:
        _, size_bytes = self.inflight.popleft()
        self.inflight_bytes -= size_bytes

    def become_probe(self) -> None:
        self.state = ProgressState.PROBE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._forget_inflight()
        self.pending_snapshot = 0

    def snapshot_finished(self, delivered: bool) -> None:
        """The shell's transfer ended. Delivered: the follower holds the snapshot, so probe right
        after it (its answer may have been lost); otherwise probe from match, which sends the
        snapshot again if the entries are still compacted."""
        after_snapshot = self.pending_snapshot + 1 if delivered else 0
        self.become_probe()
        self.next_index = max(self.next_index, after_snapshot)

    def become_snapshot(self, snapshot_index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = snapshot_index
        self.probe_sent = False
        self._forget_inflight()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._forget_inflight()
        self.pending_snapshot = 0

    def sent_append(self, last_index: int, entries_count: int, size_bytes: int = 0) -> None:
        """Record an append just sent whose entries (size_bytes of them) end at last_index."""
        if self.state is ProgressState.REPLICATE:
            if entries_count:
                self.next_index = last_index + 1
                self.inflight.append((last_index, size_bytes))
                self.inflight_bytes += size_bytes
        else:
            self.probe_sent = True

    def maybe_update(self, index: int) -> bool:
        """The follower matches the leader up to index. Returns False for a stale answer."""
        if index <= self.match_index:
            return False
        self.match_index = index
        self.next_index = max(self.next_index, index + 1)
        self.probe_sent = False
        while self.inflight and self.inflight[0][0] <= index:
            self._forget_oldest_inflight()
        return True

    def maybe_decrease(self, rejected_index: int, next_index_hint: int) -> bool:
        """The follower rejected an append whose previous index was rejected_index.

        Args:
            rejected_index: the previous index of the rejected append.
            next_index_hint: where the leader's reading of the follower's hint says to resume.

        Returns:
            False when the rejection is stale (answers an append older than what is known).
        """
        if self.state is ProgressState.SNAPSHOT:
            return False  # answers an append sent before the snapshot; the snapshot supersedes it
        if self.state is ProgressState.REPLICATE:
            if rejected_index <= self.match_index:
                return False
            self.become_probe()  # resumes right after match: everything up to it is known good
            return True
        if rejected_index != self.next_index - 1:
            return False  # not the probe we are waiting for
        self.next_index = max(min(rejected_index, next_index_hint), self.match_index + 1)
        self.probe_sent = False
        return True

    def heartbeat_answered(self) -> None:
        """A heartbeat answer proves the follower is reachable: let one more append through.

        In PROBE the probe may have been lost; in REPLICATE with a full window every append may
        have been lost, so the oldest is forgotten (a lost append shows up as a rejection later).
        """
        self.recent_active = True
        self.probe_sent = False
        if self.state is ProgressState.REPLICATE and self.is_paused() and self.inflight:
            self._forget_oldest_inflight()

    def view(self) -> ProgressView:
        return ProgressView(self.match_index, self.next_index, self.state, len(self.inflight), self.recent_active,
                            self.inflight_bytes)
