"""A small filesystem of its own under each node's data directory, for the disk-full nemesis.

Each node's data directory is the mount point of its own size-limited ext4 filesystem: an image
file in the run directory, attached through a loop device. Filling one gives that node a real
ENOSPC from the kernel while the other nodes' disks stay free, and fsync stays real: the loop
device passes flushes on to the image file on the machine's disk (a tmpfs, the other way to get a
small filesystem, would make every fsync of the whole run free and its figures flattering).

Needs root (mount) and mkfs.ext4; `unavailable_reason()` says why a machine cannot.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

#: Size of each node's filesystem: a few WAL segments (8 MiB each) and two snapshots of a state
#: that holds a minute of finished jobs at 1,000 jobs/s (about 10 MiB) fit many times over.
SIZE_MIB = 256
#: The file the nemesis fills a node's filesystem with (in the node's data directory).
FILLER_NAME = "chaos-disk-filler"
_CHUNK_BYTES = 1 << 20


def unavailable_reason() -> str | None:
    """Why per-node filesystems cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "mounting a filesystem per node needs root"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    return None


def mount(data_dir: str, image_path: str, size_mib: int = SIZE_MIB) -> None:
    """Makes an ext4 filesystem of size_mib in image_path and mounts it on data_dir (loop)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(image_path, "wb") as f:
        f.truncate(size_mib << 20)
    # -m 0: no blocks reserved for root (the node runs as root here and would use them).
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", image_path])
    _run(["mount", "-o", "loop", image_path, data_dir])


def unmount(data_dir: str) -> None:
    """Unmounts data_dir (lazily if something still holds it); the loop device is released."""
    if subprocess.run(["umount", data_dir], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", data_dir], capture_output=True)


def fill(data_dir: str) -> str:
    """Writes a filler file into data_dir until the filesystem has no block left; returns its path."""
    path = os.path.join(data_dir, FILLER_NAME)
    chunk = b"\0" * _CHUNK_BYTES
    with open(path, "wb", buffering=0) as f:
        # fallocate takes the free blocks without writing them (nothing goes to the image file);
        # writes then take whatever it left (metadata blocks, a partial last extent).
        stat = os.statvfs(data_dir)
        try:
            os.posix_fallocate(f.fileno(), 0, max(stat.f_bavail * stat.f_frsize - _CHUNK_BYTES, 1))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        f.seek(0, os.SEEK_END)
        size = _CHUNK_BYTES
        while size >= 512:
            try:
                f.write(chunk[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2  # the last few blocks: smaller writes until not even 512 bytes fit
        os.fsync(f.fileno())
    return path


def free(path: str) -> None:
    """Deletes the filler: the filesystem has room again."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
