"""Installing a Debian package that a fault tool or a test needs (libfaketime, iproute2, Chromium).

The suite runs tests in parallel processes, and apt-get refuses to run while another apt-get holds
dpkg's lock, so every install goes through one file lock: the second caller waits for the first
and then finds the package already there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from typing import Callable

#: An install that takes longer than this (a slow mirror, Chromium's size) is given up.
INSTALL_TIMEOUT_S = 1200


def install(package: str, *, present: Callable[[], bool]) -> str | None:
    """Installs `package` with apt-get unless `present()` already holds; returns None when it holds
    afterwards, otherwise why not (a skip or failure message)."""
    if present():
        return None
    if shutil.which("apt-get") is None:
        return f"{package} is missing and this system has no apt-get to install it"
    if os.geteuid() != 0:
        return f"{package} is missing; installing it needs root: `apt-get install -y {package}`"
    lock_path = os.path.join(tempfile.gettempdir(), "raftq-apt-get.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if present():  # another process installed it while we waited
            return None
        result = subprocess.run(
            "apt-get update && apt-get install -y -o DPkg::Lock::Timeout=600 " + package,
            shell=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0 or not present():
        return (f"installing Debian's {package} failed (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return None
