"""The restart rules the node and the simulator share (cluster/recovery.py)."""

import pytest

from raftq.cluster import recovery
from raftq.cluster.raft.membership import Membership
from raftq.cluster.raft.messages import SnapshotPoint


def test_a_log_that_starts_after_the_snapshot_is_refused():
    recovery.check_log_reaches(10, 11)  # right after: fine
    recovery.check_log_reaches(10, 3)  # reaches back before it: fine
    recovery.check_log_reaches(None, 1)
    recovery.check_log_reaches(None, 0)  # an empty log
    with pytest.raises(recovery.RecoveryRefused, match="ends at index 10 but the log starts at 12"):
        recovery.check_log_reaches(10, 12)
    with pytest.raises(recovery.RecoveryRefused, match="no valid snapshot covers"):
        recovery.check_log_reaches(None, 5)


def test_log_continues_the_snapshot():
    terms = {5: 1, 6: 2, 7: 2, 8: 3}
    snapshot = SnapshotPoint(7, 2)
    assert recovery.log_continues(snapshot, 5, 8, terms.get)
    assert not recovery.log_continues(SnapshotPoint(7, 3), 5, 8, terms.get)  # another term at 7
    assert not recovery.log_continues(snapshot, 5, 6, terms.get)  # ends before the snapshot
    assert not recovery.log_continues(snapshot, 0, 0, terms.get)  # empty
    assert recovery.log_continues(snapshot, 8, 8, lambda index: None)  # compacted at the snapshot itself


def test_the_core_gets_the_log_from_keep_entries_before_the_snapshot():
    assert recovery.first_entry_to_load(100, 1, 10) == 91
    assert recovery.first_entry_to_load(100, 95, 10) == 95
    assert recovery.first_entry_to_load(5, 1, 10) == 1


def test_membership_at_start():
    recorded = Membership.of_voters({"n1": "http://a", "n4": "http://d"})
    assert recovery.membership_at_start(recorded.encode(), joining=True, founders={}) == recorded
    assert recovery.membership_at_start(None, joining=True, founders={"n1": "http://a"}) == Membership()
    assert recovery.membership_at_start(None, joining=False, founders={"n1": "http://a"}) == \
        Membership.of_voters({"n1": "http://a"})
    assert recovery.membership_at_start(None, joining=False, founders=None) is None
