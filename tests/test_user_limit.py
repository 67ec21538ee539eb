"""``on_user_limit="replace"``: one session per user.

A new connection of a user at ``max_per_user`` is admitted and the user's
oldest connection closed with 4003 "replaced", atomically with the capacity
reservation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests import seed_app
from tests.asgi_fakes import FakePeer
from tests.servers import http_stats as stats
from tests.servers import uvicorn_server
from wsmanager import CloseCode, Connection, ConnectionManager


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_policy_value_is_validated_at_construction_and_assignment() -> None:
    with pytest.raises(ValueError, match='on_user_limit must be "refuse" or "replace", not \'kick\''):
        ConnectionManager(max_per_user=1, on_user_limit="kick")
    with pytest.raises(ValueError, match="on_user_limit"):
        ConnectionManager(on_user_limit=None)  # type: ignore[arg-type]
    m = ConnectionManager(max_per_user=1)
    assert m.on_user_limit == "refuse"
    with pytest.raises(ValueError, match="on_user_limit"):
        m.on_user_limit = "REPLACE"
    assert m.on_user_limit == "refuse"
    m.on_user_limit = "replace"
    assert m.on_user_limit == "replace"
    assert int(CloseCode.REPLACED) == 4003


def test_a_new_connection_replaces_the_oldest_and_the_old_one_gets_4003() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_user=2, on_user_limit="replace")
        first, second, third = FakePeer(), FakePeer(), FakePeer()
        assert await m.connect(first.ws, "L", "u")
        assert await m.connect(second.ws, "M", "u")
        assert await m.connect(third.ws, "L", "u")
        # removed from the registry at once, closed in the background
        assert first.ws not in m and second.ws in m and third.ws in m
        await settle()
        assert (first.close_code, first.close_reason) == (4003, "replaced")
        assert second.close_code is None and third.close_code is None
        assert m._user_targets("u") == [second.ws, third.ws]
        stats = m.get_stats()
        assert stats["total_connections"] == 2 and stats["pending_connections"] == 0
        assert stats["closed"] == {"replaced": 1}
        assert stats["connects"] == 3 and stats["disconnects"] == 1
        assert not any(stats["refused"].values())
        assert await m.send_to_user("u", {"hi": 1})
        assert second.texts() == [{"hi": 1}] and third.texts() == [{"hi": 1}] and first.texts() == []
        m.disconnect(second.ws)
        m.disconnect(third.ws)

    asyncio.run(main())


def test_refuse_stays_the_default_and_switching_at_run_time_applies_to_the_next_handshake() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_user=1)
        old, refused = FakePeer(), FakePeer()
        assert await m.connect(old.ws, "L", "u")
        assert not await m.connect(refused.ws, "L", "u")
        assert (refused.close_code, refused.close_reason) == (4002, "user_limit")
        m.on_user_limit = "replace"
        new = FakePeer()
        assert await m.connect(new.ws, "L", "u")
        await settle()
        assert (old.close_code, old.close_reason) == (4003, "replaced")
        assert m._user_targets("u") == [new.ws]
        m.disconnect(new.ws)

    asyncio.run(main())


def test_a_full_server_or_lobby_still_refuses_unless_the_replaced_one_frees_the_slot() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=2, max_per_lobby=1, max_per_user=1, on_user_limit="replace")
        mine, other = FakePeer(), FakePeer()
        assert await m.connect(mine.ws, "A", "u")
        assert await m.connect(other.ws, "B", "v")
        # server full, but replacing u's own connection frees the slot it needs
        again = FakePeer()
        assert await m.connect(again.ws, "A", "u")
        await settle()
        assert (mine.close_code, mine.close_reason) == (4003, "replaced")
        # lobby B is full with v's connection: replacing u's (in A) would not help
        blocked = FakePeer()
        assert not await m.connect(blocked.ws, "B", "u")
        assert (blocked.close_code, blocked.close_reason) == (4002, "server_full")
        assert again.ws in m and again.close_code is None
        assert m.get_stats()["closed"] == {"replaced": 1}
        m.disconnect(again.ws)
        m.disconnect(other.ws)

    asyncio.run(main())


def test_lowering_the_limit_at_run_time_replaces_as_many_as_needed() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_user=3, on_user_limit="replace")
        peers = [FakePeer() for _ in range(3)]
        for p in peers:
            assert await m.connect(p.ws, "L", "u")
        m.max_per_user = 1
        new = FakePeer()
        assert await m.connect(new.ws, "L", "u")
        await settle()
        assert [p.close_code for p in peers] == [4003, 4003, 4003]
        assert m._user_targets("u") == [new.ws] and len(m) == 1
        assert m.get_stats()["closed"] == {"replaced": 3}
        m.disconnect(new.ws)

    asyncio.run(main())


def test_a_handshake_in_progress_is_replaced_too_and_its_connect_returns_false() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_user=1, on_user_limit="replace")
        slow, fast = FakePeer(accept_yields=5), FakePeer()
        slow_connect = asyncio.create_task(m.connect(slow.ws, "L", "u"))
        await asyncio.sleep(0)  # slow reserved, inside accept()
        assert m.get_stats()["pending_connections"] == 1
        assert await m.connect(fast.ws, "L", "u")
        assert await slow_connect is False
        assert slow.accepted and (slow.close_code, slow.close_reason) == (4003, "replaced")
        stats = m.get_stats()
        assert len(m) == 1 and stats["pending_connections"] == 0
        assert stats["closed"] == {"replaced": 1} and stats["connects"] == 1
        m.disconnect(fast.ws)

    asyncio.run(main())


def test_storm_of_50_handshakes_of_one_user_ends_with_exactly_one() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=100, max_per_lobby=100, max_per_user=1, on_user_limit="replace")
        peers = [FakePeer(accept_yields=i % 7) for i in range(50)]
        results = await asyncio.gather(*(m.connect(p.ws, "L", "u") for p in peers))
        await settle()
        open_ = [p for p in peers if p.close_code is None]
        assert len(open_) == 1 and results.count(True) >= 1
        assert m._user_targets("u") == [open_[0].ws]
        assert all((p.close_code, p.close_reason) == (4003, "replaced") for p in peers if p is not open_[0])
        stats = m.get_stats()
        assert stats["total_connections"] == 1 and stats["pending_connections"] == 0
        assert stats["connected_users"] == 1
        assert stats["closed"] == {"replaced": 49}
        assert stats["connects"] - stats["disconnects"] == 1
        assert not any(stats["refused"].values())
        m.disconnect(open_[0].ws)
        assert len(m) == 0 and m.get_stats()["pending_connections"] == 0

    asyncio.run(main())


def test_serve_runs_on_disconnect_once_for_the_replaced_connection() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_user=1, on_user_limit="replace")
        left: list[Any] = []

        async def gone(conn: Connection) -> None:
            left.append(conn.websocket)

        async def handler(lobby: str, user: str, data: Any) -> None:
            pass

        old, new = FakePeer(), FakePeer()
        old_task = asyncio.create_task(m.serve(old.ws, "L", "u", handler, on_disconnect=gone))
        await settle()
        new_task = asyncio.create_task(m.serve(new.ws, "L", "u", handler, on_disconnect=gone))
        await settle()
        assert old_task.done() and old_task.exception() is None  # its next receive saw the close
        assert (old.close_code, old.close_reason) == (4003, "replaced")
        assert left == [old.ws]
        assert m._user_targets("u") == [new.ws]
        new.leave()
        await asyncio.wait_for(new_task, 2)
        assert left == [old.ws, new.ws] and len(m) == 0
        assert m.get_stats()["closed"] == {"replaced": 1}

    asyncio.run(main())


@pytest.fixture
def seed_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectionManager]:
    m = ConnectionManager(max_per_user=1, on_user_limit="replace")
    monkeypatch.setattr(seed_app, "manager", m)
    yield m
    assert len(m) == 0, "a test left connections behind"


def test_seed_endpoint_under_testclient_old_tab_gets_4003_new_one_works(
    seed_manager: ConnectionManager,
) -> None:
    m = seed_manager
    with (
        TestClient(seed_app.app) as client,
        client.websocket_connect("/ws/r?token=user:alice") as old,
        client.websocket_connect("/ws/r?token=user:alice") as new,
    ):
        with pytest.raises(WebSocketDisconnect) as info:
            old.receive_json()
        assert (info.value.code, info.value.reason) == (4003, "replaced")
        new.send_json({"type": "chat", "text": "still here"})
        assert new.receive_json() == {"type": "chat", "from": "alice", "text": "still here"}
        stats = m.get_stats()
        assert stats["total_connections"] == 1 and stats["closed"] == {"replaced": 1}
        assert not any(stats["refused"].values())
    assert m.get_stats()["disconnects"] == 2


# ---- a real uvicorn server, real clients --------------------------------------


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    env = {"WSM_MAX_PER_USER": "1", "WSM_ON_USER_LIMIT": "replace"}
    with uvicorn_server("tests.serve_app:app", env=env) as (p, _proc):
        yield p


async def wait_stats(port: int, check: Any, what: str) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for _ in range(500):
        s = await stats(port)
        if check(s):
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}: {s}")


@pytest.mark.slow
def test_uvicorn_old_client_receives_4003_and_the_new_one_works(port: int) -> None:
    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/ws/lobby?token=carol"
        before = (await stats(port))["closed"].get("replaced", 0)
        async with connect(url) as old:
            await old.send(json.dumps({"type": "whoami"}))
            assert json.loads(await old.recv())["user"] == "carol"
            async with connect(url) as new:
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(old.recv(), 10)
                assert info.value.rcvd is not None
                assert (info.value.rcvd.code, info.value.rcvd.reason) == (4003, "replaced")
                await new.send(json.dumps({"type": "whoami"}))
                assert json.loads(await new.recv()) == {"type": "you", "user": "carol", "lobby": "lobby"}
                s = await stats(port)
                assert s["total_connections"] == 1 and s["closed"]["replaced"] == before + 1
        await wait_stats(port, lambda s: s["total_connections"] == 0, "all gone")

    asyncio.run(main())


@pytest.mark.slow
def test_uvicorn_storm_of_50_handshakes_of_one_user_ends_with_exactly_one(port: int) -> None:
    async def one(url: str) -> tuple[str, Any]:
        ws = await connect(url)
        try:
            await ws.send(json.dumps({"type": "whoami"}))
            while True:
                if json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") == "you":
                    break
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return "closed", (exc.rcvd.code, exc.rcvd.reason)
        return "open", ws

    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/ws/storm?token=dave"
        before = await stats(port)
        results = await asyncio.gather(*(one(url) for _ in range(50)))
        # a client that got its answer may be replaced by a later handshake afterwards
        opened = [ws for kind, ws in results if kind == "open"]
        closes = [info for kind, info in results if kind == "closed"]
        assert all(info == (4003, "replaced") for info in closes)
        survivors = []
        for ws in opened:
            try:
                await ws.send(json.dumps({"type": "whoami"}))
                await asyncio.wait_for(ws.recv(), 10)
                survivors.append(ws)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and (exc.rcvd.code, exc.rcvd.reason) == (4003, "replaced")
        assert len(survivors) == 1
        s = await wait_stats(
            port,
            lambda s: s["closed"].get("replaced", 0) - before["closed"].get("replaced", 0) == 49,
            "49 replaced",
        )
        assert s["total_connections"] == 1 and s["pending_connections"] == 0 and s["connected_users"] == 1
        assert s["refused"] == before["refused"]
        await survivors[0].close()
        await wait_stats(port, lambda s: s["total_connections"] == 0, "all gone")

    asyncio.run(main())
