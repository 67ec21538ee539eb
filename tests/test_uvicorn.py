"""The seed's endpoint on a real uvicorn server, with real `websockets` clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.servers import attempt_ws, uvicorn_server
from tests.servers import http_stats as stats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with uvicorn_server("tests.seed_app:app") as (p, _proc):
        yield p


async def wait_stats(port: int, key: str, value: int) -> dict[str, Any]:
    for _ in range(200):
        s = await stats(port)
        if s[key] == value:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} never reached {value}: {s}")


def test_chat_and_direct_message_over_real_sockets(port: int) -> None:
    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/ws/lobbyA?token=user:"
        async with connect(url + "alice") as alice, connect(url + "bob") as bob:
            await wait_stats(port, "total_connections", 2)
            await alice.send(json.dumps({"type": "chat", "text": "héllo"}))
            assert json.loads(await bob.recv()) == {"type": "chat", "from": "alice", "text": "héllo"}
            assert json.loads(await alice.recv())["from"] == "alice"
            await bob.send(json.dumps({"type": "dm", "to": "alice", "text": "psst"}))
            assert json.loads(await alice.recv()) == {"type": "dm", "from": "bob", "text": "psst"}
        await wait_stats(port, "total_connections", 0)

    asyncio.run(main())


def test_concurrent_handshakes_never_overshoot_the_lobby(port: int) -> None:
    async def attempt(i: int) -> ClientConnection | int:
        return await attempt_ws(f"ws://127.0.0.1:{port}/ws/busy?token=user:u{i}")

    async def main() -> None:
        results = await asyncio.gather(*(attempt(i) for i in range(30)))
        admitted = [r for r in results if not isinstance(r, int)]
        assert len(admitted) == 10
        s = await wait_stats(port, "total_connections", 10)
        assert s["active_lobbies"] == 1
        for ws in admitted:
            await ws.close()
        await wait_stats(port, "total_connections", 0)

    asyncio.run(main())
