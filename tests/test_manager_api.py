"""Every public method of ConnectionManager, with the seed's return values."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

import wsmanager
from tests.asgi_fakes import FakePeer
from wsmanager import CloseCode, ConnectionManager, close_code_for

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def joined(m: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user) is True
    return peer


def test_module_level_manager_has_the_seed_defaults() -> None:
    m = wsmanager.manager
    assert isinstance(m, ConnectionManager)
    assert m.max_connections == 500
    assert m.max_per_lobby == 10
    assert m.max_per_user is None
    stats = m.get_stats()
    for key in ("total_connections", "max_connections", "capacity_percent", "active_lobbies"):
        assert key in stats


def test_constructor_signature_and_validation() -> None:
    m = ConnectionManager(3, 2, max_per_user=1)
    assert (m.max_connections, m.max_per_lobby, m.max_per_user) == (3, 2, 1)
    m = ConnectionManager(max_connections=7, max_per_lobby=4)
    assert (m.max_connections, m.max_per_lobby) == (7, 4)
    with pytest.raises(ValueError):
        ConnectionManager(-1)
    with pytest.raises(ValueError):
        ConnectionManager(max_per_user=0)
    with pytest.raises(TypeError):
        ConnectionManager(10, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ConnectionManager(clock=42)  # type: ignore[arg-type]


def test_limits_can_be_changed_at_runtime() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=1, max_per_lobby=5)
        await joined(m, "a", "u1")
        assert m.can_accept_connection("a") == (False, "server_full")
        m.max_connections = 2
        assert m.can_accept_connection("a") == (True, "")
        with pytest.raises(ValueError):
            m.max_per_lobby = -3

    run(main())


def test_can_accept_connection_reasons() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=3, max_per_lobby=2)
        assert m.can_accept_connection("a") == (True, "")
        await joined(m, "a", "u1")
        await joined(m, "a", "u2")
        assert m.can_accept_connection("a") == (False, "lobby_full")
        assert m.can_accept_connection("b") == (True, "")
        await joined(m, "b", "u3")
        assert m.can_accept_connection("c") == (False, "server_full")
        with pytest.raises(TypeError):
            m.can_accept_connection(123)  # type: ignore[arg-type]

    run(main())


def test_connect_disconnect_and_lookups() -> None:
    async def main() -> None:
        m = ConnectionManager()
        p1 = await joined(m, "lobby", "alice")
        p2 = await joined(m, "lobby", "bob")
        assert p1.accepted and p2.accepted
        assert len(m) == 2 and p1.ws in m
        assert m.is_user_connected("alice") and not m.is_user_connected("carol")
        assert m.get_lobby_users("lobby") == {"alice", "bob"}
        assert m.get_lobby_users("nowhere") == set()
        assert m.disconnect(p1.ws) == ("lobby", "alice")
        assert m.disconnect(p1.ws) is None
        assert not m.is_user_connected("alice")
        assert m.get_lobby_users("lobby") == {"bob"}
        assert m.disconnect(FakePeer().ws) is None

    run(main())


def test_get_stats_values() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=3, max_per_lobby=10)
        await joined(m, "a", "u1")
        await joined(m, "b", "u2")
        stats = m.get_stats()
        assert stats["total_connections"] == 2
        assert stats["max_connections"] == 3
        assert stats["capacity_percent"] == round(2 / 3 * 100, 1) == 66.7
        assert stats["active_lobbies"] == 2
        await joined(m, "c", "u3")
        assert m.can_accept_connection("d") == (False, "server_full")
        stats = m.get_stats()
        assert stats["capacity_percent"] == 100.0

    run(main())


def test_read_only_views_match_the_seed_shapes() -> None:
    async def main() -> None:
        m = ConnectionManager()
        p1 = await joined(m, "a", "alice")
        p2 = await joined(m, "a", "bob")
        p3 = await joined(m, "b", "alice")
        assert m.active_connections == {"a": {p1.ws, p2.ws}, "b": {p3.ws}}
        assert m.connection_info[p2.ws] == ("a", "bob")
        assert len(m.connection_info) == 3
        assert m.user_connections["alice"] is p3.ws  # the newest one
        assert m.user_connections["bob"] is p2.ws
        with pytest.raises(TypeError):
            m.connection_info[p1.ws] = ("x", "y")  # type: ignore[index]

    run(main())


def test_broadcast_to_lobby_counts_and_excludes() -> None:
    async def main() -> None:
        m = ConnectionManager()
        alice = await joined(m, "a", "alice")
        bob = await joined(m, "a", "bob")
        other = await joined(m, "b", "carol")
        assert await m.broadcast_to_lobby("a", {"type": "chat", "text": "hi"}) == 2
        assert alice.texts() == [{"type": "chat", "text": "hi"}]
        assert bob.texts() == [{"type": "chat", "text": "hi"}]
        assert other.texts() == []
        assert await m.broadcast_to_lobby("a", {"n": 1}, exclude_user_id="alice") == 1
        assert bob.texts()[-1] == {"n": 1} and len(alice.texts()) == 1
        assert await m.broadcast_to_lobby("empty", {"n": 1}) == 0

    run(main())


def test_send_to_user() -> None:
    async def main() -> None:
        m = ConnectionManager()
        alice = await joined(m, "a", "alice")
        assert await m.send_to_user("alice", {"type": "dm"}) is True
        assert alice.texts() == [{"type": "dm"}]
        assert await m.send_to_user("nobody", {"type": "dm"}) is False

    run(main())


def test_sends_use_compact_json_and_reject_bad_messages() -> None:
    async def main() -> None:
        m = ConnectionManager()
        alice = await joined(m, "a", "alice")
        await m.send_to_user("alice", {"text": "héllo 🎲", "n": [1, 2.5, None, True]})
        assert alice.frames[-1]["text"] == '{"text":"héllo 🎲","n":[1,2.5,null,true]}'
        with pytest.raises(ValueError):
            await m.broadcast_to_lobby("a", {"x": float("nan")})
        with pytest.raises(TypeError):
            await m.send_to_user("alice", {"x": {1, 2}})
        assert m.is_user_connected("alice")  # a bad message is the caller's error, not the client's

    run(main())


def test_ping_user_and_record_pong() -> None:
    async def main() -> None:
        m = ConnectionManager()
        alice = await joined(m, "a", "alice")

        async def answer() -> None:
            await alice.got_text.wait()
            m.record_pong("alice")

        answering = asyncio.create_task(answer())
        ok, latency = await m.ping_user("alice", timeout=2.0)
        await answering
        assert ok is True and latency is not None and 0 <= latency < 2000
        ping = alice.texts()[0]
        assert ping["type"] == "health_ping" and isinstance(ping["timestamp"], float)
        assert m.get_stats()["latency_ms"]["samples"] == 1
        assert await m.ping_user("alice", timeout=0.01) == (False, None)
        assert await m.ping_user("nobody") == (False, None)
        m.record_pong("nobody")  # unknown users are ignored
        m.update_last_message("alice")
        m.update_last_message("nobody")

    run(main())


def test_dumps_is_exported() -> None:
    assert wsmanager.dumps({"a": [1, "x"]}) == '{"a":[1,"x"]}'
    assert json.loads(wsmanager.dumps({"k": 1.5})) == {"k": 1.5}


def test_close_code_table() -> None:
    assert close_code_for("lobby_full") == 4002
    assert int(CloseCode.CAPACITY) == 4002
    assert close_code_for("server_full") == 4002
    assert close_code_for("unauthorized") == 4001
    assert close_code_for("shutting_down") == 1013
    assert close_code_for("something else") == 1008


def test_an_empty_manager_is_truthy() -> None:
    """``manager or default`` keeps the manager: it is a service, not a container."""
    m = ConnectionManager()
    assert len(m) == 0 and bool(m) is True
    default = ConnectionManager()
    assert (m or default) is m

    async def main() -> None:
        await joined(m, "lobby", "alice")
        assert len(m) == 1 and bool(m)

    run(main())
