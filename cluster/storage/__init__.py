"""Durable storage: the write-ahead log (wal.py), the hard state file (hard_state.py), their errors."""

from cluster.storage.errors import (
    CompactedError, DiskWriteError, HardStateCorruptionError, StorageError, WalCorruptionError, WalFailedError,
)
from cluster.storage.interfaces import Closable, DurableLog, LogReader
from cluster.storage.wal import WalStats, WriteAheadLog

__all__ = [
    "Closable", "CompactedError", "DiskWriteError", "DurableLog", "HardStateCorruptionError", "LogReader", "StorageError",
    "WalCorruptionError", "WalFailedError", "WalStats", "WriteAheadLog",
]
