"""Prints each node's view of the cluster; with --wait N, first waits up to N s for a leader.

Standard library only, so it runs before anything else is imported.
"""

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request


def fetch(url: str) -> dict | None:
    token = os.environ.get("RAFTQ_TOKEN")
    request = urllib.request.Request(url + "/v1/cluster", headers={"Authorization": f"Bearer {token}"} if token else {})
    ca_file = os.environ.get("RAFTQ_CA")
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def leader_of(views: dict) -> str | None:
    leaders = {view["node"] for view in views.values() if view and view.get("role") == "leader" and view.get("serving", True)}
    return next(iter(leaders)) if len(leaders) == 1 else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--wait", type=float, default=0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.wait
    while True:
        views = {url: fetch(url) for url in args.urls}
        leader = leader_of(views)
        if leader or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    print(f"{'node':6} {'url':25} {'role':10} {'term':>5} {'commit':>8} {'applied':>8}")
    for url, view in views.items():
        if view is None:
            print(f"{'?':6} {url:25} {'down':10}")
            continue
        print(f"{view['node']:6} {url:25} {view['role']:10} {view['term']:>5} "
              f"{view['commit_index']:>8} {view['applied_index']:>8}")
    if not leader:
        print("no leader elected" + (f" within {args.wait:g} s" if args.wait else ""), file=sys.stderr)
        return 1
    print(f"\nleader: {leader}")
    for url in args.urls:
        print(f"  dashboard {url}/   API {url}/v1   metrics {url}/metrics   status {url}/v1/cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
