"""The operator's dashboard: one self-contained HTML page that every node serves at `/`.

The page (dashboard.html beside this file) has its CSS and JS inline, loads nothing from elsewhere
and works offline. It holds no data: it polls `/v1/overview` of the node it came from, so the page
itself is served without the client token and asks for the token when the API answers 401.

The Content-Security-Policy allows exactly the page's own inline <script> and <style> blocks (by
their sha256), requests to this node and to its peers (the page fails over to them when this node
stops answering), and nothing else: a job's last error or payload shown on the page can never run
as script.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from aiohttp import web

from raftq.cluster.api.keys import NODE

_PAGE_NAME = "dashboard.html"
_INLINE_BLOCK = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class _Page:
    body: bytes
    script_sources: str  # "'sha256-...'" of every inline <script>
    style_sources: str   # "'sha256-...'" of every inline <style>


@lru_cache(maxsize=1)
def _page() -> _Page:
    body = resources.files(__package__).joinpath(_PAGE_NAME).read_bytes()
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, content in _INLINE_BLOCK.findall(body):
        digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    assert hashes[b"script"] and hashes[b"style"], f"{_PAGE_NAME} lost its inline script or style"
    return _Page(body, " ".join(hashes[b"script"]), " ".join(hashes[b"style"]))


def _content_security_policy(page: _Page, peer_urls: list[str]) -> str:
    connect = " ".join(["'self'", *peer_urls])
    return (
        "default-src 'none'; "
        f"script-src {page.script_sources}; "
        f"style-src {page.style_sources}; "
        f"connect-src {connect}; "
        "img-src data:; "
        "base-uri 'none'; "
        "form-action 'none'; "
        "frame-ancestors 'none'"
    )


async def dashboard(request: web.Request) -> web.Response:
    """`GET /`: the dashboard page (no data in it, so no token needed to load it)."""
    page = _page()
    node = request.app.get(NODE)
    # The page's links and failover use the URLs clients reach the peers at (`public_urls`).
    peer_urls = sorted({node.config.public_urls.get(peer_id, url).rstrip("/")
                        for peer_id, url in node.config.peers.items()}) if node is not None else []
    return web.Response(
        body=page.body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": _content_security_policy(page, peer_urls),
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
