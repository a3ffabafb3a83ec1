"""One ready job wakes one fetch: 200 fetch long polls wait on an empty queue, one job is
submitted, and the log grows by the submit and one Lease, not by 200 Leases (199 of them empty,
as it did before the fetch gate of cluster/long_poll.py)."""

from __future__ import annotations

import asyncio

import aiohttp

from raftq import Client
from raftq.cluster.localcluster import LocalCluster, metric_value, wait_until

WAITERS = 200


def test_one_ready_job_wakes_one_of_two_hundred_waiting_fetches(tmp_path):
    # The default worker timeout: the waiters send no heartbeats, and a 2 s timeout would requeue
    # the job from the silent winner to the next waiter within the test.
    with LocalCluster(str(tmp_path / "cluster"), size=1) as single_node:
        _check(single_node.urls)


def _check(urls: list[str]) -> None:
    url = urls[0]

    async def fetch(session: aiohttp.ClientSession, worker: str) -> list:
        body = {"worker": worker, "queues": ["gate"], "max_jobs": 1, "wait_s": 6}
        async with session.post(url + "/v1/lease", json=body) as answer:
            assert answer.status == 200, await answer.text()
            return (await answer.json())["jobs"]

    async def scenario() -> tuple[list, float, float]:
        # One connection per waiter (the client library would share a bounded pool).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            fetches = [asyncio.create_task(fetch(session, f"w{n}")) for n in range(WAITERS)]
            await asyncio.to_thread(wait_until, lambda: metric_value(url, "raftq_fetches_waiting") == WAITERS,
                                    timeout_s=30, what=f"{WAITERS} fetches waiting",
                                    seen=lambda: metric_value(url, "raftq_fetches_waiting"))
            before = metric_value(url, "raftq_raft_last_index")
            with Client(urls) as client:
                await asyncio.to_thread(client.submit, "gate", {"n": 1})
            await asyncio.wait(fetches, return_when=asyncio.FIRST_COMPLETED, timeout=30)
            after = metric_value(url, "raftq_raft_last_index")
            results = await asyncio.gather(*fetches)
            return results, before, after

    results, before, after = asyncio.run(scenario())
    leased = [jobs for jobs in results if jobs]
    assert len(leased) == 1 and len(leased[0]) == 1, f"expected one fetch to get the job, saw {results}"
    # The submit and one Lease, plus at most a couple of clock ticks of the idle leader.
    assert after - before <= 4, f"the log grew by {after - before:g} entries for one submit and {WAITERS} waiters"
