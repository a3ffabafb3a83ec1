"""Results you can wait for: the long poll `GET /v1/jobs/{id}?wait_s=N`, `Client.wait` and its
async twin, task handles (`.result(timeout=)`, `.state`) and the Celery-style calls, against a
real node and a real worker."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time

import pytest

from raftq import App, AsyncClient, Client, Worker, errors
from raftq.cluster.localcluster import http_json

#: The long poll answers within this much of the event it waits for on a loaded 2-core machine.
ANSWER_SLACK_S = 3.0


def test_wait_answers_when_the_job_is_acked_not_at_the_timeout(single_node):
    url = single_node.urls[0]
    with Client(single_node.urls) as client:
        job_id = client.submit("waits", {"n": 1})
        (job,) = client.fetch("w1", ["waits"], max_jobs=1)
        answer: dict = {}

        def poll() -> None:
            started = time.monotonic()
            answer["status"], answer["body"] = http_json(url + f"/v1/jobs/{job_id}?wait_s=15", timeout=30)
            answer["took_s"] = time.monotonic() - started

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.5)  # the poll is waiting (nothing to poll for: the test shows it does not answer early)
        assert poller.is_alive(), f"the long poll answered before the job finished: {answer}"
        client.ack("w1", job.id, job.lease_token, result={"sum": 3})
        poller.join(timeout=30)
        assert answer["status"] == 200 and answer["body"]["state"] == "done", answer
        assert answer["body"]["result"] == {"sum": 3}
        assert answer["took_s"] < 0.5 + ANSWER_SLACK_S, answer


def test_wait_answers_at_the_timeout_with_the_current_state(single_node):
    url = single_node.urls[0]
    with Client(single_node.urls) as client:
        job_id = client.submit("waits", {"n": 2})
        started = time.monotonic()
        status, body = http_json(url + f"/v1/jobs/{job_id}?wait_s=1.5", timeout=30)
        took_s = time.monotonic() - started
        assert status == 200 and body["state"] == "ready", body
        assert 1.5 <= took_s < 1.5 + ANSWER_SLACK_S, took_s
        # Already final: no wait at all.
        client.cancel(job_id)
        started = time.monotonic()
        status, body = http_json(url + f"/v1/jobs/{job_id}?wait_s=20", timeout=30)
        assert status == 200 and body["state"] == "cancelled" and time.monotonic() - started < ANSWER_SLACK_S
        # Client.wait with a timeout returns the record as it is when the timeout runs out.
        other = client.submit("waits", {"n": 3})
        record = client.wait(other, timeout=0.5)
        assert record["state"] == "ready"


@pytest.mark.parametrize("query, fragment", [("wait_s=21", "out of range"), ("wait_s=soon", "number of seconds"),
                                             ("wait_s=-1", "out of range"), ("wait_s=nan", "out of range")])
def test_bad_wait_is_400(single_node, query, fragment):
    url = single_node.urls[0]
    with Client(single_node.urls) as client:
        job_id = client.submit("waits", {"n": 4})
    status, body = http_json(url + f"/v1/jobs/{job_id}?{query}")
    assert status == 400 and fragment in body["error"]["message"], body


# ---------------------------------------------------------------------------- handles and the task API


app = App("http://127.0.0.1:1")  # the tests point it at the fixture's nodes


@app.task(queue="results", max_attempts=1)
def add(a, b):
    return a + b


@app.task(queue="results", max_attempts=2)
def explode(reason):
    raise ValueError(f"exploded: {reason}")


@pytest.fixture
def running_app(single_node):
    app.nodes = list(single_node.urls)
    app.client = Client(single_node.urls)
    worker = app.worker(concurrency=2, wait_s=0.5, heartbeat_s=0.5, queues=["results", "elsewhere"])
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield app
    worker.stop()
    thread.join(timeout=30)
    app.close()


def test_handles_wait_for_results_and_failures(running_app):
    handle = add.submit(2, 3)
    assert isinstance(handle, str) and handle.id == str(handle)
    assert handle.result(timeout=30) == 5
    assert handle.state == "done" and handle.ready()
    assert add.delay(10, 20).result(timeout=30) == 30

    failing = explode.delay("on purpose")
    with pytest.raises(errors.JobFailed) as failed:
        failing.result(timeout=60)
    assert failed.value.code == "dead" and "2 attempt(s)" in str(failed.value)
    assert "ValueError: exploded: on purpose" in str(failed.value)
    assert failed.value.record["attempts"] == 2


def test_result_timeout_raises_pending_and_cancel_raises_failed(single_node):
    with Client(single_node.urls) as client:
        handle = client.handle(client.submit("nobody-works-here", {"n": 1}))
        started = time.monotonic()
        with pytest.raises(errors.JobPending):
            handle.result(timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 1.0 + ANSWER_SLACK_S
        client.cancel(handle)
        with pytest.raises(errors.JobFailed) as cancelled:
            handle.result(timeout=5)
        assert cancelled.value.code == "cancelled"


def test_apply_async_countdown_eta_priority_and_queue(running_app):
    started = time.time()
    late = add.apply_async((1, 1), countdown=1.5)
    assert late.state == "scheduled"
    assert late.result(timeout=30) == 2
    record = late.record()
    assert record["finished_at"] - record["created_at"] >= 1.4, record
    eta = add.apply_async((2, 2), eta=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1))
    assert eta.result(timeout=30) == 4
    moved = add.apply_async((3, 3), queue="elsewhere", priority=7)
    assert moved.result(timeout=30) == 6
    assert (moved.record()["queue"], moved.record()["priority"]) == ("elsewhere", 7)
    assert time.time() - started < 30
    with pytest.raises(ValueError):
        add.apply_async((1, 2), countdown=1, eta=datetime.datetime.now())


async def test_async_client_waits_and_gets_results(single_node):
    async with AsyncClient(single_node.urls) as client:
        job_id = await client.submit("async-results", {"n": 5})
        waiter = asyncio.ensure_future(client.result(job_id, timeout=30))
        (job,) = await client.fetch("aw", ["async-results"], max_jobs=1, wait_s=5)
        await client.ack("aw", job.id, job.lease_token, result=25)
        assert await asyncio.wait_for(waiter, 30) == 25
        with pytest.raises(errors.JobNotFound):
            await client.wait("no-such-job", timeout=1)


def test_local_cluster_with_a_token_reads_its_own_status(tmp_path):
    from raftq.cluster.localcluster import LocalCluster

    with LocalCluster(str(tmp_path / "cluster"), size=1, token="s3cret-token") as cluster:
        leader = cluster.wait_for_leader()
        assert cluster.status(leader)["role"] == "leader"
        status, body = http_json(cluster.urls[0] + "/v1/queues")
        assert status == 401, body  # the nodes really want the token
        with Client(cluster.urls, token="s3cret-token") as client:
            assert client.queues() == {}
