"""ConnectionManager.serve(): the safe endpoint loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi import FastAPI, Query, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager


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
