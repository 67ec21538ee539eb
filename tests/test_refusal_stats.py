"""get_stats()["refused"]: every refusal counted once, whatever path decided it.

The paths: the seed's endpoint (``can_accept_connection()`` answers False,
the endpoint closes the socket itself), ``connect()`` (a limit reached
between the check and the reservation), and ``serve()`` (Origin, failed
authentication, invalid id, capacity).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests import seed_app
from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager


def refused(m: ConnectionManager) -> dict[str, object]:
    """The non-zero refusal counters."""
    return {k: v for k, v in m.get_stats()["refused"].items() if v}


@pytest.fixture
def seed_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectionManager]:
    m = ConnectionManager(max_connections=2, max_per_lobby=1)
    monkeypatch.setattr(seed_app, "manager", m)
    yield m
    assert len(m) == 0, "a test left connections behind"


def test_seed_endpoint_refusal_by_can_accept_connection_counts_once(seed_manager: ConnectionManager) -> None:
    m = seed_manager
    with TestClient(seed_app.app) as client, client.websocket_connect("/ws/r?token=user:a"):
        with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws/r?token=user:b"):
            pass
        assert (info.value.code, info.value.reason) == (4002, "lobby_full")
        assert refused(m) == {"lobby_full": 1}
        with (
            TestClient(seed_app.app) as c2,
            c2.websocket_connect("/ws/s?token=user:c"),
            pytest.raises(WebSocketDisconnect) as info,
            c2.websocket_connect("/ws/t?token=user:d"),
        ):
            pass
        assert (info.value.code, info.value.reason) == (4002, "server_full")
        assert refused(m) == {"lobby_full": 1, "server_full": 1}


def test_a_refusal_by_connect_itself_counts_once() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1)
        first, second = FakePeer(accept_yields=3), FakePeer()
        # both pass the seed's check before either reserves: connect() refuses the second
        assert m.can_accept_connection("L") == (True, "")
        assert m.can_accept_connection("L") == (True, "")
        results = await asyncio.gather(m.connect(first.ws, "L", "a"), m.connect(second.ws, "L", "b"))
        assert list(results) == [True, False]
        assert (second.close_code, second.close_reason) == (4002, "lobby_full")
        assert refused(m) == {"lobby_full": 1}
        m.disconnect(first.ws)

    asyncio.run(main())


def test_shutting_down_answer_counts_once() -> None:
    m = ConnectionManager()
    m._set_shutting_down(True)
    assert m.can_accept_connection("L") == (False, "shutting_down")
    assert refused(m) == {"shutting_down": 1}


async def serve_once(m: ConnectionManager, peer: FakePeer, lobby: object, user: str | None) -> None:
    async def handler(lobby: str, user: str, data: object) -> None:
        pass

    task = asyncio.create_task(m.serve(peer.ws, lobby, user, handler))  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    if not task.done():
        peer.leave()
    await asyncio.wait_for(task, 2)


def test_every_serve_refusal_counts_once_by_reason() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1, allowed_origins={"https://app.example"})
        evil = FakePeer(headers=[(b"origin", b"https://evil.example")])
        await serve_once(m, evil, "L", "a")
        assert (evil.close_code, evil.close_reason) == (4008, "forbidden_origin")
        anonymous = FakePeer()
        await serve_once(m, anonymous, "L", None)
        assert (anonymous.close_code, anonymous.close_reason) == (4001, "unauthorized")
        bad_id = FakePeer()
        await serve_once(m, bad_id, "", "a")
        assert (bad_id.close_code, bad_id.close_reason) == (1008, "invalid_id")
        assert refused(m) == {"forbidden_origin": 1, "unauthorized": 1, "invalid_id": 1}

        holder = FakePeer()
        holding = asyncio.create_task(m.serve(holder.ws, "L", "a", lambda *a: asyncio.sleep(0)))
        for _ in range(20):
            await asyncio.sleep(0)
        assert m.get_lobby_users("L") == {"a"}
        full = FakePeer()
        await serve_once(m, full, "L", "b")
        assert (full.close_code, full.close_reason) == (4002, "lobby_full")
        assert refused(m) == {"forbidden_origin": 1, "unauthorized": 1, "invalid_id": 1, "lobby_full": 1}
        holder.leave()
        await asyncio.wait_for(holding, 2)

    asyncio.run(main())


def test_count_refusal_rejects_unknown_reasons() -> None:
    m = ConnectionManager()
    with pytest.raises(ValueError, match="unknown refusal reason"):
        m._count_refusal("bogus")
    assert refused(m) == {}
