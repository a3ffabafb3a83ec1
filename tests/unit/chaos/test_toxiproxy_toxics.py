"""The toxic pipeline of chaos.toxiproxy without sockets: pipes, stages, links, request parsing.

Stages run on the test's event loop with hand-fed pipes; a ``Link`` runs between an
``asyncio.StreamReader`` the test feeds and a fake writer that records bytes. Waits poll
with deadlines (``asyncio.sleep(0)`` only yields to the loop).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftq.chaos.toxiproxy.errors import ApiError
from raftq.chaos.toxiproxy.proxy import Link, split_host_port
from raftq.chaos.toxiproxy.toxics import (TOXIC_TYPES, Chunk, End, Pipe, Slicer, Stage, Toxic, apply_update,
                                    toxic_from_json)

DEADLINE_S = 10.0


async def until(predicate, what: str, timeout_s: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def make_toxic(kind: str, toxicity: float = 1.0, stream: str = "downstream", **attributes: int) -> Toxic:
    return toxic_from_json({"type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes,
                            "name": f"{kind}_{random.random()}"}, exists=lambda name: False)


def stage_for(toxic: Toxic, seed: int = 0) -> tuple[Pipe, Stage, Pipe]:
    source, sink = Pipe(), Pipe(limit=1000)
    stage = Stage(toxic, source, sink, random.Random(seed))
    stage.start()
    return source, stage, sink


def drain(pipe: Pipe) -> list:
    items = []
    while len(pipe):
        items.append(pipe._items.popleft())
    return items


def chunk(data: bytes) -> Chunk:
    return Chunk(data, asyncio.get_running_loop().time())


# --- pipes --------------------------------------------------------------------------------------

async def test_pipe_backpressure_and_retire_keep_order() -> None:
    old, new = Pipe(limit=2), Pipe(limit=10)
    await old.put(1)
    await old.put(2)
    blocked = asyncio.create_task(old.put(3))  # the pipe is full: this put waits
    await asyncio.sleep(0)
    assert not blocked.done()
    await new.put(0)
    old.retire(new)  # items move over in order; the blocked put follows the forward pointer
    await asyncio.wait_for(blocked, DEADLINE_S)
    assert [await new.get() for _ in range(4)] == [0, 1, 2, 3]


async def test_cancelled_get_loses_nothing() -> None:
    pipe = Pipe()
    waiter = asyncio.create_task(pipe.get())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.wait({waiter})
    await pipe.put("x")
    assert await pipe.get() == "x"


# --- toxics on a single stage --------------------------------------------------------------------

async def test_interrupting_latency_flushes_the_held_chunk() -> None:
    source, stage, sink = stage_for(make_toxic("latency", latency=60_000))
    await source.put(chunk(b"a"))
    await source.put(chunk(b"b"))
    await until(lambda: stage.held is not None, "latency to hold a chunk")
    assert await stage.interrupt() is True
    assert [c.data for c in drain(sink)] == [b"a"]  # "b" is still in the source, for the next run
    assert len(source) == 1


async def test_limit_data_counts_across_updates_then_closes() -> None:
    toxic = make_toxic("limit_data", bytes=10)
    source, stage, sink = stage_for(toxic)
    await source.put(chunk(b"123456"))
    await until(lambda: len(sink) == 1, "first chunk")
    assert await stage.interrupt()
    stage.start()  # what an update does: same state, new run
    await source.put(chunk(b"789abc"))
    await until(lambda: len(sink) == 3, "the cut and the close")
    assert [getattr(i, "data", i) for i in drain(sink)] == [b"123456", b"789a", End.CLOSE]


async def test_timeout_drops_data_and_closes_after_silence() -> None:
    source, stage, sink = stage_for(make_toxic("timeout", timeout=50))
    await source.put(chunk(b"dropped"))
    await until(lambda: len(sink) == 1, "the close")
    assert drain(sink) == [End.CLOSE]
    assert not stage.running


async def test_timeout_zero_passes_the_end_of_stream() -> None:
    source, stage, sink = stage_for(make_toxic("timeout", timeout=0))
    await source.put(chunk(b"dropped"))
    await source.put(End.EOF)
    await until(lambda: len(sink) == 1, "the end")
    assert drain(sink) == [End.EOF]


async def test_reset_peer_cannot_be_interrupted_once_triggered() -> None:
    source, stage, sink = stage_for(make_toxic("reset_peer", timeout=50))
    await source.put(chunk(b"trigger"))
    await until(lambda: stage.committed, "the trigger")
    assert await stage.interrupt() is False
    await until(lambda: len(sink) == 1, "the reset")
    assert drain(sink) == [End.RESET]


async def test_toxicity_zero_runs_a_noop() -> None:
    source, stage, sink = stage_for(make_toxic("timeout", toxicity=0.0, timeout=0))
    await source.put(chunk(b"through"))
    await until(lambda: len(sink) == 1, "the data")
    assert drain(sink)[0].data == b"through" and stage.active is False


async def test_bandwidth_zero_holds_data_until_changed() -> None:
    source, stage, sink = stage_for(make_toxic("bandwidth", rate=0))
    await source.put(chunk(b"stuck"))
    await until(lambda: stage.held is not None, "the data to be held")
    assert len(sink) == 0
    assert await stage.interrupt()
    assert drain(sink)[0].data == b"stuck"


async def test_slow_close_delays_only_the_end() -> None:
    loop = asyncio.get_running_loop()
    source, stage, sink = stage_for(make_toxic("slow_close", delay=100))
    await source.put(chunk(b"data"))
    await until(lambda: len(sink) == 1, "the data")
    started = loop.time()
    await source.put(End.EOF)
    await until(lambda: len(sink) == 2, "the end")
    assert loop.time() - started >= 0.1 - 0.005


# --- slicer offsets -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 5000), average=st.integers(-5, 300), variation=st.integers(0, 400), seed=st.integers())
def test_slicer_pieces_cover_the_data_in_order(size: int, average: int, variation: int, seed: int) -> None:
    slicer = Slicer(average_size=average, size_variation=variation)
    pieces = slicer.slices(size, random.Random(seed))
    assert pieces[0][0] == 0 and pieces[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    if size:
        assert all(end - start <= max(average + variation, 1) for start, end in pieces)
        assert all(end > start for start, end in pieces)


# --- a whole link under changes -------------------------------------------------------------------

class FakeWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        self.closed = True


class FakeConnection:
    closed = False

    def link_done(self) -> None: ...
    def reset(self) -> None: raise AssertionError("no reset expected")
    def abort(self) -> None: raise AssertionError("no abort expected")


async def test_link_rewiring_under_traffic_keeps_every_byte_in_order() -> None:
    rng = random.Random(7)
    reader, writer = asyncio.StreamReader(), FakeWriter()
    link = Link(FakeConnection(), "downstream", reader, writer, [], random.Random(1))  # type: ignore[arg-type]
    link.start()
    makers = [lambda: make_toxic("latency", latency=rng.randrange(0, 20), jitter=5),
              lambda: make_toxic("slicer", average_size=rng.randrange(1, 50), size_variation=3, delay=50),
              lambda: make_toxic("bandwidth", rate=rng.randrange(200, 2000)),
              lambda: make_toxic("slow_close", delay=1),
              lambda: make_toxic("limit_data", bytes=10**9)]
    sent = bytearray()
    live: list[Toxic] = []
    for step in range(60):
        block = bytes((step + i) % 251 for i in range(rng.randrange(1, 3000)))
        reader.feed_data(block)
        sent += block
        if live and (len(live) > 4 or rng.random() < 0.4):
            toxic = live.pop(rng.randrange(len(live)))
            await link.remove(toxic)
        elif rng.random() < 0.2 and live:
            toxic = rng.choice(live)
            apply_update(toxic, {"toxicity": rng.choice([0.0, 1.0])})
            await link.update(toxic)
        else:
            live.append(makers[rng.randrange(len(makers))]())
            link.add(live[-1])
        await asyncio.sleep(rng.random() / 500)  # let data move between changes
    reader.feed_eof()
    await until(lambda: writer.closed, "the end of the stream to reach the writer")
    assert bytes(writer.data) == bytes(sent)
    link.cancel()


# --- request parsing ------------------------------------------------------------------------------

def test_toxic_defaults_and_json_shape() -> None:
    toxic = toxic_from_json({"type": "slicer"}, exists=lambda name: False)
    assert toxic.to_json() == {"attributes": {"average_size": 0, "size_variation": 0, "delay": 0},
                               "name": "slicer_downstream", "type": "slicer", "stream": "downstream", "toxicity": 1}
    toxic = toxic_from_json({"type": "latency", "stream": "UpStream", "attributes": {"latency": 5, "other": "x"}},
                            exists=lambda name: False)
    assert (toxic.name, toxic.direction, toxic.impl.attributes()) == ("latency_UpStream", "upstream",
                                                                      {"latency": 5, "jitter": 0})
    assert set(TOXIC_TYPES) == {"latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer",
                                "limit_data"}


@pytest.mark.parametrize("body, status, message", [
    ({"type": "latency", "stream": "both"}, 400, "stream was invalid, can be either upstream or downstream"),
    ({"type": "gremlin"}, 400, "invalid toxic type"),
    ({}, 400, "invalid toxic type"),
    ({"type": "latency", "name": "taken"}, 409, "toxic already exists"),
    ({"type": "latency", "attributes": {"latency": True}}, 400, None),
    ({"type": "latency", "attributes": [1]}, 400, None),
    ({"type": "latency", "toxicity": None, "attributes": {"jitter": 2**70}}, 400, None),
    ([], 400, None),
])
def test_toxic_request_errors(body, status: int, message: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        toxic_from_json(body, exists=lambda name: name == "taken")
    assert caught.value.status == status
    if message is None:
        assert caught.value.message.startswith("bad request body: json: cannot unmarshal")
    else:
        assert caught.value.message == message


def test_update_checks_everything_before_changing_anything() -> None:
    toxic = make_toxic("latency", latency=10, jitter=1)
    with pytest.raises(ApiError):
        apply_update(toxic, {"attributes": {"latency": 20}, "toxicity": "high"})
    assert toxic.impl.attributes() == {"latency": 10, "jitter": 1}
    apply_update(toxic, {"attributes": {"jitter": 3}, "toxicity": 0.25})
    assert (toxic.impl.attributes(), toxic.toxicity) == ({"latency": 10, "jitter": 3}, 0.25)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:80", ("127.0.0.1", "80")), ("[::1]:0", ("::1", "0")), ("localhost:", ("localhost", "")),
    (":8474", ("", "8474")),
])
def test_split_host_port(address: str, expected: tuple[str, str]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["nohost", "::1:80", "[::1]80"])
def test_split_host_port_errors(address: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(address)
