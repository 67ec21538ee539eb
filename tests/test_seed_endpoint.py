"""The seed's endpoint, unchanged, on the drop-in manager under TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import wsmanager
from tests import seed_app
from wsmanager import ConnectionManager


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectionManager]:
    m = ConnectionManager(max_connections=5, max_per_lobby=2)
    monkeypatch.setattr(seed_app, "manager", m)
    yield m
    assert len(m) == 0, "a test left connections behind"


def test_chat_between_two_clients(manager: ConnectionManager) -> None:
    with (
        TestClient(seed_app.app) as client,
        client.websocket_connect("/ws/room1?token=user:alice") as alice,
        client.websocket_connect("/ws/room1?token=user:bob") as bob,
    ):
        assert manager.get_lobby_users("room1") == {"alice", "bob"}
        alice.send_json({"type": "chat", "text": "hello"})
        assert bob.receive_json() == {"type": "chat", "from": "alice", "text": "hello"}
        assert alice.receive_json() == {"type": "chat", "from": "alice", "text": "hello"}
        bob.send_json({"type": "dm", "to": "alice", "text": "psst"})
        assert alice.receive_json() == {"type": "dm", "from": "bob", "text": "psst"}
        stats = manager.get_stats()
        assert stats["total_connections"] == 2 and stats["active_lobbies"] == 1
    assert not manager.is_user_connected("alice")


def test_unauthorized_gets_4001(manager: ConnectionManager) -> None:
    with (
        TestClient(seed_app.app) as client,
        pytest.raises(WebSocketDisconnect) as info,
        client.websocket_connect("/ws/room1?token=nobody"),
    ):
        pass
    assert info.value.code == 4001 and info.value.reason == "unauthorized"
    assert len(manager) == 0


def test_full_lobby_gets_4002_lobby_full(manager: ConnectionManager) -> None:
    with (
        TestClient(seed_app.app) as client,
        client.websocket_connect("/ws/r?token=user:a"),
        client.websocket_connect("/ws/r?token=user:b"),
    ):
        with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws/r?token=user:c"):
            pass
        assert (info.value.code, info.value.reason) == (4002, "lobby_full")
        assert manager.get_lobby_users("r") == {"a", "b"}
        assert manager.get_stats()["total_connections"] == 2


def test_health_pong_is_recorded(manager: ConnectionManager) -> None:
    with TestClient(seed_app.app) as client, client.websocket_connect("/ws/r?token=user:a") as ws:
        ws.send_json({"type": "health_pong", "timestamp": 1.0})
        ws.send_json({"type": "chat", "text": "after pong"})
        assert ws.receive_json()["text"] == "after pong"
        assert manager.get_stats()["pongs_received"] == 1


def test_second_tab_of_a_user_keeps_presence(manager: ConnectionManager) -> None:
    with TestClient(seed_app.app) as client, client.websocket_connect("/ws/r?token=user:a"):
        with client.websocket_connect("/ws/other?token=user:a"):
            assert len(manager) == 2
        assert manager.is_user_connected("a")


def test_module_level_manager_is_what_the_seed_imports() -> None:
    # The seed's endpoint module imported the module-level manager by name.
    assert seed_app.manager is wsmanager.manager
