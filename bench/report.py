"""How `raftq bench` shows its figures: the header, two tables, and an optional chart."""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from raftq.client.cli import format_table


def format_header(facts: dict[str, Any]) -> str:
    """The lines that name the machine, the cluster and the fsync policy above every report."""
    machine = facts["machine"]
    cores = f"{machine['cores']} cores"
    if machine.get("cores_usable") and machine["cores_usable"] != machine["cores"]:
        cores += f" ({machine['cores_usable']} usable)"
    parts = [cores + (f" ({machine['cpu']})" if machine.get("cpu") else "")]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']:g} GiB RAM")
    parts += [machine["os"], machine["python"], f"raftq {machine['raftq']}"]
    cluster = facts["cluster"]
    if facts.get("filesystem"):
        cluster += f"; data on {facts['filesystem']}"
    if facts.get("own_cluster") and machine.get("uvloop"):
        cluster += "; nodes on uvloop"
    lines = [
        "raftq bench: " + " · ".join(parts),
        f"cluster: {cluster}",
        f"fsync policy: {facts['fsync_policy']}",
        f"jobs: {facts['payload_bytes']}-byte payloads; cpu job = {facts['cpu_loops']:,} loop iterations (about 1 ms); "
        f"{facts['runs']} run(s) per scenario: median, spread = (max - min) / median",
    ]
    if facts.get("filesystem_in_memory"):
        lines.append(f"WARNING: the data is on {facts['filesystem']}, where fsync costs nothing: "
                     "these figures overstate what a disk allows")
    return "\n".join(lines)


def format_tables(results: Sequence[dict]) -> str:
    """Throughput and latency, then memory and log figures: one row per scenario."""
    if not results:
        return "no scenario finished"
    speed_rows, resource_rows = [], []
    for result in results:
        name = result["name"]
        if result.get("error") and not result.get("runs"):
            speed_rows.append([name, "FAILED", "", _first_line(result["error"]), "", ""])
            continue
        flag = "yes" if result["accounted"] else "NO"
        if result.get("error"):
            flag += f" (then failed: {_first_line(result['error'])})"
        speed_rows.append([name, _count(result["jobs_per_s"]), _percent(result["spread_pct"]),
                           _latency(result["submit_latency_ms"]), _latency(result["e2e_latency_ms"]), flag])
        nodes = result.get("node_rss_peak_mib") or {}
        resource_rows.append([name, _number(nodes.get("leader")), _number(nodes.get("follower_max")),
                              _number(nodes.get("all_nodes")),
                              _number(result.get("worker_rss_peak_mib")), _number(result.get("wal_bytes_per_job")),
                              _number(result.get("entries_per_fsync"), digits=1)])
    speed = format_table(["SCENARIO", "JOBS/S", "SPREAD", "SUBMIT MS p50/p90/p99/max", "E2E MS p50/p90/p99/max",
                          "ALL JOBS SEEN"], speed_rows)
    resources = format_table(["SCENARIO", "RSS LEADER MiB", "RSS FOLLOWER MiB", "RSS 3 NODES MiB", "RSS WORKER MiB",
                              "WAL B/JOB", "ENTRIES/FSYNC"], resource_rows)
    memory_rows = [[result["name"], *(_number(memory.get(key))
                                      for key in ("idle", "queued", "queued_peak", "drained", "records_dropped"))]
                   for result in results if (memory := result.get("leader_memory_mib"))]
    memory = ""
    if memory_rows:
        memory = "\n\n" + format_table(["SCENARIO", "LEADER RSS MiB: IDLE", "QUEUED", "PEAK SUBMITTING", "DRAINED",
                                         "RECORDS DROPPED"], memory_rows)
    return f"{speed}\n\n{resources}{memory}\n\n{_legend()}"


def _legend() -> str:
    return ("Scenario: kind, jobs, b = jobs per request, p = producers, w = worker processes, c = concurrency, pool, "
            "job kind.\nSUBMIT MS: per submit request. E2E MS: submit call to ack answer, per job. RSS: peak "
            "(VmHWM) during the run, median of the runs; 3 NODES: their sum; n/a for --nodes.\nLEADER RSS (drain): "
            "VmRSS before the jobs are queued, once all are queued (before any lease), its peak while they were "
            "submitted, once the last ack is in, and (with --retention) its lowest in the 10 s after those records are "
            "gone.\nWAL B/JOB and ENTRIES/FSYNC: from the leader's /metrics "
            "(raftq_wal_bytes, raftq_wal_entries_per_fsync).")


def _first_line(text: str) -> str:
    line = (text or "").strip().splitlines()[0] if text else ""
    return line[:100]


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _percent(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def _number(value: float | None, *, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def _latency(figures: dict[str, float] | None) -> str:
    if not figures:
        return "-"
    return "/".join(_ms(figures[key]) for key in ("p50", "p90", "p99", "max"))


# ---------------------------------------------------------------------------- chart


def plot_unavailable_reason() -> str | None:
    """Why --plot cannot draw here (matplotlib missing), or None when it can."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def plot_results(results: Sequence[dict], path: str, *, title: str = "") -> None:
    """Draws jobs/s (median, bars from min to max) and end-to-end latency (p50, p99) by scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.get("jobs_per_s")]
    names = [r["name"] for r in shown]
    positions = list(range(len(shown)))
    height = max(3.0, 0.35 * len(shown) + 1.5)
    figure, (speed, latency) = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    rates = [r["jobs_per_s"] for r in shown]
    low = [r["jobs_per_s"] - (r["jobs_per_s_min"] or r["jobs_per_s"]) for r in shown]
    high = [(r["jobs_per_s_max"] or r["jobs_per_s"]) - r["jobs_per_s"] for r in shown]
    speed.barh(positions, rates, xerr=[low, high], color="#4878a8", capsize=3)
    speed.set_yticks(positions, names, fontsize=8)
    speed.invert_yaxis()
    speed.set_xlabel("jobs/s (median of runs; bars: min to max)")
    for key, color, offset in (("p50", "#6a9f58", -0.2), ("p99", "#d1615d", 0.2)):
        values = [_latency_of(r, key) for r in shown]
        latency.barh([p + offset for p in positions], [v if v else float("nan") for v in values], height=0.4, color=color,
                      label=f"{key}")
    latency.set_xscale("log")
    latency.set_xlabel("latency ms (e2e per job; submit-only scenarios: per request), log scale")
    latency.legend(loc="best")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _latency_of(result: dict, key: str) -> float | None:
    figures = result.get("e2e_latency_ms") or result.get("submit_latency_ms")
    return figures.get(key) if figures else None
