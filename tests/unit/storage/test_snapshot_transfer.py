"""InstallSnapshot transfers between two real snapshot stores over real HTTP (aiohttp, loopback).

The follower side is the node's own /raft/snapshot handler logic (SnapshotReceiver) behind a
small aiohttp app; a middleware can cut a request off or flip a byte in flight.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from raftq.cluster.snapshot_transfer import (
    CHUNK_BYTES, FROM_HEADER, OFFSET_HEADER, SNAPSHOT_HEADER, TERM_HEADER, SnapshotOffer, SnapshotReceiver,
    SnapshotSender,
)
from raftq.cluster.storage.errors import SnapshotCorruptionError
from raftq.cluster.storage.snapshots import SnapshotStore
from raftq.cluster.transport.http import SECRET_HEADER


def write_snapshot_file(store: SnapshotStore, index: int, term: int, size: int) -> bytes:
    body = os.urandom(size)
    with store.writer(index, term) as writer:
        for start in range(0, size, 100_000):
            writer.write(body[start:start + 100_000])
        meta = writer.commit()
    with open(meta.path, "rb") as f:
        return f.read()


class Follower:
    """A receiver behind real HTTP; `cut_after` chunks are accepted before requests fail."""

    def __init__(self, directory: str) -> None:
        self.store = SnapshotStore.open(directory)
        self.installed: list[tuple[str, int, int]] = []
        self.receiver = SnapshotReceiver(self.store, installed=self._installed)
        self.chunks_accepted = 0
        self.cut_after: int | None = None
        self.flip_in_chunk: int | None = None
        self.bytes_received = 0

    def _installed(self, leader: str, term: int, meta) -> None:
        self.installed.append((leader, term, meta.index))

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get(SECRET_HEADER) != "s3cret":  # the node's auth middleware, in short
            return web.json_response({"error": "forbidden"}, status=403)
        chunk = await request.read()
        if chunk:
            if self.cut_after is not None and self.chunks_accepted >= self.cut_after:
                return web.json_response({"error": "injected failure"}, status=503)
            if self.flip_in_chunk == self.chunks_accepted:
                chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
            self.chunks_accepted += 1
            self.bytes_received += len(chunk)
        offer = SnapshotOffer.parse(request.headers[SNAPSHOT_HEADER])
        try:
            answer = await self.receiver.receive(request.headers[FROM_HEADER], int(request.headers[TERM_HEADER]),
                                                 offer, int(request.headers[OFFSET_HEADER]), chunk)
        except SnapshotCorruptionError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.json_response(answer)


@pytest.fixture
async def pair(tmp_path):
    follower = Follower(str(tmp_path / "follower"))
    app = web.Application(client_max_size=CHUNK_BYTES + 1024)
    app.router.add_post("/raft/snapshot", follower.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    leader_store = SnapshotStore.open(str(tmp_path / "leader"))
    reports: list[tuple[str, bool]] = []
    done = asyncio.Event()

    def report(peer: str, delivered: bool) -> None:
        reports.append((peer, delivered))
        done.set()

    sender = SnapshotSender("n1", {"n2": str(server.make_url(""))}, leader_store, secret="s3cret",
                            current_term=lambda: 7, report=report)
    yield leader_store, follower, sender, reports, done
    await sender.close()
    await follower.receiver.close()
    await server.close()


async def transfer(sender: SnapshotSender, done: asyncio.Event) -> None:
    done.clear()
    sender.request("n2")
    await asyncio.wait_for(done.wait(), timeout=30)


async def test_a_snapshot_arrives_whole_and_is_stepped_into_the_core(pair):
    leader_store, follower, sender, reports, done = pair
    data = write_snapshot_file(leader_store, 500, 3, 3 * CHUNK_BYTES + 12345)
    await transfer(sender, done)
    assert reports == [("n2", True)]
    assert follower.installed == [("n1", 7, 500)]
    meta = follower.store.newest()
    assert meta is not None and (meta.index, meta.term) == (500, 3)
    with open(meta.path, "rb") as f:
        assert f.read() == data


async def test_an_interrupted_transfer_resumes_where_the_follower_left_off(pair):
    leader_store, follower, sender, reports, done = pair
    data = write_snapshot_file(leader_store, 900, 2, 5 * CHUNK_BYTES)
    follower.cut_after = 2
    await transfer(sender, done)
    assert reports == [("n2", False)] and follower.installed == []
    follower.cut_after = None
    sender._failed_at.clear()  # no retry delay in the test  # noqa: SLF001
    await transfer(sender, done)
    assert reports[-1] == ("n2", True) and follower.installed == [("n1", 7, 900)]
    # The second transfer sent only what was missing: two chunks were already on disk.
    assert follower.bytes_received == len(data)
    with open(follower.store.newest().path, "rb") as f:
        assert f.read() == data


async def test_a_chunk_damaged_in_flight_is_caught_and_the_transfer_starts_over(pair):
    leader_store, follower, sender, reports, done = pair
    data = write_snapshot_file(leader_store, 77, 1, 2 * CHUNK_BYTES + 10)
    follower.flip_in_chunk = 1
    await transfer(sender, done)
    assert reports == [("n2", False)] and follower.installed == [] and follower.store.list() == []
    assert not [name for name in os.listdir(follower.store.directory) if name.endswith(".part")]
    follower.flip_in_chunk = None
    sender._failed_at.clear()  # noqa: SLF001
    await transfer(sender, done)
    assert reports[-1] == ("n2", True)
    with open(follower.store.newest().path, "rb") as f:
        assert f.read() == data


async def test_a_snapshot_the_follower_already_holds_is_installed_without_sending_it_again(pair):
    leader_store, follower, sender, reports, done = pair
    write_snapshot_file(leader_store, 40, 1, CHUNK_BYTES + 1)
    await transfer(sender, done)
    sent = follower.bytes_received
    sender._failed_at.clear()  # noqa: SLF001
    await transfer(sender, done)
    assert reports == [("n2", True), ("n2", True)]
    assert follower.bytes_received == sent and follower.installed == [("n1", 7, 40), ("n1", 7, 40)]


async def test_a_wrong_secret_is_refused(pair, tmp_path):
    leader_store, follower, sender, reports, done = pair
    write_snapshot_file(leader_store, 10, 1, 1000)
    sender._secret = "wrong"  # noqa: SLF001
    await transfer(sender, done)
    assert reports == [("n2", False)] and follower.installed == [] and follower.store.list() == []
