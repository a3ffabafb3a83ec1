"""Open-loop load: requests due on a fixed schedule, whatever happened to the ones before.

A closed-loop producer sends its next request when the previous one is answered, so when the
cluster slows down the producer slows down with it: the load it offers falls exactly while the
cluster is being measured, and the slow answers are under-counted (coordinated omission, in Gil
Tene's words; wrk2's fix is a constant-throughput schedule with each latency counted from the
time its request was due). Here a producer's request k is due at start + k * interval; it is sent
then (or as soon as the producer wakes: a late wake-up sends every request that came due, none
is dropped to "catch up") and awaited concurrently with the others, and its latency counts from
its due time, not from when it was sent.

A bound on the requests in flight keeps a stalled cluster from collecting an unbounded number of
them. A request that comes due while the bound is reached is not sent, and it is recorded as
offered and not served: it lowers goodput instead of vanishing from the count.

Pure: the caller passes the time and the number in flight; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Due:
    """A request that came due: when it was due, and whether the in-flight bound lets it go."""

    at: float
    send: bool


class OpenLoop:
    """One producer's schedule: request k due at start + k * interval_s; at most inflight_max in flight."""

    def __init__(self, start: float, interval_s: float, inflight_max: int) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if inflight_max < 1:
            raise ValueError(f"inflight_max must be at least 1, got {inflight_max}")
        self.start = start
        self.interval_s = interval_s
        self.inflight_max = inflight_max
        #: requests taken so far (sent or not)
        self.taken = 0

    @property
    def next_at(self) -> float:
        """When the next request not yet taken is due."""
        return self.start + self.taken * self.interval_s

    def take(self, now: float, inflight: int) -> list[Due]:
        """Every request due by now and not yet taken, in schedule order; the first ones that fit
        under the bound (given `inflight` requests already unanswered) are to be sent, the rest not."""
        due = []
        free = max(0, self.inflight_max - inflight)
        while self.next_at <= now:
            due.append(Due(self.next_at, send=free > 0))
            free -= 1 if free > 0 else 0
            self.taken += 1
        return due
