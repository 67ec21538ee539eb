"""Bad input never produces a traceback (issue 9): whatever a client sends,
``serve()`` answers with a documented error message or close code
(``wsmanager.codes``), keeps its bookkeeping right, and logs no error."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests import rawws
from tests.asgi_fakes import FakePeer
from tests.servers import uvicorn_server
from wsmanager import CLOSE_CODES, Connection, ConnectionManager
from wsmanager.codes import ERROR_REASONS

SENTINEL = {"type": "sentinel"}


def echo_app(m: ConnectionManager) -> FastAPI:
    """serve() with a handler that sends every message it gets back, through
    the manager's own encoder: what reaches a handler can be sent on."""
    app = FastAPI()

    async def handler(conn: Connection, data: dict[str, Any]) -> None:
        await conn.send({"type": "echo", "data": data})

    @app.websocket("/ws/{lobby}")
    async def ws(websocket: WebSocket, lobby: str) -> None:
        await m.serve(websocket, lobby, "u", handler)

    return app


DEEP = 30_000  # nesting levels: far over the recursion limit, under max_message_bytes

# (frame sent, what the client gets). Frames are text unless bytes.
# Outcomes: ("error", reason) / ("pong", timestamp) / ("echo", data) /
# ("nothing",) / ("close", code, reason).
CASES: list[tuple[str, str | bytes, tuple[Any, ...]]] = [
    ("ping NaN", '{"type":"health_ping","timestamp":NaN}', ("error", "bad_json")),
    ("ping Infinity", '{"type":"health_ping","timestamp":Infinity}', ("error", "bad_json")),
    ("ping -Infinity", '{"type":"health_ping","timestamp":-Infinity}', ("error", "bad_json")),
    ("ping 1e999", '{"type":"health_ping","timestamp":1e999}', ("error", "bad_json")),
    ("ping -1e999", '{"type":"health_ping","timestamp":-1e999}', ("error", "bad_json")),
    ("ping long mantissa", '{"type":"health_ping","timestamp":' + "9" * 400 + ".5}", ("error", "bad_json")),
    ("chat NaN", '{"type":"chat","x":[1,NaN]}', ("error", "bad_json")),
    ("pong NaN", '{"type":"health_pong","timestamp":NaN}', ("error", "bad_json")),
    ("huge int", '{"type":"chat","n":' + "1" * 5000 + "}", ("error", "bad_json")),
    ("bare huge int", "7" * 5000, ("error", "bad_json")),
    ("deep arrays", "[" * DEEP + "]" * DEEP, ("error", "bad_json")),
    ("deep objects", '{"a":' * (DEEP // 3) + "1" + "}" * (DEEP // 3), ("error", "bad_json")),
    ("deep unclosed", "[" * DEEP, ("error", "bad_json")),
    ("empty text", "", ("error", "bad_json")),
    ("whitespace", " \n\t", ("error", "bad_json")),
    ("NUL", "\x00", ("error", "bad_json")),
    ("BOM", "\ufeff{}", ("error", "bad_json")),
    ("raw lone surrogate", "\ud800", ("error", "bad_json")),
    ("truncated", '{"type":"chat"', ("error", "bad_json")),
    ("trailing data", '{"type":"chat"} {}', ("error", "bad_json")),
    ("null", "null", ("error", "not_an_object")),
    ("array", "[1,2]", ("error", "not_an_object")),
    ("string", '"hello"', ("error", "not_an_object")),
    ("escaped lone surrogate string", '"\\ud800"', ("error", "not_an_object")),
    ("number", "12.5", ("error", "not_an_object")),
    ("true", "true", ("error", "not_an_object")),
    ("ping string timestamp", '{"type":"health_ping","timestamp":"x"}', ("error", "bad_message")),
    ("ping bool timestamp", '{"type":"health_ping","timestamp":true}', ("error", "bad_message")),
    ("ping list timestamp", '{"type":"health_ping","timestamp":[1]}', ("error", "bad_message")),
    ("ping object timestamp", '{"type":"health_ping","timestamp":{}}', ("error", "bad_message")),
    (
        "ping deep timestamp",
        '{"type":"health_ping","timestamp":' + "[" * 900 + "]" * 900 + "}",
        ("error", "bad_message"),
    ),
    (
        "ping duplicate timestamp",
        '{"type":"health_ping","timestamp":1,"timestamp":"x"}',
        ("error", "bad_message"),
    ),
    ("ping no timestamp", '{"type":"health_ping"}', ("pong", None)),
    ("ping null timestamp", '{"type":"health_ping","timestamp":null}', ("pong", None)),
    ("ping float timestamp", '{"type":"health_ping","timestamp":1e308}', ("pong", 1e308)),
    (
        "ping big int timestamp",
        '{"type":"health_ping","timestamp":' + "9" * 4000 + "}",
        ("pong", int("9" * 4000)),
    ),
    ("pong no fields", '{"type":"health_pong"}', ("nothing",)),
    ("pong string timestamp", '{"type":"health_pong","timestamp":"x"}', ("nothing",)),
    ("pong object timestamp", '{"type":"health_pong","timestamp":{"a":[]}}', ("nothing",)),
    ("type int", '{"type":5}', ("echo", {"type": 5})),
    ("type null", '{"type":null}', ("echo", {"type": None})),
    ("type list", '{"type":["health_ping"]}', ("echo", {"type": ["health_ping"]})),
    ("type object", '{"type":{"health_ping":1}}', ("echo", {"type": {"health_ping": 1}})),
    ("no type", "{}", ("echo", {})),
    ("duplicate type", '{"type":"health_ping","type":"chat"}', ("echo", {"type": "chat"})),
    ("escaped lone surrogate", '{"type":"chat","t":"\\ud800"}', ("echo", {"type": "chat", "t": "\ud800"})),
    (
        "raw lone surrogate in string",
        '{"type":"chat","t":"\udfff"}',
        ("echo", {"type": "chat", "t": "\udfff"}),
    ),
    (
        "long string",
        '{"type":"chat","t":"' + "x" * 60_000 + '"}',
        ("echo", {"type": "chat", "t": "x" * 60_000}),
    ),
    (
        "over max_message_bytes",
        '{"type":"chat","t":"' + "x" * 70_000 + '"}',
        ("close", 1009, "message_too_big"),
    ),
    ("binary", b"\x00\x01", ("close", 1003, "binary_not_supported")),
    ("binary non-UTF-8", b"\xff\xfe\xfd", ("close", 1003, "binary_not_supported")),
    ("binary JSON", b'{"type":"chat"}', ("close", 1003, "binary_not_supported")),
    ("empty binary", b"", ("close", 1003, "binary_not_supported")),
]


@pytest.mark.parametrize(("frame", "outcome"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_kind_of_bad_frame_gets_a_documented_answer(
    frame: str | bytes, outcome: tuple[Any, ...], caplog: pytest.LogCaptureFixture
) -> None:
    m = ConnectionManager(ping_interval=None)
    caplog.set_level(logging.DEBUG)
    with TestClient(echo_app(m)) as client, client.websocket_connect("/ws/L") as ws:
        if isinstance(frame, bytes):
            ws.send_bytes(frame)
        else:
            ws.send_text(frame)
        if outcome[0] == "close":
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert (closed.value.code, closed.value.reason) == outcome[1:]
            assert CLOSE_CODES[outcome[2]] == outcome[1]
            assert len(m) == 0 and m.get_stats()["closed"] == {outcome[2]: 1}
        else:
            ws.send_text(json.dumps(SENTINEL))
            got = [json.loads(ws.receive_text())]
            if got[0] != {"type": "echo", "data": SENTINEL}:
                got.append(json.loads(ws.receive_text()))
            assert got[-1] == {"type": "echo", "data": SENTINEL}
            answers = got[:-1]
            if outcome[0] == "error":
                assert outcome[1] in ERROR_REASONS
                assert [(a["type"], a["error"]) for a in answers] == [("error", outcome[1])]
                assert isinstance(answers[0]["detail"], str) and answers[0]["detail"]
            elif outcome[0] == "pong":
                assert answers == [{"type": "health_pong", "timestamp": outcome[1]}]
            elif outcome[0] == "echo":
                assert answers == [{"type": "echo", "data": outcome[1]}]
            else:
                assert answers == []
            # the connection is still there, counted once, and usable
            assert len(m) == 1 and m.get_lobby_users("L") == {"u"} and m.is_user_connected("u")
            assert m.get_stats()["closed"] == {}
    assert len(m) == 0 and m.get_lobby_users("L") == set() and not m.is_user_connected("u")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


def test_bad_messages_of_every_kind_count_towards_the_4007_close(caplog: pytest.LogCaptureFixture) -> None:
    m = ConnectionManager(ping_interval=None, max_bad_messages=4)
    caplog.set_level(logging.DEBUG)
    with TestClient(echo_app(m)) as client, client.websocket_connect("/ws/L") as ws:
        for text in ('{"a":NaN}', "[1]", '{"type":"health_ping","timestamp":"now"}'):
            ws.send_text(text)
        assert [json.loads(ws.receive_text())["error"] for _ in range(3)] == [
            "bad_json",
            "not_an_object",
            "bad_message",
        ]
        ws.send_text("[" * DEEP)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert (closed.value.code, closed.value.reason) == (4007, "bad_message")
    assert len(m) == 0 and m.get_stats()["closed"] == {"bad_message": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------ arbitrary frames


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)

# Text that looks like the protocol, broken in the ways that matter, and text at random.
TEXT = (
    st.text()
    | st.builds(
        lambda kind, ts: '{"type":' + json.dumps(kind) + ',"timestamp":' + ts + "}",
        st.sampled_from(["health_ping", "health_pong", "chat"]),
        st.sampled_from(
            ["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "9" * 5000, "1.5", '"x"', "[", "{}"]
        ),
    )
    | JSONISH.map(lambda v: json.dumps(v, allow_nan=True))
    | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
)
FRAMES = st.lists(st.one_of(TEXT, st.binary(max_size=64)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=FRAMES)
def test_arbitrary_frames_never_raise_nor_log_an_error(frames: list[str | bytes]) -> None:
    caught = _Errors()
    root = logging.getLogger()
    root.addHandler(caught)
    try:
        asyncio.run(_play(frames))
    finally:
        root.removeHandler(caught)
    assert caught.records == [], [r.getMessage() for r in caught.records]


async def _play(frames: list[str | bytes]) -> None:
    m = ConnectionManager(ping_interval=None, max_bad_messages=100, max_message_bytes=4096)
    peer = FakePeer()
    echoed: list[Any] = []

    async def handler(conn: Connection, data: dict[str, Any]) -> None:
        echoed.append(data)
        await conn.send({"type": "echo", "data": data})

    task = asyncio.create_task(m.serve(peer.ws, "L", "u", handler))
    for frame in frames:
        key = "bytes" if isinstance(frame, bytes) else "text"
        peer.to_app.put_nowait({"type": "websocket.receive", key: frame})
    peer.leave()
    await asyncio.wait_for(task, 10)  # serve() returns: nothing escaped it
    assert len(m) == 0 and m.get_lobby_users("L") == set()
    for sent in peer.texts():
        assert sent["type"] in ("error", "health_pong", "echo")
        if sent["type"] == "error":
            assert sent["error"] in ERROR_REASONS
    assert sum(t["type"] == "echo" for t in peer.texts()) == len(echoed)
    if peer.close_message is not None:
        reason = peer.close_message["reason"]
        assert CLOSE_CODES[reason] == peer.close_message["code"]
        assert reason in ("binary_not_supported", "message_too_big", "bad_message")


# ------------------------------------------------------------- a real server


async def _stats(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


async def _answer(sock: Any) -> tuple[int, Any]:
    """The next frame: (1, its JSON) for text, (8, (code, reason)) for a close."""
    opcode, payload = await asyncio.wait_for(rawws.read_frame(sock), 10)
    if opcode == 8:
        return 8, (int.from_bytes(payload[:2], "big"), payload[2:].decode())
    return opcode, json.loads(payload)


RAW_BAD = [
    (b'{"type":"health_ping","timestamp":NaN}', "bad_json"),
    (b'{"type":"health_ping","timestamp":Infinity}', "bad_json"),
    (b'{"type":"health_ping","timestamp":-Infinity}', "bad_json"),
    (b'{"type":"health_ping","timestamp":1e999}', "bad_json"),
    (b"[" * 30_000, "bad_json"),
    (b'{"n":' + b"1" * 5000 + b"}", "bad_json"),
    (b"", "bad_json"),
    (b'{"type":"health_ping","timestamp":"now"}', "bad_message"),
    (b"[]", "not_an_object"),
]


@pytest.mark.slow
@pytest.mark.parametrize("ws_impl", ["websockets-sansio", "websockets", "wsproto"])
def test_a_real_server_logs_no_traceback_for_raw_bad_frames(ws_impl: str, tmp_path: Path) -> None:
    async def main(port: int) -> None:
        path = "/ws/L?token=u"
        sock = await rawws.handshake(port, path)
        try:
            for payload, error in RAW_BAD:
                await asyncio.get_running_loop().sock_sendall(sock, rawws.frame(payload))
                assert await _answer(sock) == (1, {"type": "error", "error": error, "detail": ANY_TEXT})
            await asyncio.get_running_loop().sock_sendall(
                sock, rawws.frame(b'{"type":"health_ping","timestamp":1}')
            )
            assert await _answer(sock) == (1, {"type": "health_pong", "timestamp": 1})
        finally:
            sock.close()
        # text that is not UTF-8 (a lone surrogate in CESU-8, a stray byte) is
        # failed by the server's WebSocket layer before the app sees it: 1007,
        # except wsproto, which drops the TCP connection; binary frames: 1003
        bad_utf8 = (8, 1007) if ws_impl != "wsproto" else None
        for payload, opcode, closed in [
            (b'{"type":"\xed\xa0\x80"}', 1, bad_utf8),
            (b"\xff\xfe", 1, bad_utf8),
            (b"\xff\xfe", 2, (8, 1003)),
        ]:
            sock = await rawws.handshake(port, path)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, rawws.frame(payload, opcode))
                try:
                    kind, (code, _reason) = await _answer(sock)
                except ConnectionError:
                    assert closed is None
                else:
                    assert (kind, code) == closed
            finally:
                sock.close()
        for _ in range(200):  # the server sees the sockets go: bounded wait
            if (await _stats(port))["total_connections"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await _stats(port))["total_connections"] == 0

    log = tmp_path / "server.log"
    with (
        log.open("wb") as err,
        uvicorn_server("tests.serve_app:app", extra_args=["--ws", ws_impl], stderr=err) as (
            port,
            _proc,
        ),
    ):
        asyncio.run(main(port))
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()
