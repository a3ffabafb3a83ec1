"""A wrong wall clock for one node process, from Debian's libfaketime.

libfaketime is preloaded into the node (LD_PRELOAD) and reads the offset from a file, so a test
can set a node's clock ahead or behind at start and step it while the node runs. Only the wall
clock (CLOCK_REALTIME: `time.time()`) is faked: FAKETIME_DONT_FAKE_MONOTONIC keeps
CLOCK_MONOTONIC true, as NTP steps, a VM restored from a snapshot or a wrong hardware clock do.

Two traps of libfaketime 0.9.10 with a true monotonic clock, measured here: its "monotonic fix"
for pthread_cond_timedwait (on by default with glibc) makes every timed wait of a thread pool
take 50-200 ms instead of microseconds, so a node's fsync threads crawl and it misses heartbeats:
FAKETIME_FORCE_MONOTONIC_FIX=0 turns it off. And `time.sleep()` fails with EINVAL (it
mis-handles clock_nanosleep on CLOCK_MONOTONIC); the node never calls it (it waits through
asyncio), but a helper script run under this environment must not either.
"""

from __future__ import annotations

import glob
import os

from raftq.chaos import debian_packages

#: where Debian's libfaketime package puts the library (multiarch folder varies)
_LIBRARY_PATTERNS = ("/usr/lib/*/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1")
#: how often (seconds) the faked process re-reads the offset file: a step takes effect within it
CACHE_DURATION_S = 1


class FaketimeUnavailable(RuntimeError):
    """Raised when libfaketime is missing and cannot be installed here (the reason is the message)."""


def library_path(*, install: bool = True) -> str:
    """The libfaketime library; installs Debian's `faketime` package when missing and allowed.

    Raises:
        FaketimeUnavailable: missing, and there is no apt-get, we are not root, or the install failed.
    """
    found = _find()
    if found:
        return found
    if not install:
        raise FaketimeUnavailable("libfaketime is not installed: `apt-get install -y faketime`")
    failure = debian_packages.install("faketime", present=lambda: _find() is not None)
    if failure:
        raise FaketimeUnavailable(failure)
    found = _find()
    assert found is not None
    return found


def _find() -> str | None:
    for pattern in _LIBRARY_PATTERNS:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[0]
    return None


def offset_text(offset_s: float) -> str:
    """libfaketime's relative form in seconds, e.g. "+3600.000" or "-86400.000"."""
    return f"{offset_s:+.3f}"


class SkewedClock:
    """The environment and offset file of one node whose wall clock is off by `offset_s`.

    `env` goes into the node's environment; `set_offset()` steps the running node's clock (within
    CACHE_DURATION_S).
    """

    def __init__(self, library: str, offset_file: str, offset_s: float = 0.0) -> None:
        self.library = library
        self.offset_file = offset_file
        self.set_offset(offset_s)

    def set_offset(self, offset_s: float) -> None:
        self.offset_s = offset_s
        tmp = self.offset_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(offset_text(offset_s) + "\n")
        os.replace(tmp, self.offset_file)  # the node never reads a half-written offset

    @property
    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": self.library,
            "FAKETIME_TIMESTAMP_FILE": self.offset_file,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_FORCE_MONOTONIC_FIX": "0",
            "FAKETIME_CACHE_DURATION": str(CACHE_DURATION_S),
        }
