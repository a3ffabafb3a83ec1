"""Durable storage: the write-ahead log (wal.py), the hard state file (hard_state.py), their errors."""

from raftq.cluster.storage.errors import (
    CompactedError, DiskWriteError, HardStateCorruptionError, StorageError, WalCorruptionError, WalFailedError,
)
from raftq.cluster.storage.interfaces import Closable, DurableLog, LogReader
from raftq.cluster.storage.wal import WalStats, WriteAheadLog

__all__ = [
    "Closable", "CompactedError", "DiskWriteError", "DurableLog", "HardStateCorruptionError", "LogReader", "StorageError",
    "WalCorruptionError", "WalFailedError", "WalStats", "WriteAheadLog",
]
