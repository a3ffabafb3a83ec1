"""Cluster membership: who votes, who only listens, and where each member is reached.

A `Membership` is a value. It travels in CONFIG log entries (the whole membership, not a delta,
so that any one entry says everything) and in the queue state machine's snapshot, which records
the membership of the last CONFIG entry it applied. The core reads only ids and the voter flag;
each member's URL rides along for the shells, which connect to it.

Changes go one server at a time (Raft thesis §4.1): add a learner, promote a learner, remove a
member. Any two configurations one such step apart have overlapping majorities, so a cluster can
switch directly from one to the next without joint consensus. Ids are unique for all time
(etcd, hashicorp/raft): a removed id is remembered in `removed` and never admitted again, so a
wiped box rejoins under a new name and an old box with stale data cannot pass for a new one.
"""

from __future__ import annotations

from dataclasses import field

import msgpack

from raftq.cluster.records import record

__all__ = ["Member", "Membership", "MembershipDecodeError", "quorum_size"]

#: Format tag of an encoded membership (the first element), so a future format is refused, not misread.
_FORMAT_TAG = "raftq.members/1"


class MembershipDecodeError(ValueError):
    """Raised when bytes are not an encoded Membership."""


def quorum_size(voters_count: int) -> int:
    """Votes (or copies) that make a majority of voters_count voters."""
    return voters_count // 2 + 1


@record
class Member:
    """One member: its id, the base URL its peers and clients use, and whether it votes."""

    node_id: str
    url: str
    voter: bool


@record
class Membership:
    """The members, sorted by id, and the ids removed for good."""

    members: tuple[Member, ...] = ()
    removed: tuple[str, ...] = ()
    #: The voters' ids, worked out once: the leader reads them for every commit it counts.
    voters: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "voters", tuple(m.node_id for m in self.members if m.voter))

    @classmethod
    def of_voters(cls, urls: dict[str, str]) -> Membership:
        """All voters: {node id: url} (a cluster bootstrapped from its peer list)."""
        return cls(tuple(Member(node_id, url, True) for node_id, url in sorted(urls.items())))

    @property
    def learners(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members if not m.voter)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    def get(self, node_id: str) -> Member | None:
        for member in self.members:
            if member.node_id == node_id:
                return member
        return None

    def is_voter(self, node_id: str) -> bool:
        member = self.get(node_id)
        return member is not None and member.voter

    def urls(self) -> dict[str, str]:
        return {m.node_id: m.url for m in self.members}

    # ------------------------------------------------------------------ one step at a time

    def with_learner(self, node_id: str, url: str) -> Membership:
        """Adds a non-voting member (the first step of adding a node)."""
        assert self.get(node_id) is None and node_id not in self.removed, node_id
        return Membership(tuple(sorted((*self.members, Member(node_id, url, False)), key=_by_id)), self.removed)

    def with_voter(self, node_id: str) -> Membership:
        """Promotes a learner to voter."""
        member = self.get(node_id)
        assert member is not None and not member.voter, node_id
        return self._replaced(node_id, Member(node_id, member.url, True))

    def without(self, node_id: str) -> Membership:
        """Removes a member for good: its id is never admitted again."""
        assert self.get(node_id) is not None, node_id
        members = tuple(m for m in self.members if m.node_id != node_id)
        return Membership(members, tuple(sorted((*self.removed, node_id))))

    def _replaced(self, node_id: str, member: Member) -> Membership:
        return Membership(tuple(member if m.node_id == node_id else m for m in self.members), self.removed)

    # ------------------------------------------------------------------ bytes

    def encode(self) -> bytes:
        return msgpack.packb(
            [_FORMAT_TAG, [[m.node_id, m.url, m.voter] for m in self.members], list(self.removed)],
            use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Membership:
        """Raises MembershipDecodeError when data is not exactly one encoded membership."""
        try:
            raw = msgpack.unpackb(data, raw=False, use_list=True)
        except Exception as exc:  # msgpack raises many types
            raise MembershipDecodeError(f"undecodable membership: {exc}") from None
        if not (isinstance(raw, list) and len(raw) == 3 and raw[0] == _FORMAT_TAG
                and isinstance(raw[1], list) and isinstance(raw[2], list)):
            raise MembershipDecodeError("not a raftq membership")
        members = []
        for item in raw[1]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and item[0]
                    and isinstance(item[1], str) and isinstance(item[2], bool)):
                raise MembershipDecodeError(f"bad member {item!r}")
            members.append(Member(item[0], item[1], item[2]))
        if not all(isinstance(node_id, str) for node_id in raw[2]):
            raise MembershipDecodeError("removed ids must be strings")
        return cls(tuple(sorted(members, key=_by_id)), tuple(sorted(raw[2])))


def _by_id(member: Member) -> str:
    return member.node_id
