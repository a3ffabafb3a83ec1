"""Errors raised by the Raft core.

```
RaftError
├── RaftConfigError    local misuse: a RaftConfig that cannot work
├── NotLeader          local request on a node that is not the leader (carries the leader hint)
├── ProposalDropped    local request refused for backpressure (uncommitted bytes bound) or
│                      while leadership is being transferred
├── ChangeRefused      local request: a membership change or transfer that may not happen now
├── StepRejected       remote misbehaviour: a peer message that is malformed or misaddressed
└── CodecError         remote misbehaviour: bytes that do not decode to messages
```
Programmer errors inside the core (an impossible role transition, truncating a committed entry)
are `assert`s that crash the node, as etcd panics: a broken invariant must not keep serving.
"""

from __future__ import annotations


class RaftError(Exception):
    """Base class of every error the Raft core raises on purpose."""


class RaftConfigError(RaftError):
    """Raised when a RaftConfig is invalid (see RaftConfig.validate)."""


class NotLeader(RaftError):
    """Raised when a proposal or read reaches a node that is not the leader.

    Attributes:
        leader_id: the leader this node currently knows, or None when it knows none.
    """

    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class ProposalDropped(RaftError):
    """Raised when the leader refuses a proposal because too many bytes are uncommitted."""


class ChangeRefused(RaftError):
    """Raised when a membership change or a leadership transfer is refused.

    Attributes:
        retryable: True when the same request may succeed shortly (a change or transfer is under
            way, the new leader has not committed its first entry yet); False when it never will
            as asked (an unknown or removed id, removing the leader itself).
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class StepRejected(RaftError):
    """Raised when step() gets a message that is malformed, misaddressed or from an unknown peer."""


class CodecError(RaftError):
    """Raised when bytes cannot be decoded into Raft messages."""
