"""ConnectionManager.serve(): the safe endpoint loop."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from fastapi import FastAPI, Query, WebSocket
from starlette.testclient import TestClient
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from tests.asgi_fakes import FakePeer
from wsmanager import Connection, ConnectionManager


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def __call__(self, lobby: str, user: str, data: dict[str, Any]) -> None:
        self.calls.append((lobby, user, data))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def serving(
    m: ConnectionManager, user: str | None = "alice", *, peer: FakePeer | None = None, handler: Any = None
) -> tuple[FakePeer, asyncio.Task[None], Recorder]:
    peer = peer or FakePeer()
    rec = Recorder()
    task = asyncio.create_task(m.serve(peer.ws, "lobby", user, handler or rec))
    await settle()
    return peer, task, rec


def test_valid_messages_reach_the_handler_and_the_entry_is_removed_at_the_end() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer, task, rec = await serving(m)
        assert m.get_lobby_users("lobby") == {"alice"}
        peer.send_json({"type": "chat", "text": "hi"})
        await settle()
        assert rec.calls == [("lobby", "alice", {"type": "chat", "text": "hi"})]
        peer.leave()
        await asyncio.wait_for(task, 1)
        assert len(m) == 0

    asyncio.run(main())


def test_bad_json_and_non_objects_get_an_error_then_a_close() -> None:
    async def main() -> None:
        m = ConnectionManager(max_bad_messages=3)
        peer, task, rec = await serving(m)
        peer.send_text("{not json")
        peer.send_text("[1, 2]")
        peer.send_json({"type": "chat"})  # a good one resets the count
        peer.send_text("null")
        peer.send_text('"str"')
        await settle()
        errors = [t["error"] for t in peer.texts() if t.get("type") == "error"]
        assert errors == ["bad_json", "not_an_object", "not_an_object", "not_an_object"]
        assert peer.close_message is None and len(rec.calls) == 1
        peer.send_text("garbage")
        await asyncio.wait_for(task, 1)
        assert (peer.close_code, peer.close_reason) == (4007, "bad_message")
        assert len(m) == 0 and m.get_stats()["closed"] == {"bad_message": 1}

    asyncio.run(main())


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        ({"type": "websocket.receive", "bytes": b"\x00\x01"}, 1003, "binary_not_supported"),
        ({"type": "websocket.receive", "text": '{"t":"' + "x" * 200 + '"}'}, 1009, "message_too_big"),
        ({"type": "websocket.receive", "text": '{"t":"' + "é" * 60 + '"}'}, 1009, "message_too_big"),
    ],
)
def test_binary_and_oversized_frames_close_with_their_code(frame: Any, code: int, reason: str) -> None:
    async def main() -> None:
        m = ConnectionManager(max_message_bytes=100)
        peer, task, rec = await serving(m)
        peer.to_app.put_nowait(frame)
        await asyncio.wait_for(task, 1)
        assert (peer.close_code, peer.close_reason) == (code, reason)
        assert rec.calls == [] and len(m) == 0

    asyncio.run(main())


def test_health_messages_are_handled_and_not_passed_on() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer, task, rec = await serving(m)
        pinging = asyncio.create_task(m.ping_user("alice", timeout=2))
        await peer.got_text.wait()
        ping = peer.texts()[0]
        assert ping["type"] == "health_ping"
        peer.send_json({"type": "health_pong", "timestamp": ping["timestamp"]})
        ok, latency = await pinging
        assert ok and latency is not None
        assert m.get_stats()["latency_ms"]["samples"] == 1
        peer.send_json({"type": "health_ping", "timestamp": 12.5})
        await settle()
        assert peer.texts()[-1] == {"type": "health_pong", "timestamp": 12.5}
        assert rec.calls == []
        peer.leave()
        await task

    asyncio.run(main())


def test_flooding_client_is_told_once_then_closed_with_4005() -> None:
    async def main() -> None:
        m = ConnectionManager(rate_limit=1, rate_burst=3, rate_limit_close_after=5)
        peer, task, rec = await serving(m)
        for i in range(20):
            peer.send_json({"n": i})
        await asyncio.wait_for(task, 1)
        assert [c[2]["n"] for c in rec.calls] == [0, 1, 2]
        errors = [t for t in peer.texts() if t.get("type") == "error"]
        assert [e["error"] for e in errors] == ["rate_limited"]
        assert (peer.close_code, peer.close_reason) == (4005, "rate_limited")
        assert len(m) == 0 and m.get_stats()["rate_limited_messages"] == 6

    asyncio.run(main())


def test_refusals_are_accept_then_close() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1, allowed_origins={"https://app.example"})
        nobody, task, _ = await serving(m, None)
        await task
        assert nobody.accepted and (nobody.close_code, nobody.close_reason) == (4001, "unauthorized")

        evil = FakePeer(headers=[(b"origin", b"https://evil.example")])
        _, task, _ = await serving(m, "mallory", peer=evil)
        await task
        assert evil.accepted and (evil.close_code, evil.close_reason) == (4008, "forbidden_origin")

        bad_id, task, _ = await serving(m, "x" * 2000)
        await task
        assert bad_id.accepted and bad_id.close_code == 1008 and len(m) == 0

        ours = FakePeer(headers=[(b"origin", b"https://app.example")])
        _, first, _ = await serving(m, "alice", peer=ours)
        no_origin, second, _ = await serving(m, "bob")  # not a browser: allowed, but the lobby is full
        await second
        assert (no_origin.close_code, no_origin.close_reason) == (4002, "lobby_full")
        assert m.get_lobby_users("lobby") == {"alice"}
        ours.leave()
        await first

    asyncio.run(main())


def test_allowed_origins_given_as_one_string_is_a_type_error() -> None:
    # frozenset("https://app.example") is a set of characters: every browser would be refused
    # with 4008, silently. The error says what to write instead.
    with pytest.raises(TypeError, match=r"^allowed_origins .* write \{'https://app.example'\}$"):
        ConnectionManager(allowed_origins="https://app.example")
    with pytest.raises(TypeError, match=r"^allowed_origins "):
        ConnectionManager(allowed_origins=b"https://app.example")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^allowed_origins must hold str"):
        ConnectionManager(allowed_origins=[b"https://app.example"])  # type: ignore[list-item]
    ok = ConnectionManager(allowed_origins=["https://app.example", "https://admin.example"])
    assert ok.allowed_origins == frozenset({"https://app.example", "https://admin.example"})


def test_a_failing_handler_closes_with_1011_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(lobby: str, user: str, data: dict[str, Any]) -> None:
        raise KeyError("to")

    async def main() -> None:
        m = ConnectionManager()
        peer, task, _ = await serving(m, handler=boom)
        peer.send_json({"type": "dm"})
        await asyncio.wait_for(task, 1)
        assert (peer.close_code, peer.close_reason) == (1011, "internal_error")
        assert len(m) == 0

    with caplog.at_level(logging.ERROR, logger="wsmanager"):
        asyncio.run(main())
    assert "message handler failed" in caplog.text


def test_cancelled_endpoint_still_removes_the_entry() -> None:
    async def main() -> None:
        m = ConnectionManager()
        _, task, _ = await serving(m)
        assert len(m) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(m) == 0

    asyncio.run(main())


def test_serve_in_a_fastapi_app_shows_codes_to_the_client() -> None:
    m = ConnectionManager(max_per_lobby=5)
    app = FastAPI()

    async def echo(lobby: str, user: str, data: dict[str, Any]) -> None:
        await m.broadcast_to_lobby(lobby, {"from": user, **data})

    @app.websocket("/ws/{lobby}")
    async def ws(websocket: WebSocket, lobby: str, token: str = Query("")) -> None:
        await m.serve(websocket, lobby, token or None, echo)

    client = TestClient(app)
    with client.websocket_connect("/ws/a?token=alice") as alice:
        alice.send_text("{oops")
        assert alice.receive_json()["error"] == "bad_json"
        alice.send_json({"text": "hi"})
        assert alice.receive_json() == {"from": "alice", "text": "hi"}
    with client.websocket_connect("/ws/a") as anon, pytest.raises(WebSocketDisconnect) as info:
        anon.receive_text()
    assert (info.value.code, info.value.reason) == (4001, "unauthorized")
    assert len(m) == 0


def test_safe_chat_example_with_its_lifespan() -> None:
    from examples.safe_chat import app as example

    with TestClient(example.app) as client:
        with (
            client.websocket_connect("/ws/main?token=ann") as ann,
            client.websocket_connect("/ws/main?token=bob") as bob,
        ):
            ann.send_json({"type": "chat", "text": "hi bob"})
            assert bob.receive_json() == {"type": "chat", "from": "ann", "text": "hi bob"}
            bob.send_json({"type": "dm", "to": "ann", "text": "psst"})
            assert ann.receive_json() == {"type": "chat", "from": "ann", "text": "hi bob"}
            assert ann.receive_json() == {"type": "dm", "from": "bob", "text": "psst"}
            assert client.get("/stats").json()["total_connections"] == 2
        nobody = client.websocket_connect("/ws/main?token=%20")
        with nobody as ws, pytest.raises(WebSocketDisconnect) as info:
            ws.receive_text()
        assert info.value.code == 4001
    # the lifespan ran shutdown() on exit, then re-opened the manager for the next start
    assert len(example.manager) == 0 and example.manager.can_accept_connection("main") == (True, "")


# ------------------------------------------------- hooks and the connection form


class Hooks:
    """on_connect / on_disconnect recorders that see the registry when they run."""

    def __init__(self, m: ConnectionManager) -> None:
        self.m = m
        self.events: list[tuple[str, str, str, bool]] = []  # (hook, lobby, user, registered then)
        self.conns: list[Connection] = []

    async def on_connect(self, conn: Connection) -> None:
        self.conns.append(conn)
        self.events.append(("connect", conn.lobby_code, conn.user_id, conn.websocket in self.m))

    async def on_disconnect(self, conn: Connection) -> None:
        self.events.append(("disconnect", conn.lobby_code, conn.user_id, conn.websocket in self.m))


def hooked(m: ConnectionManager, hooks: Hooks, handler: Any = None, user: str | None = "alice") -> Any:
    peer = FakePeer()
    rec = Recorder()
    task = asyncio.create_task(
        m.serve(
            peer.ws,
            "lobby",
            user,
            handler or rec,
            on_connect=hooks.on_connect,
            on_disconnect=hooks.on_disconnect,
        )
    )
    return peer, task, rec


def test_hooks_run_after_registration_and_after_removal() -> None:
    async def main() -> None:
        m = ConnectionManager()
        hooks = Hooks(m)
        peer, task, rec = hooked(m, hooks)
        await settle()
        assert hooks.events == [("connect", "lobby", "alice", True)]
        conn = hooks.conns[0]
        assert conn.websocket is peer.ws and conn.manager is m and conn.connected
        peer.send_json({"type": "chat"})
        await settle()
        assert rec.calls == [("lobby", "alice", {"type": "chat"})]  # the pattern's 3-argument handler
        peer.leave()
        await asyncio.wait_for(task, 1)
        assert hooks.events[1:] == [("disconnect", "lobby", "alice", False)]
        assert not conn.connected and len(m) == 0

    asyncio.run(main())


def test_refused_connections_call_no_hook() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1)
        hooks = Hooks(m)
        first, task1, _ = hooked(m, hooks)
        await settle()
        for user in (None, "bob"):  # unauthorized, then lobby_full
            peer, task, _ = hooked(m, hooks, user=user)
            await asyncio.wait_for(task, 1)
            assert peer.close_code in (4001, 4002)
        assert [e[0] for e in hooks.events] == ["connect"]
        first.leave()
        await asyncio.wait_for(task1, 1)
        assert [e[0] for e in hooks.events] == ["connect", "disconnect"]

    asyncio.run(main())


def test_a_connection_handler_gets_its_connection_and_can_answer_the_sender_only() -> None:
    async def main() -> None:
        m = ConnectionManager()
        seen: list[tuple[Connection, dict[str, Any]]] = []

        async def handler(conn: Connection, data: dict[str, Any]) -> None:
            seen.append((conn, data))
            assert await conn.send({"type": "echo", "to": conn.user_id, "n": data["n"]})

        hooks = Hooks(m)
        alice, task_a, _ = hooked(m, hooks, handler)
        bob, task_b, _ = hooked(m, hooks, handler, user="bob")
        await settle()
        alice.send_json({"n": 1})
        await settle()
        assert [(c.websocket, c.lobby_code, c.user_id, d) for c, d in seen] == [
            (alice.ws, "lobby", "alice", {"n": 1})
        ]
        assert seen[0][0] is hooks.conns[0]  # the same object the hooks get
        assert alice.texts() == [{"type": "echo", "to": "alice", "n": 1}] and bob.texts() == []
        alice.leave()
        bob.leave()
        await asyncio.wait_for(asyncio.gather(task_a, task_b), 1)
        assert not await seen[0][0].send({"late": True})  # gone: False, no exception

    asyncio.run(main())


def test_handler_forms_are_told_apart_by_their_positional_parameters() -> None:
    from wsmanager.endpoint import _takes_connection

    async def seed(lobby: str, user: str, data: dict[str, Any]) -> None: ...
    async def seed_with_default(lobby: str, user: str, data: dict[str, Any] | None = None) -> None: ...
    async def conn_form(conn: Connection, data: dict[str, Any]) -> None: ...
    async def anything(*args: Any) -> None: ...

    class Bound:
        async def method(self, conn: Connection, data: dict[str, Any]) -> None: ...

    assert not _takes_connection(seed) and not _takes_connection(seed_with_default)
    assert not _takes_connection(anything) and not _takes_connection(Recorder())
    assert _takes_connection(conn_form) and _takes_connection(Bound().method)


def test_a_failing_on_connect_closes_with_1011_and_still_calls_on_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        m = ConnectionManager()
        hooks = Hooks(m)
        disconnected: list[bool] = []

        async def bad_connect(conn: Connection) -> None:
            raise RuntimeError("database down")

        async def bad_disconnect(conn: Connection) -> None:
            disconnected.append(conn.websocket in m)
            raise RuntimeError("database still down")

        peer = FakePeer()
        rec = Recorder()
        task = asyncio.create_task(
            m.serve(peer.ws, "lobby", "alice", rec, on_connect=bad_connect, on_disconnect=bad_disconnect)
        )
        await asyncio.wait_for(task, 1)  # no exception leaks out of serve()
        assert (peer.close_code, peer.close_reason) == (1011, "internal_error")
        assert disconnected == [False] and len(m) == 0 and rec.calls == []
        # the next connection is served normally
        ok, task2, _ = hooked(m, hooks)
        await settle()
        assert len(m) == 1
        ok.leave()
        await asyncio.wait_for(task2, 1)
        assert len(m) == 0

    with caplog.at_level(logging.ERROR, logger="wsmanager"):
        asyncio.run(main())
    assert "on_connect hook failed" in caplog.text and "on_disconnect hook failed" in caplog.text


class DeafPeer(FakePeer):
    """A client that does not answer the server's close (a frozen machine)."""

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.close":
            self.close_message = message
            self.frames.append(message)
            return
        await super()._send(message)


def test_on_disconnect_runs_as_soon_as_the_manager_removes_the_connection() -> None:
    """A close by the library (here the heartbeat's stale close) runs on_disconnect at
    once, before the client took the close; serve() ends later and does not run it again."""

    async def main() -> None:
        now = [1000.0]
        m = ConnectionManager(clock=lambda: now[0], ping_interval=1, ping_timeout=1)
        hooks = Hooks(m)
        peer = DeafPeer()
        task = asyncio.create_task(
            m.serve(
                peer.ws,
                "lobby",
                "zed",
                Recorder(),
                on_connect=hooks.on_connect,
                on_disconnect=hooks.on_disconnect,
            )
        )
        await settle()
        now[0] += 1.5
        await m.health.sweep(wait=True)  # pinged
        now[0] += 1.5
        await m.health.sweep(wait=True)  # stale: removed and closed
        await settle()
        assert hooks.events == [("connect", "lobby", "zed", True), ("disconnect", "lobby", "zed", False)]
        assert (peer.close_code, peer.close_reason) == (4004, "stale")
        assert not task.done()  # serve() still waits for the client's side of the close
        peer.leave(4004)
        await asyncio.wait_for(task, 1)
        assert [e[0] for e in hooks.events] == ["connect", "disconnect"]

    asyncio.run(main())


def test_a_removal_during_on_connect_runs_on_disconnect_only_after_it() -> None:
    async def main() -> None:
        m = ConnectionManager()
        events: list[str] = []
        release = asyncio.Event()

        async def slow_connect(conn: Connection) -> None:
            events.append("connect:start")
            await release.wait()
            events.append("connect:end")

        async def on_disconnect(conn: Connection) -> None:
            events.append("disconnect")

        peer = FakePeer()
        task = asyncio.create_task(
            m.serve(
                peer.ws, "lobby", "alice", Recorder(), on_connect=slow_connect, on_disconnect=on_disconnect
            )
        )
        await settle()
        await m.close_connection(peer.ws, "slow_consumer")  # removed while on_connect still runs
        await settle()
        assert events == ["connect:start"] and len(m) == 0
        release.set()
        await asyncio.wait_for(task, 1)
        assert events == ["connect:start", "connect:end", "disconnect"]
        assert (peer.close_code, peer.close_reason) == (4006, "slow_consumer")

    asyncio.run(main())


def test_cancelled_serve_still_calls_on_disconnect() -> None:
    async def main() -> None:
        m = ConnectionManager()
        hooks = Hooks(m)
        _, task, _ = hooked(m, hooks)
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [e[:3] for e in hooks.events] == [
            ("connect", "lobby", "alice"),
            ("disconnect", "lobby", "alice"),
        ]
        assert len(m) == 0

    asyncio.run(main())


def test_hooks_in_a_fastapi_app() -> None:
    m = ConnectionManager()
    app = FastAPI()

    async def welcome(conn: Connection) -> None:
        await conn.send({"type": "welcome", "you": conn.user_id})
        await m.broadcast_to_lobby(conn.lobby_code, {"type": "joined", "user": conn.user_id})

    async def goodbye(conn: Connection) -> None:
        await m.broadcast_to_lobby(conn.lobby_code, {"type": "left", "user": conn.user_id})

    async def echo(conn: Connection, data: dict[str, Any]) -> None:
        await conn.send({"type": "echo", **data})

    @app.websocket("/ws/{lobby}")
    async def ws(websocket: WebSocket, lobby: str, token: str = Query("")) -> None:
        await m.serve(websocket, lobby, token or None, echo, on_connect=welcome, on_disconnect=goodbye)

    with TestClient(app) as client, client.websocket_connect("/ws/a?token=alice") as alice:
        assert alice.receive_json() == {"type": "welcome", "you": "alice"}
        assert alice.receive_json() == {"type": "joined", "user": "alice"}
        with client.websocket_connect("/ws/a?token=bob") as bob:
            assert bob.receive_json() == {"type": "welcome", "you": "bob"}
            assert bob.receive_json() == {"type": "joined", "user": "bob"}
            assert alice.receive_json() == {"type": "joined", "user": "bob"}
            bob.send_json({"x": 1})
            assert bob.receive_json() == {"type": "echo", "x": 1}
        assert alice.receive_json() == {"type": "left", "user": "bob"}
    assert len(m) == 0


def test_lowering_max_message_bytes_at_run_time_applies_to_open_serve_connections() -> None:
    # README: "manager.max_message_bytes = 1 << 20 applies at once". serve()
    # read the limit once, when the connection started: an open connection
    # kept the old limit and a 500-byte message still reached the handler.
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        got: list[Any] = []

        async def handler(conn: Connection, data: dict[str, Any]) -> None:
            got.append(data)

        task = asyncio.create_task(m.serve(peer.ws, "L", "u", handler))
        await settle()
        assert peer.ws in m
        m.max_message_bytes = 100
        peer.send_text(json.dumps({"t": "x" * 500}))
        peer.leave()
        await asyncio.wait_for(task, 5)
        assert got == []
        assert peer.close_message is not None
        assert (peer.close_message["code"], peer.close_message["reason"]) == (1009, "message_too_big")

    asyncio.run(main())
