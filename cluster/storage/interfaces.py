"""What the node needs from durable log storage, as small Protocols (etcd `storage.go`, hashicorp `stable.go`).

`LogReader` is the read side a Raft log needs; `DurableLog` adds what the node shell drives from its
worker thread after each Ready: hard state and entries persisted, then synced, before messages are
sent (Raft §5.1, etcd `Ready`). Closing is a separate capability (hashicorp `WithClose`) because a
memory implementation has nothing to close. `WriteAheadLog` implements all three.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from raftq.cluster.raft.messages import Entry, HardState


@runtime_checkable
class LogReader(Protocol):
    @property
    def first_index(self) -> int: ...  # 0 when empty

    @property
    def last_index(self) -> int: ...  # 0 when empty

    def term(self, index: int) -> int: ...  # 0 for index 0 and past the end; raises CompactedError

    def entries(self, lo: int | None = None, hi: int | None = None) -> list[Entry]: ...  # [lo, hi)


@runtime_checkable
class DurableLog(LogReader, Protocol):
    @property
    def hard_state(self) -> HardState: ...

    def save_hard_state(self, hard_state: HardState) -> None: ...  # durable on return

    def append(self, entries: Sequence[Entry]) -> None: ...  # may overwrite a suffix; not yet durable

    def sync(self) -> None: ...  # everything appended so far is durable on return


@runtime_checkable
class Closable(Protocol):
    def close(self) -> None: ...
