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
from wsmanager.settings import MAX_COUNT, MAX_SECONDS

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
    (2**63, ValueError),  # beyond the core's Py_ssize_t
    (HUGE, ValueError),
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
    (1e308, ValueError),  # finite, but its milliseconds / nanoseconds overflow a C integer
    (MAX_SECONDS * 1.001, ValueError),
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
    "max_connections": (MAX_COUNT, MAX_COUNT),
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
    "shutdown_timeout": (MAX_SECONDS, MAX_SECONDS),
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


# ------------------------------------------- values past what C can hold (issue 9)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_connections", 10**400),
        ("max_per_lobby", 2**63),
        ("max_per_user", 2**70),
        ("max_id_bytes", 2**64),
        ("rate_limit_close_after", 10**30),
    ],
    ids=["max_connections", "max_per_lobby", "max_per_user", "max_id_bytes", "rate_limit_close_after"],
)
def test_a_count_beyond_the_c_range_raises_value_error_naming_the_setting(name: str, value: int) -> None:
    # README: "an out-of-range value ... raises ValueError / TypeError whose
    # message starts with the setting's name, and the old value stays".
    # Was: OverflowError "Python int too large to convert to C ssize_t".
    with pytest.raises(ValueError, match=f"^{name}"):
        kwargs: dict[str, Any] = {name: value}
        ConnectionManager(**kwargs)
    m = ConnectionManager()
    old = getattr(m, name)
    with pytest.raises(ValueError, match=f"^{name}"):
        setattr(m, name, value)
    assert getattr(m, name) == old


def test_a_redis_lease_whose_milliseconds_overflow_raises_value_error_naming_lease() -> None:
    # 1e308 s is finite; int(lease * 1000) raised OverflowError
    # "cannot convert float infinity to integer".
    with pytest.raises(ValueError, match=r"^lease"):
        RedisBackend(lease=1e308)
    backend = RedisBackend(lease=MAX_SECONDS)  # the bound itself is taken
    assert backend.lease == MAX_SECONDS and str(int(MAX_SECONDS * 1000)) in backend._argv


# ------------------------------------------------ settings as class attributes


def test_a_subclass_attribute_does_not_switch_off_the_setting_checks() -> None:
    # A subclass that sets a default as a class attribute (the usual Python
    # way to configure a class) shadowed the Setting descriptor: assignments
    # on its instances were stored unchecked, and NaN turned the size limit
    # off again (the max_message_bytes=nan case). NaN for a count is
    # a TypeError, as on the base class (COUNT above).
    class MyManager(ConnectionManager):
        max_message_bytes = 1024

    m = MyManager(ping_interval=None)
    assert m.max_message_bytes == 1024
    with pytest.raises(TypeError, match=r"^max_message_bytes"):
        m.max_message_bytes = float("nan")  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"^max_message_bytes"):
        m.max_message_bytes = 0
    assert m.max_message_bytes == 1024


def test_a_subclass_lobby_size_is_the_one_the_core_enforces() -> None:
    # Was: a subclass's max_per_lobby = 50 read 50 while the core refused the
    # 11th member (the C default of 10).
    class BigLobbies(ConnectionManager):
        max_per_lobby = 50
        close_timeout = 1
        ping_interval = None

    class Bigger(BigLobbies):
        max_connections = 60

    async def main() -> None:
        m = Bigger()
        assert (m.max_per_lobby, m.max_connections, m.close_timeout, m.ping_interval) == (50, 60, 1.0, None)
        peers = [FakePeer() for _ in range(51)]
        joined = [await m.connect(p.ws, "L", f"u{i}") for i, p in enumerate(peers)]
        assert joined == [True] * 50 + [False]
        assert len(m.get_lobby_users("L")) == 50
        for p in peers[:50]:
            m.disconnect(p.ws)

    asyncio.run(main())
    # a keyword argument still wins, positional or not, even the base default
    assert Bigger(500, 10).max_per_lobby == 10
    assert Bigger(max_per_lobby=7).max_per_lobby == 7
    assert ConnectionManager().max_per_lobby == 10  # the base class is untouched


@pytest.mark.parametrize(
    ("name", "value", "exc"),
    [("max_per_lobby", 2.5, TypeError), ("close_timeout", NAN, ValueError), ("rate_limit", -1, ValueError)],
)
def test_a_bad_class_attribute_is_refused_when_the_class_is_created(
    name: str, value: Any, exc: type[Exception]
) -> None:
    with pytest.raises(exc, match=f"^{name} .*class attribute of Bad"):
        type("Bad", (ConnectionManager,), {name: value})


def test_a_redis_backend_subclass_attribute_is_checked_and_applied() -> None:
    class Short(RedisBackend):
        lease = 2
        max_backlog = 5

    backend = Short()
    assert (backend.lease, backend.max_backlog) == (2.0, 5) and "2000" in backend._argv
    with pytest.raises(TypeError, match=r"^max_backlog"):
        backend.max_backlog = NAN  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"^lease .*class attribute of Bad"):
        type("Bad", (RedisBackend,), {"lease": 1e308})


# --------------------------------------- method arguments: the same checks


TIMEOUTS: list[tuple[Any, type[Exception]]] = [
    (NAN, ValueError),
    (INF, ValueError),
    (-5, ValueError),
    (0, ValueError),
    (1e308, ValueError),
    (True, TypeError),
    ("1", TypeError),
]


@pytest.mark.parametrize(("value", "exc"), TIMEOUTS)
def test_shutdown_refuses_a_bad_timeout(value: Any, exc: type[Exception]) -> None:
    # shutdown(timeout=nan) was taken silently and behaved as timeout=0
    # (every client got only ~10 ms for its close).
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        assert await m.connect(peer.ws, "L", "u")
        with pytest.raises(exc, match=r"^timeout "):
            await m.shutdown(timeout=value)
        assert peer.ws in m  # nothing was shut down
        m.disconnect(peer.ws)

    asyncio.run(main())


@pytest.mark.parametrize(("value", "exc"), TIMEOUTS)
def test_ping_user_refuses_a_bad_timeout(value: Any, exc: type[Exception]) -> None:
    # ping_user(u, timeout=nan) never returned (asyncio never fires a NaN timer).
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        assert await m.connect(peer.ws, "L", "u")
        with pytest.raises(exc, match=r"^timeout "):
            # the outer wait_for only keeps the test from hanging
            await asyncio.wait_for(m.ping_user("u", timeout=value), 5)
        assert peer.texts() == []  # refused before any ping was sent
        m.disconnect(peer.ws)

    asyncio.run(main())


@pytest.mark.parametrize(("value", "exc"), TIMEOUTS)
def test_redis_wait_up_refuses_a_bad_timeout(value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"^timeout "):
        asyncio.run(RedisBackend().wait_up(value))
