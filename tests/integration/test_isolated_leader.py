"""Guarantee 4: an isolated leader stops answering 2xx and never hands out a job once deposed.

Every directed peer link goes through its own Toxiproxy proxy (the project's server, driven by
toxiproxy-python); disabling the four links of the leader cuts it off from both followers while
clients can still reach it directly.
"""

from __future__ import annotations

import time

from toxiproxy import Toxiproxy

from raftq.chaos.toxiproxy import ToxiproxyThread
from raftq import Client, errors
from raftq.cluster.localcluster import LocalCluster, wait_until

#: The nodes' election timeout is 10-20 ticks of 0.1 s; check-quorum steps down after one timeout.
ELECTION_TIMEOUT_S = 2.0


def test_isolated_leader_stops_serving_and_never_leases(tmp_path):
    with ToxiproxyThread("127.0.0.1", 0) as proxy_server:
        toxiproxy = Toxiproxy()
        toxiproxy.update_api_consumer(proxy_server.host, proxy_server.port)
        proxies = {}

        def through_proxy(source: str, target: str, port: int) -> str:
            proxy = toxiproxy.create(name=f"{source}-{target}", listen="127.0.0.1:0", upstream=f"127.0.0.1:{port}")
            proxies[(source, target)] = proxy
            return f"http://{proxy.listen}"

        with LocalCluster(str(tmp_path / "cluster"), size=3, peer_url=through_proxy) as cluster:
            leader = cluster.wait_for_leader()
            leader_url = cluster.nodes[leader].url
            with Client(cluster.urls) as client:
                ids = client.submit_many("iso", [{"n": n} for n in range(20)])
            links = [p for (source, target), p in proxies.items() if leader in (source, target)]
            for proxy in links:
                proxy.disable()
            isolated_at = time.monotonic()

            # Straight to the isolated node: no submit and no lease may succeed from now on.
            with Client([leader_url], deadline=1.5, timeout=1.0) as direct:
                deadline = time.monotonic() + 2 * ELECTION_TIMEOUT_S
                while time.monotonic() < deadline:
                    try:
                        job_id = direct.submit("iso", {"late": True})
                        raise AssertionError(f"isolated leader acknowledged submit {job_id}")
                    except errors.RaftqError:
                        pass
                    try:
                        jobs = direct.fetch("w-isolated", ["iso"], max_jobs=5, wait_s=0)
                        assert not jobs, f"isolated leader handed out {[j.id for j in jobs]}"
                    except errors.RaftqError:
                        pass
            step_down = wait_until(
                lambda: (cluster.status(leader) or {}).get("role") != "leader" or None,
                timeout_s=10, what="the isolated leader to step down", seen=lambda: cluster.status(leader))
            assert step_down
            assert time.monotonic() - isolated_at < 2 * ELECTION_TIMEOUT_S + 3, "stepped down too late"

            others = [cluster.nodes[n].url for n in cluster.nodes if n != leader]
            with Client(others, deadline=30) as majority:
                new_leader = cluster.wait_for_leader(exclude=leader, timeout_s=30)
                assert new_leader != leader
                leased = majority.fetch("w-majority", ["iso"], max_jobs=20, wait_s=2)
                assert {job.id for job in leased} <= set(ids) and leased

            for proxy in links:
                proxy.enable()
            cluster.wait_converged(timeout_s=60)
            final = cluster.statuses()
            assert final[leader]["role"] == "follower", final[leader]
