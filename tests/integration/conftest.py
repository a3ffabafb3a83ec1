"""Fixtures that start real node processes on loopback ports."""

from __future__ import annotations

import pytest

from raftq.cluster.localcluster import LocalCluster


def _dump_logs_on_failure(request: pytest.FixtureRequest, cluster: LocalCluster) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for node_id in cluster.nodes:
            print(f"----- {node_id} log (tail) -----")
            print(cluster.log_text(node_id)[-4000:])


@pytest.fixture
def single_node(tmp_path, request):
    """A cluster of one: every change still goes append -> fsync -> commit -> apply."""
    with LocalCluster(str(tmp_path / "cluster"), size=1, extra_args=["--worker-timeout", "2"]) as cluster:
        yield cluster
        _dump_logs_on_failure(request, cluster)


@pytest.fixture
def three_nodes(tmp_path, request):
    with LocalCluster(str(tmp_path / "cluster"), size=3, extra_args=["--worker-timeout", "2"]) as cluster:
        yield cluster
        _dump_logs_on_failure(request, cluster)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
