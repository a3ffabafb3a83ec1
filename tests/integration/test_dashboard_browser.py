"""The dashboard in a real browser: Debian's headless Chromium against a real 3-node cluster.

Chromium is driven through the DevTools protocol over a websocket with aiohttp's client, so the
test needs no browser-automation dependency. It loads the leader's page, sees three nodes and one
leader, watches a queue's depth follow submits, redrives a dead job with its button (and checks
the API agrees), saves a full-page screenshot (also copied to docs/dashboard.png when RAFTQ_SAVE_SCREENSHOT is set), then watches a
follower's page name the new leader after the leader is killed. Every wait polls with a deadline.
A second test checks that every metric deploy/grafana-dashboard.json queries is exported.

Chromium comes from Debian's `chromium` package: the `chromium` fixture installs it with apt-get
when it is missing and the test runs as root, and skips (saying why) otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftq import Client
from raftq.chaos import debian_packages
from raftq.cluster.localcluster import LocalCluster

CHROMIUM_PATH = "/usr/bin/chromium"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The page polls twice a second here (default 2 s) so that the test stays short.
REFRESH_S = 0.5
DLQ_QUEUE = "emails"
WORK_QUEUE = "work"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; installed from Debian's package when missing and we are root."""
    failure = debian_packages.install("chromium", present=lambda: os.path.exists(CHROMIUM_PATH))
    if failure:
        pytest.skip(failure)
    return CHROMIUM_PATH


@pytest.fixture
def cluster(tmp_path, request):
    with LocalCluster(str(tmp_path / "cluster"), size=3) as started:
        yield started
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for node_id in started.nodes:
                print(f"----- {node_id} log (tail) -----")
                print(started.log_text(node_id)[-4000:])


# ---------------------------------------------------------------------- a tiny DevTools client


async def poll(probe: Callable[[], Awaitable[Any]], *, timeout_s: float, what: str,
               seen: Callable[[], Awaitable[Any]] | None = None, interval_s: float = 0.1) -> Any:
    """Awaits probe() until it returns something truthy; TimeoutError names what and what was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"; last seen: {await seen()!r}" if seen is not None else f"; last value: {value!r}"
            raise TimeoutError(f"waited {timeout_s:g} s for {what}{detail}")
        await asyncio.sleep(interval_s)


class Browser:
    """One headless Chromium process and a DevTools protocol session on its page."""

    def __init__(self, binary: str, profile_dir: Path, log_path: Path) -> None:
        self.binary = binary
        self.profile_dir = profile_dir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.events: list[dict] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future] = {}

    async def start(self) -> None:
        self.profile_dir.mkdir(parents=True)
        args = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={self.profile_dir}", "--remote-debugging-port=0", "--window-size=1400,1000",
            "--hide-scrollbars", "about:blank",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port_file = self.profile_dir / "DevToolsActivePort"

        async def port() -> int | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}; see {self.log_path}")
            text = port_file.read_text() if port_file.exists() else ""
            first = text.splitlines()[0] if text.strip() else ""
            return int(first) if first.isdigit() else None

        devtools_port = await poll(port, timeout_s=30, what="chromium's DevToolsActivePort file")
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{devtools_port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._waiting.pop(data["id"], None) if "id" in data else None
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools websocket closed"))

    async def send(self, method: str, params: dict | None = None, *, timeout_s: float = 20.0) -> dict:
        assert self._ws is not None
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        answer = await asyncio.wait_for(future, timeout_s)
        if "error" in answer:
            raise RuntimeError(f"{method} failed: {answer['error']}")
        return answer["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await poll(lambda: self.evaluate(f"location.href === {json.dumps(url)} && document.readyState === 'complete'"),
                   timeout_s=15, what=f"{url} to load")

    async def wait_for(self, expression: str, *, timeout_s: float = 15.0, what: str, seen: str | None = None) -> Any:
        """Polls a JS expression in the page until it is truthy."""
        async def show() -> Any:
            return await self.evaluate(seen) if seen else None

        return await poll(lambda: self.evaluate(expression), timeout_s=timeout_s, what=what,
                          seen=show if seen else None)

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the middle of the element."""
        point = await self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); if (!el) return null;"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        assert point is not None, f"nothing matches {selector}"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": point["x"], "y": point["y"],
                                                         "button": "left", "clickCount": 1})

    async def screenshot(self, path: Path) -> bytes:
        """A PNG of the whole page, scrolled to the top."""
        await self.evaluate("window.scrollTo(0, 0)")
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        })
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and Content-Security-Policy violations the page reported."""
        found = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(event["params"]["exceptionDetails"])[:500])
            elif event["method"] == "Log.entryAdded":
                text = event["params"]["entry"].get("text", "")
                if "Content Security Policy" in text or "Content-Security-Policy" in text:
                    found.append(text)
        return found

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._ws is not None:
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._session is not None:
            await self._session.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait, 10)


# ---------------------------------------------------------------------- page probes (JS)


NODES_JS = "[...document.querySelectorAll('#nodes .node')].map(n => [n.dataset.node, n.dataset.role])"
DLQ_ROWS_JS = "document.querySelectorAll('#dlq tbody tr[data-job]').length"


def depth_js(queue: str, state: str) -> str:
    selector = f'#queues tr[data-queue="{queue}"] td[data-state="{state}"]'
    return (f"(() => {{ const td = document.querySelector({json.dumps(selector)});"
            " return td ? Number(td.textContent.replace(/,/g, '')) : null; })()")


def polls_js() -> str:
    return "Number(document.body.dataset.polls || 0)"


def one_leader(nodes: list[list[str]] | None) -> str | None:
    """The leader's id when the page shows three nodes and exactly one leader."""
    if not nodes or len(nodes) != 3:
        return None
    leaders = [node_id for node_id, role in nodes if role == "leader"]
    return leaders[0] if len(leaders) == 1 else None


# ---------------------------------------------------------------------- the test


async def test_dashboard_in_headless_chromium(chromium: str, cluster: LocalCluster, tmp_path: Path) -> None:
    leader = cluster.wait_for_leader()
    follower = next(node_id for node_id in cluster.nodes if node_id != leader)
    client = Client(cluster.urls, deadline=20.0)
    browser = Browser(chromium, tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        # Three dead-lettered jobs with different errors, and some waiting work.
        dead_ids = await asyncio.to_thread(_make_dead_jobs, client)
        await asyncio.to_thread(client.submit_many, WORK_QUEUE, [{"n": i} for i in range(20)])

        await browser.start()
        leader_url = cluster.nodes[leader].url
        await browser.navigate(f"{leader_url}/?refresh={REFRESH_S}")
        title = await browser.evaluate("document.title")
        assert title == "raftq dashboard", f"GET {leader_url}/ did not serve the dashboard page (title {title!r})"

        # 1. Three nodes, one leader, the one the cluster reports.
        async def shown_leader() -> str | None:
            return one_leader(await browser.evaluate(NODES_JS))

        page_leader = await poll(shown_leader, timeout_s=15, what="three nodes and one leader on the page",
                                 seen=lambda: browser.evaluate(NODES_JS))
        assert page_leader == leader

        # 2. A queue's depth follows submits.
        ready_js = depth_js(WORK_QUEUE, "ready")
        ready_before = await browser.wait_for(f"{ready_js} !== null && {ready_js}", what="the work queue's ready count")
        assert ready_before == 20
        await asyncio.to_thread(client.submit_many, WORK_QUEUE, [{"n": i} for i in range(20, 45)])
        await browser.wait_for(f"{ready_js} === {ready_before + 25}",
                               what="ready to grow by the 25 submitted jobs", seen=ready_js)

        # 3. Redrive one dead job with its button; it leaves the DLQ on the page and in the API.
        redriven = dead_ids[0]
        row = f'#dlq tr[data-job="{redriven}"]'
        await browser.wait_for(f"{DLQ_ROWS_JS} === {len(dead_ids)} && !!document.querySelector({json.dumps(row)})",
                               what="the dead jobs in the DLQ browser",
                               seen="document.querySelector('#dlq-panel').innerText")
        await browser.click(f'{row} button[data-action="redrive-one"]')
        await browser.wait_for(f"!document.querySelector({json.dumps(row)}) && {DLQ_ROWS_JS} === {len(dead_ids) - 1}",
                               what="the redriven job to leave the DLQ browser",
                               seen="document.querySelector('#dlq-panel').innerText")
        assert "Redrove 1" in await browser.evaluate("document.querySelector('#toast').textContent")
        job = await asyncio.to_thread(client.get, redriven)
        assert job["state"] == "ready" and job["attempts"] == 0, job
        still_dead = {j["id"] for j in await asyncio.to_thread(client.dead, DLQ_QUEUE)}
        assert still_dead == set(dead_ids[1:])

        # 4. Some traffic, one batch per page poll, so the charts and the workers table have content.
        await _run_traffic(client, browser, polls=14)
        await browser.wait_for("Number(document.querySelector('#queues-panel').dataset.samples) >= 14",
                               what="the charts to hold at least 14 samples")
        shot = await browser.screenshot(tmp_path / "dashboard.png")
        assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 20_000
        if os.environ.get("RAFTQ_SAVE_SCREENSHOT"):  # refresh the README's picture on request only
            docs = REPO_ROOT / "docs"
            docs.mkdir(exist_ok=True)
            shutil.copyfile(tmp_path / "dashboard.png", docs / "dashboard.png")

        # 5. A follower's page shows the cluster too, and follows a leader change.
        await browser.navigate(f"{cluster.nodes[follower].url}/?refresh={REFRESH_S}")
        assert await poll(shown_leader, timeout_s=15, what="a follower's page to show the leader",
                          seen=lambda: browser.evaluate(NODES_JS)) == leader
        cluster.kill(leader)
        new_leader = await asyncio.to_thread(cluster.wait_for_leader, 30.0, exclude=leader)

        async def after_failover() -> bool:
            nodes = dict(await browser.evaluate(NODES_JS) or [])
            return nodes.get(leader) == "down" and nodes.get(new_leader) == "leader" and \
                list(nodes.values()).count("leader") == 1

        await poll(after_failover, timeout_s=20, what=f"the page to show {new_leader} leading and {leader} down",
                   seen=lambda: browser.evaluate(NODES_JS))

        assert browser.page_errors() == []
    finally:
        await browser.close()
        await asyncio.to_thread(client.close)


def _make_dead_jobs(client: Client) -> list[str]:
    """Submits three one-attempt jobs and fails each with retry=False, so they are dead-lettered."""
    errors = [
        "SMTPServerDisconnected: Connection unexpectedly closed",
        "ValueError: invalid address '<script>alert(1)</script>'",  # shown as text, never run
        "TimeoutError: smtp.example.com:25 did not answer in 30 s",
    ]
    ids = [client.submit(DLQ_QUEUE, {"to": f"user{i}@example.com"}, max_attempts=1) for i in range(len(errors))]
    leased: list = []
    deadline = time.monotonic() + 15
    while len(leased) < len(ids) and time.monotonic() < deadline:
        leased += client.fetch("mailer-1", [DLQ_QUEUE], max_jobs=len(ids) - len(leased), wait_s=2.0)
    assert sorted(job.id for job in leased) == sorted(ids)
    for job in leased:
        client.fail("mailer-1", job.id, job.lease_token, errors[ids.index(job.id)], retry=False)
    for job_id in ids:
        assert client.get(job_id)["state"] == "dead"
    return ids


async def _run_traffic(client: Client, browser: Browser, *, polls: int) -> None:
    """Per page poll: submit a few jobs, lease some, ack most and fail one; a worker keeps a few leased."""
    def batch(i: int) -> None:
        client.submit_many(WORK_QUEUE, [{"batch": i, "n": n} for n in range(3 + i % 5)])
        worker = f"worker-{1 + i % 2}"
        jobs = client.fetch(worker, [WORK_QUEUE], max_jobs=6)
        keep = jobs[:1] if worker == "worker-2" and i < 6 else []
        done = [job for job in jobs if job not in keep]
        if done:
            client.ack_many(worker, [(job.id, job.lease_token, None) for job in done[1:]])
            client.fail(worker, done[0].id, done[0].lease_token, "ConnectionResetError: upstream closed", delay_s=30)
        client.heartbeat("worker-1", [])

    for i in range(polls):
        seen = await browser.evaluate(polls_js())
        await asyncio.to_thread(batch, i)
        await browser.wait_for(f"{polls_js()} > {seen}", what="the next page poll")


def test_grafana_dashboard_queries_exported_metrics(cluster: LocalCluster) -> None:
    """Every raftq_* series deploy/grafana-dashboard.json queries is on some node's /metrics."""
    text = (REPO_ROOT / "deploy" / "grafana-dashboard.json").read_text()
    dashboard = json.loads(text)
    assert dashboard["panels"] and dashboard["uid"] == "raftq-overview"
    wanted = set(re.findall(r"\braftq_[a-z0-9_]+", text))
    with Client(cluster.urls, deadline=20.0) as client:  # one job through every step: every family shows up
        client.submit(WORK_QUEUE, {"n": 1})
        [job] = client.fetch("worker-1", [WORK_QUEUE], max_jobs=1, wait_s=5.0)
        client.ack("worker-1", job.id, job.lease_token)
        client.heartbeat("worker-1", [])
    exported: set[str] = set()
    for url in cluster.urls:  # what only the leader knows is on the leader's page alone
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            for family in text_string_to_metric_families(response.read().decode()):
                exported.add(family.name)
                exported.update(sample.name for sample in family.samples)
    missing = sorted(wanted - exported)
    assert not missing, f"deploy/grafana-dashboard.json queries metrics no node exports: {missing}"
