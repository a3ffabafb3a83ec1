"""TLS end to end (issue 11, Build 2): three real nodes with certificates from deploy/make-certs.sh.

Clients and peers speak TLS only; peers verify each other and require each other's client
certificate on /raft (mutual TLS, on top of the cluster secret). A client with the cluster's CA
submits, fetches and acks; a client trusting another CA is refused before it sends a byte of its
request, and so is plain HTTP.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from raftq import AsyncClient, Client, errors
from raftq.cluster.localcluster import LocalCluster, http_json
from raftq.cluster.transport.http import SECRET_HEADER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/make-certs.sh needs openssl")


def make_certs(directory: str) -> str:
    subprocess.run([os.path.join(ROOT, "deploy", "make-certs.sh"), directory], check=True, capture_output=True)
    return directory


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    certs = make_certs(str(base / "certs"))
    with LocalCluster(str(base / "cluster"), size=3, tls_dir=certs) as cluster:
        yield cluster


def test_the_cluster_runs_over_tls_and_a_client_with_its_ca_works(tls_cluster):
    assert all(url.startswith("https://") for url in tls_cluster.urls)
    with Client(tls_cluster.urls, ca_file=tls_cluster.ca_file, timeout=10, deadline=30) as client:
        job_id = client.submit("tls", {"over": "tls"})
        (job,) = client.fetch("w1", ["tls"], wait_s=5)
        assert job.id == job_id and job.payload == {"over": "tls"}
        client.ack("w1", job.id, job.lease_token)
        assert client.get(job_id)["state"] == "done"
        status = client.cluster()
    assert all(node["url"].startswith("https://") for node in status["nodes"]), status
    tls_cluster.wait_converged()


def test_a_client_trusting_another_ca_is_refused(tls_cluster, tmp_path):
    other = make_certs(str(tmp_path / "other"))
    with Client(tls_cluster.urls, ca_file=os.path.join(other, "ca.pem"), timeout=2, deadline=3) as client:
        with pytest.raises(errors.ConnectError, match="certificate is not trusted"):
            client.submit("tls", {"n": 1})
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        http_json(tls_cluster.urls[0] + "/v1/cluster", context=ssl.create_default_context())  # system CAs


def test_the_async_client_speaks_tls_and_refuses_another_ca(tls_cluster, tmp_path):
    other = make_certs(str(tmp_path / "other"))

    async def run() -> None:
        async with AsyncClient(tls_cluster.urls, ca_file=tls_cluster.ca_file, timeout=10, deadline=30) as client:
            job_id = await client.submit("tls-async", {"over": "tls"})
            assert (await client.get(job_id))["state"] == "ready"
        async with AsyncClient(tls_cluster.urls, ca_file=os.path.join(other, "ca.pem"), timeout=2, deadline=3) as client:
            with pytest.raises(errors.ConnectError, match="certificate is not trusted"):
                await client.submit("tls-async", {"n": 1})

    asyncio.run(run())


def test_plain_http_to_a_tls_node_gets_no_answer(tls_cluster):
    plain = tls_cluster.urls[0].replace("https://", "http://")
    try:
        status, _ = http_json(plain + "/v1/cluster")
    except OSError:
        return  # the connection was dropped: fine
    assert status == 400, "a TLS listener must not serve plain HTTP"


def test_raft_needs_a_peer_certificate_besides_the_secret(tls_cluster):
    url = tls_cluster.urls[0] + "/raft/messages"
    headers = {"Content-Type": "application/msgpack", SECRET_HEADER: tls_cluster.secret}

    def post(context: ssl.SSLContext) -> int:
        request = urllib.request.Request(url, data=b"\xc1", method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    without_certificate = ssl.create_default_context(cafile=tls_cluster.ca_file)
    assert post(without_certificate) == 403
    with_certificate = ssl.create_default_context(cafile=tls_cluster.ca_file)
    with_certificate.load_cert_chain(os.path.join(tls_cluster.tls_dir, "n2.pem"), os.path.join(tls_cluster.tls_dir,
                                                                                              "n2.key"))
    assert post(with_certificate) == 400, "a peer with certificate and secret reaches the view (garbage body: 400)"
