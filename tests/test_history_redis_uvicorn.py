"""History and recovery across real uvicorn nodes and a real redis-server
(issue 12): a client offline for N messages gets exactly those N, then live
ones, after reconnecting to the other node; the same after the node that
served it was killed with -9 and restarted; ``recovered: false`` once Redis
restarted empty (a new epoch) or the gap exceeds the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.redis_server import RedisServer, redis_server
from tests.servers import uvicorn_server

pytestmark = pytest.mark.slow

_namespaces = itertools.count()
APP = "tests.history_cluster_app:app"


def env_for(url: str, namespace: str, size: int = 100) -> dict[str, str]:
    return {
        "WSMANAGER_REDIS_URL": url,
        "WSMANAGER_REDIS_NAMESPACE": namespace,
        "WSMANAGER_LEASE_SECONDS": "2",
        "HISTORY_SIZE": str(size),
    }


@contextlib.contextmanager
def nodes(env: dict[str, str], n: int = 2) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(uvicorn_server(APP, env=env)) for _ in range(n)]


def announce(port: int, start: int, n: int, lobby: str = "room") -> None:
    url = f"http://127.0.0.1:{port}/announce/{lobby}?start={start}&n={n}"
    req = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.load(resp) == {"sent": n}


async def receive(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages (bounded wait: a missing one fails)."""
    return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(count)]


async def open_client(port: int, user: str, since: tuple[str, int] | None = None) -> ClientConnection:
    query = f"user={user}" + (f"&since={since[0]}:{since[1]}" if since else "")
    return await connect(f"ws://127.0.0.1:{port}/ws/room?{query}")


def pos(message: dict[str, Any]) -> tuple[str, int]:
    return message["_pos"]["epoch"], message["_pos"]["offset"]


def test_offline_for_n_gets_exactly_those_n_then_live_on_the_other_node(redis: RedisServer) -> None:
    with nodes(env_for(redis.url, f"hu{next(_namespaces)}")) as [(p1, _), (p2, _)]:

        async def main() -> None:
            ws = await open_client(p1, "ann")
            (first,) = await receive(ws, 1)
            assert first["type"] == "lobby_position"
            await asyncio.to_thread(announce, p1, 0, 3)
            seen = await receive(ws, 3)
            assert [m["n"] for m in seen] == [0, 1, 2]
            last = pos(seen[-1])
            await ws.close()
            await asyncio.to_thread(announce, p2, 3, 5)  # offline for 5
            ws2 = await open_client(p2, "ann", last)
            got = await receive(ws2, 6)
            assert [m["n"] for m in got[:5]] == [3, 4, 5, 6, 7]
            assert [pos(m)[1] for m in got[:5]] == [last[1] + i for i in range(1, 6)]
            assert got[5]["type"] == "recovery" and got[5]["recovered"] is True
            await asyncio.to_thread(announce, p1, 8, 2)  # live, from the first node
            live = await receive(ws2, 2)
            assert [m["n"] for m in live] == [8, 9] and pos(live[0])[1] == last[1] + 6
            await ws2.close()

        asyncio.run(main())


def test_recovery_after_the_serving_node_was_killed_and_restarted(redis: RedisServer) -> None:
    env = env_for(redis.url, f"hu{next(_namespaces)}")
    with contextlib.ExitStack() as stack:
        p2, _ = stack.enter_context(uvicorn_server(APP, env=env))
        p1, proc1 = stack.enter_context(uvicorn_server(APP, env=env))

        async def main() -> None:
            ws = await open_client(p1, "bea")
            await receive(ws, 1)
            await asyncio.to_thread(announce, p1, 0, 2)
            last = pos((await receive(ws, 2))[-1])
            proc1.kill()  # kill -9: the client's connection dies with it
            await asyncio.to_thread(proc1.wait)
            await ws.close()
            await asyncio.to_thread(announce, p2, 2, 4)  # while the first node is down
            await asyncio.to_thread(stack.enter_context, uvicorn_server(APP, env=env, port=p1))
            ws2 = await open_client(p1, "bea", last)
            got = await receive(ws2, 5)
            assert [m["n"] for m in got[:4]] == [2, 3, 4, 5]
            assert got[4]["type"] == "recovery" and got[4]["recovered"] is True
            await asyncio.to_thread(announce, p2, 6, 1)
            (live,) = await receive(ws2, 1)
            assert live["n"] == 6 and pos(live) == (last[0], last[1] + 5)
            await ws2.close()

        asyncio.run(main())


def test_recovered_false_after_redis_restarted_empty_or_a_gap_beyond_the_history() -> None:
    with redis_server() as redis, nodes(env_for(redis.url, "hx", size=3)) as [(p1, _), (p2, _)]:

        async def main() -> None:
            ws = await open_client(p1, "cid")
            await receive(ws, 1)
            await asyncio.to_thread(announce, p1, 0, 1)
            (m,) = await receive(ws, 1)
            await ws.close()
            await asyncio.to_thread(announce, p2, 1, 4)  # 4 missed > history_size 3
            ws2 = await open_client(p2, "cid", pos(m))
            (rec,) = await receive(ws2, 1)
            assert rec["type"] == "recovery" and rec["recovered"] is False
            await asyncio.to_thread(announce, p2, 5, 1)
            (live,) = await receive(ws2, 1)
            assert live["n"] == 5 and pos(live) == (rec["epoch"], rec["offset"] + 1)
            await ws2.close()
            await asyncio.to_thread(redis.kill)
            await asyncio.to_thread(redis.start)  # empty: the history (and its epoch) is lost
            for _ in range(500):  # the nodes reconnect by themselves
                stats = [await asyncio.to_thread(_stats, p) for p in (p1, p2)]
                if all(s["backplane"]["up"] and s["backplane"]["outages"] for s in stats):
                    break
                await asyncio.sleep(0.02)
            ws3 = await open_client(p1, "cid", pos(live))
            (rec3,) = await receive(ws3, 1)
            assert rec3["type"] == "recovery" and rec3["recovered"] is False
            assert rec3["epoch"] != live["_pos"]["epoch"] and rec3["offset"] == 0
            await asyncio.to_thread(announce, p2, 6, 1)
            (new,) = await receive(ws3, 1)
            assert pos(new) == (rec3["epoch"], 1)
            await ws3.close()

        asyncio.run(main())


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        return dict(json.load(resp))
