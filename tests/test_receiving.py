"""Pongs read while the app does not read (wsmanager/receiving.py), on an
injected clock with in-process ASGI peers: push-only endpoints, handlers that
await, the order of the app's own messages, late pongs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from tests.asgi_fakes import FakePeer
from tests.test_health import FakeClock, settle
from wsmanager import ConnectionManager
from wsmanager.receiving import MAX_HELD

INTERVAL, TIMEOUT = 10.0, 5.0


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def make() -> tuple[ConnectionManager, FakeClock]:
    clock = FakeClock()
    return ConnectionManager(clock=clock, ping_interval=INTERVAL, ping_timeout=TIMEOUT), clock


def pong(peer: FakePeer) -> None:
    ping = [t for t in peer.texts() if t.get("type") == "health_ping"][-1]
    peer.send_json({"type": "health_pong", "timestamp": ping["timestamp"]})


async def push_only(m: ConnectionManager, peer: FakePeer, user: str, forever: asyncio.Event) -> None:
    """Connects, then never reads (notifications would come from elsewhere)."""
    assert await m.connect(peer.ws, "news", user)
    try:
        await forever.wait()
    finally:
        m.disconnect(peer.ws)


async def seed_loop(
    m: ConnectionManager,
    peer: FakePeer,
    user: str,
    got: list[dict[str, Any]],
    handler: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """The seed's endpoint loop, recording every message it reads."""
    await m.connect(peer.ws, "chat", user)
    try:
        while True:
            data = await peer.ws.receive_json()
            got.append(data)
            m.update_last_message(user)
            if data.get("type") == "health_pong":
                m.record_pong(user)
                continue
            await handler(data)
    except WebSocketDisconnect:
        m.disconnect(peer.ws)


def test_push_only_endpoint_keeps_a_client_that_answers_and_closes_a_silent_one() -> None:
    async def main() -> None:
        m, clock = make()
        forever = asyncio.Event()
        answering, silent = FakePeer(), FakePeer()
        tasks = [
            asyncio.create_task(push_only(m, answering, "a", forever)),
            asyncio.create_task(push_only(m, silent, "s", forever)),
        ]
        await settle()
        for _ in range(3):  # three rounds: ping, answer (or not), past the timeout
            clock.advance(INTERVAL)
            result = await m.health.sweep(wait=True)
            await settle()
            if answering.ws in m:
                pong(answering)
            await settle()
            clock.advance(TIMEOUT)
            result = await m.health.sweep(wait=True)
            await settle()
        assert answering.ws in m
        assert answering.close_code is None
        assert m.latency_ms(answering.ws) is not None  # its pongs were read and measured
        assert silent.ws not in m
        assert (silent.close_code, silent.close_reason) == (4004, "stale")
        assert result.expired == 0
        assert m.get_stats()["stale_closed"]["no_pong"] == 1
        forever.set()
        await asyncio.gather(*tasks)

    run(main)


def test_push_only_endpoint_whose_client_leaves_is_removed() -> None:
    async def main() -> None:
        m, clock = make()
        forever = asyncio.Event()
        peer = FakePeer()
        task = asyncio.create_task(push_only(m, peer, "a", forever))
        await settle()
        clock.advance(INTERVAL)
        await m.health.sweep(wait=True)
        peer.leave()
        await settle()
        assert peer.ws not in m  # the app never reads: the manager saw the client go
        forever.set()
        await task

    run(main)


def test_messages_read_for_a_push_only_endpoint_are_bounded() -> None:
    async def main() -> None:
        m, clock = make()
        forever = asyncio.Event()
        peer = FakePeer()
        task = asyncio.create_task(push_only(m, peer, "a", forever))
        await settle()
        clock.advance(INTERVAL)
        await m.health.sweep(wait=True)
        for i in range(MAX_HELD + 4):  # chatter, no pong
            peer.send_json({"type": "chat", "n": i})
        for _ in range(5):
            await settle()
        assert peer.to_app.qsize() == 4  # the rest is left in the server's queue
        assert peer.ws in m  # the messages were a sign of life
        forever.set()
        await task

    run(main)


@pytest.mark.parametrize("server_receive", ["coroutine", "future"])
def test_the_seed_loop_gets_all_its_messages_in_order_while_the_manager_reads_a_pong(
    server_receive: str,
) -> None:
    async def main() -> None:
        m, clock = make()
        peer = FakePeer(receive_future=server_receive == "future")
        got: list[dict[str, Any]] = []
        release = asyncio.Event()

        async def handler(data: dict[str, Any]) -> None:
            if data.get("type") == "hold":
                await release.wait()

        task = asyncio.create_task(seed_loop(m, peer, "u", got, handler))
        peer.send_json({"type": "hold"})
        await settle()
        clock.advance(INTERVAL)
        await m.health.sweep(wait=True)  # pinged while the handler holds: nobody reads
        peer.send_json({"type": "chat", "n": 1})
        pong(peer)
        peer.send_json({"type": "chat", "n": 2})
        await settle()
        assert m.get_stats()["pongs_received"] == 1  # read for the app, while it holds
        clock.advance(TIMEOUT)
        assert (await m.health.sweep(wait=True)).expired == 0
        release.set()
        peer.send_json({"type": "chat", "n": 3})
        await settle()
        assert got == [{"type": "hold"}, *({"type": "chat", "n": n} for n in (1, 2, 3))]
        assert peer.ws in m
        peer.leave()
        await task
        assert peer.ws not in m

    run(main)


@pytest.mark.parametrize("server_receive", ["coroutine", "future"])
def test_a_reading_app_still_reads_its_pongs_itself(server_receive: str) -> None:
    async def main() -> None:
        m, clock = make()
        peer = FakePeer(receive_future=server_receive == "future")
        got: list[dict[str, Any]] = []

        async def handler(data: dict[str, Any]) -> None:
            return None

        task = asyncio.create_task(seed_loop(m, peer, "u", got, handler))
        await settle()
        clock.advance(INTERVAL)
        await m.health.sweep(wait=True)  # the app waits in receive
        pong(peer)
        await settle()
        assert [d["type"] for d in got] == ["health_pong"]  # nothing taken from the app
        assert m.latency_ms(peer.ws) is not None
        peer.leave()
        await task

    run(main)


def test_ping_user_from_the_handler_gets_its_pong() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        got: list[dict[str, Any]] = []
        results: list[tuple[bool, float | None]] = []
        answered = asyncio.Event()

        async def handler(data: dict[str, Any]) -> None:
            results.append(await m.ping_user("u", timeout=30.0))
            answered.set()

        task = asyncio.create_task(seed_loop(m, peer, "u", got, handler))
        peer.send_json({"type": "ping_me"})
        while not any(t.get("type") == "health_ping" for t in peer.texts()):
            await peer.got_text.wait()
            peer.got_text.clear()
        pong(peer)
        await answered.wait()
        ok, latency = results[0]
        assert ok is True
        assert latency is not None and 0 <= latency < 30_000.0
        assert [d["type"] for d in got] == ["ping_me"]  # the pong was read for the handler
        assert m.get_stats()["latency_ms"]["samples"] == 1
        peer.leave()
        await task

    run(main)


def test_a_late_pong_is_no_round_trip() -> None:
    async def main() -> None:
        m, clock = make()
        heard: list[float] = []
        m.add_latency_listener(lambda _ws, ms: heard.append(ms))
        peer = FakePeer()
        assert await m.connect(peer.ws, "L", "u")
        clock.advance(INTERVAL)
        await m.health.sweep(wait=True)
        clock.advance(TIMEOUT / 2)
        m.touch(peer.ws)  # other traffic keeps it alive...
        clock.advance(TIMEOUT)
        assert m.record_pong_ws(peer.ws) is None  # ...but the pong comes after the ping's timeout
        m.record_pong("u")
        stats = m.get_stats()
        assert stats["pongs_received"] == 2
        assert stats["latency_ms"]["samples"] == 0
        assert m.latency_ms(peer.ws) is None
        assert heard == []

        clock.advance(INTERVAL)
        await m.health.sweep(wait=True)
        clock.advance(TIMEOUT)  # just in time
        assert m.record_pong_ws(peer.ws) == TIMEOUT * 1000.0
        assert heard == [TIMEOUT * 1000.0]
        m.disconnect(peer.ws)

    run(main)


def test_a_pong_after_ping_user_gave_up_is_no_round_trip() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        assert await m.connect(peer.ws, "L", "u")
        assert await m.ping_user("u", timeout=0.01) == (False, None)
        pong(peer)  # read by the manager (nobody else reads), after the timeout
        await settle()
        stats = m.get_stats()
        assert stats["pongs_received"] == 1
        assert stats["latency_ms"]["samples"] == 0
        assert m.latency_ms(peer.ws) is None
        m.disconnect(peer.ws)

    run(main)
