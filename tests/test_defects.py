"""The defects of the hand-written pattern, each one shown fixed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from tests import seed_app
from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager

# ---------------------------------------------------------------- several tabs


def test_several_connections_of_one_user() -> None:
    async def main() -> None:
        m = ConnectionManager()
        tab1, tab2 = FakePeer(), FakePeer()
        await m.connect(tab1.ws, "a", "alice")
        await m.connect(tab2.ws, "b", "alice")
        assert await m.send_to_user("alice", {"type": "dm"}) is True
        assert tab1.texts() == [{"type": "dm"}] and tab2.texts() == [{"type": "dm"}]
        assert m.disconnect(tab1.ws) == ("a", "alice")
        assert m.is_user_connected("alice")  # the seed said False here
        assert await m.send_to_user("alice", {"type": "again"}) is True
        assert tab2.texts()[-1] == {"type": "again"}
        m.disconnect(tab2.ws)
        assert not m.is_user_connected("alice")

    asyncio.run(main())


def test_send_to_user_true_if_one_tab_got_it() -> None:
    async def main() -> None:
        m = ConnectionManager()
        dead, alive = FakePeer(), FakePeer()
        await m.connect(dead.ws, "a", "alice")
        await m.connect(alive.ws, "a", "alice")
        dead.fail_sends = True
        assert await m.send_to_user("alice", {"x": 1}) is True
        assert dead.ws not in m and alive.ws in m
        alive.fail_sends = True
        assert await m.send_to_user("alice", {"x": 2}) is False
        assert not m.is_user_connected("alice")

    asyncio.run(main())


def test_max_per_user_refuses_with_4002_user_limit() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_user=2)
        tabs = [FakePeer() for _ in range(3)]
        assert await m.connect(tabs[0].ws, "a", "alice") is True
        assert await m.connect(tabs[1].ws, "b", "alice") is True
        assert await m.connect(tabs[2].ws, "a", "alice") is False
        assert tabs[2].close_code == 4002 and tabs[2].close_reason == "user_limit"
        assert tabs[2].ws not in m
        assert m.get_stats()["refused"]["user_limit"] == 1
        m.disconnect(tabs[0].ws)
        third = FakePeer()
        assert await m.connect(third.ws, "a", "alice") is True

    asyncio.run(main())


# ------------------------------------------------------ broadcast is robust


def test_disconnect_during_broadcast_never_raises() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=100)
        peers = [FakePeer() for _ in range(20)]
        for i, p in enumerate(peers):
            await m.connect(p.ws, "a", f"u{i}")
        gate = asyncio.Event()
        peers[0].send_gate = gate  # the first send suspends

        async def churn() -> None:
            await asyncio.sleep(0)
            for p in peers[5:15]:
                m.disconnect(p.ws)  # the seed raised "Set changed size during iteration"
            for i in range(5):
                await m.connect(FakePeer().ws, "a", f"new{i}")
            gate.set()

        sent, _ = await asyncio.gather(m.broadcast_to_lobby("a", {"t": 1}), churn())
        # The broadcast no longer waits for the stuck first member: everyone in
        # the lobby when it started got it (peers[0] once its send completes),
        # and the churn meanwhile raised nothing.
        assert sent == 20
        await asyncio.sleep(0.01)
        assert all(p.texts() == [{"t": 1}] for p in peers)
        assert len(m) == 15
        assert await m.broadcast_to_lobby("a", {"t": 2}) == 15

    asyncio.run(main())


def test_failed_send_in_broadcast_removes_only_that_connection() -> None:
    async def main() -> None:
        m = ConnectionManager()
        good, bad, good2 = FakePeer(), FakePeer(), FakePeer()
        for p, u in ((good, "g"), (bad, "b"), (good2, "g2")):
            await m.connect(p.ws, "a", u)
        bad.fail_sends = True
        assert await m.broadcast_to_lobby("a", {"t": 1}) == 2
        assert bad.ws not in m and m.get_lobby_users("a") == {"g", "g2"}
        assert good2.texts() == [{"t": 1}]

    asyncio.run(main())


# ----------------------------------------------------- check-then-act race


async def _storm(endpoint: Any, n: int, m: ConnectionManager) -> list[FakePeer]:
    peers = [FakePeer(accept_yields=5) for _ in range(n)]
    await asyncio.gather(*(endpoint(p, f"user:u{i}") for i, p in enumerate(peers)))
    return peers


def _run_endpoint_factory(check_then_await: bool) -> Any:
    async def run_endpoint(peer: FakePeer, token: str) -> None:
        if check_then_await:
            # an app that awaits between the check and connect (a DB lookup, say)
            user_id = await seed_app.authenticate_token(token)
            assert user_id
            ok, reason = seed_app.manager.can_accept_connection("room")
            if not ok:
                await peer.ws.close(code=4002, reason=reason)
                return
            await asyncio.sleep(0)
            await seed_app.manager.connect(peer.ws, "room", user_id)
            try:
                while True:
                    await peer.ws.receive_json()
            except WebSocketDisconnect:
                seed_app.manager.disconnect(peer.ws)
        else:
            await seed_app.websocket_endpoint(peer.ws, "room", token)

    return run_endpoint


@pytest.mark.parametrize("check_then_await", [False, True], ids=["seed-endpoint", "await-between"])
def test_concurrent_handshakes_admit_exactly_the_lobby_limit(
    check_then_await: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=500, max_per_lobby=10)
        monkeypatch.setattr(seed_app, "manager", m)
        endpoint = _run_endpoint_factory(check_then_await)
        peers = [FakePeer(accept_yields=5) for _ in range(50)]
        tasks = [asyncio.create_task(endpoint(p, f"user:u{i}")) for i, p in enumerate(peers)]
        for _ in range(100):
            await asyncio.sleep(0)
        admitted = [p for p in peers if p.ws in m]
        refused = [p for p in peers if p.close_message is not None]
        assert len(admitted) == 10 and len(m) == 10
        assert len(refused) == 40
        assert {(p.close_code, p.close_reason) for p in refused} == {(4002, "lobby_full")}
        for p in admitted:
            p.leave()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results == [None] * 50  # every endpoint ended normally: no traceback
        assert len(m) == 0 and m.get_stats()["pending_connections"] == 0

    asyncio.run(main())


def test_concurrent_handshakes_respect_max_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=7, max_per_lobby=100)
        monkeypatch.setattr(seed_app, "manager", m)
        endpoint = _run_endpoint_factory(True)
        peers = [FakePeer(accept_yields=3) for _ in range(30)]
        tasks = [asyncio.create_task(endpoint(p, f"user:u{i}")) for i, p in enumerate(peers)]
        for _ in range(100):
            await asyncio.sleep(0)
        assert len(m) == 7
        assert {p.close_reason for p in peers if p.close_message} == {"server_full"}
        for p in peers:
            if p.ws in m:
                p.leave()
        await asyncio.gather(*tasks)
        assert len(m) == 0

    asyncio.run(main())


def test_cancelled_handshake_releases_its_reservation() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1)
        slow = FakePeer(accept_yields=1000)
        task = asyncio.create_task(m.connect(slow.ws, "a", "u"))
        await asyncio.sleep(0)
        assert m.can_accept_connection("a") == (False, "lobby_full")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.can_accept_connection("a") == (True, "")
        assert slow.ws not in m and m.get_stats()["pending_connections"] == 0

    asyncio.run(main())


# ------------------------------------------------------------ O(1) checks


def _fill(m: ConnectionManager, lobbies: int) -> list[object]:
    sockets = []
    for i in range(lobbies):
        ws = object()
        assert m._reserve(ws, f"lobby{i}", f"user{i}") == ""
        m._commit(ws)
        sockets.append(ws)
    return sockets


def _best_of(fn: Any, calls: int = 2000, repeats: int = 15) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_capacity_check_and_stats_do_not_walk_the_lobbies() -> None:
    """A complexity test, not a speed test: at 100,000 lobbies an O(lobbies)
    check costs about 10,000x what it costs at 10. The best of 15 runs of each
    is compared with a 20x allowance, far above any scheduling noise and far
    below the growth of a per-lobby walk."""
    small, big = ConnectionManager(max_connections=10**6), ConnectionManager(max_connections=10**6)
    _fill(small, 10)
    keep = _fill(big, 100_000)
    assert big.get_stats()["active_lobbies"] == 100_000
    for name in ("can_accept_connection", "get_stats"):
        if name == "can_accept_connection":
            t_small = _best_of(lambda: small.can_accept_connection("lobby5"))
            t_big = _best_of(lambda: big.can_accept_connection("lobby5"))
        else:
            t_small = _best_of(small.get_stats)
            t_big = _best_of(big.get_stats)
        assert t_big < 20 * t_small, (name, t_small, t_big)
    assert len(keep) == 100_000


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("lobby", "user", "exc"),
    [
        (123, "u", TypeError),
        ("a", None, TypeError),
        ("a", b"u", TypeError),
        ("", "u", ValueError),
        ("a", "", ValueError),
        ("x" * 1025, "u", ValueError),
        ("a", "é" * 513, ValueError),  # 1026 bytes of UTF-8
        ("a", "\ud800", ValueError),
    ],
)
def test_invalid_ids_raise_and_leave_the_registry_unchanged(lobby: Any, user: Any, exc: type) -> None:
    async def main() -> None:
        m = ConnectionManager()
        other = FakePeer()
        await m.connect(other.ws, "keep", "keeper")
        before = m.get_stats()
        peer = FakePeer()
        with pytest.raises(exc):
            await m.connect(peer.ws, lobby, user)
        assert not peer.accepted and peer.close_message is None
        assert m.get_stats() == before and peer.ws not in m

    asyncio.run(main())


def test_ids_at_the_limit_are_accepted() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer = FakePeer()
        assert await m.connect(peer.ws, "x" * 1024, "é" * 512) is True
        assert m.get_lobby_users("x" * 1024) == {"é" * 512}

    asyncio.run(main())


def test_connecting_the_same_websocket_twice_raises() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer = FakePeer()
        await m.connect(peer.ws, "a", "alice")
        before = m.get_stats()
        with pytest.raises(ValueError, match="already connected"):
            await m.connect(peer.ws, "b", "alice")
        assert m.get_stats() == before
        assert m.get_lobby_users("b") == set()

    asyncio.run(main())
