"""One node's durable state behind one object: the log with its hard state, and the snapshots.

The node is handed a `NodeStorage` (or opens one in its data directory): the write-ahead log
(`wal.py`: entries, term and vote; the `DurableLog` interface of `interfaces.py`) and the snapshot
store (`snapshots.py`). The node's drive loop is the only writer after start; the snapshot writer
thread only adds snapshot files. Whoever opens it closes it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from raftq.cluster.storage.snapshots import SnapshotStore
from raftq.cluster.storage.wal import WriteAheadLog


@dataclass
class NodeStorage:
    """See the module docstring."""

    log: WriteAheadLog
    snapshots: SnapshotStore

    @classmethod
    def open(cls, data_dir: str, *, wal_segment_bytes: int, logger: logging.Logger) -> "NodeStorage":
        """Opens (or creates) `data_dir/wal` and `data_dir/snapshots`; blocking: call it from a thread.

        Raises:
            StorageError: the log or a snapshot cannot be read back (see wal.py, snapshots.py).
        """
        os.makedirs(data_dir, exist_ok=True)
        snapshots = SnapshotStore.open(os.path.join(data_dir, "snapshots"), logger=logger)
        wal = WriteAheadLog.open(os.path.join(data_dir, "wal"), segment_bytes_max=wal_segment_bytes, logger=logger)
        return cls(wal, snapshots)

    def close(self) -> None:
        self.log.close()
