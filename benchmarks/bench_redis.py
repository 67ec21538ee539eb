"""Cross-node delivery through the Redis backplane, next to in-process delivery.

    python benchmarks/bench_redis.py [--messages 20000] [--pings 2000]

Starts its own redis-server on a free 127.0.0.1 port. Every row delivers
``{"i": n}`` from one sender to one recipient connection (a sink that records
when ``send_text`` is called) and reports:

* unloaded latency (p50 / p99, microseconds): one message at a time, the next
  one sent when the previous one arrived;
* throughput (messages/s): ``--messages`` broadcasts back to back, until the
  last one arrived (cross-node: queued, pipelined, fanned out by Redis).

Rows:
  in-process           in-memory backend (the default), recipient on this node
  in-process (before)  the broadcast_to_lobby of the commit before the backend
                       seam, same manager: the cost of the seam on the local path
  local, redis backend the Redis backend configured, recipient on this node
  cross-node, 1 proc   two nodes (two managers, two Redis connections) in this
                       process: sender and receiver share one core and loop
  cross-node, 2 procs  the receiving node in a subprocess (latency measured
                       with CLOCK_MONOTONIC, common to both processes)
Ratios are against the in-process row of the same run.

Routing (``--routing-messages``, 0 to skip): 4 receiving nodes, each serving
a disjoint quarter of ``--lobbies`` lobbies (one member per lobby), and a
fifth node broadcasting ``{"i": n}`` to the lobbies in turn, one at a time
(the next when the previous arrived). Reported per design: bytes received
per node on the backplane (``received_bytes``: what Redis pushed to it), the
ratio against the one-bus design, and p50 / p99 of cross-node delivery.
  per-lobby channels   this version: a node subscribes to its lobbies' channels
  one bus channel      the design before: every lobby on one channel that every
                       node subscribes to (same code, every channel name mapped
                       to one)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starlette.websockets import WebSocketState  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402
from wsmanager import ConnectionManager, dumps  # noqa: E402
from wsmanager.backends.redis import RedisBackend  # noqa: E402


class Sink:
    """A connected websocket that records when each message reached it."""

    application_state = WebSocketState.CONNECTED  # connect() skips accept()

    def __init__(self) -> None:
        self.times: list[float] = []
        self.arrived = asyncio.Event()
        self.expect = 0

    async def send_text(self, data: str) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) >= self.expect:
            self.arrived.set()


class Before(ConnectionManager):
    """broadcast_to_lobby as it was before the backend seam (commit e2409b5)."""

    async def broadcast_to_lobby(
        self,
        lobby_code: str,
        message: Any,
        exclude_user_id: str | None = None,
        *,
        default: Callable[[Any], Any] | None = None,
    ) -> int:
        if not self._lobby_count(lobby_code):
            return 0
        return await self.delivery.deliver_lobby(lobby_code, dumps(message), exclude_user_id)


async def settle(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the cluster did not settle")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1e6


async def measure(sender: ConnectionManager, sink: Sink, pings: int, messages: int) -> dict[str, float]:
    async def burst(n: int) -> float:
        start = len(sink.times)
        sink.expect = start + n
        sink.arrived.clear()
        t0 = time.perf_counter()
        for i in range(n):
            await sender.broadcast_to_lobby("bench", {"i": i}, exclude_user_id="sender")
        await asyncio.wait_for(sink.arrived.wait(), 120)
        return n / (sink.times[-1] - t0)

    await burst(min(messages, 2000))  # warm-up
    # unloaded latency
    lat = []
    for i in range(pings):
        sink.expect = len(sink.times) + 1
        sink.arrived.clear()
        t0 = time.perf_counter()
        await sender.broadcast_to_lobby("bench", {"i": i}, exclude_user_id="sender")
        await asyncio.wait_for(sink.arrived.wait(), 10)
        lat.append(sink.times[-1] - t0)
    # throughput: median of three bursts
    rate = statistics.median([await burst(messages) for _ in range(3)])
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "rate": rate}


async def local_row(manager: ConnectionManager, pings: int, messages: int) -> dict[str, float]:
    sink = Sink()
    await manager.connect(sink, "bench", "receiver")  # type: ignore[arg-type]
    await manager.connect(Sink(), "bench", "sender")  # type: ignore[arg-type]
    return await measure(manager, sink, pings, messages)


async def cross_row(url: str, ns: str, pings: int, messages: int) -> dict[str, float]:
    a = ConnectionManager(backend=RedisBackend(url, namespace=ns, max_backlog=10 * messages))
    b = ConnectionManager(backend=RedisBackend(url, namespace=ns))
    await a.start()
    await b.start()
    sink = Sink()
    await b.connect(sink, "bench", "receiver")  # type: ignore[arg-type]
    await a.connect(Sink(), "bench", "sender")  # type: ignore[arg-type]
    await settle(lambda: a.get_stats()["total_connections"] == 2)
    try:
        return await measure(a, sink, pings, messages)
    finally:
        await a.stop()
        await b.stop()


# --- the receiving node in its own process ---------------------------------


async def receiver_main(url: str, ns: str, expect: int) -> None:
    node = ConnectionManager(backend=RedisBackend(url, namespace=ns))
    await node.start()
    sink = Sink()
    sink.expect = expect
    await node.connect(sink, "bench", "receiver")  # type: ignore[arg-type]
    print("ready", flush=True)
    await asyncio.wait_for(sink.arrived.wait(), 300)
    print(json.dumps(sink.times), flush=True)
    await node.stop()


async def two_process_row(url: str, ns: str, pings: int, messages: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--receiver",
        url,
        ns,
        str(pings + messages),
        stdout=subprocess.PIPE,
        limit=1 << 26,
    )
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    a = ConnectionManager(backend=RedisBackend(url, namespace=ns, max_backlog=10 * messages))
    await a.start()
    await a.connect(Sink(), "bench", "sender")  # type: ignore[arg-type]
    await settle(lambda: a.get_stats()["total_connections"] == 2)
    sent: list[float] = []
    # unloaded: pace by a fixed gap well above the latency (no feedback channel)
    for i in range(pings):
        sent.append(time.perf_counter())
        await a.broadcast_to_lobby("bench", {"i": i}, exclude_user_id="sender")
        await asyncio.sleep(0.002)
    t0 = time.perf_counter()
    for i in range(messages):
        await a.broadcast_to_lobby("bench", {"i": i}, exclude_user_id="sender")
    times = json.loads(await proc.stdout.readline())
    await proc.wait()
    await a.stop()
    lat = [r - s for r, s in zip(times[:pings], sent, strict=True)]
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "rate": messages / (times[-1] - t0)}


class OneBus(RedisBackend):
    """The design before per-lobby routing: one channel for every lobby and user."""

    def lobby_channel(self, lobby: str) -> bytes:
        return f"{self.namespace}:bus-all".encode()

    def user_channel(self, user: str) -> bytes:
        return f"{self.namespace}:bus-all".encode()


async def routing_row(
    url: str, ns: str, backend: type[RedisBackend], lobbies: int, messages: int
) -> dict[str, Any]:
    cap = 10 * lobbies
    out = backend(url, namespace=ns, max_backlog=10 * messages)
    sender = ConnectionManager(backend=out, max_connections=cap)
    nodes = [ConnectionManager(backend=backend(url, namespace=ns), max_connections=cap) for _ in range(4)]
    for node in (sender, *nodes):
        await node.start()
    sinks: list[Sink] = []
    for j in range(lobbies):
        sink = Sink()
        await nodes[j % 4].connect(sink, f"r{j}", f"u{j}")  # type: ignore[arg-type]
        sinks.append(sink)
    await settle(lambda: sender.get_stats()["total_connections"] == lobbies)
    try:
        before = [node.get_stats()["backplane"]["received_bytes"] for node in nodes]
        lat = []
        for k in range(messages):
            sink = sinks[k % lobbies]
            sink.expect = len(sink.times) + 1
            sink.arrived.clear()
            t0 = time.perf_counter()
            await sender.broadcast_to_lobby(f"r{k % lobbies}", {"i": k})
            await asyncio.wait_for(sink.arrived.wait(), 10)
            lat.append(sink.times[-1] - t0)
        after = [node.get_stats()["backplane"]["received_bytes"] for node in nodes]
        got = [a - b for a, b in zip(after, before, strict=True)]
        return {"bytes": got, "p50": pct(lat, 50), "p99": pct(lat, 99)}
    finally:
        for node in (sender, *nodes):
            await node.stop()


async def routing(lobbies: int, messages: int) -> None:
    server = RedisServer()
    server.start()
    try:
        rows = [
            ("one bus channel", await routing_row(server.url, "bus", OneBus, lobbies, messages)),
            ("per-lobby channels", await routing_row(server.url, "lob", RedisBackend, lobbies, messages)),
        ]
    finally:
        server.close()
    base = statistics.mean(rows[0][1]["bytes"])
    print(f"routing: 4 nodes x {lobbies // 4} lobbies, {messages} broadcasts from a fifth node")
    print("| design              | bytes received per node (min-max) | ratio vs one bus | p50 µs | p99 µs |")
    print("|---------------------|----------------------------------:|-----------------:|-------:|-------:|")
    for name, r in rows:
        mean = statistics.mean(r["bytes"])
        span = f"{mean:,.0f} ({min(r['bytes']):,}-{max(r['bytes']):,})"
        print(f"| {name:<19} | {span:>33} | {mean / base:15.3f}x | {r['p50']:6.1f} | {r['p99']:6.1f} |")


async def main(pings: int, messages: int) -> None:
    server = RedisServer()
    server.start()
    try:
        rows: list[tuple[str, dict[str, float]]] = []
        rows.append(("in-process", await local_row(ConnectionManager(), pings, messages)))
        rows.append(("in-process (before)", await local_row(Before(), pings, messages)))
        again = await local_row(ConnectionManager(), pings, messages)  # noise check: same as row 1
        rows.append(("in-process, again", again))
        redis_local = ConnectionManager(backend=RedisBackend(server.url, namespace="local"))
        await redis_local.start()
        rows.append(("local, redis backend", await local_row(redis_local, pings, messages)))
        await redis_local.stop()
        rows.append(("cross-node, 1 proc", await cross_row(server.url, "x1", pings, messages)))
        rows.append(("cross-node, 2 procs", await two_process_row(server.url, "x2", pings, messages)))
    finally:
        server.close()
    base = rows[0][1]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {pings} pings, {messages} messages")
    print(f"| {'path':<22} | p50 µs | p99 µs | msgs/s    | p50 ratio | msgs/s ratio |")
    print(f"|{'-' * 24}|-------:|-------:|----------:|----------:|-------------:|")
    for name, r in rows:
        print(
            f"| {name:<22} | {r['p50']:6.1f} | {r['p99']:6.1f} | {r['rate']:9,.0f} |"
            f" {r['p50'] / base['p50']:8.2f}x | {r['rate'] / base['rate']:11.2f}x |"
        )
    spread = statistics.pstdev([rows[0][1]["rate"], rows[2][1]["rate"]]) / base["rate"]
    print(f"in-process run-to-run spread of msgs/s: {spread:.1%}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--receiver":
        asyncio.run(receiver_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--pings", type=int, default=2_000)
    parser.add_argument("--lobbies", type=int, default=1_000)
    parser.add_argument("--routing-messages", type=int, default=4_000)
    parser.add_argument("--routing-only", action="store_true", help="only the routing table")
    args = parser.parse_args()
    if not args.routing_only:
        asyncio.run(main(args.pings, args.messages))
    if args.routing_messages:
        asyncio.run(routing(args.lobbies, args.routing_messages))
