"""Keeps `raftq bench floor` working: three real processes, real fsyncs, raftq's client as producer.

No timed assertions: the figures only have to exist and add up, and nothing may be left behind.
"""

from __future__ import annotations

import os
import re

from raftq.bench import main as bench


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if text.encode() in cmdline.read():
                    found.append(pid)
        except OSError:
            continue  # gone meanwhile
    return found


def test_floor_measures_one_job_submits_and_memory_then_cleans_up(tmp_path, capsys):
    exit_code = bench.main(["floor", "--jobs", "40", "--runs", "2", "--data-dir", str(tmp_path)])
    printed = capsys.readouterr()
    assert exit_code == 0, printed.err

    runs = re.findall(r"^run \d: ([\d,]+) submits/s, p50 ([\d.]+) ms, p99 ([\d.]+) ms; "
                      r"RSS of the three ([\d.]+) MiB \(peak ([\d.]+)\)$", printed.out, re.M)
    assert len(runs) == 2, printed.out
    for rate, p50, p99, rss, peak in runs:
        assert float(rate.replace(",", "")) > 0
        assert 0 < float(p50) <= float(p99)
        assert 0 < float(rss) <= float(peak), printed.out
    assert re.search(r"^median: [\d,]+ one-job submits/s", printed.out, re.M), printed.out

    assert os.listdir(tmp_path) == [], "each run's folder (three data files, three logs) is removed"
    assert _processes_mentioning(str(tmp_path)) == [], "the three processes are stopped"
