"""The replicated queue: commands (what the log carries) and the deterministic state machine.

Pure: no asyncio, aiohttp, socket, time or random imports (a unit test enforces it), so that
every replica computes the same state from the same log.
"""

from raftq.cluster.queue import commands, results
from raftq.cluster.queue.commands import CommandDecodeError, decode_command, encode_command
from raftq.cluster.queue.jobs import STATES
from raftq.cluster.queue.state_machine import EVENTS, QueueStateMachine

__all__ = [
    "commands", "results", "CommandDecodeError", "decode_command", "encode_command", "STATES", "EVENTS",
    "QueueStateMachine",
]
