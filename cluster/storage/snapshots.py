"""The snapshot files: a node's state machine at one log index, stored whole and checksummed.

Theory of operation
-------------------
**Format.** A snapshot covering log index `index`, whose entry had term `term`, is the file
`snap-<index:020d>-<term:020d>.snap`: the body (the state machine's opaque byte stream) followed
by a trailer, struct `<QQQ32s8s`: index, term, body length, sha256(body), magic `RAFTQSN1`. The
trailer goes at the end so the body can be streamed out of the state machine without knowing
its length up front, in constant memory. Names are zero-padded, so name order is index order.

A file is valid when it is at least a trailer long, ends with the magic, its trailer's body
length is the file size minus the trailer, its trailer's index and term are the name's, and the
body's sha256 matches. `verify()` checks all of it, reading in `READ_CHUNK_BYTES` chunks (a body
may be 100 MB); `list()` only reads names and sizes, so the node verifies the one it restores
and falls back to an older one when that fails.

**Writes and durability** (the hard state file's rules). `SnapshotWriter` streams the body into
`<final name>.tmp`, hashing as it goes; `commit()` appends the trailer, fsyncs, renames the file
to its final name and fsyncs the directory. A crash leaves either no snapshot or a complete one
under its final name, never a partial one: a final file that fails verification was damaged
after it was durable, and `SnapshotCorruptionError` names it. A leftover `.tmp` is a write a
crash interrupted; `open()` deletes it. `retain()` and `remove()` fsync the directory after
each deletion, oldest first, so a crash in between still leaves the newest snapshots.

**Transfers.** A follower receives a leader's snapshot file as raw bytes (body and trailer, as
`read_range()` serves them) into `incoming-<index>-<term>-<sha256 prefix>.part`, named after
what it will hold so that an interrupted transfer of the same file resumes from the bytes on
disk (`received`), and a transfer of another file starts by deleting the old part. The part is
not fsynced chunk by chunk: after a crash it may hold fewer bytes than were acknowledged (the
sender then continues from what is there) or, on some file systems, garbage where unsynced data
was; `finish()` catches the latter, since it checks the sha256 of the whole file as it is on
disk against the one the sender announced, and then the snapshot checks, all before renaming
the part into place. A damaged file never enters the store, and never replaces a good one.

**Errors.** Damage is `SnapshotCorruptionError` (path and reason); a chunk at the wrong offset
is `OffsetMismatch` (carrying the bytes held, so the sender can continue from there); bad sizes
or digests announced by a peer are `ValueError`; failures of the OS propagate as OSError.
Programmer errors (writing after commit, finishing an incomplete transfer) are asserts.

**Threads.** Blocking I/O, no asyncio: the server calls it through worker threads. Not
thread-safe: one call at a time per store, writer or incoming snapshot.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
from typing import BinaryIO, Final

from raftq.cluster.records import record
from raftq.cluster.storage.errors import SnapshotCorruptionError, StorageError
from raftq.cluster.storage.hard_state import fsync_directory

_TRAILER: Final = struct.Struct("<QQQ32s8s")
#: Bytes of the trailer at the end of every snapshot file.
TRAILER_BYTES: Final = _TRAILER.size
#: Last 8 bytes of every snapshot file; the digit is the format version.
MAGIC: Final = b"RAFTQSN1"
#: Verification and digests read files in chunks of this size, bounding their memory.
READ_CHUNK_BYTES: Final = 1 << 20
#: The writer's buffer: state machines tend to write many small pieces; this makes them few writes.
WRITE_BUFFER_BYTES: Final = 1 << 20

_SNAPSHOT_NAME = re.compile(r"snap-(\d{20})-(\d{20})\.snap")
_TEMPORARY_SUFFIX = ".tmp"
_PART_SUFFIX = ".part"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_log = logging.getLogger("raftq.snapshots")


def snapshot_file_name(index: int, term: int) -> str:
    """The file name of the snapshot at (index, term) inside the store directory."""
    return f"snap-{index:020d}-{term:020d}.snap"


@record
class SnapshotMeta:
    """One snapshot file, as named on disk (not verified: see SnapshotStore.verify())."""

    index: int  #: the last log index the snapshot covers
    term: int  #: the term of that entry
    path: str
    size_bytes: int  #: the whole file, body and trailer


class OffsetMismatch(StorageError):
    """Raised by IncomingSnapshot.write_at() for a chunk that does not start where the part ends.

    Attributes:
        received: bytes the part holds; the sender continues from there.
        offset: where the refused chunk started.
    """

    def __init__(self, received: int, offset: int | None = None) -> None:
        where = f"a chunk at byte {offset}" if offset is not None else "a chunk"
        super().__init__(f"{where} does not continue the {received} bytes held")
        self.received = received
        self.offset = offset


class SnapshotStore:
    """The directory of snapshot files of one node (see the module docstring).

    Open with `SnapshotStore.open(directory)`. Not thread-safe: one call at a time.
    """

    def __init__(self, directory: str, *, logger: logging.Logger) -> None:
        """Use open(); this only builds the object."""
        self.directory = directory
        self._logger = logger

    @classmethod
    def open(cls, directory: str | os.PathLike, *, logger: logging.Logger | None = None) -> "SnapshotStore":
        """Opens the store in directory (created when missing) and deletes interrupted writes.

        Leftover `*.tmp` files (a write a crash interrupted before its rename) are deleted and
        logged. `*.part` files are kept: they are transfers that may resume.

        Args:
            directory: holds the snapshot files; nothing else should be written there.
            logger: where the deletions are logged (default: the "raftq.snapshots" logger).

        Raises:
            OSError: the directory cannot be created, read or cleaned.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            os.makedirs(directory)
            fsync_directory(os.path.dirname(os.path.abspath(directory)))
        store = cls(directory, logger=logger or _log)
        leftovers = sorted(name for name in os.listdir(directory) if name.endswith(_TEMPORARY_SUFFIX))
        for name in leftovers:
            path = os.path.join(directory, name)
            size = os.path.getsize(path)
            os.unlink(path)
            store._logger.warning("snapshots: deleted %s (%d bytes), a snapshot write a crash interrupted",
                                  path, size)
        if leftovers:
            fsync_directory(directory)  # not needed for safety (open deletes them again); keeps the disk tidy
        return store

    # ------------------------------------------------------------------ reading

    def list(self) -> list[SnapshotMeta]:
        """Every snapshot file by its name, in ascending (index, term) order; not verified."""
        found = []
        for name in os.listdir(self.directory):
            match = _SNAPSHOT_NAME.fullmatch(name)
            if match:
                path = os.path.join(self.directory, name)
                found.append(SnapshotMeta(int(match.group(1)), int(match.group(2)), path, os.path.getsize(path)))
        found.sort(key=lambda meta: (meta.index, meta.term))
        return found

    def newest(self) -> SnapshotMeta | None:
        """The snapshot with the highest index (then term), or None when there is none; not verified."""
        snapshots = self.list()
        return snapshots[-1] if snapshots else None

    def find(self, index: int, term: int) -> SnapshotMeta | None:
        """The snapshot ending at (index, term), or None; not verified."""
        return next((meta for meta in self.list() if (meta.index, meta.term) == (index, term)), None)

    def verify(self, meta: SnapshotMeta) -> None:
        """Checks meta's file completely: size, trailer, name, and the body's sha256.

        Reads the file in READ_CHUNK_BYTES chunks, so memory stays bounded whatever its size.

        Raises:
            SnapshotCorruptionError: the file is damaged; names it and says how.
            OSError: the file cannot be read (FileNotFoundError when it is gone).
        """
        _assert_named(meta)
        with open(meta.path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < meta.size_bytes:
                # Snapshot files never change once in place, so any change is damage.
                raise SnapshotCorruptionError(meta.path, f"cut short: {size} bytes, {meta.size_bytes} when listed")
            trailer = _read_trailer(f, meta.path, size, meta.index, meta.term)
            if size != meta.size_bytes:
                raise SnapshotCorruptionError(meta.path, f"{size} bytes, {meta.size_bytes} when listed")
            body_hash = _hash_prefix(f, meta.path, size - TRAILER_BYTES)
        _check_body_digest(meta.path, body_hash.digest(), trailer)

    def open_body(self, meta: SnapshotMeta) -> BinaryIO:
        """A readable file object over the snapshot's body only, positioned at its start.

        read(n) stops at the end of the body (the trailer is never returned), so the state
        machine can restore straight from it in bounded memory. The caller closes it (it is a
        context manager). It checks the trailer, not the body's sha256: verify() first.

        Raises:
            SnapshotCorruptionError: the trailer is missing or does not match the name.
            OSError: the file cannot be opened.
        """
        _assert_named(meta)
        f = open(meta.path, "rb", buffering=0)
        try:
            size = os.fstat(f.fileno()).st_size
            _read_trailer(f, meta.path, size, meta.index, meta.term)
            f.seek(0)
            return io.BufferedReader(_BodyReader(f, size - TRAILER_BYTES), buffer_size=READ_CHUNK_BYTES)
        except BaseException:
            f.close()
            raise

    def read_range(self, meta: SnapshotMeta, offset: int, size: int) -> bytes:
        """Up to size raw bytes of meta's file (body and trailer) from offset; fewer at its end.

        Raises:
            OSError: the file cannot be read.
        """
        assert offset >= 0 and size >= 0, (offset, size)
        with open(meta.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    # ------------------------------------------------------------------ writing and deleting

    def writer(self, index: int, term: int, *, hasher: "hashlib._Hash | None" = None) -> "SnapshotWriter":
        """Starts writing the snapshot at (index, term); see SnapshotWriter.

        Args:
            hasher: a fresh sha256 to hash the body with (default: one made here). A forked
                child passes one its parent made, so it never enters OpenSSL's locks.

        Raises:
            OSError: the temporary file cannot be created.
        """
        assert index >= 0 and term >= 0, (index, term)
        return SnapshotWriter(self.directory, index, term, hasher=hasher)

    def path_of(self, index: int, term: int) -> str:
        """Where the snapshot at (index, term) is (or would be)."""
        return os.path.join(self.directory, snapshot_file_name(index, term))

    def remove_unfinished(self, index: int, term: int) -> bool:
        """Deletes the temporary file of the snapshot at (index, term), if a writer that died left
        one (open() would delete it at the next start); returns whether there was one.

        Raises:
            OSError: the file is there and cannot be deleted.
        """
        try:
            os.unlink(self.path_of(index, term) + _TEMPORARY_SUFFIX)
        except FileNotFoundError:
            return False
        return True

    def retain(self, keep: int = 2) -> list[str]:
        """Deletes all but the newest `keep` snapshots, oldest first, fsyncing the directory after each.

        Returns:
            The deleted paths, oldest first.

        Raises:
            OSError: a deletion or fsync failed (the older files are already gone).
        """
        # Keeping none would leave a compacted log with nothing to start from: a caller's mistake.
        assert keep >= 1, keep
        deleted = []
        for meta in self.list()[:-keep]:
            self.remove(meta)
            deleted.append(meta.path)
        return deleted

    def remove(self, meta: SnapshotMeta) -> None:
        """Deletes meta's file durably (unlink, then fsync the directory).

        Raises:
            OSError: the file is not there (FileNotFoundError) or the disk refused.
        """
        os.unlink(meta.path)
        fsync_directory(self.directory)

    def incoming(self, index: int, term: int, size_bytes: int, sha256_hex: str) -> "IncomingSnapshot":
        """Starts or resumes receiving a snapshot file (body and trailer) from a peer.

        A part already holding a prefix of this very file (same index, term and digest) is
        resumed: `received` is its size. Every other `*.part` in the directory is deleted, durably.

        Args:
            index, term: the snapshot's, as announced.
            size_bytes: the whole file's size, as announced.
            sha256_hex: the sha256 of the whole file, lowercase hex, as announced.

        Raises:
            ValueError: the announced size or digest cannot be a snapshot's (the peer's mistake).
            OSError: the part cannot be created or the old ones deleted.
        """
        if size_bytes < TRAILER_BYTES:
            raise ValueError(f"a snapshot file has at least {TRAILER_BYTES} bytes, not {size_bytes}")
        if not _SHA256_HEX.fullmatch(sha256_hex):
            raise ValueError(f"not a lowercase hex sha256: {sha256_hex[:100]!r}")
        assert index >= 0 and term >= 0, (index, term)
        name = f"incoming-{index}-{term}-{sha256_hex[:16]}{_PART_SUFFIX}"
        path = os.path.join(self.directory, name)
        stale = sorted(n for n in os.listdir(self.directory) if n.endswith(_PART_SUFFIX) and n != name)
        if os.path.exists(path) and os.path.getsize(path) > size_bytes:
            stale.append(name)  # longer than the file it is named after: not a prefix of it
        for stale_name in stale:
            stale_path = os.path.join(self.directory, stale_name)
            os.unlink(stale_path)
            fsync_directory(self.directory)
            self._logger.info("snapshots: deleted %s, a transfer that will not resume", stale_path)
        incoming = IncomingSnapshot(self, index, term, size_bytes, sha256_hex, path)
        if incoming.received:
            self._logger.info("snapshots: resuming %s at byte %d of %d", path, incoming.received, size_bytes)
        return incoming

    def _install(self, part_path: str, index: int, term: int, size_bytes: int, sha256_hex: str) -> SnapshotMeta:
        """Checks a complete part like a snapshot, then renames it into place; deletes it when bad."""
        with open(part_path, "rb", buffering=0) as f:
            os.fsync(f.fileno())  # the bytes checked below are the bytes that stay
            size = os.fstat(f.fileno()).st_size
            assert size == size_bytes, (part_path, size, size_bytes)
            try:
                file_hash = _hash_prefix(f, part_path, size - TRAILER_BYTES)
                body_digest = file_hash.copy().digest()  # sha256 state after the body: one pass for both
                file_hash.update(_read_exactly(f, part_path, TRAILER_BYTES))
                # The digest first: a mismatch there is damage in transit, whatever else it garbled.
                actual = file_hash.hexdigest()
                if actual != sha256_hex:
                    raise SnapshotCorruptionError(part_path, f"checksum mismatch: the file's sha256 is {actual}, "
                                                             f"the sender announced {sha256_hex}")
                trailer = _read_trailer(f, part_path, size, index, term)
                _check_body_digest(part_path, body_digest, trailer)
            except SnapshotCorruptionError:
                os.unlink(part_path)
                fsync_directory(self.directory)
                raise
        path = os.path.join(self.directory, snapshot_file_name(index, term))
        os.replace(part_path, path)
        fsync_directory(self.directory)  # makes the rename itself durable
        return SnapshotMeta(index, term, path, size)


class SnapshotWriter:
    """Writes one snapshot file; a context manager that aborts unless commit() was called.

        with store.writer(index, term) as writer:
            for chunk in body:
                writer.write(chunk)
            meta = writer.commit()
    """

    def __init__(self, directory: str, index: int, term: int, *, hasher: "hashlib._Hash | None" = None) -> None:
        """Use SnapshotStore.writer(); creates `<final name>.tmp` (replacing a stale one)."""
        self.index = index
        self.term = term
        self._directory = directory
        self.path = os.path.join(directory, snapshot_file_name(index, term))
        self._temporary = self.path + _TEMPORARY_SUFFIX
        self._file: BinaryIO | None = open(self._temporary, "wb", buffering=WRITE_BUFFER_BYTES)
        self._hash = hasher if hasher is not None else hashlib.sha256()
        self._body_bytes = 0
        self._committed = False

    def write(self, data: bytes) -> None:
        """Appends data to the body.

        Raises:
            OSError: the disk refused (abort() then, or leave the with block by the exception).
        """
        assert self._file is not None, "SnapshotWriter.write() after commit() or abort()"
        self._file.write(data)
        self._hash.update(data)
        self._body_bytes += len(data)

    def commit(self) -> SnapshotMeta:
        """Appends the trailer, fsyncs, renames the file to its final name and fsyncs the directory.

        Returns:
            The new snapshot (an existing file with the same name is replaced).

        Raises:
            OSError: the disk refused. Before the rename the temporary file is deleted and no
                snapshot was made; when only the directory fsync failed, the file is in place
                but may not survive a crash.
        """
        assert self._file is not None, "SnapshotWriter.commit() after commit() or abort()"
        try:
            self._file.write(_TRAILER.pack(self.index, self.term, self._body_bytes, self._hash.digest(), MAGIC))
            self._file.flush()
            os.fsync(self._file.fileno())  # the whole file is durable before its name says it is complete
            self._file.close()
            self._file = None
            os.replace(self._temporary, self.path)
        except BaseException:
            self._abort_quietly()
            raise
        self._committed = True
        fsync_directory(self._directory)  # makes the rename itself durable
        return SnapshotMeta(self.index, self.term, self.path, self._body_bytes + TRAILER_BYTES)

    def abort(self) -> None:
        """Closes and deletes the temporary file; nothing was written. Idempotent; no-op after commit().

        Raises:
            OSError: the file could not be closed or deleted (open() deletes it later).
        """
        if self._committed:
            return
        file, self._file = self._file, None
        try:
            if file is not None:
                file.close()  # flushes the buffer: on a full disk this raises, and the file must still go
        finally:
            try:
                os.unlink(self._temporary)
            except FileNotFoundError:
                pass
        # No directory fsync: a .tmp that comes back after a crash is deleted by open().

    def _abort_quietly(self) -> None:
        """abort() while an exception is on its way: a second error must not hide the first."""
        try:
            self.abort()
        except OSError as exc:
            _log.warning("snapshots: aborting %s: %s", self._temporary, exc)

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._committed:
            return
        if exc_type is not None:
            self._abort_quietly()
        else:
            self.abort()  # left without commit(): no snapshot


class IncomingSnapshot:
    """A snapshot file arriving from a peer in chunks, resumable (see the module docstring).

    Attributes:
        index, term, size_bytes, sha256_hex: what the sender announced.
        path: the part file.
        received: bytes the part holds; the next chunk must start there.
    """

    def __init__(self, store: SnapshotStore, index: int, term: int, size_bytes: int, sha256_hex: str,
                 path: str) -> None:
        """Use SnapshotStore.incoming(); opens (or creates) the part for appending."""
        self.index = index
        self.term = term
        self.size_bytes = size_bytes
        self.sha256_hex = sha256_hex
        self.path = path
        self._store = store
        self._file: BinaryIO | None = open(path, "ab")
        self.received = self._file.tell()  # "ab" opens at the end: resume from what the disk holds
        assert self.received <= size_bytes, (path, self.received, size_bytes)  # incoming() deletes longer ones

    @property
    def complete(self) -> bool:
        """Whether all size_bytes are held (finish() may be called)."""
        return self.received == self.size_bytes

    def write_at(self, offset: int, data: bytes) -> None:
        """Appends a chunk that starts at offset.

        Raises:
            OffsetMismatch: offset is not `received` (nothing written; carries `received`).
            ValueError: the chunk would run past size_bytes (nothing written).
            OSError: the disk refused.
        """
        assert self._file is not None, "IncomingSnapshot.write_at() after close() or finish()"
        if offset != self.received:
            raise OffsetMismatch(self.received, offset)
        if self.received + len(data) > self.size_bytes:
            raise ValueError(f"{self.path}: a chunk of {len(data)} bytes at {offset} runs past the announced "
                             f"size {self.size_bytes}")
        self._file.write(data)
        self._file.flush()  # in the kernel, so a later resume finds it even if this object is dropped
        self.received += len(data)

    def finish(self) -> SnapshotMeta:
        """Checks the complete part and renames it into the store as a snapshot.

        The part is fsynced; the sha256 of the whole file must be the announced one, and the
        file must pass the same checks as verify(); only then is it renamed to its final name
        (replacing a file with that name) and the directory fsynced.

        Returns:
            The new snapshot.

        Raises:
            SnapshotCorruptionError: the file does not match the announced digest, or is not a
                valid snapshot; the part is deleted (the transfer starts over).
            OSError: the disk refused.
        """
        assert self.complete, f"{self.path}: finish() with {self.received} of {self.size_bytes} bytes"
        self.close()
        return self._store._install(self.path, self.index, self.term, self.size_bytes, self.sha256_hex)

    def close(self) -> None:
        """Closes the part, keeping it for a later resume. Idempotent."""
        file, self._file = self._file, None
        if file is not None:
            file.close()


def file_digest(meta: SnapshotMeta) -> str:
    """The sha256 (lowercase hex) of meta's whole file, body and trailer: what a transfer checks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    buffer = bytearray(READ_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(meta.path, "rb", buffering=0) as f:
        while count := f.readinto(view):
            digest.update(view[:count])
    return digest.hexdigest()


# ---------------------------------------------------------------------- helpers


class _BodyReader(io.RawIOBase):
    """Raw reads of a snapshot file that end where its body ends (open_body() buffers it)."""

    def __init__(self, file: io.FileIO, body_bytes: int) -> None:
        super().__init__()
        self._file = file
        self._body_bytes = body_bytes
        self._position = 0  # always the file's own position too: no one else reads this handle

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._body_bytes - self._position)
        if count <= 0:
            return 0
        got = self._file.readinto(memoryview(buffer)[:count])
        self._position += got or 0
        return got or 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._body_bytes}[whence]
        position = base + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = self._file.seek(position)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _assert_named(meta: SnapshotMeta) -> None:
    name = os.path.basename(meta.path)
    assert name == snapshot_file_name(meta.index, meta.term), f"{meta} is not a SnapshotStore.list() entry"


def _read_exactly(f: io.FileIO, path: str, count: int) -> bytes:
    """count bytes from f's position; a shorter read means the file shrank while being read."""
    chunks = []
    while count:
        chunk = f.read(count)
        if not chunk:
            raise SnapshotCorruptionError(path, "cut short while being read")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _read_trailer(f: io.FileIO, path: str, size: int, index: int, term: int) -> tuple[int, int, int, bytes, bytes]:
    """The trailer of the file f (size bytes long), checked against its size and name.

    Raises:
        SnapshotCorruptionError: it is missing or says something else than the file and name.
    """
    if size < TRAILER_BYTES:
        raise SnapshotCorruptionError(path, f"cut short: {size} bytes, less than the {TRAILER_BYTES}-byte trailer")
    f.seek(size - TRAILER_BYTES)
    trailer = _TRAILER.unpack(_read_exactly(f, path, TRAILER_BYTES))
    trailer_index, trailer_term, body_bytes, _, magic = trailer
    if magic != MAGIC:
        # Truncation removes the magic first, so a cut file usually ends up here too.
        raise SnapshotCorruptionError(path, f"bad magic {magic!r}, expected {MAGIC!r}: no trailer at the end "
                                            "(the file is cut short, overwritten, or not a snapshot)")
    if body_bytes != size - TRAILER_BYTES:
        short = "cut short: " if body_bytes > size - TRAILER_BYTES else ""
        raise SnapshotCorruptionError(path, f"{short}the trailer says {body_bytes} body bytes, "
                                            f"the file holds {size - TRAILER_BYTES}")
    if trailer_index != index:
        raise SnapshotCorruptionError(path, f"name says index {index}, trailer says {trailer_index}")
    if trailer_term != term:
        raise SnapshotCorruptionError(path, f"name says term {term}, trailer says {trailer_term}")
    return trailer


def _hash_prefix(f: io.FileIO, path: str, count: int) -> "hashlib._Hash":
    """The running sha256 of the first count bytes of f, read in READ_CHUNK_BYTES chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(min(count, READ_CHUNK_BYTES))
    view = memoryview(buffer)
    f.seek(0)
    remaining = count
    while remaining:
        got = f.readinto(view[:min(remaining, len(buffer))])
        if not got:
            raise SnapshotCorruptionError(path, "cut short while being read")
        digest.update(view[:got])
        remaining -= got
    return digest


def _check_body_digest(path: str, body_digest: bytes, trailer: tuple[int, int, int, bytes, bytes]) -> None:
    if body_digest != trailer[3]:
        raise SnapshotCorruptionError(path, f"checksum mismatch: the body's sha256 is {body_digest.hex()}, "
                                            f"the trailer says {trailer[3].hex()}")
