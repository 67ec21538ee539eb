"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 for the module's tests (started on first use, stopped by
    its PID after the module; see tests/redis_server.py)."""
    with redis_server() as server:
        yield server
