"""A FastAPI app on ``manager.serve()`` for the real-socket tests, configured
from WSM_* environment variables, with a /debug view of the server's tasks,
live websockets and memory.

WSM_TRACEMALLOC=1 traces Python allocations (the C core's included: it
allocates through PyMem) from startup, so /debug can report the memory the
process holds at the Python level: unlike the RSS, that figure means the same
with and without AddressSanitizer (whose quarantine and shadow memory make the
RSS of a sanitized process grow by itself)."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from typing import Any

from fastapi import FastAPI, Query, WebSocket
from starlette.websockets import WebSocket as StarletteWebSocket

from wsmanager import ConnectionManager, Stats
from wsmanager.servers import DIRECT_ATTR

if os.environ.get("WSM_TRACEMALLOC") == "1":
    tracemalloc.start()


def _sanitized() -> bool:
    """Whether AddressSanitizer's runtime is loaded in this process."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


SANITIZED = _sanitized()


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


manager = ConnectionManager(
    max_connections=int(_env("WSM_MAX_CONNECTIONS", 2000)),
    max_per_lobby=int(_env("WSM_MAX_PER_LOBBY", 1000)),
    rate_limit=_env("WSM_RATE", 0) or None,
    rate_burst=_env("WSM_BURST", 0) or None,
    rate_limit_close_after=int(_env("WSM_RATE_CLOSE_AFTER", 100)),
    max_backlog=int(_env("WSM_MAX_BACKLOG", 1024)),
    max_backlog_bytes=int(_env("WSM_MAX_BACKLOG_BYTES", 1 << 20)),
    max_message_bytes=int(_env("WSM_MAX_MESSAGE_BYTES", 64 * 1024)),
    close_timeout=_env("WSM_CLOSE_TIMEOUT", 2),
    shutdown_timeout=_env("WSM_SHUTDOWN_TIMEOUT", 5),
    max_per_user=int(_env("WSM_MAX_PER_USER", 0)) or None,
    on_user_limit=os.environ.get("WSM_ON_USER_LIMIT", "refuse"),
)
app = FastAPI(lifespan=manager.lifespan)


async def handle(lobby: str, user: str, data: dict[str, Any]) -> None:
    kind = data.get("type")
    if kind == "chat":
        await manager.broadcast_to_lobby(lobby, {"type": "chat", "from": user, "text": data.get("text")})
    elif kind == "blast":  # many broadcasts at once, to fill the pipes of clients that do not read
        count = max(0, min(int(data.get("n", 1)), 500))
        text = "x" * max(0, min(int(data.get("size", 100)), 32_000))
        for i in range(count):
            await manager.broadcast_to_lobby(lobby, {"type": "blast", "i": i, "text": text})
    elif kind == "whoami":
        await manager.send_to_user(user, {"type": "you", "user": user, "lobby": lobby})
    elif kind == "dm":
        await manager.send_to_user(
            str(data.get("to")), {"type": "dm", "from": user, "text": data.get("text")}
        )


@app.websocket("/ws/{lobby}")
async def ws(websocket: WebSocket, lobby: str, token: str = Query("")) -> None:
    await manager.serve(websocket, lobby, token or None, handle)


@app.websocket("/seed/{lobby}")
async def seed_style(websocket: WebSocket, lobby: str, token: str = Query("")) -> None:
    """The seed's refusals, closed *before* ``accept()`` (what a real server
    turns into an HTTP status), then ``serve()`` as on /ws."""
    if not token:
        await websocket.close(code=4001, reason="unauthorized")
        return
    can_accept, reason = manager.can_accept_connection(lobby)
    if not can_accept:
        await websocket.close(code=4002, reason=reason)
        return
    await manager.serve(websocket, lobby, token, handle)


@app.get("/stats")
async def stats() -> Stats:
    return manager.get_stats()


@app.get("/debug")
async def debug() -> dict[str, Any]:
    gc.collect()
    with open("/proc/self/statm") as f:  # noqa: ASYNC230 (procfs: never blocks)
        rss_pages = int(f.read().split()[1])
    return {
        "tasks": len(asyncio.all_tasks()),
        "websockets": sum(isinstance(o, StarletteWebSocket) for o in gc.get_objects()),
        "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE"),
        # Python-level memory in use (None unless WSM_TRACEMALLOC=1), after the collection above
        "traced_bytes": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
        "sanitized": SANITIZED,
        # open connections whose broadcasts went out as pre-built frames (uvicorn's websockets-sansio)
        "direct": sum(getattr(w, DIRECT_ATTR, None) is not None for w in manager.connection_info),
        "stats": manager.get_stats(),
    }
