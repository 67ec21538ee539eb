"""manager.add_close_listener (wsmanager.events): every refusal and close the library performs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager
from wsmanager.events import CloseEvent


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def summary(events: list[CloseEvent]) -> list[tuple[Any, ...]]:
    return [(e.code, e.reason, e.lobby_code, e.user_id, e.refused) for e in events]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def noop(_conn: Any, _data: dict[str, Any]) -> None:
    return None


def test_refusals_are_reported_with_their_lobby_and_user() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 1)
        events: list[CloseEvent] = []
        m.add_close_listener(events.append)
        alice = FakePeer()
        assert await m.connect(alice.ws, "room", "alice")
        bob = FakePeer()
        assert not await m.connect(bob.ws, "room", "bob")  # lobby full
        nobody = FakePeer()
        await m.serve(nobody.ws, "room", None, noop)  # serve() refuses a falsy user
        assert summary(events) == [
            (4002, "lobby_full", "room", "bob", True),
            (4001, "unauthorized", "room", None, True),
        ]
        assert events[0].websocket is bob.ws
        assert (bob.close_code, bob.close_reason) == (4002, "lobby_full")  # what the client saw

    asyncio.run(main())


def test_stale_slow_consumer_and_rate_limit_closes_are_reported() -> None:
    async def main() -> None:
        clock = FakeClock()
        m = ConnectionManager(
            max_backlog=3,
            rate_limit=1,
            rate_burst=2,
            rate_limit_close_after=3,
            clock=clock,
            ping_interval=1.0,
            ping_timeout=1.0,
        )
        events: list[CloseEvent] = []
        m.add_close_listener(events.append)

        # a member that does not read: its backlog overflows
        slow = FakePeer()
        assert await m.connect(slow.ws, "a", "slow")
        slow.send_gate = asyncio.Event()
        for n in range(6):
            await m.broadcast_to_lobby("a", {"n": n})
        await settle()
        assert slow.close_code == 4006

        # a flooder under serve(): burst, drops, then 4005
        flooder = FakePeer()
        task = asyncio.create_task(m.serve(flooder.ws, "a", "flooder", noop))
        for n in range(10):
            flooder.send_json({"type": "chat", "n": n})
        await asyncio.wait_for(task, 2.0)
        assert flooder.close_code == 4005

        # a frozen member: pinged, never answers, closed as stale by the heartbeat
        frozen = FakePeer()
        assert await m.connect(frozen.ws, "b", "frozen")
        clock.now += 1.5
        await m.health.sweep(wait=True)
        clock.now += 1.5
        await m.health.sweep(wait=True)
        await settle()
        assert frozen.close_code == 4004
        await m.stop()

        assert summary(events) == [
            (4006, "slow_consumer", "a", "slow", False),
            (4005, "rate_limited", "a", "flooder", False),
            (4004, "stale", "b", "frozen", False),
        ]

    asyncio.run(main())


def test_a_client_that_leaves_is_no_event_and_shutdown_is() -> None:
    async def main() -> None:
        m = ConnectionManager()
        events: list[CloseEvent] = []
        m.add_close_listener(events.append)
        leaver = FakePeer()
        task = asyncio.create_task(m.serve(leaver.ws, "a", "leaver", noop))
        await settle()
        leaver.leave()
        await asyncio.wait_for(task, 2.0)
        assert events == []
        stayer = FakePeer()
        assert await m.connect(stayer.ws, "a", "stayer")
        await m.shutdown(timeout=1.0)
        assert summary(events) == [(1001, "server_shutdown", "a", "stayer", False)]

    asyncio.run(main())


def test_a_failing_listener_is_logged_and_removed_listeners_hear_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        m = ConnectionManager(10, 1)
        heard: list[str] = []
        removed: list[str] = []

        def broken(_event: CloseEvent) -> None:
            raise RuntimeError("listener bug")

        m.add_close_listener(broken)
        m.add_close_listener(lambda e: heard.append(e.reason))
        remove = m.add_close_listener(lambda e: removed.append(e.reason))
        remove()
        remove()  # idempotent
        first = FakePeer()
        assert await m.connect(first.ws, "room", "a")
        second = FakePeer()
        assert not await m.connect(second.ws, "room", "b")
        assert heard == ["lobby_full"]
        assert removed == []
        assert (second.close_code, second.close_reason) == (4002, "lobby_full")  # the close still happened

    asyncio.run(main())
    assert "close listener failed" in caplog.text
    with pytest.raises(TypeError, match="must be callable"):
        ConnectionManager().add_close_listener(42)  # type: ignore[arg-type]
