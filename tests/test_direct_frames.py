"""Direct frames: on uvicorn's websockets-sansio protocol a broadcast is framed
once and the same bytes written to every ready connection (real uvicorn, real
``websockets`` clients, with and without permessage-deflate)."""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests import rawws
from tests.servers import uvicorn_server

APP = "tests.direct_app:app"

pytestmark = pytest.mark.slow


def run(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body with asyncio.run (the suite has no async plugin)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with uvicorn_server(APP) as (port, _):
        yield port


def debug(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug", timeout=5) as r:
        return dict(json.loads(r.read()))


async def join(port: int, lobby: str, user: str, *, compress: bool = True) -> ClientConnection:
    ws = await connect(
        f"ws://127.0.0.1:{port}/ws/{lobby}/{user}",
        compression="deflate" if compress else None,
        max_size=None,
    )
    assert bool(ws.protocol.extensions) is compress  # deflate negotiated or not
    return ws


async def recv_n(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(n)]


async def broadcast_roundtrip(port: int, lobby: str) -> list[ClientConnection]:
    a = await join(port, lobby, "a")
    b = await join(port, lobby, "b", compress=False)
    c = await join(port, lobby, "c")
    plan = [(40, 8), (10, 100), (3, 40000)]  # 1-byte, 2-byte and 8-byte frame lengths
    expected = []
    for n, size in plan:
        await a.send(json.dumps({"op": "bcast", "n": n, "size": size, "tag": f"s{size}"}))
        expected += [{"tag": f"s{size}", "i": i, "pad": "é" * size} for i in range(n)]
    for ws in (a, b, c):
        assert await recv_n(ws, len(expected)) == expected
    return [a, b, c]


@run
async def test_broadcast_arrives_intact_in_order(server: int) -> None:
    clients = await broadcast_roundtrip(server, "intact")
    info = debug(server)
    assert info["resolved_direct"] == 3  # the fast path was taken
    for ws in clients:
        await ws.close()


@run
async def test_mixed_with_ordinary_sends_keeps_order(server: int) -> None:
    a = await join(server, "mixed", "a")
    b = await join(server, "mixed", "b", compress=False)
    n = 60
    await a.send(json.dumps({"op": "mixed", "n": n, "to": "b", "tag": "m"}))
    # protocol pings whose pongs uvicorn writes in between the direct frames
    pongs = [await b.ping() for _ in range(5)] + [await a.ping() for _ in range(5)]
    # a: broadcasts (i % 3 == 0) and its endpoint's own send_json (i % 3 == 2)
    got_a = await recv_n(a, 40)
    assert [m["i"] for m in got_a] == [i for i in range(n) if i % 3 != 1]
    # b: broadcasts and send_to_user (i % 3 == 1)
    got_b = await recv_n(b, 40)
    assert [m["i"] for m in got_b] == [i for i in range(n) if i % 3 != 2]
    await asyncio.wait_for(asyncio.gather(*pongs), 10)
    await a.close()
    await b.close()


@run
async def test_stuck_client_is_closed_and_others_get_everything(server: int) -> None:
    a = await join(server, "stuck", "a")
    b = await join(server, "stuck", "b", compress=False)
    stuck = await rawws.handshake(server, "/ws/stuck/s", rcvbuf=4096)
    before = debug(server)["closed"].get("slow_consumer", 0)
    try:
        # 200 x 16 KB broadcasts: far more than the stuck client's pipes hold
        for _ in range(4):
            await a.send(json.dumps({"op": "bcast", "n": 50, "size": 8000, "tag": "x"}))
        for ws in (a, b):
            got = await recv_n(ws, 200)
            assert [m["i"] for m in got] == list(range(50)) * 4
        for _ in range(100):
            if debug(server)["closed"].get("slow_consumer", 0) == before + 1:
                break
            await asyncio.sleep(0.1)
        assert debug(server)["closed"].get("slow_consumer", 0) == before + 1
    finally:
        stuck.close()
        await a.close()
        await b.close()


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames, pos = [], 0
    while pos + 2 <= len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[pos : pos + 2])
            pos += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[pos : pos + 8])
            pos += 8
        frames.append((opcode, data[pos : pos + n]))
        pos += n
    return frames


@run
async def test_nothing_written_after_client_close(server: int) -> None:
    loop = asyncio.get_running_loop()
    a = await join(server, "gone", "a")
    raw = await rawws.handshake(server, "/ws/gone/r")
    try:
        # the endpoint stops receiving, so the entry stays registered after the close
        await loop.sock_sendall(raw, rawws.frame(json.dumps({"op": "sleep", "seconds": 1.5}).encode()))
        await asyncio.sleep(0.2)
        await loop.sock_sendall(raw, rawws.frame(struct.pack("!H", 1000), opcode=8))
        await asyncio.sleep(0.2)
        for i in range(3):
            await a.send(json.dumps({"op": "count", "tag": f"t{i}"}))
            got = json.loads(await asyncio.wait_for(a.recv(), 5))
            assert got == {"tag": f"t{i}"}
            assert json.loads(await asyncio.wait_for(a.recv(), 5)) == {"delivered": 1}
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(raw, 65536), 10):
            data += chunk
        assert [op for op, _ in parse_frames(data)] == [8]  # only the close reply
    finally:
        raw.close()
        await a.close()


@pytest.mark.parametrize(
    "env",
    [{"COUNT_SENDS": "1"}, {"DIRECT_FRAMES": "0"}],
    ids=["send-wrapping-middleware", "option-off"],
)
@run
async def test_ordinary_path(env: dict[str, str]) -> None:
    with uvicorn_server(APP, env=env) as (port, _):
        clients = await broadcast_roundtrip(port, "plain")
        info = debug(port)
        assert info["resolved_direct"] == 0
        if "COUNT_SENDS" in env:
            assert info["sends"] == 3 * 53  # the middleware saw every message
        for ws in clients:
            await ws.close()
