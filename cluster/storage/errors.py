"""Errors raised by the storage package (the write-ahead log, the hard state file, the snapshot files).

```
StorageError
├── WalCorruptionError            durable data on disk is damaged: names the file (and byte offset)
│   └── HardStateCorruptionError  the hard state file in particular
├── WalFailedError                a write or fsync failed earlier: the log refuses further use
├── DiskWriteError                the disk refused a write, sync, truncate, rename or delete: names the file
├── CompactedError                an index dropped by compact() was asked for
└── SnapshotCorruptionError       a snapshot file is damaged, or a received one fails its digest: names it
```
(snapshots.OffsetMismatch, a chunk of an incoming snapshot at the wrong offset, is a StorageError
too; it lives beside the class that raises it.)
Corruption is what the disk did to data that was once durable (remote misbehaviour, in h11's
words); a torn tail is not an error, it is cut off and logged. Programmer errors (a gap in
appended indexes, two threads at once) are `assert`s.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the storage package raises on purpose."""


class WalCorruptionError(StorageError):
    """Raised at open when data that was durable is damaged (a bad record before the tail).

    Attributes:
        path: the damaged file.
        offset: byte offset of the first bad record in that file, or None for a whole-file check.
        reason: what is wrong there ("crc mismatch", "entry index 7, expected 6", ...).
    """

    def __init__(self, path: str, offset: int | None, reason: str) -> None:
        where = f"{path} at byte {offset}" if offset is not None else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class HardStateCorruptionError(WalCorruptionError):
    """Raised at open when the hard state file (term, vote) does not decode or fails its checksum."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, None, reason)


class WalFailedError(StorageError):
    """Raised by every call after a write, truncate or fsync failed.

    After a failed fsync the kernel may have dropped the dirty pages and cleared the error
    (PostgreSQL's "fsyncgate"), so a retry could report success for data that is gone. The only
    safe way on is a restart, which recovers from what is really on disk.
    """


class DiskWriteError(StorageError, OSError):
    """Raised when the disk refuses to write, sync, truncate, rename or delete a file (ENOSPC,
    EIO, EROFS, ...). An OSError too, whose `filename` is the file and `errno` the OS error, so
    `str()` reads "[Errno 28] No space left on device: '<file>'" even where the OS call that
    failed (a write() on an open file) named none.
    """

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error), path)


def storage_failure_line(error: BaseException) -> str:
    """The one ERROR line of a node that stops because its disk refused (names file and error)."""
    return (f"cannot write to disk: {error}; stopping: a node that cannot persist its log must not "
            "lead or vote")


class CompactedError(StorageError):
    """Raised when asking for the term or entries of an index that compact() dropped."""


class SnapshotCorruptionError(StorageError):
    """Raised when a snapshot file fails verification, or an incoming one fails its digest.

    Snapshot files are renamed into place only after an fsync, so a crash never leaves a partial
    one under its final name: a file that fails these checks was damaged after it was durable (or
    arrived damaged). The node falls back to an older snapshot.

    Attributes:
        path: the damaged file.
        reason: what is wrong with it ("checksum mismatch: ...", "cut short: ...", ...).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
