"""Toxics and the pipeline that carries one direction of one proxied connection.

Theory of operation
-------------------
A direction of a connection (a *link*, see ``proxy.py``) is a chain::

    reader -> Pipe -> Stage(toxic 1) -> Pipe -> Stage(toxic 2) -> ... -> Pipe (tail) -> writer

A ``Pipe`` is a small bounded FIFO of items. An item is a ``Chunk`` (bytes plus the loop time
at which the reader received them) or an ``End`` marker: ``EOF`` (the source closed), ``CLOSE``
(a toxic closed the stream: timeout, limit_data) or ``RESET`` (reset_peer). A ``Stage`` is one
asyncio task running one toxic's ``pipe()`` coroutine: it takes items from its input pipe and
puts (possibly delayed, cut or dropped) items into its output pipe. Every stage forwards the
first ``End`` it sees and then stops, so an end travels behind the data that came before it.
This is the shape of the real server's ``ToxicStub`` chain (channels between goroutines).

Pipes are bounded so that a slow toxic (bandwidth, latency) pushes back on the reader and, in
the end, on the sending peer's socket, as the real server's Go channels do. The bound is soft
for ``push()``: a stage that is interrupted while it holds data flushes it with ``push()``,
which never blocks, because an interrupt must not wait on the pipeline it is rewiring.

Changing the chain while data flows
-----------------------------------
The real server interrupts a stub, swaps channels, and restarts it. Here everything runs on
one event loop, so a rewiring step that does not await is atomic:

* add: a new pipe + stage is put in front of the tail and the previous last producer's
  ``output`` is pointed at the new pipe. Data already in the tail stays ahead of anything the
  new stage emits, so nothing is reordered, and nothing is interrupted.
* remove: the stage's task is cancelled (that is the "interrupt"); its ``CancelledError``
  handler pushes whatever it was holding (``Stage.held``) into its output; then its input pipe
  is *retired into* its output (items moved over in order, and any producer blocked on the old
  pipe follows the forward pointer), and the previous producer's ``output`` is re-pointed.
* update: the stage is interrupted the same way and restarted with the new attributes.

Data is only dropped where a toxic drops it by design (timeout, reset_peer, limit_data).

Toxicity is drawn each time a stage starts running a toxic (connection start, toxic added,
toxic updated), like ``ToxicStub.Run``: below the toxicity the toxic runs, otherwise a no-op.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import random
from dataclasses import dataclass, field, fields
from typing import Any, Awaitable, Callable, ClassVar

from .errors import (INVALID_STREAM, INVALID_TOXIC_TYPE, TOXIC_ALREADY_EXISTS, decode_field,
                     require_object)

UPSTREAM = "upstream"      # client -> server
DOWNSTREAM = "downstream"  # server -> client
DIRECTIONS = (UPSTREAM, DOWNSTREAM)  # the real server lists upstream toxics first

PIPE_LIMIT_DEFAULT = 4     # items. Go's channels are unbuffered; a little slack saves task switches


class End(enum.Enum):
    EOF = "eof"        # the source closed (or failed): close the destination normally
    CLOSE = "close"    # a toxic ended the stream on purpose (timeout, limit_data)
    RESET = "reset"    # reset_peer: close both sockets with an RST


@dataclass(slots=True)
class Chunk:
    data: bytes
    stamp: float  # loop.time() when the reader received it; latency is measured from here


Item = Chunk | End


class Pipe:
    """A bounded FIFO between two pipeline stages that can be retired into another pipe."""

    def __init__(self, limit: int = PIPE_LIMIT_DEFAULT) -> None:
        self._items: collections.deque[Item] = collections.deque()
        self._limit = max(1, limit)
        self._forward: Pipe | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __len__(self) -> int:
        return len(self._items)

    def resolve(self) -> Pipe:
        """The live pipe this one stands for (itself unless it was retired)."""
        pipe = self
        while pipe._forward is not None:
            pipe = pipe._forward
        return pipe

    def push(self, item: Item) -> None:
        """Append without waiting, even past the limit (flushes during an interrupt)."""
        pipe = self.resolve()
        pipe._items.append(item)
        pipe._readable.set()
        if len(pipe._items) >= pipe._limit:
            pipe._writable.clear()

    async def put(self, item: Item) -> None:
        """Append, waiting while the pipe is full (this is the backpressure)."""
        while True:
            pipe = self.resolve()  # again after every wait: the pipe may have been retired meanwhile
            if len(pipe._items) < pipe._limit:
                pipe.push(item)
                return
            await pipe._writable.wait()

    async def get(self) -> Item:
        """Take the oldest item. Cancelling a waiting get() loses nothing."""
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if not self._items:
            self._readable.clear()
        if len(self._items) < self._limit:
            self._writable.set()
        return item

    def retire(self, into: Pipe) -> None:
        """Move every item into ``into`` (in order) and forward all later puts there."""
        while self._items:
            into.push(self._items.popleft())
        self._forward = into
        self._readable.clear()
        self._writable.set()  # wake producers blocked on this pipe so that they re-resolve


class Stage:
    """One toxic running on one link: the counterpart of the real server's ToxicStub."""

    def __init__(self, toxic: Toxic, input: Pipe, output: Pipe, rng: random.Random) -> None:
        self.toxic = toxic
        self.input = input
        self.output = output
        self.rng = rng
        self.state = toxic.impl.new_state()  # per connection, kept across updates (limit_data)
        self.held: Item | None = None        # data taken from input and not yet in output
        self.committed = False               # reset_peer fired: no interrupt can save the link
        self.active = False                  # the toxicity draw of the current run
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.active = self.rng.random() < self.toxic.toxicity
        body = self.toxic.impl.pipe if self.active else noop_pipe
        self._task = asyncio.get_running_loop().create_task(self._run(body))

    async def _run(self, body: Callable[[Stage], Awaitable[None]]) -> None:
        try:
            await body(self)
        except asyncio.CancelledError:
            # Interrupted (toxic removed/updated, or the connection closed): never drop data
            # on the floor, as the real toxics' interrupt branches say.
            if self.held is not None:
                self.output.push(self.held)
                self.held = None
            raise

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def interrupt(self) -> bool:
        """Stop the running toxic; False if it already ended or cannot be stopped."""
        if not self.running or self.committed:
            return False
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait({self._task})  # not `await task`: that would re-raise the cancel here
        return True

    def cancel(self) -> None:
        """Connection teardown: stop whatever runs, committed or not."""
        if self._task is not None:
            self._task.cancel()

    async def emit(self, item: Item) -> None:
        """Put one item into the output; it counts as held until the put completes."""
        self.held = item
        await self.output.put(item)
        self.held = None


async def noop_pipe(stage: Stage) -> None:
    """What a stage runs when the toxicity draw says "not this time"."""
    while True:
        item = await stage.input.get()
        await stage.emit(item)
        if isinstance(item, End):
            return


async def _forever() -> None:
    await asyncio.Event().wait()


# --- toxic types ------------------------------------------------------------------------------

class ToxicType:
    """Attributes (dataclass fields, all integers as in Go) plus the pipe coroutine."""

    kind: ClassVar[str]
    go_struct: ClassVar[str]        # the Go type name, for decode error messages
    go_int: ClassVar[str] = "int64"
    buffer: ClassVar[int] = PIPE_LIMIT_DEFAULT  # size of the pipe feeding this toxic
    closes_on_removal: ClassVar[bool] = False   # Go's CleanupToxic: removal closes the link

    def new_state(self) -> Any:
        return None

    def attributes(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def decode(self, raw: Any) -> dict[str, int]:
        """Checked attribute updates from a request's ``attributes`` value (unknown keys ignored)."""
        if raw is None:
            return {}
        obj = require_object(raw, f"toxics.{self.go_struct}")
        updates = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = decode_field(obj, f.name, self.go_int, f"{self.go_struct}.attributes")
            if value is not None:
                updates[f.name] = value
        return updates

    async def pipe(self, stage: Stage) -> None:
        raise NotImplementedError


@dataclass
class Latency(ToxicType):
    kind: ClassVar[str] = "latency"
    go_struct: ClassVar[str] = "LatencyToxic"
    buffer: ClassVar[int] = 1024  # as the real one: data keeps arriving while earlier data waits
    latency: int = 0  # ms
    jitter: int = 0   # ms, uniform in [-jitter, +jitter)

    def delay_s(self, rng: random.Random) -> float:
        delay = self.latency
        if self.jitter > 0:
            delay += rng.randrange(self.jitter * 2) - self.jitter
        return delay / 1000

    async def pipe(self, stage: Stage) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await stage.input.get()
            if isinstance(item, End):
                await stage.emit(item)
                return
            stage.held = item
            # Measured from arrival, so chunks queued behind a delayed one wait only the rest.
            wait = self.delay_s(stage.rng) - (loop.time() - item.stamp)
            if wait > 0:
                await asyncio.sleep(wait)
                item.stamp += wait
            await stage.emit(item)


@dataclass
class Bandwidth(ToxicType):
    kind: ClassVar[str] = "bandwidth"
    go_struct: ClassVar[str] = "BandwidthToxic"
    rate: int = 0  # KB/s, 1 KB = 1000 bytes

    async def pipe(self, stage: Stage) -> None:
        loop = asyncio.get_running_loop()
        debt = 0.0  # seconds this run still owes for data already sent (carries oversleep credit)
        while True:
            item = await stage.input.get()
            if isinstance(item, End):
                await stage.emit(item)
                return
            stage.held = item
            if self.rate <= 0:
                # The real toxic never lets data through at rate 0 (its 100 ms slicing loop
                # cannot make progress); the data is released when the toxic changes.
                await _forever()
            debt += len(item.data) / (self.rate * 1000)
            step = self.rate * 100  # bytes per 100 ms: big chunks go out in 100 ms slices
            rest = item.data
            while len(rest) > step:
                await asyncio.sleep(0.1)
                await stage.output.put(Chunk(rest[:step], item.stamp))
                rest = rest[step:]
                stage.held = Chunk(rest, item.stamp)
                debt -= 0.1
            started = loop.time()
            if debt > 0:
                await asyncio.sleep(debt)
            debt -= loop.time() - started
            await stage.emit(Chunk(rest, item.stamp))


@dataclass
class Timeout(ToxicType):
    kind: ClassVar[str] = "timeout"
    go_struct: ClassVar[str] = "TimeoutToxic"
    closes_on_removal: ClassVar[bool] = True  # the real Cleanup() closes the stub
    timeout: int = 0  # ms; 0 = never close, just swallow everything

    async def pipe(self, stage: Stage) -> None:
        limit = self.timeout / 1000 if self.timeout > 0 else None
        while True:
            try:
                # A fresh timer per received chunk, as the real select on time.After does:
                # the connection closes after `timeout` ms without data.
                async with asyncio.timeout(limit):
                    item = await stage.input.get()
            except TimeoutError:
                await stage.emit(End.CLOSE)
                return
            if isinstance(item, End):
                await stage.emit(item)
                return
            # Data chunks are dropped: this toxic is a black hole.


@dataclass
class ResetPeer(ToxicType):
    kind: ClassVar[str] = "reset_peer"
    go_struct: ClassVar[str] = "ResetToxic"
    timeout: int = 0  # ms between the first data (or end of stream) and the RST

    async def pipe(self, stage: Stage) -> None:
        await stage.input.get()  # the trigger's data is dropped, as in the real toxic
        # The real toxic waits without listening for interrupts: removing it now changes nothing.
        stage.committed = True
        await asyncio.sleep(self.timeout / 1000)
        await stage.emit(End.RESET)


@dataclass
class SlowClose(ToxicType):
    kind: ClassVar[str] = "slow_close"
    go_struct: ClassVar[str] = "SlowCloseToxic"
    delay: int = 0  # ms

    async def pipe(self, stage: Stage) -> None:
        while True:
            item = await stage.input.get()
            if isinstance(item, End):
                stage.held = item  # an interrupt closes at once rather than never
                await asyncio.sleep(self.delay / 1000)
                await stage.emit(item)
                return
            await stage.emit(item)


@dataclass
class Slicer(ToxicType):
    kind: ClassVar[str] = "slicer"
    go_struct: ClassVar[str] = "SlicerToxic"
    go_int: ClassVar[str] = "int"
    average_size: int = 0    # bytes
    size_variation: int = 0  # bytes, should be below average_size
    delay: int = 0           # MICROseconds between slices

    def slices(self, size: int, rng: random.Random) -> list[tuple[int, int]]:
        """[start, end) offsets: halve until a piece is within average + variation (as Go)."""
        out: list[tuple[int, int]] = []
        todo = [(0, size)]
        while todo:
            start, end = todo.pop()
            if (end - start) - self.average_size <= self.size_variation or end - start <= 1:
                out.append((start, end))
                continue
            mid = start + (end - start) // 2
            if self.size_variation > 0:
                mid += rng.randrange(self.size_variation * 2) - self.size_variation
            # Go recurses forever (average 0) or slices out of range (variation > average);
            # keep every piece non-empty instead.
            mid = min(max(mid, start + 1), end - 1)
            todo.append((mid, end))
            todo.append((start, mid))
        return out

    async def pipe(self, stage: Stage) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await stage.input.get()
            if isinstance(item, End):
                await stage.emit(item)
                return
            data = item.data
            due = loop.time()
            for start, end in self.slices(len(data), stage.rng):
                stage.held = Chunk(data[start:], item.stamp)
                await stage.output.put(Chunk(data[start:end], item.stamp))
                stage.held = Chunk(data[end:], item.stamp) if end < len(data) else None
                # The delay is in microseconds, but the event loop's timers are only good to
                # about 1 ms (epoll rounds up): sleeping per slice would cap us near 1000
                # slices/s. Pace against a due time instead; below 1 ms of debt just yield,
                # so the writer still sees (and writes) each slice on its own.
                due = max(due, loop.time() - 0.001) + self.delay / 1_000_000
                wait = due - loop.time()
                await asyncio.sleep(wait if wait >= 0.001 else 0)
            stage.held = None


@dataclass
class LimitData(ToxicType):
    kind: ClassVar[str] = "limit_data"
    go_struct: ClassVar[str] = "LimitDataToxic"
    bytes: int = 0  # bytes let through (per connection and direction) before the close

    def new_state(self) -> Any:
        return [0]  # bytes let through so far; survives updates of the toxic

    async def pipe(self, stage: Stage) -> None:
        sent = stage.state
        while True:
            item = await stage.input.get()
            if isinstance(item, End):
                await stage.emit(item)
                return
            room = max(self.bytes - sent[0], 0)
            if len(item.data) > room:
                item = Chunk(item.data[:room], item.stamp)
            if item.data:
                sent[0] += len(item.data)  # counted first: an interrupt flushes it anyway
                await stage.emit(item)
            if self.bytes - sent[0] <= 0:
                await stage.emit(End.CLOSE)
                return


TOXIC_TYPES: dict[str, type[ToxicType]] = {
    cls.kind: cls for cls in (Latency, Bandwidth, Timeout, ResetPeer, SlowClose, Slicer, LimitData)
}


@dataclass
class Toxic:
    """A named toxic of a proxy (the real ToxicWrapper)."""

    name: str
    type: str
    stream: str        # as the client spelled it; `direction` is the parsed value
    direction: str
    toxicity: float
    impl: ToxicType = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        # Field order of the real JSON: attributes, name, type, stream, toxicity.
        toxicity: float | int = self.toxicity
        if float(toxicity).is_integer():
            toxicity = int(toxicity)  # Go prints a float32 1.0 as 1
        return {"attributes": self.impl.attributes(), "name": self.name, "type": self.type,
                "stream": self.stream, "toxicity": toxicity}


def parse_direction(stream: str) -> str:
    direction = stream.lower()
    if direction not in DIRECTIONS:
        raise INVALID_STREAM()
    return direction


def toxic_from_json(body: Any, exists: Callable[[str], bool]) -> Toxic:
    """Build a toxic from a create request, checking in the real server's order."""
    obj = require_object(body, "toxics.ToxicWrapper")
    where = "ToxicWrapper"
    name = decode_field(obj, "name", "string", where) or ""
    type_name = decode_field(obj, "type", "string", where) or ""
    stream = decode_field(obj, "stream", "string", where)
    stream = "downstream" if stream is None else stream
    toxicity = decode_field(obj, "toxicity", "float32", where)
    direction = parse_direction(stream)
    if not name:
        name = f"{type_name}_{stream}"
    cls = TOXIC_TYPES.get(type_name)
    if cls is None:
        raise INVALID_TOXIC_TYPE()
    if exists(name):
        raise TOXIC_ALREADY_EXISTS()
    impl = cls()
    for key, value in impl.decode(obj.get("attributes")).items():
        setattr(impl, key, value)
    return Toxic(name=name, type=type_name, stream=stream, direction=direction,
                 toxicity=1.0 if toxicity is None else toxicity, impl=impl)


def apply_update(toxic: Toxic, body: Any) -> None:
    """Apply an update request (``attributes`` and/or ``toxicity``); checks all before changing."""
    obj = require_object(body, "struct { Attributes interface {}; Toxicity float32 }")
    updates = toxic.impl.decode(obj.get("attributes"))
    toxicity = decode_field(obj, "toxicity", "float32", "ToxicWrapper")
    for key, value in updates.items():
        setattr(toxic.impl, key, value)
    if toxicity is not None:
        toxic.toxicity = toxicity


__all__ = ["Chunk", "DIRECTIONS", "DOWNSTREAM", "End", "Pipe", "Stage",
           "TOXIC_TYPES", "Toxic", "ToxicType", "UPSTREAM", "apply_update", "noop_pipe",
           "parse_direction", "toxic_from_json"]
