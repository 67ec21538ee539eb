"""Lifecycle races (issue 9): shutdown while handshakes are in flight, members
who leave a lobby during a broadcast, and connect() on a socket that is
already closed."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.asgi_fakes import FakePeer
from tests.redis_server import RedisServer
from tests.servers import uvicorn_server
from wsmanager import ConnectionManager
from wsmanager.backends.redis import RedisBackend


class GatedPeer(FakePeer):
    """A client whose handshake hangs inside ``accept()`` until ``gate`` is
    set: what a middleware that awaits in ``send`` looks like to the app."""

    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__()
        self.gate = gate

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.accept":
            await self.gate.wait()
        await super()._send(message)


class HookedPeer(FakePeer):
    """A client whose ASGI ``send`` wrapper runs ``hook()`` (Python code of
    the app's, e.g. a middleware) before its first text frame goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Any = None

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.send" and self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()
        await super()._send(message)


async def joined(m: ConnectionManager, lobby: str, user: str, peer: FakePeer | None = None) -> FakePeer:
    peer = peer or FakePeer()
    assert await m.connect(peer.ws, lobby, user)
    return peer


async def until(predicate: Any, what: str) -> None:
    """Let the loop run (no clock involved) until ``predicate()`` holds."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def until_pending(m: ConnectionManager, n: int) -> None:
    await until(lambda: m.get_stats()["pending_connections"] == n, f"{n} handshakes pending: {m.get_stats()}")


def counts(m: ConnectionManager) -> tuple[int, int, int]:
    stats = m.get_stats()
    return len(m), stats["total_connections"], stats["pending_connections"]


# ------------------------------------------------------ shutdown vs handshakes


def test_shutdown_while_handshakes_are_inside_accept_registers_none_of_them() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=100, max_per_lobby=100, ping_interval=None)
        settled = [await joined(m, "room", f"old{i}") for i in range(5)]
        gate = asyncio.Event()
        peers = [GatedPeer(gate) for _ in range(30)]
        handshakes = [asyncio.create_task(m.connect(p.ws, "room", f"u{i}")) for i, p in enumerate(peers)]
        await until_pending(m, 30)
        shutdown = asyncio.create_task(m.shutdown(timeout=5.0))
        await until(lambda: m.shutting_down, "shutdown began")
        gate.set()  # every accept completes after shutdown began
        await asyncio.wait_for(shutdown, 6.0)
        # what a user sees once shutdown() returned
        assert counts(m) == (0, 0, 0)
        assert m.get_lobby_users("room") == set()
        assert all(t.done() for t in handshakes)
        assert [t.result() for t in handshakes] == [False] * 30
        assert all((p.close_code, p.close_reason) == (1013, "shutting_down") for p in peers)
        assert all((p.close_code, p.close_reason) == (1001, "server_shutdown") for p in settled)
        assert not [p for p in peers if p.texts()]

    asyncio.run(main())


def test_a_handshake_stuck_in_accept_past_the_shutdown_timeout_never_registers() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None, shutdown_timeout=0.2)
        gate = asyncio.Event()
        stuck = GatedPeer(gate)
        async with m.lifespan():
            handshake = asyncio.create_task(m.connect(stuck.ws, "room", "slow"))
            await until_pending(m, 1)
        # the lifespan ran shutdown(), then re-opened the manager for the next
        # start: the late accept must still not register (nor hold capacity)
        assert counts(m) == (0, 0, 0)
        assert not handshake.done()
        gate.set()
        assert await asyncio.wait_for(handshake, 2.0) is False
        assert counts(m) == (0, 0, 0)
        assert (stuck.close_code, stuck.close_reason) == (1013, "shutting_down")
        assert m.can_accept_connection("room") == (True, "")

    asyncio.run(main())


# --------------------------------------------------- leaving during a broadcast


def test_a_member_moved_to_another_lobby_mid_broadcast_does_not_get_the_old_lobbys_message() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        first = await joined(m, "A", "first", HookedPeer())
        mover = await joined(m, "A", "mover")
        leaver = await joined(m, "A", "leaver")
        last = await joined(m, "A", "last")

        async def hook() -> None:  # runs inside first's send, while the broadcast is under way
            m.disconnect(mover.ws)
            assert await m.connect(mover.ws, "B", "mover")
            m.disconnect(leaver.ws)

        assert isinstance(first, HookedPeer)
        first.hook = hook
        delivered = await m.broadcast_to_lobby("A", {"n": 1})
        assert first.texts() == [{"n": 1}] and last.texts() == [{"n": 1}]
        assert mover.texts() == [] and leaver.texts() == []
        assert delivered == 2
        assert m.get_lobby_users("B") == {"mover"}
        assert await m.broadcast_to_lobby("B", {"n": 2}) == 1
        assert mover.texts() == [{"n": 2}]

    asyncio.run(main())


def test_a_member_who_rejoins_as_the_excluded_user_is_skipped() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        first = await joined(m, "A", "first", HookedPeer())
        other = await joined(m, "A", "other")

        async def hook() -> None:
            m.disconnect(other.ws)
            assert await m.connect(other.ws, "A", "boss")

        assert isinstance(first, HookedPeer)
        first.hook = hook
        assert await m.broadcast_to_lobby("A", {"n": 1}, exclude_user_id="boss") == 1
        assert other.texts() == []

    asyncio.run(main())


def test_a_connection_that_stopped_being_the_users_does_not_get_send_to_user() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        tab1 = await joined(m, "A", "alice", HookedPeer())
        tab2 = await joined(m, "A", "alice")
        tab3 = await joined(m, "A", "alice")

        async def hook() -> None:
            m.disconnect(tab2.ws)
            assert await m.connect(tab2.ws, "A", "mallory")
            m.disconnect(tab3.ws)

        assert isinstance(tab1, HookedPeer)
        tab1.hook = hook
        assert await m.send_to_user("alice", {"secret": 1}) is True
        assert tab1.texts() == [{"secret": 1}]
        assert tab2.texts() == [] and tab3.texts() == []

    asyncio.run(main())


def test_a_backlogged_member_that_moves_lobby_loses_the_old_lobbys_queued_messages() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        slow = await joined(m, "A", "slow")
        slow.send_gate = asyncio.Event()
        await m.broadcast_to_lobby("A", {"n": 0})  # suspends: slow now has a backlog
        await m.broadcast_to_lobby("A", {"n": 1})  # queued behind it
        m.disconnect(slow.ws)
        assert await m.connect(slow.ws, "B", "slow")
        slow.send_gate.set()
        await m.broadcast_to_lobby("B", {"n": 2})
        for _ in range(10):
            await asyncio.sleep(0)
        assert {"n": 1} not in slow.texts()
        assert slow.texts()[-1] == {"n": 2}

    asyncio.run(main())


# ----------------------------------------------------- connect() on a closed socket


def test_connect_on_a_socket_the_app_already_closed_returns_false_and_counts_nothing() -> None:
    async def main() -> None:
        m = ConnectionManager(max_connections=1, max_per_lobby=1, ping_interval=None)
        peer = FakePeer()
        await peer.ws.close(code=4001)  # an auth refusal without `return`
        assert await m.connect(peer.ws, "room", "u") is False
        assert counts(m) == (0, 0, 0)
        assert peer.ws not in m
        assert not m.is_user_connected("u")
        assert m.get_lobby_users("room") == set()
        assert m.can_accept_connection("room") == (True, "")
        assert [f["type"] for f in peer.frames] == ["websocket.close"]
        assert peer.close_code == 4001
        assert m.get_stats()["refused"] == {k: 0 for k in m.get_stats()["refused"]}
        # the slot it did not take is free for the next client
        assert await m.connect(FakePeer().ws, "room", "v") is True

    asyncio.run(main())


class GonePeer(FakePeer):
    """A client that disconnected during the handshake: the server's ``send``
    raises on accept (uvicorn raises ``ClientDisconnected``, an OSError)."""

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.accept":
            raise OSError("client disconnected")
        await super()._send(message)


def test_connect_after_the_client_left_during_the_handshake_returns_false() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1, ping_interval=None)
        gone = GonePeer()
        assert await m.connect(gone.ws, "room", "u") is False
        assert counts(m) == (0, 0, 0)
        assert m.can_accept_connection("room") == (True, "")
        # the ASGI server delivered the disconnect instead of the connect event
        early = FakePeer()
        early.to_app.get_nowait()
        early.leave(1001)
        assert await m.connect(early.ws, "room", "u") is False
        assert counts(m) == (0, 0, 0)
        assert await m.connect(FakePeer().ws, "room", "v") is True

    asyncio.run(main())


def test_seed_endpoint_with_an_auth_refusal_without_return_counts_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = ConnectionManager(ping_interval=None)
    app = FastAPI()

    @app.websocket("/ws/{lobby}")
    async def endpoint(websocket: WebSocket, lobby: str, token: str = "") -> None:
        if token != "secret":
            await websocket.close(code=4001)  # the bug: no `return`
        if not await m.connect(websocket, lobby, token or "anon"):
            return
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            m.disconnect(websocket)

    with caplog.at_level(logging.ERROR), TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws/room?token=bad"):
            pass
        assert refused.value.code == 4001
        assert counts(m) == (0, 0, 0)
        assert m.get_lobby_users("room") == set()
        with client.websocket_connect("/ws/room?token=secret"):
            assert len(m) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------- with the Redis backplane


class GatedRedisBackend(RedisBackend):
    """A Redis backend whose cluster-wide reservation waits for ``gate``
    (a slow Redis round trip), while ``gate`` is set."""

    gate: asyncio.Event | None = None

    async def reserve(self, websocket: Any, lobby: str, user: str) -> str:
        if self.gate is not None:
            await self.gate.wait()
        return await super().reserve(websocket, lobby, user)


_ns = itertools.count()


def _node(url: str, backend: type[RedisBackend] = RedisBackend) -> ConnectionManager:
    ns = f"life{next(_ns)}"
    return ConnectionManager(
        max_per_lobby=100,
        backend=backend(url, namespace=ns, lease=1.0, connect_timeout=5.0),
        ping_interval=None,
    )


async def until_clock(predicate: Any, what: str, timeout: float = 10.0) -> None:
    """Wait for what another node sees through Redis (bounded; no timing asserted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


@pytest.mark.slow
def test_shutdown_while_handshakes_wait_for_the_backplane_registers_none(redis: RedisServer) -> None:
    async def main() -> None:
        a = _node(redis.url, GatedRedisBackend)
        assert isinstance(a.backend, GatedRedisBackend)
        b = ConnectionManager(
            backend=RedisBackend(redis.url, namespace=a.backend.namespace, lease=1.0, connect_timeout=5.0),
            ping_interval=None,
        )
        await a.start()
        await b.start()
        try:
            settled = await joined(a, "room", "old")
            await until_clock(lambda: b.get_stats()["total_connections"] == 1, "b sees a's connection")
            a.backend.gate = gate = asyncio.Event()
            peers = [FakePeer() for _ in range(10)]
            handshakes = [asyncio.create_task(a.connect(p.ws, "room", f"u{i}")) for i, p in enumerate(peers)]
            await until_pending(a, 10)
            shutdown = asyncio.create_task(a.shutdown(timeout=5.0))
            await until(lambda: a.shutting_down, "shutdown began")
            gate.set()  # every cluster-wide reservation completes after shutdown began
            await asyncio.wait_for(shutdown, 6.0)
            assert counts(a) == (0, 0, 0)
            assert [t.result() for t in handshakes] == [False] * 10
            assert all((p.close_code, p.close_reason) == (1013, "shutting_down") for p in peers)
            assert (settled.close_code, settled.close_reason) == (1001, "server_shutdown")
            assert a.backend.pending_count() == 0
            await until_clock(lambda: b.get_stats()["total_connections"] == 0, "b sees a empty")
            assert b.can_accept_connection("room") == (True, "")
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


@pytest.mark.slow
def test_a_handshake_the_client_left_releases_its_cluster_reservation(redis: RedisServer) -> None:
    async def main() -> None:
        a = _node(redis.url)
        await a.start()
        try:
            assert isinstance(a.backend, RedisBackend)
            assert await a.connect(GonePeer().ws, "room", "u") is False
            closed = FakePeer()
            await closed.ws.close(code=4001)
            assert await a.connect(closed.ws, "room", "v") is False
            assert counts(a) == (0, 0, 0)
            assert a.backend.pending_count() == 0
            assert a.get_stats()["total_connections"] == 0  # the cluster's figure
            assert a.get_lobby_users("room") == set()
        finally:
            await a.stop()

    asyncio.run(main())


@pytest.mark.slow
def test_a_remote_broadcast_skips_a_member_that_left_the_lobby_before_its_turn(redis: RedisServer) -> None:
    async def main() -> None:
        a = _node(redis.url)
        assert isinstance(a.backend, RedisBackend)
        b = ConnectionManager(
            backend=RedisBackend(redis.url, namespace=a.backend.namespace, lease=1.0, connect_timeout=5.0),
            ping_interval=None,
        )
        await a.start()
        await b.start()
        try:
            first = await joined(a, "A", "first", HookedPeer())
            mover = await joined(a, "A", "mover")
            last = await joined(a, "A", "last")
            await until_clock(lambda: b.get_stats()["total_connections"] == 3, "b sees a's members")

            async def hook() -> None:  # runs inside first's send, during a's local delivery
                a.disconnect(mover.ws)
                assert await a.connect(mover.ws, "B", "mover")

            assert isinstance(first, HookedPeer)
            first.hook = hook
            await b.broadcast_to_lobby("A", {"n": 1})
            await until_clock(lambda: bool(last.texts()), "the message reaches a")
            assert first.texts() == [{"n": 1}] and last.texts() == [{"n": 1}]
            assert {"n": 1} not in mover.texts()
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


# ------------------------------------------------------------ on a real uvicorn


async def _get_json(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


async def _open(url: str, **kwargs: Any) -> ClientConnection:
    return await ws_connect(url, ping_interval=None, open_timeout=30, **kwargs)


@pytest.mark.slow
def test_sigterm_while_30_handshakes_are_held_in_accept_on_uvicorn(tmp_path: Path) -> None:
    exit_file = tmp_path / "exit.json"

    async def close_of(opening: asyncio.Task[ClientConnection]) -> tuple[int, str] | None:
        try:
            ws = await opening
            await asyncio.wait_for(ws.wait_closed(), 30)
        except (OSError, InvalidStatus, asyncio.TimeoutError):
            return None
        rcvd = ws.protocol.close_rcvd
        return None if rcvd is None else (rcvd.code, rcvd.reason)

    async def main(port: int, proc: subprocess.Popen[bytes]) -> None:
        base = f"ws://127.0.0.1:{port}/ws"
        settled = [asyncio.create_task(_open(f"{base}/room?user=old{i}")) for i in range(5)]
        await asyncio.wait_for(asyncio.gather(*settled), 30)
        held = [asyncio.create_task(_open(f"{base}/held?user=u{i}")) for i in range(30)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (s := await _get_json(port, "/stats")) != {"held": 30, "total": 5, "pending": 30}:
            assert loop.time() < deadline, s
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        closes = await asyncio.gather(*(close_of(t) for t in settled + held))
        await loop.run_in_executor(None, proc.wait, 30)
        assert closes[:5] == [(1001, "server_shutdown")] * 5
        assert closes[5:] == [(1013, "shutting_down")] * 30
        assert json.loads(exit_file.read_text()) == {"len": 0, "total": 0, "pending": 0}

    env = {"WSM_EXIT_FILE": str(exit_file)}
    with uvicorn_server("tests.lifecycle_app:app", env=env) as (port, proc):
        asyncio.run(main(port, proc))
        assert proc.poll() is not None
