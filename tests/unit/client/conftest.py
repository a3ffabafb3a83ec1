"""Fixtures of the client tests (the fakes themselves are in fakes.py)."""

from __future__ import annotations

import pytest

from tests.unit.client.fakes import ApiServer


@pytest.fixture
def api():
    """The in-memory cluster served over real HTTP on a free loopback port."""
    server = ApiServer()
    server.start()
    yield server
    server.stop()
