"""The cost of history with the Redis backplane (issue 12), history off as the
baseline in the same run, and the Redis commands per published message.

    python benchmarks/bench_history_redis.py [--messages 5000] [--members 10]

Starts its own redis-server on a free 127.0.0.1 port. Two nodes (two
managers) in this process; ``--members`` connections in one lobby, half on
each node; node A broadcasts ``--messages`` ``{"type": "note", "i": n}`` back
to back; the row's time runs until every member got every message. Rows:
history off (the plain backplane: A delivers locally, publishes to B) and
``history_size=100`` (one script per message: offset, XADD, SPUBLISH; every
member, A's too, gets it from the channel). Commands per message: Redis'
``INFO commandstats`` calls (scripts' inner commands included) during the
broadcasts, divided by the messages.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.asgi_fakes import FakePeer
from tests.servers import free_port, wait_for_port
from wsmanager import ConnectionManager
from wsmanager.backends.redis import RedisBackend


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {k: int(v["calls"]) for k, v in info.items()}


async def row(url: str, ns: str, history: bool, messages: int, members: int) -> tuple[float, dict[str, int]]:
    size = 100 if history else None
    nodes = [
        ConnectionManager(backend=RedisBackend(url, namespace=ns, connect_timeout=5), history_size=size)
        for _ in range(2)
    ]
    for node in nodes:
        await node.start()
    peers = []
    for i in range(members):
        peer = FakePeer()
        assert await nodes[i % 2].connect(peer.ws, "room", f"u{i}")
        peers.append(peer)
    await asyncio.sleep(0.3)  # views and subscriptions settled
    client = aioredis.Redis.from_url(url)
    before = await commandstats(client)
    want = messages + (1 if history else 0)  # + the lobby_position message
    start = time.perf_counter()
    for i in range(messages):
        await nodes[0].broadcast_to_lobby("room", {"type": "note", "i": i})
    while any(sum(f["type"] == "websocket.send" for f in p.frames) < want for p in peers):  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    after = await commandstats(client)
    await client.aclose()
    for node in nodes:
        await node.stop()
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return elapsed, {k: v for k, v in diff.items() if v and k not in ("cmdstat_info",)}


async def main(messages: int, members: int) -> None:
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="wsm-bench-")
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp]
    cmd += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        wait_for_port(port, proc)
        url = f"redis://127.0.0.1:{port}/0"
        off, off_cmds = await row(url, "b-off", False, messages, members)
        on, on_cmds = await row(url, "b-on", True, messages, members)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{messages} broadcasts to a lobby of {members} ({members // 2} per node), 2 nodes, 1 Redis")
    print(f"{'row':<22}{'us/broadcast':>14}{'msgs/s':>10}{'ratio':>8}{'Redis cmds/msg':>16}")
    for name, t, cmds in (("history off", off, off_cmds), ("history_size=100", on, on_cmds)):
        per = sum(cmds.values()) / messages
        print(f"{name:<22}{t / messages * 1e6:>14.1f}{messages / t:>10.0f}{t / off:>8.2f}{per:>16.3f}")
    print("history off:", {k: round(v / messages, 2) for k, v in off_cmds.items()})
    print("commands per message, history on:")
    for k, v in sorted(on_cmds.items(), key=lambda kv: -kv[1]):
        print(f"  {k.removeprefix('cmdstat_'):<12}{v / messages:>6.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--members", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(main(args.messages, args.members))
