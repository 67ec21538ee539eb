"""One node of a cluster with history on (issue 12), for
tests/test_history_redis_uvicorn.py.

Its manager joins the Redis backplane named by ``WSMANAGER_REDIS_URL`` (the
test sets it, with a namespace and a short lease) with
``history_size=HISTORY_SIZE`` (default 100).

WebSocket ``/ws/{lobby}?user=U[&since=<epoch>:<offset>]``: connects with that
position (``wsmanager.history.parse_since_param``) and then only reads.
HTTP ``/announce/{lobby}?start=S&n=N``: broadcasts ``{"type": "note", "n": i}``
for i in S..S+N-1, in order; ``/stats``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsmanager import ConnectionManager
from wsmanager.backends import backend_from_env
from wsmanager.history import parse_since_param

manager = ConnectionManager(
    history_size=int(os.environ.get("HISTORY_SIZE", "100")),
    backend=backend_from_env(),
)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await manager.start()
    yield
    await manager.stop()


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws/{lobby_code}")
async def ws(websocket: WebSocket, lobby_code: str, user: str, since: str = "") -> None:
    position = parse_since_param(since) if since else None
    if not await manager.connect(websocket, lobby_code, user, since=position):
        return
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(websocket)


@app.post("/announce/{lobby_code}")
async def announce(lobby_code: str, start: int, n: int) -> dict[str, int]:
    for i in range(start, start + n):
        await manager.broadcast_to_lobby(lobby_code, {"type": "note", "n": i})
    return {"sent": n}


@app.get("/stats")
async def stats() -> Any:
    return manager.get_stats()
