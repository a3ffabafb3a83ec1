"""Options and fixtures shared by every test directory (keep this small)."""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--rewrite", action="store_true", default=False,
        help="data-driven tests: write the actual output into tests/testdata files instead of comparing",
    )


def pytest_configure(config) -> None:
    # Each xdist worker picks node and proxy ports from its own slice of the band, so two tests
    # running at once never pick the same port (free_ports' probe cannot see a port picked but
    # not yet bound by another process). Child processes inherit the slice.
    import os

    from raftq.cluster.localcluster import PORT_RANGE_ENV, port_band

    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count) or PORT_RANGE_ENV in os.environ:
        return
    band, index, slices = port_band(), int(worker.removeprefix("gw")), int(count)
    width = len(band) // slices
    low = band.start + index * width
    os.environ[PORT_RANGE_ENV] = f"{low}-{low + width - 1}"
