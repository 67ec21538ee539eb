"""Every numeric setting rejects NaN, infinities, out-of-range values, bools
and wrong types, naming the setting, at construction and on assignment
(issue 9; ``wsmanager.settings``)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager, backend_from_env
from wsmanager.backends.redis import RedisBackend

NAN, INF = float("nan"), float("inf")
HUGE = 10**400  # an int no double holds

# bad values per kind of setting -> the exception they raise
Bad = list[tuple[Any, type[Exception]]]
COUNT: list[tuple[Any, type[Exception]]] = [
    (NAN, TypeError),
    (INF, TypeError),
    (-INF, TypeError),
    (1.0, TypeError),
    (2.5, TypeError),
    (True, TypeError),
    (False, TypeError),
    ("5", TypeError),
    (None, TypeError),
    ([3], TypeError),
    (-1, ValueError),
]
COUNT1: Bad = [*COUNT, (0, ValueError)]
OPTIONAL_COUNT1: Bad = [(v, e) for v, e in COUNT1 if v is not None]
SECONDS: list[tuple[Any, type[Exception]]] = [
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    (0, ValueError),
    (0.0, ValueError),
    (-1, ValueError),
    (HUGE, ValueError),
    (True, TypeError),
    ("5", TypeError),
    (None, TypeError),
    (object(), TypeError),
]
OPTIONAL_SECONDS: Bad = [(v, e) for v, e in SECONDS if v is not None]
RATE: list[tuple[Any, type[Exception]]] = [
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    (-1, ValueError),
    (-0.5, ValueError),
    (HUGE, ValueError),
    (True, TypeError),
    ("5", TypeError),
]
BURST: Bad = [*RATE, (0, ValueError), (0.5, ValueError)]

MANAGER_SETTINGS: dict[str, list[tuple[Any, type[Exception]]]] = {
    "max_connections": COUNT,
    "max_per_lobby": COUNT,
    "max_per_user": OPTIONAL_COUNT1,
    "max_id_bytes": COUNT1,
    "max_backlog": COUNT1,
    "max_backlog_bytes": COUNT1,
    "rate_limit": RATE,
    "rate_burst": BURST,
    "rate_limit_close_after": COUNT,
    "max_message_bytes": COUNT1,
    "max_bad_messages": COUNT1,
    "close_timeout": SECONDS,
    "shutdown_timeout": SECONDS,
    "ping_interval": OPTIONAL_SECONDS,
    "ping_timeout": OPTIONAL_SECONDS,
}
BACKEND_SETTINGS: dict[str, list[tuple[Any, type[Exception]]]] = {
    "lease": [*SECONDS, (0.0001, ValueError)],
    "connect_timeout": SECONDS,
    "command_timeout": SECONDS,
    "backoff_max": SECONDS,
    "max_backlog": COUNT1,
}


def _table(settings: dict[str, list[tuple[Any, type[Exception]]]]) -> list[Any]:
    return [
        pytest.param(name, value, exc, id=f"{name}={value!r:.20}")
        for name, bad in settings.items()
        for value, exc in bad
    ]


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize(("name", "value", "exc"), _table(MANAGER_SETTINGS))
def test_the_manager_refuses_a_bad_setting_when_built(name: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=f"^{name} "):
        ConnectionManager(**{name: value})


@pytest.mark.parametrize(("name", "value", "exc"), _table(MANAGER_SETTINGS))
def test_the_manager_refuses_a_bad_setting_on_assignment(name: str, value: Any, exc: type[Exception]) -> None:
    m = ConnectionManager(rate_limit=5)
    before = getattr(m, name)
    with pytest.raises(exc, match=f"^{name} "):
        setattr(m, name, value)
    assert _same(getattr(m, name), before)  # unchanged


@pytest.mark.parametrize(("name", "value", "exc"), _table(BACKEND_SETTINGS))
def test_the_redis_backend_refuses_a_bad_setting(name: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=f"^{name} "):
        RedisBackend(**{name: value})
    backend = RedisBackend()
    before = getattr(backend, name)
    with pytest.raises(exc, match=f"^{name} "):
        setattr(backend, name, value)
    assert getattr(backend, name) == before


GOOD: dict[str, tuple[Any, Any]] = {  # value given -> value read back
    "max_connections": (0, 0),
    "max_per_lobby": (7, 7),
    "max_per_user": (None, None),
    "max_id_bytes": (1, 1),
    "max_backlog": (1, 1),
    "max_backlog_bytes": (1 << 30, 1 << 30),
    "rate_limit": (2, 2.0),
    "rate_burst": (1, 1.0),
    "rate_limit_close_after": (0, 0),
    "max_message_bytes": (1, 1),
    "max_bad_messages": (1, 1),
    "close_timeout": (0.001, 0.001),
    "shutdown_timeout": (3, 3.0),
    "ping_interval": (None, None),
    "ping_timeout": (0.5, 0.5),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_settings_are_taken_at_construction_and_on_assignment(name: str) -> None:
    value, read = GOOD[name]
    extra = {"rate_limit": 5} if name == "rate_burst" else {}
    m = ConnectionManager(**{name: value}, **extra)  # type: ignore[arg-type]
    assert getattr(m, name) == read
    m = ConnectionManager(**extra)  # type: ignore[arg-type]
    setattr(m, name, value)
    assert getattr(m, name) == read


def test_assigned_limits_take_effect() -> None:
    m = ConnectionManager()
    m.max_id_bytes = 4
    assert m.max_id_bytes == 4

    async def join(lobby: str) -> bool:
        return await m.connect(FakePeer().ws, lobby, "u")

    with pytest.raises(ValueError, match="the limit is 4 bytes"):
        asyncio.run(join("lobby"))  # 5 bytes: over the new limit
    assert asyncio.run(join("lob")) and len(m) == 1
    m.disconnect(next(iter(m.active_connections["lob"])))
    m.rate_limit = 1
    assert (m.rate_limit, m.rate_burst, m.rate_limit_close_after) == (1.0, 1.0, 100)
    m.rate_burst = 3
    m.rate_limit = 2  # the burst given stays
    assert (m.rate_limit, m.rate_burst) == (2.0, 3.0)
    m.rate_limit = None
    assert m.rate_limit is None and m.rate_burst is None
    m.rate_limit_close_after = 7
    assert m.rate_limit_close_after == 7
    backend = RedisBackend(lease=1)
    backend.lease = 2.5
    assert backend.lease == 2.5 and "2500" in backend._argv


def test_the_lease_from_the_environment_is_checked() -> None:
    for bad in ("nan", "inf", "-1", "0"):
        with pytest.raises(ValueError, match=r"^lease "):
            backend_from_env({"WSMANAGER_REDIS_URL": "redis://127.0.0.1:1/0", "WSMANAGER_LEASE_SECONDS": bad})


# ------------------------------------------------- the reported case, end to end


def _app(m: ConnectionManager) -> FastAPI:
    app = FastAPI()

    async def handler(lobby: str, user: str, data: dict[str, Any]) -> None:
        return None

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await m.serve(websocket, "L", "u", handler)

    return app


FIVE_MIB = '{"type":"chat","t":"' + "x" * (5 << 20) + '"}'


@pytest.mark.parametrize("limit", [64 * 1024, 1 << 20, (5 << 20) - 1])
def test_a_5_mib_message_is_closed_with_1009_under_a_valid_limit(limit: int) -> None:
    m = ConnectionManager(max_message_bytes=limit, ping_interval=None)
    with pytest.raises((TypeError, ValueError), match=r"^max_message_bytes "):
        m.max_message_bytes = NAN  # type: ignore[assignment]
    assert m.max_message_bytes == limit  # the limit stays on
    with TestClient(_app(m)) as client, client.websocket_connect("/ws") as ws:
        ws.send_text(FIVE_MIB)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert (closed.value.code, closed.value.reason) == (1009, "message_too_big")
    assert len(m) == 0


@pytest.mark.parametrize("bad", [NAN, INF, -1, 0, "64k", None])
def test_a_limit_that_would_turn_the_size_check_off_is_refused(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=r"^max_message_bytes "):
        ConnectionManager(max_message_bytes=bad)
