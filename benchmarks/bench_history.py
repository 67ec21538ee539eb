"""The cost of history (issue 12) on a broadcast, against history off, same run.

A lobby of ``members`` connections (Starlette WebSockets whose ASGI send
completes at once: the C fan-out path), one manager per configuration,
``broadcast_to_lobby`` awaited in a loop; the best of ``repeat`` runs, in
microseconds per broadcast. Rows:

* ``off``: the default (``history_size=None``), the baseline;
* ``size=100``: each message gets its position and is kept in the ring;
* ``size=100,ttl=60``: the same with an age limit (expiry checked per append);
* ``empty lobby, size=100``: a broadcast to a lobby with no member (kept only).

Usage: ``python benchmarks/bench_history.py [--quick] [--members N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from wsmanager import ConnectionManager


async def _send(message: Any) -> None:
    return None


async def _receive() -> Any:
    await asyncio.Event().wait()


def _socket() -> WebSocket:
    scope = {"type": "websocket", "path": "/", "headers": [], "query_string": b""}
    return WebSocket(scope, receive=_receive, send=_send)


async def _manager(members: int, **kw: Any) -> ConnectionManager:
    m = ConnectionManager(members + 10, members + 10, ping_interval=None, **kw)
    for i in range(members):
        sock = _socket()
        # what connect() does after accept(): reserve and commit, without a handshake
        sock.client_state = sock.application_state = WebSocketState.CONNECTED
        assert m._reserve(sock, "L", f"u{i}") == ""
        assert m._commit(sock)
    return m


async def _time(m: ConnectionManager, lobby: str, n: int, repeat: int) -> float:
    message = {"type": "chat", "user": "alice", "text": "hello, lobby"}
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            await m.broadcast_to_lobby(lobby, message)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


async def main(quick: bool, members: int) -> None:
    n, repeat = (2_000, 3) if quick else (20_000, 7)
    configs: list[tuple[str, str, dict[str, Any]]] = [
        ("off", "L", {}),
        ("size=100", "L", {"history_size": 100}),
        ("size=100,ttl=60", "L", {"history_size": 100, "history_ttl": 60}),
        ("empty lobby, size=100", "E", {"history_size": 100}),
    ]
    managers = [(label, lobby, await _manager(members, **kw)) for label, lobby, kw in configs]
    results: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    for _ in range(3):  # interleaved rounds: load changes hit every row alike
        for label, lobby, m in managers:
            results[label].append(await _time(m, lobby, n, repeat))
    base = min(results["off"])
    print(f"broadcast to a lobby of {members} (C fan-out path), us per broadcast, best of runs")
    print(f"{'configuration':<24}{'us':>10}{'ratio vs off':>15}")
    for label, values in results.items():
        us = min(values)
        print(f"{label:<24}{us:>10.2f}{us / base:>15.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--members", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.quick, args.members))
