"""What the load does to the nodes, sampled from their /metrics during a chaos run.

Every `interval_s` a thread per node scrapes the node's own /metrics (directly, not through the
client proxy, so a fault on the client path does not blind it) and records a `load` event with
the three figures the load is expected to push up:

    pending      raftq_proposals_pending: proposals waiting for their entry to commit (leader)
    send_queue   the largest raftq_peer_send_queue_messages{peer}: Raft messages queued for one
                 peer and not yet sent (a slow or cut-off follower's queue fills first)
    rss_bytes    process_resident_memory_bytes of the node process

with the node's role, so that the checker can report the peaks overall and per fault kind
(`checker.load_peaks`). A sample is a point in time: a peak shorter than the interval can be
missed, so the figures are lower bounds of the true peaks.
"""

from __future__ import annotations

import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from raftq.chaos.history import HistoryWriter

#: Seconds between two scrapes of one node.
INTERVAL_S = 0.5
#: Seconds a scrape may take (a paused node does not answer).
SCRAPE_TIMEOUT_S = 2.0


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> dict | None:
    """{role, pending, send_queue, rss_bytes} of the node at url, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    sample = {"role": None, "pending": 0, "send_queue": 0, "rss_bytes": None}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "raftq_raft_role" and s.value == 1:
                sample["role"] = s.labels.get("role")
            elif s.name == "raftq_proposals_pending":
                sample["pending"] = int(s.value)
            elif s.name == "raftq_peer_send_queue_messages":
                sample["send_queue"] = max(sample["send_queue"], int(s.value))
            elif s.name == "process_resident_memory_bytes":
                sample["rss_bytes"] = int(s.value)
    return sample


class LoadSampler:
    """One thread per node scraping its /metrics every interval_s into `load` history events."""

    def __init__(self, cluster, history: HistoryWriter, interval_s: float = INTERVAL_S) -> None:
        self.cluster = cluster
        self.history = history
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._poll, args=(node_id,), name=f"load-{node_id}", daemon=True)
                        for node_id in cluster.nodes]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)

    def _poll(self, node_id: str) -> None:
        while not self.stop_event.is_set():
            sample = scrape(self.cluster.nodes[node_id].url)
            if sample is not None:
                self.history.event("load", proc="monitor", node=node_id, **sample)
            self.stop_event.wait(self.interval_s)
