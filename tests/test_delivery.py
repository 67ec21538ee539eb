"""Delivery under load and abuse: slow consumers, backlogs, order, rate limits, shutdown."""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.asgi_fakes import FakePeer
from wsmanager import CloseCode, ConnectionManager


async def joined(m: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user)
    return peer


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# ------------------------------------------------------------- slow consumers


def test_a_stuck_member_does_not_delay_the_others() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=50)
        peers = [await joined(m, "a", f"u{i}") for i in range(10)]
        stuck = peers[3]
        stuck.send_gate = asyncio.Event()  # its sends suspend until set
        for n in range(20):
            # the broadcast returns without waiting for the stuck member
            assert await asyncio.wait_for(m.broadcast_to_lobby("a", {"n": n}), 1.0) == 10
        for p in peers:
            if p is not stuck:
                assert p.texts() == [{"n": n} for n in range(20)]
        assert stuck.texts() == []
        assert m.get_stats()["backlogged_connections"] == 1
        stuck.send_gate.set()
        await settle()
        # order kept: the suspended send first, then the backlog
        assert stuck.texts() == [{"n": n} for n in range(20)]
        assert m.get_stats()["backlogged_connections"] == 0
        assert stuck.ws in m

    asyncio.run(main())


def test_order_is_kept_across_broadcasts_direct_sends_and_pings() -> None:
    async def main() -> None:
        m = ConnectionManager()
        slow = await joined(m, "a", "slow")
        slow.send_gate = asyncio.Event()
        await m.broadcast_to_lobby("a", {"n": 0})
        await m.send_to_user("slow", {"n": 1})
        await m.broadcast_to_lobby("a", {"n": 2})
        ping = asyncio.create_task(m.ping_user("slow", timeout=0.5))
        await asyncio.sleep(0)
        await m.send_to_user("slow", {"n": 3})
        slow.send_gate.set()
        await settle()
        got = slow.texts()
        assert [g.get("n") for g in got] == [0, 1, 2, None, 3]
        assert got[3]["type"] == "health_ping"
        assert await ping == (False, None)

    asyncio.run(main())


def test_backlog_over_its_message_bound_closes_with_4006() -> None:
    async def main() -> None:
        m = ConnectionManager(max_backlog=5)
        good = await joined(m, "a", "good")
        slow = await joined(m, "a", "slow")
        slow.send_gate = asyncio.Event()
        counts = [await m.broadcast_to_lobby("a", {"n": n}) for n in range(7)]
        # 1 suspended in flight + 5 queued; the 7th overflows
        assert counts == [2, 2, 2, 2, 2, 2, 1]
        await settle()
        assert slow.close_code == int(CloseCode.SLOW_CONSUMER) == 4006
        assert slow.close_reason == "slow_consumer"
        assert slow.ws not in m and good.ws in m
        assert m.get_lobby_users("a") == {"good"}
        stats = m.get_stats()
        assert stats["closed"] == {"slow_consumer": 1}
        assert stats["backlogged_connections"] == 0
        assert len(good.texts()) == 7

    asyncio.run(main())


def test_backlog_over_its_byte_bound_closes_with_4006() -> None:
    async def main() -> None:
        m = ConnectionManager(max_backlog_bytes=1000)
        slow = await joined(m, "a", "slow")
        slow.send_gate = asyncio.Event()
        assert await m.send_to_user("slow", {"t": "x" * 10}) is True  # in flight
        assert await m.send_to_user("slow", {"t": "é" * 400}) is True  # 800+ bytes queued
        assert await m.send_to_user("slow", {"t": "y" * 200}) is False  # over 1000 bytes
        await settle()
        assert (slow.close_code, slow.close_reason) == (4006, "slow_consumer")
        assert not m.is_user_connected("slow")

    asyncio.run(main())


def test_sends_that_complete_at_once_create_no_task() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=100)
        peers = [await joined(m, "a", f"u{i}") for i in range(50)]
        created = 0
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
            nonlocal created
            created += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        try:
            for n in range(100):
                assert await m.broadcast_to_lobby("a", {"n": n}) == 50
        finally:
            loop.set_task_factory(None)
        assert created == 0
        assert all(len(p.texts()) == 100 for p in peers)

    asyncio.run(main())


def test_a_backlogged_connection_that_fails_is_removed() -> None:
    async def main() -> None:
        m = ConnectionManager()
        slow = await joined(m, "a", "slow")
        slow.send_gate = asyncio.Event()
        await m.broadcast_to_lobby("a", {"n": 0})
        await m.broadcast_to_lobby("a", {"n": 1})
        slow.fail_sends = True
        slow.send_gate.set()
        await settle()
        assert slow.ws not in m
        assert m.get_stats()["backlogged_connections"] == 0
        assert await m.broadcast_to_lobby("a", {"n": 2}) == 0

    asyncio.run(main())


def test_disconnect_drops_the_backlog_and_its_writer() -> None:
    async def main() -> None:
        m = ConnectionManager()
        slow = await joined(m, "a", "slow")
        slow.send_gate = asyncio.Event()
        before = len(asyncio.all_tasks())
        await m.broadcast_to_lobby("a", {"n": 0})
        await m.broadcast_to_lobby("a", {"n": 1})
        assert len(asyncio.all_tasks()) == before + 1  # one writer for the connection
        m.disconnect(slow.ws)
        await settle()
        assert len(asyncio.all_tasks()) == before
        assert m.get_stats()["backlogged_connections"] == 0

    asyncio.run(main())


# ---------------------------------------------------------------- rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_burst_then_rate() -> None:
    async def main() -> None:
        clock = FakeClock()
        m = ConnectionManager(rate_limit=8, rate_burst=5, rate_limit_close_after=8, clock=clock)
        peer = await joined(m, "a", "u")
        verdicts = [m._allow(peer.ws) for _ in range(7)]
        assert verdicts == [0, 0, 0, 0, 0, 1, 2]  # burst of 5, then dropped (first one told)
        clock.now += 0.125  # one token back
        assert [m._allow(peer.ws) for _ in range(2)] == [0, 2]
        clock.now += 10  # bucket full again: the streak is forgiven
        assert [m._allow(peer.ws) for _ in range(6)] == [0, 0, 0, 0, 0, 1]
        # persistent abuse: more than close_after drops without refilling
        assert [m._allow(peer.ws) for _ in range(8)] == [2] * 7 + [3]
        assert m.get_stats()["rate_limited_messages"] == 12

    asyncio.run(main())


def test_rate_limit_is_off_by_default_and_can_be_changed() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer = await joined(m, "a", "u")
        assert all(m._allow(peer.ws) == 0 for _ in range(10_000))
        assert m.rate_limit is None
        m.set_rate_limit(1, burst=2)
        assert [m._allow(peer.ws) for _ in range(3)] == [0, 0, 1]
        assert m._allow(FakePeer().ws) == 0  # unknown websockets are not limited
        with pytest.raises(ValueError):
            m.set_rate_limit(-1)
        with pytest.raises(ValueError):
            m.set_rate_limit(5, burst=0.5)

    asyncio.run(main())


# ------------------------------------------------------------------ shutdown


def test_shutdown_flushes_backlogs_then_closes_everyone_with_1001() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=10)
        peers = [await joined(m, "a", f"u{i}") for i in range(5)]
        slow = peers[0]
        slow.send_gate = asyncio.Event()
        for n in range(3):
            await m.broadcast_to_lobby("a", {"n": n})
        stopped = []

        async def stop() -> None:  # the heartbeat's stop(), when the manager has one
            stopped.append(True)

        m.stop = stop  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, slow.send_gate.set)
        await asyncio.wait_for(m.shutdown(timeout=2.0), 3.0)
        assert stopped == [True]
        assert m.can_accept_connection("a") == (False, "shutting_down")
        assert len(m) == 0
        assert slow.texts() == [{"n": 0}, {"n": 1}, {"n": 2}]  # flushed before the close
        assert all((p.close_code, p.close_reason) == (1001, "server_shutdown") for p in peers)
        late = FakePeer()
        assert await m.connect(late.ws, "a", "late") is False
        assert (late.close_code, late.close_reason) == (1013, "shutting_down")
        assert m.get_stats()["closed"]["server_shutdown"] == 5

    asyncio.run(main())


def test_shutdown_returns_within_its_timeout_despite_a_stuck_client() -> None:
    async def main() -> None:
        m = ConnectionManager()
        stuck = await joined(m, "a", "stuck")
        ok = await joined(m, "a", "ok")
        stuck.send_gate = asyncio.Event()  # never set
        await m.broadcast_to_lobby("a", {"n": 0})
        await asyncio.wait_for(m.shutdown(timeout=0.3), 2.0)
        assert len(m) == 0
        assert ok.close_code == 1001
        await settle()
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(main())


def test_an_unknown_protocol_layout_falls_back_to_the_ordinary_send(caplog: pytest.LogCaptureFixture) -> None:
    """The direct-frame path reads uvicorn's private protocol state; a layout
    it does not know must turn it off, never fail a send."""
    # the direct-frame path is only tried once uvicorn's sans-I/O protocol is loaded
    import uvicorn.protocols.websockets.websockets_sansio_impl  # noqa: F401

    from wsmanager.servers import DIRECT_ATTR as _DIRECT_ATTR

    async def main() -> None:
        m = ConnectionManager()
        peer = await joined(m, "a", "alice")
        peer.ws.__dict__[_DIRECT_ATTR] = object()  # "resolved" to something without the attributes
        assert await m.broadcast_to_lobby("a", {"n": 1}) == 1
        assert peer.texts() == [{"n": 1}]
        assert peer.ws.__dict__[_DIRECT_ATTR] is None  # off for good on this connection
        assert await m.broadcast_to_lobby("a", {"n": 2}) == 1
        assert peer.texts() == [{"n": 1}, {"n": 2}]

    with caplog.at_level("WARNING", logger="wsmanager.manager"):
        asyncio.run(main())
    assert "direct frames disabled" in caplog.text


class _Discard(list[Any]):
    """A frame list that keeps nothing (the peer's sent frames are not needed)."""

    def append(self, item: Any) -> None:
        return None


@pytest.mark.parametrize("sansio_loaded", [False, True])
def test_a_broadcast_leaves_no_tracked_object_per_recipient(
    sansio_loaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broadcast leaves nothing per recipient for the garbage collector:
    every object it would keep (a WebSocket's instance ``__dict__``, once
    read, is one) makes the collections that a server's allocations trigger
    traverse more, and at 20k connections those collections were most of a
    broadcast's cost (benchmarks/bench_core.py, GC on)."""
    from wsmanager.servers import DIRECT_ATTR

    sansio = "uvicorn.protocols.websockets.websockets_sansio_impl"
    if sansio_loaded:  # the direct-frame path asks each recipient for a transport
        importlib.import_module(sansio)
    else:  # the ordinary path: as on a server that is not uvicorn's sans-I/O protocol
        monkeypatch.delitem(sys.modules, sansio, raising=False)

    def tracked_growth(step: Callable[[], object]) -> int:
        gc.collect()
        gc.disable()
        try:
            before = gc.get_count()[0]
            step()
            return gc.get_count()[0] - before
        finally:
            gc.enable()

    # The direct path caches its verdict on each WebSocket (one setattr);
    # CPython stores it inline unless this process already set more distinct
    # attribute names on WebSocket instances than a shared-keys table holds
    # (other tests may have): then each setattr makes a dict, and that is
    # the allowance.
    spare = [FakePeer().ws for _ in range(200)]
    allowance = 0
    if sansio_loaded:

        def mark_all() -> None:
            for ws in spare:
                setattr(ws, DIRECT_ATTR, None)

        allowance = tracked_growth(mark_all)

    async def main() -> None:
        m = ConnectionManager(max_per_lobby=500)
        peers = [await joined(m, "a", f"u{i}") for i in range(200)]
        for p in peers:
            p.frames = _Discard()
        await joined(m, "warm-up", "w")
        await m.broadcast_to_lobby("warm-up", {"n": 0})  # one-time imports and caches
        loop = asyncio.get_running_loop()
        sent = loop.create_future()
        grown = tracked_growth(lambda: sent.set_result(m.delivery.deliver_lobby_now("a", '{"n":1}', None)))
        assert sent.result() == len(peers)
        assert grown < allowance + len(peers) // 4, (grown, allowance)

    asyncio.run(main())


def test_a_send_that_raises_oserror_marks_the_socket_disconnected_as_starlette_does() -> None:
    """Starlette's ``WebSocket.send`` turns an ``OSError`` of the ASGI send
    into ``application_state = DISCONNECTED`` (later sends then raise
    instead of writing); the manager's inline send keeps that bookkeeping.
    The failed connection is removed, the others get the message."""
    from starlette.websockets import WebSocketState

    async def main() -> None:
        m = ConnectionManager()
        good = await joined(m, "a", "good")
        bad = await joined(m, "a", "bad")
        bad.fail_sends = True
        assert await m.broadcast_to_lobby("a", {"n": 1}) == 1
        assert bad.ws.application_state is WebSocketState.DISCONNECTED
        assert bad.ws not in m and good.ws in m
        assert good.texts() == [{"n": 1}]
        bad2 = await joined(m, "a", "bad2")
        bad2.fail_sends = True
        assert not await m.send_to_user("bad2", {"n": 2})
        assert bad2.ws.application_state is WebSocketState.DISCONNECTED
        assert bad2.ws not in m

    asyncio.run(main())


class _YieldingPeer(FakePeer):
    """A peer whose sends begin with ``yields`` bare yields, as every send of
    Starlette's TestClient does (an anyio memory stream: ``checkpoint()``,
    that is ``asyncio.sleep(0)``)."""

    def __init__(self, yields: int) -> None:
        super().__init__()
        self.yields = yields

    async def _send(self, message: Any) -> None:
        if message["type"] == "websocket.send":
            for _ in range(self.yields):
                await asyncio.sleep(0)
        await super()._send(message)


def test_a_send_that_only_yields_a_turn_is_finished_inline_without_a_task() -> None:
    """A send that suspends only on a bare yield waits for nothing: the
    broadcast resumes it at once instead of starting a writer task per
    recipient per message (TestClient, anyio streams); a send that keeps
    yielding goes to its writer task, in order."""

    async def main() -> None:
        m = ConnectionManager(max_per_lobby=100)
        peers: list[FakePeer] = []
        for i in range(20):
            peer = _YieldingPeer(1)
            assert await m.connect(peer.ws, "a", f"u{i}")
            peers.append(peer)
        spinning = _YieldingPeer(50)
        assert await m.connect(spinning.ws, "a", "spin")
        created = 0
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
            nonlocal created
            created += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        try:
            for n in range(10):
                assert await m.broadcast_to_lobby("a", {"n": n}) == 21
        finally:
            loop.set_task_factory(None)
        assert all(p.texts() == [{"n": n} for n in range(10)] for p in peers)
        assert created == 1  # the spinning peer's writer only
        for _ in range(5_000):  # 50 turns per message, then the writer is done
            await asyncio.sleep(0)
            if not m.get_stats()["backlogged_connections"]:
                break
        assert spinning.texts() == [{"n": n} for n in range(10)]

    asyncio.run(main())


class _RewritingPeer(FakePeer):
    """A peer behind a send wrapper that rewrites the message in place (a
    middleware that tags outgoing text), then keeps it, as a queueing
    server does."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    async def _send(self, message: Any) -> None:
        if message["type"] == "websocket.send":
            message["text"] = f"{self.tag}:{message['text']}"
        await super()._send(message)


def test_a_send_wrapper_that_rewrites_the_message_in_place_affects_only_its_recipient() -> None:
    """Each recipient of a broadcast gets the text as serialized, whatever
    another recipient's send wrapper did to the message it was handed."""

    async def main() -> None:
        m = ConnectionManager(direct_frames=False)
        peers = [_RewritingPeer(f"p{i}") for i in range(3)]
        for i, peer in enumerate(peers):
            assert await m.connect(peer.ws, "a", f"u{i}")
        assert await m.broadcast_to_lobby("a", {"n": 1}) == 3
        for peer in peers:
            sent = [f["text"] for f in peer.frames if f["type"] == "websocket.send"]
            assert sent == [f'{peer.tag}:{{"n":1}}']

    asyncio.run(main())


def test_a_send_that_raises_before_awaiting_removes_only_that_recipient() -> None:
    """An ASGI ``send`` that raises when called (a plain function, not a
    coroutine function) or returns nothing awaitable fails that recipient
    only: it is removed, the others get the message, the broadcast returns."""

    async def main() -> None:
        m = ConnectionManager(direct_frames=False)
        good = await joined(m, "a", "good")
        bad = await joined(m, "a", "bad")
        odd = await joined(m, "a", "odd")

        def raising(message: Any) -> Any:
            raise OSError("reset before the coroutine existed")

        def not_awaitable(message: Any) -> Any:
            return 42

        bad.ws._send = raising
        odd.ws._send = not_awaitable
        assert await m.broadcast_to_lobby("a", {"n": 1}) == 1
        assert good.texts() == [{"n": 1}]
        assert good.ws in m and bad.ws not in m and odd.ws not in m

    asyncio.run(main())
