"""A one-line progress bar for the CLI, on stderr, silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Redraws per second at most: a bar redrawn per job would cost more than the jobs on a fast cluster.
REDRAW_HZ_MAX = 10
BAR_WIDTH = 30


class ProgressBar:
    """Counts work done out of `total` and draws `label [#####.....] done/total pct rate/s`.

    Args:
        total: units of work expected.
        label: text before the bar.
        stream: where to draw (default sys.stderr).
        enabled: draw or not (default: when the stream is a terminal).
    """

    def __init__(self, total: int, *, label: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled if enabled is not None else _is_tty(self.stream)
        self.done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        """Adds `count` units done; redraws when enough time has passed."""
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._drawn_at >= 1 / REDRAW_HZ_MAX or self.done >= self.total):
            self._drawn_at = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The bar as text (without carriage return)."""
        elapsed_s = max((time.monotonic() if now is None else now) - self._started, 1e-9)
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        prefix = f"{self.label} " if self.label else ""
        return f"{prefix}[{bar}] {self.done}/{self.total} {fraction * 100:3.0f}% {self.done / elapsed_s:,.0f}/s"

    def close(self) -> None:
        """Draws the final state and ends the line."""
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
            self.enabled = False

    @property
    def elapsed_s(self) -> float:
        """Seconds since the bar was made."""
        return time.monotonic() - self._started


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
