"""Rooms (issue 11): one connection in several lobbies, join / leave / lobbies_of."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from starlette.types import Message

from tests.asgi_fakes import FakePeer
from tests.redis_server import redis_server
from wsmanager import ConnectionManager
from wsmanager.backends.redis import RedisBackend

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


async def shutdown_began(m: ConnectionManager) -> None:
    """Let a shutdown() task just created run up to its first wait."""
    for _ in range(10):
        if m.shutting_down:
            return
        await asyncio.sleep(0)
    raise AssertionError("shutdown() did not begin")


def test_join_during_shutdown_is_refused_shutting_down_like_connect(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, ping_interval=None)
        a = await connected(m, "A", "alice")
        slow = await connected(m, "S", "slow")
        slow.send_gate = asyncio.Event()  # its sends suspend until set: shutdown() waits for its backlog
        assert await m.send_to_user("slow", {"type": "chat"}) is True
        shutdown = asyncio.create_task(m.shutdown(timeout=5.0))
        await shutdown_began(m)
        assert a.ws in m  # shutdown() under way, nothing closed yet
        with caplog.at_level(logging.INFO, logger="wsmanager.manager"):
            assert await m.join(a.ws, "B") is False
            assert await m.connect(FakePeer().ws, "B", "bob") is False
        reasons = [getattr(r, "reason", None) for r in caplog.records]
        assert reasons.count("shutting_down") == 2
        assert m.get_stats()["refused"]["shutting_down"] == 2
        assert m.lobbies_of(a.ws) <= {"A"} and m.get_lobby_users("B") == set()
        with pytest.raises(TypeError):  # a bad id is still an error, not a refusal
            await m.join(a.ws, 42)  # type: ignore[arg-type]
        slow.send_gate.set()
        await shutdown
        assert (a.close_code, a.close_reason) == (1001, "server_shutdown")
        assert m.get_stats()["active_lobbies"] == 0

    run(main())


class JoinGatedBackend(RedisBackend):
    """A Redis backend whose cluster-wide join admits once ``gate`` is set
    (a slow Redis round trip) and which records the memberships it is told ended."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.left: list[str] = []

    async def join(self, websocket: Any, lobby: str) -> str:
        self.waiting.set()
        await self.gate.wait()
        return ""

    def leave(self, websocket: Any, lobby: str) -> None:
        self.left.append(lobby)


@pytest.mark.slow
def test_a_clustered_join_that_shutdown_overtakes_is_refused_and_undone() -> None:
    async def main(url: str) -> None:
        backend = JoinGatedBackend(url, namespace="rooms-shutdown", lease=1.0, connect_timeout=5.0)
        m = ConnectionManager(max_per_lobby=100, backend=backend, ping_interval=None)
        await m.start()
        try:
            a = await connected(m, "A", "alice")
            join = asyncio.create_task(m.join(a.ws, "B"))
            await backend.waiting.wait()  # the backend holds the join
            shutdown = asyncio.create_task(m.shutdown(timeout=5.0))
            await shutdown_began(m)
            backend.gate.set()  # the cluster admits it after shutdown began
            assert await join is False
            assert "B" not in m.lobbies_of(a.ws) and m.get_lobby_users("B") == set()
            assert backend.left == ["B"]  # the cluster-wide membership is given back
            assert m.get_stats()["refused"]["shutting_down"] == 1
            await shutdown
        finally:
            await m.stop()

    with redis_server() as server:
        run(main(server.url))


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


class LoggedPeer(FakePeer):
    """A FakePeer that writes its name to a shared log on every text frame."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.send":
            self.log.append(self.name)
        await super()._send(message)


def test_a_lobby_broadcast_goes_out_in_the_order_members_entered_after_leaves() -> None:
    """Members whose first lobby it is first (by connect), then those that
    joined it (by join), whichever left in between: the head, the tail or
    the middle of the joined list."""

    async def main() -> None:
        m = ConnectionManager(100, 10)
        log: list[str] = []
        first = LoggedPeer("first", log)
        assert await m.connect(first.ws, "L", "first") is True
        peers = [LoggedPeer(f"u{i}", log) for i in range(4)]
        for i, peer in enumerate(peers):
            assert await m.connect(peer.ws, f"H{i}", peer.name) is True
            assert await m.join(peer.ws, "L") is True
        assert m.leave(peers[3].ws, "L") is True  # the newest
        assert m.leave(peers[0].ws, "L") is True  # the oldest
        assert await m.join(peers[3].ws, "L") is True
        assert await m.join(peers[0].ws, "L") is True
        assert m.leave(peers[2].ws, "L") is True  # one in the middle
        log.clear()
        assert await m.broadcast_to_lobby("L", {"type": "chat"}) == 4
        assert log == ["first", "u1", "u3", "u0"]
        for name in ("u1", "u3", "u0"):  # every leave again: the lobby empties
            assert m.leave(peers[int(name[1])].ws, "L") is True
        m.disconnect(first.ws)
        assert m.get_lobby_users("L") == set() and "L" not in m.active_connections
        assert await m.join(peers[1].ws, "L") is True
        log.clear()
        assert await m.broadcast_to_lobby("L", {"type": "chat"}) == 1
        assert log == ["u1"]

    run(main())


# ------------------------------------------------------------ presence events


def presence(peer: FakePeer, lobby: str | None = None) -> list[Any]:
    return [t for t in peer.texts() if t.get("type") == "presence" and (lobby is None or t["lobby"] == lobby)]


def test_presence_is_off_by_default_and_its_settings_are_validated() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10)
        assert m.presence is None
        a = await connected(m, "A", "alice")
        assert await m.join(a.ws, "B")
        assert presence(a) == [] and m._take_dirty() == []
        m.presence_changed("A")  # a no-op

    run(main())
    with pytest.raises(TypeError):
        ConnectionManager(presence_events=1)  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ConnectionManager(presence_events=True, presence_interval=bad)
    with pytest.raises(TypeError):
        ConnectionManager(presence_events=True, presence_interval="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ConnectionManager(10, 10, True)  # type: ignore[call-arg]


def test_200_members_arriving_together_cost_about_200_messages() -> None:
    async def main() -> None:
        m = ConnectionManager(1000, 1000, presence_events=True)
        assert m.presence is not None
        peers = [await connected(m, "L", f"u{i}") for i in range(200)]
        # each got the (empty) state on arrival, nothing else yet
        assert all(
            presence(p) == [{"type": "presence", "lobby": "L", "joins": [], "leaves": [], "state": True}]
            for p in peers
        )
        assert m.presence.flush() == 200
        assert sum(len(presence(p)) for p in peers) == 400  # not 200 * 200
        diff = presence(peers[0])[-1]
        assert diff == {
            "type": "presence",
            "lobby": "L",
            "joins": sorted(f"u{i}" for i in range(200)),
            "leaves": [],
        }
        assert m.presence.flush() == 0  # nothing changed since
        await m.stop()

    run(main())


def test_presence_tabs_join_once_and_leave_once() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, presence_events=True)
        assert m.presence is not None
        watcher = await connected(m, "L", "watcher")
        m.presence.flush()
        tab1 = await connected(m, "L", "alice")
        m.presence.flush()
        tab2 = await connected(m, "L", "alice")
        assert presence(tab2)[-1]["joins"] == ["alice", "watcher"]  # the state
        assert m.presence.flush() == 0  # alice was already there
        m.disconnect(tab1.ws)
        assert m.presence.flush() == 0  # still there through tab2
        m.disconnect(tab2.ws)
        assert m.presence.flush() == 1
        diffs = [p for p in presence(watcher) if "state" not in p]
        assert [(d["joins"], d["leaves"]) for d in diffs] == [
            (["watcher"], []),
            (["alice"], []),
            ([], ["alice"]),
        ]
        await m.stop()

    run(main())


def test_presence_join_and_leave_within_one_interval_send_nothing() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, presence_events=True)
        assert m.presence is not None
        watcher = await connected(m, "L", "watcher")
        other = await connected(m, "X", "bob")
        m.presence.flush()
        before = len(presence(watcher))
        assert await m.join(other.ws, "L")
        assert m.leave(other.ws, "L")
        flying = await connected(m, "L", "carol")
        m.disconnect(flying.ws)
        assert m.presence.flush() == 0
        assert len(presence(watcher)) == before
        await m.stop()

    run(main())


def test_presence_state_on_join_then_diffs_on_leave_of_a_room() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, presence_events=True)
        assert m.presence is not None
        bob = await connected(m, "R", "bob")
        m.presence.flush()
        alice = await connected(m, "A", "alice")
        assert await m.join(alice.ws, "R")
        assert presence(alice, "R") == [
            {"type": "presence", "lobby": "R", "joins": ["bob"], "leaves": [], "state": True}
        ]
        m.presence.flush()
        assert presence(bob, "R")[-1] == {"type": "presence", "lobby": "R", "joins": ["alice"], "leaves": []}
        assert presence(alice, "R")[-1] == {
            "type": "presence",
            "lobby": "R",
            "joins": ["alice"],
            "leaves": [],
        }
        assert presence(bob, "A") == []  # bob is not in A
        m.leave(alice.ws, "R")
        m.presence.flush()
        assert presence(bob, "R")[-1] == {"type": "presence", "lobby": "R", "joins": [], "leaves": ["alice"]}
        await m.stop()

    run(main())


def test_presence_abrupt_disconnects_produce_a_leave() -> None:
    async def main() -> None:
        clock = [100.0]
        m = ConnectionManager(
            100, 10, presence_events=True, clock=lambda: clock[0], ping_interval=5, ping_timeout=5
        )
        assert m.presence is not None
        watcher = await connected(m, "L", "watcher")
        broken = await connected(m, "L", "broken")
        m.presence.flush()
        broken.fail_sends = True
        await m.broadcast_to_lobby("L", {"type": "chat"})  # its send fails: removed
        assert broken.ws not in m
        m.presence.flush()
        assert presence(watcher)[-1] == {"type": "presence", "lobby": "L", "joins": [], "leaves": ["broken"]}
        m.presence.flush()
        # the stale sweep: silent past ping_interval + ping_timeout
        silent = await connected(m, "L", "silent")
        m.presence.flush()
        m.update_last_message("watcher")
        for step in (6.0, 6.0):
            clock[0] += step
            m.update_last_message("watcher")
            await m.health.sweep(wait=True)
        assert silent.ws not in m
        m.presence.flush()
        assert presence(watcher)[-1] == {"type": "presence", "lobby": "L", "joins": [], "leaves": ["silent"]}
        await m.stop()

    run(main())


def test_presence_changed_rereads_the_lobby_and_the_task_flushes() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, presence_events=True, presence_interval=0.01)
        assert m.presence is not None
        watcher = await connected(m, "L", "watcher")
        m.presence.flush()
        m.presence_changed("L")  # e.g. a backend's report: nothing changed locally
        assert m.presence.flush() == 0
        await connected(m, "L", "alice")
        # the periodic flusher (started lazily by the first event) sends it
        while len(presence(watcher)) < 3:
            await watcher.got_text.wait()
            watcher.got_text.clear()
        assert presence(watcher)[-1]["joins"] == ["alice"]
        await m.stop()

    run(main())


async def next_presence(peer: FakePeer, count: int) -> dict[str, Any]:
    """Wait until ``peer`` has ``count`` presence messages (sent by the flusher
    task); the last. Bounded: a flusher that never wakes fails, not hangs."""

    async def arrived() -> None:
        while len(presence(peer)) < count:
            peer.got_text.clear()
            await peer.got_text.wait()

    await asyncio.wait_for(arrived(), 10.0)
    last: dict[str, Any] = presence(peer)[count - 1]
    return last


class Big(ConnectionManager):
    max_per_lobby = 50


@pytest.mark.parametrize("cls", [ConnectionManager, Big])
def test_the_presence_flusher_sleeps_until_a_membership_changes(cls: type[ConnectionManager]) -> None:
    """One wake-up per change burst, by every path that ends a membership
    (disconnect, leave, the heartbeat's stale sweep), none while nothing
    changes; a subclass with class-level settings keeps them."""

    async def main() -> None:
        clock = [100.0]
        m = cls(
            presence_events=True,
            presence_interval=0.002,
            clock=lambda: clock[0],
            ping_interval=5,
            ping_timeout=5,
        )
        assert m.presence is not None and isinstance(m, cls) and m.max_per_lobby == cls().max_per_lobby
        watcher = await connected(m, "L", "watcher")
        assert m.presence.wakeups <= 1  # at most the one its arrival caused
        alice = await connected(m, "L", "alice")
        bob = await connected(m, "L", "bob")
        other = await connected(m, "X", "carol")
        diff = await next_presence(watcher, 2)  # state, then one diff for all three
        assert diff["joins"] == ["alice", "bob", "watcher"]
        woke = m.presence.wakeups
        await asyncio.sleep(0.1)  # 50 intervals with nothing changing
        assert m.presence.wakeups == woke and len(presence(watcher)) == 2
        expected: list[tuple[Callable[[], object], list[str]]] = [
            (lambda: m.disconnect(alice.ws), ["alice"]),
            (lambda: m.leave(bob.ws, "L"), ["bob"]),
        ]
        for n, (change, leaves) in enumerate(expected, start=3):
            change()
            assert (await next_presence(watcher, n))["leaves"] == leaves
            assert m.presence.wakeups == woke + n - 2
        assert await m.join(other.ws, "L") is True
        assert (await next_presence(watcher, 5))["joins"] == ["carol"]
        for _ in range(2):  # carol stays silent past ping_interval + ping_timeout: swept
            clock[0] += 6.0
            m.update_last_message("watcher")
            await m.health.sweep(wait=True)
        assert other.ws not in m
        assert (await next_presence(watcher, 6))["leaves"] == ["carol"]
        assert m.presence.wakeups == woke + 4
        await m.stop()

    run(main())


def test_a_member_whose_send_fails_during_a_presence_flush_is_removed_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        loop_errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
        m = ConnectionManager(100, 10, presence_events=True, presence_interval=0.002)
        watcher = await connected(m, "L", "watcher")
        broken = await connected(m, "L", "broken")
        assert (await next_presence(watcher, 2))["joins"] == ["broken", "watcher"]
        broken.fail_sends = True
        with caplog.at_level(logging.DEBUG, logger="wsmanager"):
            await connected(m, "L", "alice")  # the flusher's diff to broken fails
            assert (await next_presence(watcher, 3))["joins"] == ["alice"]
            assert broken.ws not in m
            # its removal is announced by the next flush
            assert (await next_presence(watcher, 4))["leaves"] == ["broken"]
            # a newcomer whose state message fails is removed the same way
            doomed = FakePeer()
            doomed.fail_sends = True
            await m.connect(doomed.ws, "L", "doomed")
            assert doomed.ws not in m
            assert await m.broadcast_to_lobby("L", {"type": "chat"}) == 2
        assert [getattr(r, "reason", None) for r in caplog.records if "send failed" in r.getMessage()] == [
            "send_failed",
            "send_failed",
        ]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
        await m.stop()
        assert loop_errors == []

    run(main())
