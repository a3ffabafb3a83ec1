"""The cluster's clock as the leader reads it: the applied clock, advanced by monotonic time.

Theory of operation
-------------------
Leases, delays, backoff, retention and idempotency windows are decided by the queue state
machine on its replicated clock, `QueueStateMachine.clock_ms`: the largest `now_ms` any applied
command carried. Every command's `now_ms` comes from here, so the rule for that number is the
rule for the cluster's time (SPEC.md, Time; README, design decisions):

* While a node leads, its reading is the clock it applied when it took office plus the
  *monotonic* time elapsed since. A wall clock that is off by a day, or steps while the node
  runs, changes nothing: the wall clock is never read here.
* The reading never falls behind the applied clock. A new leader that applies its predecessor's
  last entries after taking office moves up to them (it catches up with history, it does not
  jump with any node's clock), and the state machine keeps the maximum anyway.
* A new leader starts from the clock it applied, so the cluster's time stands still between the
  last entry its predecessor committed and the new leader's first reading: leases lengthen by
  about an election, never shorten (etcd, Consul and Chubby do the same). The leader keeps that
  gap small by committing its reading at least once per election timeout while anything waits
  on the clock (the node's housekeeping proposes a `Tick`).

Nothing here is persisted or sent: a monotonic reading means nothing to another process, only
the `now_ms` stamped into a committed command does. A node's wall clock seeds a brand-new
cluster's clock (whose state holds nothing that waits on it), so that the cluster's times read as
dates; from then on the cluster's clock stays near real time (it loses about an election per
failover) but owes nothing to any node's wall clock. The API shows times on it, and tells a
worker how long its lease has left (`lease_expires_in_s`) rather than make it compare clocks.
"""

from __future__ import annotations

import time
from typing import Callable


class LeaderClock:
    """Readings of the cluster's clock in milliseconds for the node that leads.

    `take_office()` at each new term; `read(applied_ms)` for every command stamped.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._anchor_ms: int | None = None  # cluster time at the anchor
        self._anchor_monotonic = 0.0  # our monotonic seconds at the anchor

    def take_office(self) -> None:
        """A new term: the next reading starts again from the applied clock."""
        self._anchor_ms = None

    def read(self, applied_ms: int) -> int:
        """The cluster's time now: at least `applied_ms`, the state machine's clock."""
        now = self._monotonic()
        if self._anchor_ms is not None:
            reading = self._anchor_ms + round((now - self._anchor_monotonic) * 1000)
            if reading >= applied_ms:
                return reading
        # First reading of the term, or the applied clock moved past ours: the predecessor's last
        # entries applied after we took office. Continue from them.
        self._anchor_ms, self._anchor_monotonic = applied_ms, now
        return applied_ms

