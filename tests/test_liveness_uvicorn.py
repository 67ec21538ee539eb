"""Liveness on a real uvicorn server for each endpoint style (tests/liveness_app.py):
a push-only endpoint that never reads, the seed's loop and ``serve()`` whose
handlers await ``ping_user()``, and the order of the app's own messages while
the manager reads pongs for it."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests import rawws
from tests.servers import http_stats as stats
from tests.servers import uvicorn_server

pytestmark = pytest.mark.slow

PING_INTERVAL, PING_TIMEOUT = 0.3, 0.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    env = {"WSM_TEST_PING_INTERVAL": str(PING_INTERVAL), "WSM_TEST_PING_TIMEOUT": str(PING_TIMEOUT)}
    with uvicorn_server("tests.liveness_app:app", env=env) as (p, _proc):
        yield p


@pytest.fixture(scope="module")
def quiet_port() -> Iterator[int]:
    """The same app without a heartbeat: only ping_user() pings."""
    env = {"WSM_TEST_PING_INTERVAL": "none", "WSM_TEST_PING_TIMEOUT": "none"}
    with uvicorn_server("tests.liveness_app:app", env=env) as (p, _proc):
        yield p


async def wait_stats(port: int, ok: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = await stats(port)
        if ok(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never got there: {s}")
        await asyncio.sleep(0.05)


async def http_get(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


async def recv_answering(ws: ClientConnection, seen: list[str] | None = None) -> dict[str, Any]:
    """The next message that is not a health_ping; pings are answered on the way."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message.get("type") == "health_ping":
            await ws.send(json.dumps({"type": "health_pong", "timestamp": message["timestamp"]}))
            if seen is not None:
                seen.append("pong")
            continue
        return dict(message)


# ------------------------------------------------------------ push-only


def test_push_only_endpoint_keeps_a_client_that_answers_pings(port: int) -> None:
    async def main() -> None:
        before = await stats(port)
        async with connect(f"ws://127.0.0.1:{port}/push/news?token=reader", ping_interval=None) as ws:
            pongs = 0
            while pongs < 6:  # six intervals: past interval + timeout several times over
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert message["type"] == "health_ping"
                await ws.send(json.dumps({"type": "health_pong", "timestamp": message["timestamp"]}))
                pongs += 1
            assert (await http_get(port, "/notify/news"))["sent"] == 1
            assert await recv_answering(ws) == {"type": "notice"}
            s = await stats(port)
            assert s["stale_closed"]["no_pong"] == before["stale_closed"]["no_pong"]
            assert s["total_connections"] == before["total_connections"] + 1
            assert s["latency_ms"]["samples"] > before["latency_ms"]["samples"]  # the pongs were seen
        # the app never reads: the client's leaving is seen all the same
        await wait_stats(port, lambda s: s["total_connections"] == before["total_connections"])

    asyncio.run(main())


def close_code_from(data: bytes) -> int | None:
    """The code of the first close frame among the server's (unmasked) frames."""
    while len(data) >= 2:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if n == 126:
            n, at = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, at = struct.unpack("!Q", data[2:10])[0], 10
        payload, data = data[at : at + n], data[at + n :]
        if opcode == 8:
            return int(struct.unpack("!H", payload[:2])[0])
    return None


def test_push_only_endpoint_still_closes_a_frozen_client_as_stale(port: int) -> None:
    async def main() -> None:
        before = await stats(port)
        # a client that completes the handshake, then neither reads nor writes
        sock = await rawws.handshake(port, "/push/frozen?token=ice")
        try:
            await wait_stats(port, lambda s: s["stale_closed"]["no_pong"] > before["stale_closed"]["no_pong"])
            loop = asyncio.get_running_loop()
            received = b""
            while close_code_from(received) is None:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                if not chunk:
                    break
                received += chunk
            assert close_code_from(received) == 4004
        finally:
            sock.close()

    asyncio.run(main())


# ------------------------------------------- ping_user() from a handler


@pytest.mark.parametrize("style", ["seed", "serve"])
def test_ping_user_from_the_message_handler_gets_its_pong(port: int, style: str) -> None:
    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/{style}/pinging?token=p-{style}"
        async with connect(url, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "ping_me", "timeout": 2.0}))
            answer = await recv_answering(ws)
            assert answer["type"] == "pinged"
            assert answer["ok"] is True
            assert 0 <= answer["latency_ms"] < 2000.0  # answered within its timeout
            s = await stats(port)
            assert s["latency_ms"]["p99"] < 2000.0  # no timed-out round trip in the percentiles

    asyncio.run(main())


@pytest.mark.parametrize("style", ["seed", "serve"])
def test_a_pong_after_its_ping_timed_out_is_not_a_round_trip(quiet_port: int, style: str) -> None:
    async def main() -> None:
        url = f"ws://127.0.0.1:{quiet_port}/{style}/late?token=late-{style}"
        async with connect(url, ping_interval=None) as ws:
            before = await stats(quiet_port)
            await ws.send(json.dumps({"type": "ping_me", "timeout": 0.3}))
            ping = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert ping["type"] == "health_ping"
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer == {"type": "pinged", "ok": False, "latency_ms": None}
            # only now, after ping_user() gave up, the pong
            await ws.send(json.dumps({"type": "health_pong", "timestamp": ping["timestamp"]}))
            await ws.send(json.dumps({"type": "after"}))  # read in order after the pong
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "echo"
            s = await stats(quiet_port)
            assert s["pongs_received"] == before["pongs_received"] + 1  # seen...
            assert s["latency_ms"]["samples"] == before["latency_ms"]["samples"]  # ...but not measured

            # a pong in time is still measured
            await ws.send(json.dumps({"type": "ping_me", "timeout": 5.0}))
            answer = await recv_answering(ws)
            assert answer["ok"] is True
            s = await stats(quiet_port)
            assert s["latency_ms"]["samples"] == before["latency_ms"]["samples"] + 1
            assert s["latency_ms"]["p99"] < 5000.0

    asyncio.run(main())


# ------------------------------- the app's own messages, while pongs are read for it


@pytest.mark.parametrize("style", ["seed", "serve"])
def test_the_app_gets_all_its_messages_in_order_while_the_manager_reads_pongs(port: int, style: str) -> None:
    async def main() -> None:
        before = await stats(port)
        url = f"ws://127.0.0.1:{port}/{style}/order?token=o-{style}"
        async with connect(url, ping_interval=None) as ws:
            # the handler holds for longer than interval + timeout; the client
            # keeps answering pings and sending messages meanwhile
            await ws.send(json.dumps({"type": "hold", "seconds": 3 * (PING_INTERVAL + PING_TIMEOUT)}))
            seen: list[str] = []
            sent = 0
            for _ in range(3):
                for _ in range(3):
                    await ws.send(json.dumps({"type": "note", "n": sent}))
                    sent += 1
                ping = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert ping["type"] == "health_ping"
                await ws.send(json.dumps({"type": "health_pong", "timestamp": ping["timestamp"]}))
            assert await recv_answering(ws, seen) == {"type": "held"}
            echoed = [(await recv_answering(ws, seen))["data"]["n"] for _ in range(sent)]
            assert echoed == list(range(sent))
            s = await stats(port)
            assert s["stale_closed"]["no_pong"] == before["stale_closed"]["no_pong"]

    asyncio.run(main())
