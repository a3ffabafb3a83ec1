"""Typed application keys shared by the app factory and the views."""

import aiohttp
from aiohttp import web

from raftq.cluster.api.connections import ConnectionGuard
from raftq.cluster.server import Node

NODE = web.AppKey("node", Node)
#: An HTTP client session for the few views that ask peers (the dashboard overview).
PEER_SESSION = web.AppKey("peer_session", aiohttp.ClientSession)
#: The connection limit and header-read deadline (`main.serve` builds the listener with it).
CONNECTION_GUARD = web.AppKey("connection_guard", ConnectionGuard)
#: The peers' open `/raft/stream` WebSockets, closed at shutdown once nothing waits on replication.
PEER_STREAMS = web.AppKey("peer_streams", set)
