"""What test_network_namespaces.py runs on the client host (a network namespace of its own).

    python netns_probe.py status URL...            every node's /v1/cluster, once one leads
    python netns_probe.py submit URL COUNT         COUNT jobs through one (non-leader) node
    python netns_probe.py work URL                 a burst worker drains the queue through that node
    python netns_probe.py get URL                  one request, redirects not followed
    python netns_probe.py wait-applied URL INDEX   until that node applied INDEX
    python netns_probe.py converged URL...         until every node applied one index with one digest

Each prints one JSON object on stdout. The token and the CA come from RAFTQ_TOKEN and RAFTQ_CA.
Every wait polls with a deadline and exits 1 saying what it saw.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

from raftq import Client
from raftq.client.worker.runtime import Worker

QUEUE = "hosts"
DEADLINE_S = 30.0


def _context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ["RAFTQ_CA"])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def get(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['RAFTQ_TOKEN']}",
                                                   "Accept": "application/json"})
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=_context()))
    try:
        with opener.open(request, timeout=5) as response:
            status, headers, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, dict(exc.headers), exc.read()
    text = body.decode(errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return {"status": status, "headers": headers, "json": parsed, "text": text[:200_000]}


def _poll(what: str, check, seen) -> object:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            print(json.dumps({"error": f"waited {DEADLINE_S:g} s for {what}", "seen": seen()}))
            sys.exit(1)
        time.sleep(0.1)


def _statuses(urls: list[str]) -> dict:
    answers = {}
    for url in urls:
        try:
            answers[url] = get(url + "/v1/cluster")["json"]
        except OSError as exc:
            answers[url] = {"unreachable": str(exc)}
    return answers


def status(urls: list[str]) -> dict:
    def one_leader() -> dict | None:
        answers = _statuses(urls)
        leaders = {a.get("leader") for a in answers.values() if a and "leader" in a}
        serving = [a for a in answers.values() if a and a.get("role") == "leader" and a.get("serving")]
        return answers if len(serving) == 1 and leaders == {serving[0]["node"]} else None

    return _poll("one leader that every node knows", one_leader, lambda: _statuses(urls))  # type: ignore[return-value]


def _client(url: str) -> Client:
    return Client([url], token=os.environ["RAFTQ_TOKEN"], ca_file=os.environ["RAFTQ_CA"], timeout=5,
                  deadline=DEADLINE_S)


def submit(url: str, count: int) -> dict:
    ids = []
    with _client(url) as client:
        for start in range(0, count, 10):  # ten jobs an entry: enough entries for a snapshot
            ids += client.submit_many(QUEUE, [{"n": n} for n in range(start, min(count, start + 10))])
        return {"ids": ids, "leader_url": client.leader_url, "nodes": list(client.nodes)}


def work(url: str) -> dict:
    seen: list[int] = []
    with _client(url) as client:
        worker = Worker(client, {QUEUE: lambda job: seen.append(job.payload["n"]) or job.payload["n"]},
                        concurrency=4, burst=True, wait_s=1.0)
        worker.run()
        depths = client.queues()
    return {"done": sorted(seen), "queues": depths}


def wait_applied(url: str, index: int) -> dict:
    def applied() -> dict | None:
        answer = get(url + "/v1/cluster")["json"]
        return answer if answer and answer.get("applied_index", 0) >= index else None

    return _poll(f"{url} to apply index {index}", applied, lambda: _statuses([url]))  # type: ignore[return-value]


def _digest_seen(url: str) -> object:
    try:
        answer = get(url + "/v1/cluster?digest=1")["json"] or {}
    except OSError as exc:
        return str(exc)
    return answer.get("applied_index"), answer.get("digest")


def converged(urls: list[str]) -> dict:
    def digests() -> dict | None:
        answers = {url: get(url + "/v1/cluster?digest=1")["json"] or {} for url in urls}
        applied = {a.get("applied_index") for a in answers.values()}
        found = {a.get("digest") for a in answers.values()}
        return answers if len(applied) == 1 and len(found) == 1 and None not in found else None

    return _poll("one applied index and one digest on every node", digests,
                 lambda: {url: _digest_seen(url) for url in urls})  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "status":
        answer = status(rest)
    elif command == "submit":
        answer = submit(rest[0], int(rest[1]))
    elif command == "work":
        answer = work(rest[0])
    elif command == "get":
        answer = get(rest[0])
    elif command == "wait-applied":
        answer = wait_applied(rest[0], int(rest[1]))
    elif command == "converged":
        answer = converged(rest)
    else:
        print(json.dumps({"error": f"unknown command {command!r}"}))
        return 2
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
