"""Day-two operations over HTTP: membership changes and leadership transfer.

    POST   /v1/cluster/members        {"id", "url"}   add a learner; answers once the change commits
    DELETE /v1/cluster/members/{id}                   remove a member; answers once it commits
    POST   /v1/cluster/transfer       {"to"?: id}     move leadership; answers once it has moved

Like every /v1 path these need the client token where one is set, and a follower answers 307
to the leader. The Raft core decides what may happen (`RaftNode.add_learner`, `remove_member`,
`transfer_leadership`): a change it refuses for now (another change or a transfer under way, a
new leader that has not committed its first entry) is a 503 with Retry-After; one it will never
make as asked (an id that is or was a member, an unknown one) a 409 or 404. Bad input is a 400
and reaches no one.

Removing the leader itself: it hands leadership to the most caught-up voter first (thesis
§4.2.2), then answers 307 to the new leader, where the same DELETE removes it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from raftq.cluster import constants as c
from raftq.cluster.api.keys import NODE
from raftq.cluster.api.wire import ApiError, invalid, read_body, respond
from raftq.cluster.config import NODE_ID_PATTERN
from raftq.cluster.errors import NotLeaderError
from raftq.cluster.raft.errors import ChangeRefused

#: Longest member URL accepted.
MEMBER_URL_CHARS_MAX = 512
#: How often a view looks whether leadership has moved.
LEADER_POLL_S = 0.005


def _node_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NODE_ID_PATTERN.fullmatch(value):
        raise invalid(f"{what} must be a node id matching {NODE_ID_PATTERN.pattern}")
    return value


def _member_url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) \
            or len(value) > MEMBER_URL_CHARS_MAX or any(ch.isspace() for ch in value):
        raise invalid(f"url must be an http:// or https:// URL of at most {MEMBER_URL_CHARS_MAX} characters")
    return value.rstrip("/")


def _refused(exc: ChangeRefused) -> ApiError:
    if exc.retryable:
        return ApiError(503, "unavailable", str(exc), headers={"Retry-After": str(c.RETRY_AFTER_S)})
    return ApiError(409, "conflict", str(exc))


async def _body(request: web.Request) -> dict:
    body = await read_body(request, request.app[NODE].config.body_bytes_max)
    if not isinstance(body, dict):
        raise invalid("body must be an object")
    return body


async def add_member(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await _body(request)
    unknown = sorted(set(map(str, body)) - {"id", "url"})
    if unknown:
        raise invalid(f"unknown fields: {', '.join(unknown)[:200]}")
    node_id, url = _node_id(body.get("id"), "id"), _member_url(body.get("url"))
    node.require_leader()
    try:
        await node.add_member(node_id, url)
    except ChangeRefused as exc:
        raise _refused(exc) from None
    return respond(request, {"ok": True, "id": node_id, "voter": False, "nodes": node.status()["nodes"]}, status=201)


async def remove_member(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node_id = _node_id(request.match_info["node_id"], "the member id")
    node.require_leader()
    if node.raft.membership.get(node_id) is None:
        raise ApiError(404, "not_found", f"{node_id} is not a member")
    if node_id == node.config.node_id:
        await _hand_leadership_on(node, None)
        raise NotLeaderError(node.leader_id, node.leader_url())  # 307: the new leader removes us
    try:
        await node.remove_member(node_id)
    except ChangeRefused as exc:
        raise _refused(exc) from None
    return respond(request, {"ok": True, "removed": node_id, "nodes": node.status()["nodes"]})


async def transfer(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await _body(request)
    unknown = sorted(set(map(str, body)) - {"to"})
    if unknown:
        raise invalid(f"unknown fields: {', '.join(unknown)[:200]}")
    to = None if body.get("to") is None else _node_id(body["to"], "to")
    node.require_leader()
    previous = node.config.node_id
    leader = await _hand_leadership_on(node, to)
    return respond(request, {"ok": True, "previous": previous, "leader": leader, "leader_url": node.leader_url()})


async def _hand_leadership_on(node: Any, to: str | None) -> str:
    """Transfers leadership and waits until another node leads (two election timeouts at most:
    the core gives up after one).

    Raises:
        ApiError: 409 for a target that cannot lead, 503 when the transfer did not finish.
    """
    try:
        target = await node.transfer_leadership(to)
    except ChangeRefused as exc:
        raise _refused(exc) from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * node.config.election_ticks * node.config.tick_interval_s
    while loop.time() < deadline:
        leader = node.leader_id
        if leader is not None and leader != node.config.node_id:
            return leader
        await asyncio.sleep(LEADER_POLL_S)
    raise ApiError(503, "unavailable", f"{target} did not take over in time; this node leads on",
                   headers={"Retry-After": str(c.RETRY_AFTER_S)})
