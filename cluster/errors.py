"""Errors of the broker process (the asyncio shell and its HTTP edge).

    RaftqNodeError
     ├── ConfigError          bad configuration; the node does not start
     └── ServiceError         a request cannot be served now; the API maps it to an HTTP answer
          ├── NotLeaderError  this node does not lead (307 to the leader, or 503 when none is known)
          ├── Unavailable     overloaded, shutting down, or the entry did not commit in time (503)
          │    └── NotServingYet  a new leader still applying its predecessors' entries (held, then 307)
          └── ProposalLost    the entry was overwritten by a new leader (503; the client retries)

The Raft core, the queue state machine and the WAL have their own errors modules; this one holds
only what the shell raises to its callers.
"""

from __future__ import annotations


class RaftqNodeError(Exception):
    """Base of every error the broker shell raises."""


class ConfigError(RaftqNodeError):
    """Raised when a configuration value is invalid; the message names the field."""


class ServiceError(RaftqNodeError):
    """Raised when a request cannot be served right now."""


class NotLeaderError(ServiceError):
    """Raised when a request needs the leader and this node is not it."""

    def __init__(self, leader_id: str | None, leader_url: str | None) -> None:
        self.leader_id = leader_id
        self.leader_url = leader_url
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")


class Unavailable(ServiceError):
    """Raised when the node is overloaded, stopping, or a proposal did not commit in time."""


class NotServingYet(Unavailable):
    """Raised when this node leads but has not applied its own term's no-op entry yet."""


class ProposalLost(ServiceError):
    """Raised when a proposed entry was replaced by another leader's entry at the same index."""
