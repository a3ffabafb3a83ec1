"""The peers' endpoints, `/raft/*`: Raft messages (a WebSocket stream, or one POST for a peer of
an older release during a rolling upgrade) and InstallSnapshot chunks.

Peers present the cluster secret, not a client token: `app.auth_middleware` checks it (and the
content type) before a view runs or a byte of the body is read. Messages go to the node's inbox (`Node.deliver`), never straight into the core: the drive
loop steps them. A SNAP message arrives only through `/raft/snapshot`, once its file is stored.

A stream's binary frames are decoded and delivered from the connection's own data callback
(`peer_stream.py`, on the aiohttp releases it mirrors), in the loop turn their bytes are read, not
by the view's task a turn later: every commit waits for one such frame on the leader (the
follower's answer) and one on the follower (the append), so the drive loop wakes one turn sooner
each way. What the inbox holds is bounded by
its count (`Node.deliver` drops a frame beyond it) and by the leader's in-flight appends per
follower (bytes and count, the core's flow control).
"""

from __future__ import annotations

import logging
from functools import partial

from aiohttp import WSCloseCode, WSMsgType, web

from raftq.cluster.api.keys import NODE, PEER_STREAMS
from raftq.cluster.api.peer_stream import peer_stream_response
from raftq.cluster.api.wire import ApiError
from raftq.cluster.config import NODE_ID_PATTERN
from raftq.cluster.raft.codec import decode_messages
from raftq.cluster.raft.messages import MessageType
from raftq.cluster.records import record
from raftq.cluster.snapshot_transfer import FROM_HEADER, OFFSET_HEADER, SNAPSHOT_HEADER, TERM_HEADER, SnapshotOffer
from raftq.cluster.transport.http import FROM_URL_HEADER, PING_INTERVAL_S
from raftq.cluster.storage.errors import SnapshotCorruptionError

log = logging.getLogger("raftq.api")

#: Longest sender URL remembered from a peer request.
URL_CHARS_MAX = 2048


async def raft_messages(request: web.Request) -> web.Response:
    node = request.app[NODE]
    raw = await request.read()
    try:
        messages = decode_messages(raw)
    except Exception as exc:  # the codec's own error types vary; a bad body is the peer's fault
        raise ApiError(400, "invalid", f"undecodable raft messages: {exc}") from None
    if any(m.type is MessageType.SNAP for m in messages):
        # A SNAP message is only true once its file is on our disk: it comes from /raft/snapshot.
        raise ApiError(400, "invalid", "snapshots travel through /raft/snapshot, not as messages")
    _learn_sender_url(node, _SenderUrl.of(request), messages)
    if not node.deliver(messages):
        raise ApiError(503, "overloaded", "inbox full", headers={"Retry-After": "1"})
    return web.Response(status=204)


async def raft_stream(request: web.Request) -> web.StreamResponse:
    """A peer's lane (cluster/transport/http.py): binary frames, each a batch of messages.

    The connection is closed on the first frame that is not a valid batch, or that carries a SNAP
    message; the peer reconnects and Raft repairs whatever was lost. A full inbox drops the frame
    (a dropped request, as for POST /raft/messages).
    """
    node = request.app[NODE]
    sender_url = _SenderUrl.of(request)  # the same for every frame of the connection
    ws = peer_stream_response(partial(_deliver_frame, node, sender_url), max_msg_size=node.config.body_bytes_max,
                              heartbeat=PING_INTERVAL_S)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "invalid", "/raft/stream takes a WebSocket upgrade")
    await ws.prepare(request)
    peer = request.headers.get(FROM_HEADER, "?")[:64]
    streams = request.app[PEER_STREAMS]
    streams.add(ws)
    try:
        await _receive_frames(node, sender_url, ws, peer)
    finally:
        streams.discard(ws)
    return ws


async def _receive_frames(node, sender_url: _SenderUrl, ws: web.WebSocketResponse, peer: str) -> None:
    """Reads what the response did not deliver itself (`peer_stream.py`): control frames (aiohttp
    answers pings and closes), the first frame `_deliver_frame` refused, on which this closes the
    connection with the reason, and on an aiohttp release it does not mirror, every frame."""
    async for frame in ws:
        if frame.type is not WSMsgType.BINARY:
            if frame.type is WSMsgType.ERROR:  # the reader failed: a frame too large, or delivering one raised
                log.warning("closing the raft stream from %r: %s", peer, str(frame.data)[:200])
            await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"binary frames only")
            break
        try:
            messages = decode_messages(frame.data)
        except Exception as exc:  # the codec's own error types vary; a bad frame is the peer's fault
            log.warning("closing the raft stream from %r: undecodable frame: %s", peer, str(exc)[:200])
            await ws.close(code=WSCloseCode.INVALID_TEXT, message=b"undecodable raft messages")
            break
        if any(m.type is MessageType.SNAP for m in messages):
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"snapshots travel through /raft/snapshot")
            break
        _learn_sender_url(node, sender_url, messages)
        node.deliver(messages)


def _deliver_frame(node, sender_url: _SenderUrl, data: bytes) -> bool:
    """A stream's binary frame, in the connection's data callback: True once its messages are in
    the node's inbox (or dropped there, the inbox being full); False for a frame to refuse, which
    `_receive_frames` then decodes again to close the connection with the reason."""
    try:
        messages = decode_messages(data)
    except Exception:  # the codec's own error types vary; _receive_frames names the error
        return False
    if any(m.type is MessageType.SNAP for m in messages):
        return False
    _learn_sender_url(node, sender_url, messages)
    node.deliver(messages)
    return True


@record
class _SenderUrl:
    """The sender and its URL a peer request names (headers), when both are there and the URL fits."""

    sender: str
    url: str

    @classmethod
    def of(cls, request: web.Request) -> _SenderUrl | None:
        sender, url = request.headers.get(FROM_HEADER, ""), request.headers.get(FROM_URL_HEADER, "")
        return cls(sender, url) if sender and url and len(url) <= URL_CHARS_MAX else None


def _learn_sender_url(node, sender_url: _SenderUrl | None, messages: list) -> None:
    """A node not yet told the membership answers a leader through the URL the leader names."""
    if sender_url is not None and all(m.from_id == sender_url.sender for m in messages):
        node.learn_peer_url(sender_url.sender, sender_url.url)


async def raft_snapshot(request: web.Request) -> web.Response:
    """One chunk of an InstallSnapshot transfer (cluster/snapshot_transfer.py)."""
    node = request.app[NODE]
    receiver = node.snapshot_receiver
    if receiver is None:
        raise ApiError(503, "unavailable", "node is starting", headers={"Retry-After": "1"})
    try:
        offer = SnapshotOffer.parse(request.headers.get(SNAPSHOT_HEADER, ""))
        offset = int(request.headers.get(OFFSET_HEADER, ""))
        term = int(request.headers.get(TERM_HEADER, ""))
    except ValueError as exc:
        raise ApiError(400, "invalid", f"bad snapshot transfer headers: {exc}") from None
    leader = request.headers.get(FROM_HEADER, "")
    # Any node id: a learner receives its first snapshot from a leader it does not know yet (the
    # cluster secret has authenticated the sender already).
    if not NODE_ID_PATTERN.fullmatch(leader):
        raise ApiError(400, "invalid", f"{FROM_HEADER} {leader[:64]!r} is not a node id")
    if offer.size_bytes > node.config.snapshot_file_bytes_max:
        raise ApiError(413, "too_large", f"a snapshot of {offer.size_bytes} bytes exceeds this node's limit "
                                         f"of {node.config.snapshot_file_bytes_max}")
    chunk = await request.read()
    try:
        answer = await receiver.receive(leader, term, offer, offset, chunk)
    except SnapshotCorruptionError as exc:
        raise ApiError(422, "invalid", f"snapshot does not match its digest: {exc}") from None
    except ValueError as exc:
        raise ApiError(400, "invalid", str(exc)) from None
    return web.json_response(answer)
