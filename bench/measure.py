"""What `raftq bench` measures around the jobs: the machine, node metrics, node memory, percentiles."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from raftq.cluster.localcluster import http_json

#: Seconds a metrics or status request may take; a node under load answers slowly, not never.
PROBE_TIMEOUT_S = 10.0
#: The only fsync policy raftq has (SPEC guarantee 1); named in every report header.
FSYNC_POLICY = "fsync on majority before every 2xx"
#: Filesystems on which fsync costs nothing, so figures are not comparable with a disk.
_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


# ---------------------------------------------------------------------------- statistics


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """p50, p90, p99 (nearest rank) and max of `values`; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def combine_percentiles(runs: Sequence[dict[str, float] | None]) -> dict[str, float] | None:
    """Across runs: the median of each run's p50/p90/p99, and the largest max."""
    present = [run for run in runs if run]
    if not present:
        return None
    combined = {key: median([run[key] for run in present]) for key in ("p50", "p90", "p99")}
    combined["max"] = max(run["max"] for run in present)
    return combined  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the nodes


@dataclass(frozen=True)
class WalSample:
    """One scrape of the WAL figures of a node's /metrics."""

    wal_bytes: float | None
    fsync_entries_sum: float | None
    fsync_count: float | None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def scrape_wal(url: str, token: str | None) -> WalSample:
    """raftq_wal_bytes and the raftq_wal_entries_per_fsync histogram's sum and count at `url`."""
    request = urllib.request.Request(url.rstrip("/") + "/metrics", headers=_headers(token))
    with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as answer:
        text = answer.read().decode("utf-8", errors="replace")
    wal_bytes = entries_sum = count = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "raftq_wal_bytes":
                wal_bytes = sample.value
            elif sample.name == "raftq_wal_entries_per_fsync_sum":
                entries_sum = sample.value
            elif sample.name == "raftq_wal_entries_per_fsync_count":
                count = sample.value
    return WalSample(wal_bytes, entries_sum, count)


def wal_figures(before: WalSample | None, after: WalSample | None, jobs: int) -> tuple[float | None, float | None]:
    """(WAL bytes per job, log entries per fsync) between two scrapes of the same node."""
    if before is None or after is None:
        return None, None
    per_job = None
    if before.wal_bytes is not None and after.wal_bytes is not None and jobs:
        per_job = (after.wal_bytes - before.wal_bytes) / jobs
    per_fsync = None
    if None not in (before.fsync_entries_sum, before.fsync_count, after.fsync_entries_sum, after.fsync_count):
        fsyncs = after.fsync_count - before.fsync_count  # type: ignore[operator]
        if fsyncs > 0:
            per_fsync = (after.fsync_entries_sum - before.fsync_entries_sum) / fsyncs  # type: ignore[operator]
    return per_job, per_fsync


def find_leader(urls: Sequence[str], token: str | None) -> tuple[str, str] | None:
    """(leader id, leader URL) as the first node that answers sees it; None when none knows one."""
    for url in urls:
        try:
            status, body = http_json(url.rstrip("/") + "/v1/cluster", timeout=PROBE_TIMEOUT_S, headers=_headers(token))
        except OSError:
            continue
        if status == 200 and body.get("leader") and body.get("leader_url"):
            return body["leader"], body["leader_url"].rstrip("/")
    return None


def reset_peak_rss(pid: int) -> bool:
    """Resets a process's VmHWM to its current RSS (Linux clear_refs "5"); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def stop_processes(processes: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """Terminates the processes (servers a bench started), then kills any that outlives `timeout_s`."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


# ---------------------------------------------------------------------------- the machine


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS and Python of this machine, for the report header."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": _has_module("uvloop"),
        "raftq": _raftq_version(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _raftq_version() -> str:
    """The package version, plus the git commit when run from a checkout ("+" when it has changes)."""
    try:
        from importlib.metadata import version

        text = version("raftq")
    except Exception:
        text = "0.1.0 (not installed)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return text
    return f"{text}, git {commit}{'+' if dirty else ''}" if commit else text


def filesystem_of(path: str) -> str | None:
    """The filesystem type (ext4, xfs, tmpfs, ...) that holds `path`, from /proc/mounts."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    path = os.path.realpath(path)
    best, kind = "", None
    for entry in entries:
        if len(entry) < 3:
            continue
        mount_point = entry[1].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, entry[2]
    return kind


def memory_filesystem(kind: str | None) -> bool:
    return kind in _MEMORY_FILESYSTEMS
