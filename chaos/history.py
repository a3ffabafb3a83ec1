"""The operation history: every op the workload, the drain and the nemesis performed, with times.

Shape (Jepsen's): an op is an `invoke` record followed by one completion record with the same
`op_id`, whose `type` is `ok` (the cluster said yes), `fail` (the cluster said no, so nothing
happened) or `info` (no usable answer: the outcome is unknown). An op whose process died before
it completed has no completion record; readers treat it as `info`. Events (nemesis steps, node
status changes, run facts) are single records of type `event`.

Every record carries `proc` (who: p0, w3, drain, nemesis, monitor, runner), `op`, `type`,
`t` (time.monotonic(): one clock for every process on the machine, for ordering and durations)
and `wall` (time.time(): comparable with the lease expiry times the nodes hand out).

    op        invoke fields                    ok fields
    submit    value, scheduled_t (when the open-loop schedule made it due), [delay_s]   job
    lease     worker                           jobs: [{id, value, lease, expires, attempt}]
    ack       worker, job, lease, value        -
    nack      worker, job, lease, value        -            (a worker's FAIL of a job)
    events:   meta {lease_s, seed, ...}, nemesis {phase, fault, ...}, status {node, role, term,
              leader, serving}, converged {digests, equal}, dead {jobs}, liveness {message},
              unsent {scheduled_t, jobs} (a submit request that came due while its producer had
              the most allowed in flight: offered, never sent)

Each process writes its own JSON-lines file (one write + flush per record, so a SIGKILLed worker
leaves every record it finished); `merge()` sorts them all by time into one `history.jsonl`
whose line numbers the checker quotes.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import threading
import time
from typing import Any, Iterable

#: Completion types.
OK, FAIL, INFO = "ok", "fail", "info"


class HistoryWriter:
    """Appends one process's records to its own file; thread-safe."""

    def __init__(self, path: str, proc: str) -> None:
        self.path = path
        self.proc = proc
        self._file = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _write(self, record: dict) -> None:
        self._write_all([record])

    def _write_all(self, records: list[dict]) -> None:
        text = "".join(json.dumps(record, separators=(",", ":"), default=str) + "\n" for record in records)
        with self._lock:
            if not self._file.closed:
                self._file.write(text)
                self._file.flush()

    def invoke(self, op: str, proc: str | None = None, **fields: Any) -> str:
        """Records the start of an op; returns its op id for `complete`."""
        proc = proc or self.proc
        op_id = f"{proc}:{next(self._ids)}"
        self._write({"proc": proc, "op": op, "type": "invoke", "op_id": op_id, "t": time.monotonic(),
                     "wall": time.time(), **fields})
        return op_id

    def invoke_many(self, op: str, items: list[dict], proc: str | None = None) -> list[str]:
        """Records the start of one op per item (one request carrying many jobs), in one write."""
        proc = proc or self.proc
        t, wall = time.monotonic(), time.time()
        op_ids = [f"{proc}:{next(self._ids)}" for _ in items]
        self._write_all([{"proc": proc, "op": op, "type": "invoke", "op_id": op_id, "t": t, "wall": wall, **fields}
                         for op_id, fields in zip(op_ids, items)])
        return op_ids

    def complete_many(self, op_ids: list[str], op: str, kinds: str | list[str], items: list[dict]) -> None:
        """Completes the ops of `invoke_many` (one kind for all, or one per op), each with its own
        fields, in one write."""
        kinds = [kinds] * len(op_ids) if isinstance(kinds, str) else kinds
        assert all(kind in (OK, FAIL, INFO) for kind in kinds), kinds
        t, wall = time.monotonic(), time.time()
        self._write_all([{"proc": op_id.rsplit(":", 1)[0], "op": op, "type": kind, "op_id": op_id, "t": t,
                          "wall": wall, **fields} for op_id, kind, fields in zip(op_ids, kinds, items)])

    def complete(self, op_id: str, op: str, kind: str, **fields: Any) -> None:
        assert kind in (OK, FAIL, INFO), kind
        self._write({"proc": op_id.rsplit(":", 1)[0], "op": op, "type": kind, "op_id": op_id,
                     "t": time.monotonic(), "wall": time.time(), **fields})

    def event(self, op: str, proc: str | None = None, **fields: Any) -> None:
        self._write({"proc": proc or self.proc, "op": op, "type": "event", "t": time.monotonic(),
                     "wall": time.time(), **fields})

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_records(path: str) -> list[dict]:
    """Records of one JSON-lines file; a torn last line (a killed writer) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for text in f:
            text = text.strip()
            if not text:
                continue
            try:
                records.append(json.loads(text))
            except ValueError:
                continue
    return records


def read_history_dir(directory: str) -> list[dict]:
    """The records of every `*.jsonl` in directory, ordered by time (no `line` numbers yet)."""
    records: list[dict] = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        records.extend(read_records(path))
    records.sort(key=lambda r: r["t"])  # stable: one writer's records keep their order at equal times
    return records


def merge(directory: str, out_path: str) -> list[dict]:
    """Merges every `*.jsonl` in directory into out_path, ordered by time; sets `line` (1-based)."""
    records = read_history_dir(directory)
    with open(out_path, "w", encoding="utf-8") as f:
        for line, record in enumerate(records, start=1):
            record["line"] = line
            f.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
    return records


def numbered(records: Iterable[dict]) -> list[dict]:
    """Records with `line` set where missing (hand-written histories in tests)."""
    result = []
    for line, record in enumerate(records, start=1):
        result.append(record if "line" in record else {**record, "line": line})
    return result
