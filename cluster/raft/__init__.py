"""The sans-IO Raft core: no asyncio, sockets, clocks or global randomness (see node.py)."""

from raftq.cluster.raft.codec import decode_message, decode_messages, encode_message, encode_messages
from raftq.cluster.raft.errors import CodecError, RaftConfigError, NotLeader, ProposalDropped, RaftError, StepRejected
from raftq.cluster.raft.messages import Entry, EntryKind, HardState, Message, MessageType
from raftq.cluster.raft.node import RaftConfig, RaftNode, Ready, Role
from raftq.cluster.raft.progress import ProgressState, ProgressView

__all__ = [
    "CodecError", "RaftConfigError", "Entry", "EntryKind", "HardState", "Message", "MessageType", "NotLeader",
    "ProgressState", "ProgressView", "ProposalDropped", "RaftConfig", "RaftError", "RaftNode", "Ready", "Role",
    "StepRejected", "decode_message", "decode_messages", "encode_message", "encode_messages",
]
