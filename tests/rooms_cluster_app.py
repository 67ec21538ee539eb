"""One node of a cluster whose connections join and leave lobbies (rooms).

Its manager joins the Redis backplane named by ``WSMANAGER_REDIS_URL`` (the
test sets it, with a namespace and a short lease), with presence events on,
``max_per_lobby`` from ``ROOMS_MAX_PER_LOBBY`` (default 10) and the presence
interval from ``ROOMS_PRESENCE_INTERVAL`` (default 0.2 s).

WebSocket ``/ws/{lobby}?user=U``; a client sends
``{"type": "join" | "leave", "lobby": L}`` (answered with ``{"type":
"joined" | "left", "lobby": L, "ok": bool}``) or ``{"type": "chat", "lobby":
L, "text": t}`` (broadcast to L as ``{"type": "chat", "lobby": L, "from": U,
"text": t}``). HTTP: ``/stats``, ``/lobby/{L}`` (users, cluster and local),
``/channels`` (the pub/sub channels this node is subscribed for).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsmanager import ConnectionManager, Stats
from wsmanager.backends import backend_from_env

manager = ConnectionManager(
    max_connections=1000,
    max_per_lobby=int(os.environ.get("ROOMS_MAX_PER_LOBBY", "10")),
    presence_events=True,
    presence_interval=float(os.environ.get("ROOMS_PRESENCE_INTERVAL", "0.2")),
    backend=backend_from_env(),
)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await manager.start()
    yield
    await manager.stop()


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws/{lobby_code}")
async def rooms(websocket: WebSocket, lobby_code: str, user: str) -> None:
    if not await manager.connect(websocket, lobby_code, user):
        return
    try:
        while True:
            data = await websocket.receive_json()
            kind, lobby = data.get("type"), str(data.get("lobby", ""))
            if kind == "join":
                ok = await manager.join(websocket, lobby)
                await websocket.send_json({"type": "joined", "lobby": lobby, "ok": ok})
            elif kind == "leave":
                ok = manager.leave(websocket, lobby)
                await websocket.send_json({"type": "left", "lobby": lobby, "ok": ok})
            elif kind == "chat":
                message = {"type": "chat", "lobby": lobby, "from": user, "text": data.get("text")}
                await manager.broadcast_to_lobby(lobby, message)
    except WebSocketDisconnect:
        manager.disconnect(websocket)


@app.get("/stats")
async def stats() -> Stats:
    return manager.get_stats()


@app.get("/lobby/{lobby_code}")
async def lobby(lobby_code: str) -> dict[str, Any]:
    return {
        "cluster": sorted(manager.get_lobby_users(lobby_code)),
        "local": sorted(manager.get_lobby_users(lobby_code, local=True)),
    }
