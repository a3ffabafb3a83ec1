"""Keeps `raftq bench` working: a tiny end-to-end scenario on a cluster of its own, checked by shape.

No timed assertions: the figures only have to exist and add up (every job submitted and acked once).
"""

from __future__ import annotations

import json

from raftq.bench import main as bench

TINY_JOBS = 300


def test_tiny_e2e_scenario_writes_a_complete_json_report(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    exit_code = bench.main([
        "--scenario", "e2e", "--jobs", str(TINY_JOBS), "--batch", "50", "--producers", "1", "--workers", "2",
        "--concurrency", "2", "--runs", "1", "--no-progress", "--json", str(report_path),
        "--data-dir", str(tmp_path / "data"),
    ])
    printed = capsys.readouterr()
    assert exit_code == 0, printed.err

    report = json.loads(report_path.read_text())
    header = report["header"]
    assert header["fsync_policy"] == "fsync on majority before every 2xx"
    assert header["machine"]["cores"] >= 1
    (scenario,) = report["scenarios"]
    assert scenario["error"] is None
    assert (scenario["scenario"], scenario["jobs"], scenario["workers"]) == ("e2e", TINY_JOBS, 2)
    assert scenario["jobs_per_s"] > 0
    assert scenario["accounted"] is True
    (run,) = scenario["runs"]
    assert run["submitted"] == TINY_JOBS
    assert run["acked"] == TINY_JOBS
    assert run["queue_depth"]["done"] == TINY_JOBS
    assert run["queue_depth"]["ready"] == run["queue_depth"]["leased"] == 0
    for figures in (scenario["submit_latency_ms"], scenario["e2e_latency_ms"]):
        assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    assert set(run["node_rss_by_node_mib"]) == {"n1", "n2", "n3"}
    assert run["node_rss_peak_mib"]["leader"] > 0
    assert run["node_rss_peak_mib"]["all_nodes"] == round(sum(run["node_rss_by_node_mib"].values()), 1)
    assert run["leader_memory_mib"] is None  # the queued / drained figures belong to drain
    assert run["worker_rss_peak_mib"] > 0
    if not run["leader_changed"]:  # the WAL figures come from one leader's log, or not at all
        assert run["wal_bytes_per_job"] > 0
        assert run["entries_per_fsync"] >= 1

    assert scenario["name"] in printed.out  # the table
    assert "fsync on majority before every 2xx" in printed.out  # the header


def test_a_run_whose_records_the_retention_drops_still_accounts_for_every_job(tmp_path):
    """--retention 0: the records are gone by the time the run is counted, so the done depth is
    not the jobs' count; every ack answered 2xx and nothing is left unfinished, so all are seen."""
    report_path = tmp_path / "bench.json"
    exit_code = bench.main([
        "--scenario", "e2e", "--jobs", "200", "--batch", "50", "--runs", "1", "--retention", "0", "--no-progress",
        "--json", str(report_path), "--data-dir", str(tmp_path / "data"),
    ])
    assert exit_code == 0
    (scenario,) = json.loads(report_path.read_text())["scenarios"]
    (run,) = scenario["runs"]
    assert run["acked"] == 200 and run["queue_depth"].get("done", 0) < 200, run["queue_depth"]
    assert scenario["accounted"] is True


def test_cli_pool_runs_raftq_worker_as_a_process_and_counts_every_job(tmp_path, capsys):
    """--pool cli: `raftq worker` with its default flags, jobs of one loopback request each."""
    report_path = tmp_path / "bench.json"
    exit_code = bench.main([
        "--scenario", "e2e", "--jobs", "200", "--batch", "100", "--pool", "cli", "--concurrency", "2",
        "--kind", "echo", "--runs", "1", "--no-progress", "--json", str(report_path),
        "--data-dir", str(tmp_path / "data"),
    ])
    assert exit_code == 0, capsys.readouterr().err
    (scenario,) = json.loads(report_path.read_text())["scenarios"]
    assert scenario["error"] is None and scenario["accounted"] is True, scenario
    (run,) = scenario["runs"]
    assert (run["acked"], run["queue_depth"]["done"]) == (200, 200), run
    assert run["worker_rss_peak_mib"] > 0  # the raftq worker process's own


def test_drain_reports_the_leaders_memory_idle_queued_and_drained(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    exit_code = bench.main([
        "--scenario", "drain", "--jobs", "200", "--batch", "100", "--runs", "1", "--no-progress",
        "--json", str(report_path), "--data-dir", str(tmp_path / "data"),
    ])
    printed = capsys.readouterr()
    assert exit_code == 0, printed.err
    (scenario,) = json.loads(report_path.read_text())["scenarios"]
    assert scenario["error"] is None and scenario["accounted"] is True, scenario
    memory = scenario["leader_memory_mib"]
    assert set(memory) == {"idle", "queued", "queued_peak", "drained"}, memory
    assert 0 < memory["idle"] and 0 < memory["queued"] <= memory["queued_peak"], memory
    assert memory["drained"] > 0
    assert "PEAK SUBMITTING" in printed.out


def test_default_set_is_listed_without_running_anything(capsys):
    assert bench.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [scenario.label for scenario in bench.DEFAULT_SET]
    assert bench.HEADLINE.label in listed


def test_shape_flags_without_a_scenario_are_refused(capsys):
    assert bench.main(["--jobs", "5"]) == 2
    assert "--scenario" in capsys.readouterr().err
