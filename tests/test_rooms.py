"""Rooms (issue 11): one connection in several lobbies, join / leave / lobbies_of."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def connected(m: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user) is True
    return peer


def chat(peer: FakePeer) -> list[Any]:
    return [t for t in peer.texts() if t.get("type") == "chat"]


def test_one_connection_in_three_lobbies_gets_each_broadcast_once() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        a = await connected(m, "A", "alice")
        assert await m.join(a.ws, "B") is True
        assert await m.join(a.ws, "C") is True
        assert m.lobbies_of(a.ws) == {"A", "B", "C"}
        for lobby in ("A", "B", "C"):
            assert await m.broadcast_to_lobby(lobby, {"type": "chat", "in": lobby}) == 1
        assert chat(a) == [{"type": "chat", "in": lobby} for lobby in ("A", "B", "C")]
        await m.broadcast_to_lobby("D", {"type": "chat", "in": "D"})
        assert len(chat(a)) == 3

    run(main())


def test_a_broadcast_reaches_a_member_that_joined_second_and_exclude_user_skips_it() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        bob = await connected(m, "B", "bob")
        alice = await connected(m, "A", "alice")
        assert await m.join(alice.ws, "B") is True
        assert await m.broadcast_to_lobby("B", {"type": "chat", "n": 1}) == 2
        assert chat(alice) == [{"type": "chat", "n": 1}] and chat(bob) == [{"type": "chat", "n": 1}]
        assert await m.broadcast_to_lobby("B", {"type": "chat", "n": 2}, exclude_user_id="alice") == 1
        assert len(chat(alice)) == 1 and len(chat(bob)) == 2
        assert m.get_lobby_users("B") == {"alice", "bob"}
        assert m.get_lobby_users("A") == {"alice"}
        assert set(m.active_connections["B"]) == {alice.ws, bob.ws}

    run(main())


def test_joining_twice_changes_nothing_and_leaving_stops_the_broadcasts() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        a = await connected(m, "A", "alice")
        assert await m.join(a.ws, "B") is True
        assert await m.join(a.ws, "B") is True
        assert await m.join(a.ws, "A") is True
        assert m.get_stats()["active_lobbies"] == 2
        assert await m.broadcast_to_lobby("B", {"type": "chat"}) == 1
        assert m.leave(a.ws, "B") is True
        assert m.leave(a.ws, "B") is False
        assert m.leave(a.ws, "nowhere") is False
        assert m.lobbies_of(a.ws) == {"A"}
        assert await m.broadcast_to_lobby("B", {"type": "chat"}) == 0
        assert m.get_lobby_users("B") == set()
        assert m.get_stats()["active_lobbies"] == 1

    run(main())


def test_a_full_lobby_refuses_a_join_and_counts_it(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        m = ConnectionManager(100, 2)
        await connected(m, "B", "bob")
        await connected(m, "B", "carol")
        a = await connected(m, "A", "alice")
        with caplog.at_level(logging.INFO, logger="wsmanager.manager"):
            assert await m.join(a.ws, "B") is False
        assert any(getattr(r, "reason", None) == "lobby_full" for r in caplog.records)
        assert m.get_stats()["refused"]["lobby_full"] == 1
        assert m.lobbies_of(a.ws) == {"A"}
        assert m.get_lobby_users("B") == {"bob", "carol"}
        # memberships count against max_per_lobby: a connect() is refused too
        assert await m.join(a.ws, "C") is True
        await connected(m, "C", "dave")
        assert m.can_accept_connection("C") == (False, "lobby_full")
        assert await m.connect(FakePeer().ws, "C", "erin") is False

    run(main())


def test_concurrent_joins_never_overshoot_max_per_lobby() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 5)
        peers = [await connected(m, f"home{i}", f"u{i}") for i in range(20)]
        results = await asyncio.gather(*(m.join(p.ws, "hot") for p in peers))
        assert results.count(True) == 5
        assert len(m.get_lobby_users("hot")) == 5
        assert m.get_stats()["refused"]["lobby_full"] == 15

    run(main())


def test_join_of_an_unknown_connection_is_refused_not_connected(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        stranger = FakePeer()
        with caplog.at_level(logging.INFO, logger="wsmanager.manager"):
            assert await m.join(stranger.ws, "A") is False
        assert any(getattr(r, "reason", None) == "not_connected" for r in caplog.records)
        assert m.lobbies_of(stranger.ws) == set()
        assert m.leave(stranger.ws, "A") is False
        a = await connected(m, "A", "alice")
        m.disconnect(a.ws)
        assert await m.join(a.ws, "B") is False
        assert m.get_stats()["active_lobbies"] == 0

    run(main())


def test_join_validates_the_lobby_code_like_connect() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, max_id_bytes=8)
        a = await connected(m, "A", "alice")
        with pytest.raises(TypeError):
            await m.join(a.ws, 5)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await m.join(a.ws, "")
        with pytest.raises(ValueError):
            await m.join(a.ws, "x" * 9)
        with pytest.raises(ValueError):
            await m.join(a.ws, "\ud800")
        assert m.lobbies_of(a.ws) == {"A"}

    run(main())


def test_disconnect_leaves_every_lobby_and_returns_the_first() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        a = await connected(m, "A", "alice")
        bob = await connected(m, "B", "bob")
        await m.join(a.ws, "B")
        await m.join(a.ws, "C")
        assert m.disconnect(a.ws) == ("A", "alice")
        assert m.lobbies_of(a.ws) == set()
        assert m.get_lobby_users("B") == {"bob"}
        assert m.get_lobby_users("C") == set()
        stats = m.get_stats()
        assert stats["total_connections"] == 1 and stats["active_lobbies"] == 1
        m.disconnect(bob.ws)
        stats = m.get_stats()
        assert (stats["total_connections"], stats["active_lobbies"], stats["connected_users"]) == (0, 0, 0)

    run(main())


def test_leaving_the_first_lobby_keeps_the_connection_registered() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 1)
        a = await connected(m, "A", "alice")
        await m.join(a.ws, "B")
        assert m.leave(a.ws, "A") is True
        assert m.lobbies_of(a.ws) == {"B"}
        assert m.get_lobby_users("A") == set()
        # its place in A is free (max_per_lobby 1)
        other = await connected(m, "A", "bob")
        assert m.is_user_connected("alice")
        assert await m.send_to_user("alice", {"type": "chat", "dm": True})
        assert chat(a) == [{"type": "chat", "dm": True}]
        assert m.connection_info[a.ws] == ("A", "alice")
        assert len(m) == 2 and m.get_stats()["total_connections"] == 2
        m.leave(a.ws, "B")
        assert m.lobbies_of(a.ws) == set() and a.ws in m
        assert m.disconnect(a.ws) == ("A", "alice")
        assert m.disconnect(other.ws) == ("A", "bob")
        assert m.get_stats()["active_lobbies"] == 0

    run(main())


def test_stats_count_memberships_per_lobby_and_connections_once() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        a = await connected(m, "A", "alice")
        b = await connected(m, "A", "alice")  # a second tab
        for lobby in ("B", "C"):
            await m.join(a.ws, lobby)
            await m.join(b.ws, lobby)
        stats = m.get_stats()
        assert stats["total_connections"] == 2
        assert stats["connected_users"] == 1
        assert stats["active_lobbies"] == 3
        assert m._lobby_count("B") == 2
        assert len(m.connection_info) == 2
        await m.broadcast_to_lobby("C", {"type": "chat"})
        assert len(chat(a)) == 1 and len(chat(b)) == 1

    run(main())


def test_a_failed_send_removes_the_connection_from_every_lobby() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        a = await connected(m, "A", "alice")
        bob = await connected(m, "B", "bob")
        await m.join(a.ws, "B")
        a.fail_sends = True
        assert await m.broadcast_to_lobby("B", {"type": "chat"}) == 1
        assert a.ws not in m
        assert m.get_lobby_users("B") == {"bob"} and m.get_lobby_users("A") == set()
        assert chat(bob) == [{"type": "chat"}]

    run(main())
