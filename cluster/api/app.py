"""The aiohttp application: routes, auth, and the one place errors become HTTP answers."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from raftq.cluster import backup
from raftq.cluster import constants as c
from raftq.cluster import tls
from raftq.cluster.api import cluster_views, dashboard, raft_views, views
from raftq.cluster.api.connections import ConnectionGuard
from raftq.cluster.api.keys import CONNECTION_GUARD, NODE, PEER_SESSION, PEER_STREAMS
from raftq.cluster.api.wire import JSON, MSGPACK, MSGPACK_ALIASES, ApiError, error_response
from raftq.cluster.config import NodeConfig
from raftq.cluster.errors import NotLeaderError, NotServingYet, ProposalLost, Unavailable
from raftq.cluster.server import Node
from raftq.protocol import LEADER_HEADER
from raftq.cluster.transport.http import SECRET_HEADER, STREAM_PATH

log = logging.getLogger("raftq.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths served without the client token: Prometheus scrapes and peers (which use the cluster secret).
_OPEN_PREFIXES = ("/metrics", "/raft/")


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/queues/{queue}/jobs", views.submit)
    r.add_post("/v1/lease", views.fetch)
    r.add_post("/v1/ack", views.ack)
    r.add_post("/v1/fail", views.fail)
    r.add_post("/v1/extend", views.extend)
    r.add_post("/v1/release", views.release)
    r.add_post("/v1/workers/{worker}/heartbeat", views.heartbeat)
    r.add_get("/v1/workers", views.workers)
    r.add_get("/v1/jobs/{job_id}", views.get_job)
    r.add_post("/v1/jobs/{job_id}/cancel", views.cancel)
    r.add_get("/v1/queues", views.list_queues)
    r.add_put("/v1/queues/{queue}", views.configure_queue)
    r.add_delete("/v1/queues/{queue}", views.delete_queue)
    r.add_get("/v1/queues/{queue}/dead", views.list_dead)
    r.add_post("/v1/queues/{queue}/dead/redrive", views.redrive)
    r.add_post("/v1/queues/{queue}/dead/purge", views.purge_dead)
    r.add_get("/v1/schedules", views.list_schedules)
    r.add_get("/v1/schedules/{name}", views.get_schedule)
    r.add_put("/v1/schedules/{name}", views.put_schedule)
    r.add_delete("/v1/schedules/{name}", views.delete_schedule)
    r.add_post("/v1/schedules/{name}/pause", views.pause_schedule)
    r.add_post("/v1/schedules/{name}/resume", views.resume_schedule)
    r.add_get("/v1/cluster", views.cluster_status)
    r.add_post("/v1/cluster/members", cluster_views.add_member)
    r.add_delete("/v1/cluster/members/{node_id}", cluster_views.remove_member)
    r.add_post("/v1/cluster/transfer", cluster_views.transfer)
    r.add_get("/v1/overview", views.overview)
    r.add_get(backup.BACKUP_PATH, backup.backup_view)
    r.add_get("/metrics", views.metrics)
    r.add_get("/", dashboard.dashboard)
    r.add_post("/raft/messages", raft_views.raft_messages)
    r.add_get(STREAM_PATH, raft_views.raft_stream)
    r.add_post("/raft/snapshot", raft_views.raft_snapshot)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    # The route template, never the raw path: labels stay bounded whatever clients send.
    route = resource.canonical if resource is not None else "unmatched"
    request.app[NODE].metrics.http_request_seconds.observe(time.perf_counter() - started,
                                                           (route, request.method, str(response.status)))
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status >= 400:
            log.info("refused %s %r: %s %r", request.method, request.path, exc.status, exc.message)
        return error_response(request, exc)
    except NotLeaderError as exc:
        return await _not_leader(request, exc)
    except NotServingYet as exc:
        return await _not_leader(request, NotLeaderError(None, None), unavailable=exc)
    except (Unavailable, ProposalLost) as exc:
        return error_response(request, ApiError(503, "unavailable", str(exc), headers=_retry_after()))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_response(request, ApiError(exc.status, _http_code(exc.status), exc.reason))
        raise
    except Exception:
        log.exception("unexpected error serving %s %r", request.method, request.path)
        return error_response(request, ApiError(500, "internal", "internal error; see the node's log"))


async def _not_leader(request: web.Request, exc: NotLeaderError,
                      unavailable: NotServingYet | None = None) -> web.StreamResponse:
    leader_id, leader_url = exc.leader_id, exc.leader_url
    if leader_url is None:
        # In an election, or a new leader not serving yet: hold the request until a leader that
        # answers is known (at most the election timeout's lower bound), then redirect, rather
        # than make the client back off for a whole Retry-After (see Node.wait_for_leader).
        # Nothing was done for the request yet.
        node = request.app[NODE]
        if await node.wait_for_leader(node.leader_hold_s):
            leader_id, leader_url = node.leader_id, node.leader_url()
    if leader_url is None:
        if unavailable is not None:
            return error_response(request, ApiError(503, "unavailable", str(unavailable), headers=_retry_after()))
        return error_response(request, ApiError(503, "no_leader", "no leader is known yet; retry shortly",
                                                headers=_retry_after()))
    if leader_id == request.app[NODE].config.node_id:
        location = request.path_qs  # this node won: again here, at the address the client used
    else:
        location = leader_url.rstrip("/") + request.path_qs
    body = ApiError(307, "not_leader", f"node {leader_id} leads; retry at {location}",
                    headers={"Location": location, LEADER_HEADER: leader_id or ""})
    return error_response(request, body)


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(c.RETRY_AFTER_S)}


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
            421: "misdirected"}.get(status, "invalid")


def cors_middleware(config: NodeConfig):
    """Lets a dashboard loaded from one node call the others (redrive on the leader, failover).

    Only the cluster's own node URLs are allowed origins; anything else gets no CORS headers and
    the browser keeps its same-origin rule.
    """
    urls = [config.url, *config.peers.values(), *config.public_urls.values()]
    allowed = {url.rstrip("/") for url in urls}
    allowed |= {origin.replace("://127.0.0.1:", "://localhost:") for origin in allowed}

    @web.middleware
    async def add_cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or origin not in allowed or not request.path.startswith("/v1/"):
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept",
                "Access-Control-Max-Age": "600",
            })
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = f"{LEADER_HEADER}, Retry-After"
        response.headers["Vary"] = "Origin"
        return response

    return add_cors


#: What each peer path carries. Neither is a type a browser may send without a CORS preflight,
#: so a web page cannot post to /raft even on a node started with --insecure-no-cluster-secret.
_PEER_CONTENT_TYPES = {"/raft/messages": MSGPACK, "/raft/snapshot": "application/octet-stream"}


def auth_middleware(config: NodeConfig):
    """Bearer token on /v1 (when configured); cluster secret on /raft, checked before the body is read."""
    expected = f"Bearer {config.client_token}".encode() if config.client_token else None
    secret = config.cluster_secret

    @web.middleware
    async def check_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/raft/"):
            _check_peer(request, secret, open_to_all=config.insecure_no_cluster_secret)
            if config.tls_peer_certs and not tls.presented_client_certificate(request):
                raise ApiError(403, "forbidden", "peer requests need a client certificate signed by the cluster's CA")
        # The dashboard page itself holds no data (its requests carry the token), and a browser
        # cannot send a bearer header when it loads a page: "/" is open, as an exact match.
        elif expected is not None and path != "/" and not path.startswith(_OPEN_PREFIXES):
            presented = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(presented, expected):
                raise ApiError(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    return check_credentials


def _check_peer(request: web.Request, secret: str | None, *, open_to_all: bool) -> None:
    """Raises 401/403 for a request that is not from a peer, 415 for a body a peer never sends."""
    if secret is not None:
        presented = request.headers.get(SECRET_HEADER)
        if presented is None:
            raise ApiError(401, "unauthorized", f"peer requests carry the cluster secret in {SECRET_HEADER}")
        if not hmac.compare_digest(presented.encode(errors="surrogateescape"), secret.encode()):
            raise ApiError(403, "forbidden", "wrong cluster secret")
    elif not open_to_all:
        raise ApiError(403, "forbidden", "this node has no peers and takes no peer traffic")
    if request.path == STREAM_PATH and "Origin" in request.headers:
        # Browsers open WebSockets cross-site without a preflight, and always say where from;
        # peers never do. This keeps web pages off /raft on a node without a secret too.
        raise ApiError(403, "forbidden", "peer streams are not opened from web pages")
    wanted = _PEER_CONTENT_TYPES.get(request.path)
    if wanted is not None and request.content_type != wanted:
        raise ApiError(415, "unsupported_media_type", f"{request.path} takes {wanted}")


_BODY_TYPES = frozenset({JSON, *MSGPACK_ALIASES})
#: Methods that change state: they must say their body is JSON or msgpack.
_WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
#: Host names that always name this node: a loopback client reaches it by one of these.
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def browser_guard_middleware(config: NodeConfig):
    """Keeps web pages from writing to the API or reading it through DNS rebinding.

    A page on any site may send a "simple" cross-site POST (text/plain, form or multipart body,
    or no body) without a CORS preflight, with the user's network position: so writes on /v1 must
    carry a JSON or msgpack Content-Type (415 otherwise), which a page can only send after a
    preflight the CORS rules refuse. A page whose domain re-resolves to this node's address
    (DNS rebinding) is same-origin to the browser but sends its own name in Host: so the Host
    header must name this node (421 otherwise). /raft is left to the cluster secret.
    """
    allowed_hosts = set(_LOOPBACK_NAMES) | {name.lower() for name in config.allowed_hosts}
    for url in [config.url, *config.peers.values(), *config.public_urls.values()]:
        allowed_hosts.add((urlsplit(url).hostname or "").lower())
    if config.host not in ("", "0.0.0.0", "::"):
        allowed_hosts.add(config.host.lower())

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/raft/"):
            return await handler(request)
        host = request.headers.get("Host")
        if host is not None and _host_name(host) not in allowed_hosts:
            raise ApiError(421, "misdirected", f"Host {_host_name(host)[:100]!r} does not name this node; "
                                               "add it with --allowed-hosts if it does")
        if request.method in _WRITE_METHODS and path.startswith("/v1/") \
                and request.content_type not in _BODY_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"writes carry Content-Type {JSON} or {MSGPACK} (also with an empty body)")
        return await handler(request)

    return guard


def _host_name(host: str) -> str:
    """The name part of a Host header: "[::1]:7001" -> "::1", "Example.com:80" -> "example.com"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def init_app(config: NodeConfig) -> web.Application:
    """Builds the application; the node starts and stops with it (cleanup_ctx)."""
    node = Node(config)
    guard = ConnectionGuard(config.connections_max, config.header_timeout_s,
                            on_refused=lambda reason: node.metrics.connections_refused_total.labels(reason).inc())
    node.metrics.connections_open.set_function(lambda: guard.open_count)
    app = web.Application(
        middlewares=[guard.middleware, cors_middleware(config), metrics_middleware, error_middleware,
                     browser_guard_middleware(config), auth_middleware(config)],
        client_max_size=config.body_bytes_max,
    )
    app[NODE] = node
    app[CONNECTION_GUARD] = guard
    app[PEER_STREAMS] = set()
    setup_routes(app)
    app.cleanup_ctx.append(_node_lifecycle)
    app.on_shutdown.append(_close_peer_streams)
    return app


async def _close_peer_streams(app: web.Application) -> None:
    """At a graceful stop, peer streams stay open while proposals in flight still need the
    followers' answers (they arrive on those streams), then close, so that the server does not
    wait out its grace period on connections that never end by themselves."""
    node = app[NODE]
    deadline = time.monotonic() + c.SHUTDOWN_GRACE_S
    while node.pending_proposals_count and time.monotonic() < deadline:
        await asyncio.sleep(node.config.tick_interval_s)  # pacing a shutdown, not a test wait
    streams = list(app[PEER_STREAMS])
    await asyncio.gather(*(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node stopping")
                           for ws in streams), return_exceptions=True)


async def _node_lifecycle(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
    app[PEER_SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls.peer_client_context(node.config) or True))
    yield
    await app[PEER_SESSION].close()
    await node.stop()
