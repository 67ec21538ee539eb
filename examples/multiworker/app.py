"""A lobby chat that runs on many worker processes (and machines) at once.

    redis-server &                                   # or any Redis you run
    REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn examples.multiworker.app:app --workers 4 --port 8000

Every worker is one node of the cluster: whichever worker a socket lands on,
a chat message reaches the whole lobby, a direct message reaches the user,
``max_per_lobby`` holds across workers, and ``/stats`` answers for the
cluster (``/stats?local=1`` for the worker that served the request).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect

from wsmanager import ConnectionManager
from wsmanager.backends.redis import RedisBackend

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
LEASE = float(os.environ.get("WSMANAGER_LEASE_SECONDS", "10"))

manager = ConnectionManager(
    max_connections=10_000,
    max_per_lobby=50,
    backend=RedisBackend(REDIS_URL, namespace=os.environ.get("CHAT_NAMESPACE", "chat"), lease=LEASE),
)


# starts the heartbeat and joins the cluster (never fails: serves locally until
# Redis answers); on SIGTERM closes this worker's sockets with 1001 and leaves
# the cluster, so its connections stop counting at once
app = FastAPI(title="wsmanager multi-worker chat", lifespan=manager.lifespan)


@app.get("/stats")
async def stats(local: bool = False) -> dict[str, Any]:
    return {"worker_pid": os.getpid(), **manager.get_stats(local=local)}


@app.websocket("/ws/{lobby_code}")
async def lobby_socket(websocket: WebSocket, lobby_code: str, user: str = Query(...)) -> None:
    if not user or len(user) > 64:
        await websocket.close(code=4001, reason="unauthorized")
        return
    ok, reason = manager.can_accept_connection(lobby_code)
    if not ok:
        await websocket.close(code=4002, reason=reason)
        return
    if not await manager.connect(websocket, lobby_code, user):
        return
    try:
        await websocket.send_json({"type": "welcome", "worker_pid": os.getpid()})
        await manager.broadcast_to_lobby(lobby_code, {"type": "joined", "user": user}, exclude_user_id=user)
        while True:
            data = await websocket.receive_json()
            manager.update_last_message(user)
            kind = data.get("type")
            if kind == "health_pong":
                manager.record_pong(user)
            elif kind == "dm":
                text = data.get("text")
                await manager.send_to_user(str(data.get("to")), {"type": "dm", "from": user, "text": text})
            elif kind == "chat":
                text = data.get("text")
                await manager.broadcast_to_lobby(lobby_code, {"type": "chat", "from": user, "text": text})
    except (WebSocketDisconnect, ValueError):  # left, or sent something that is not JSON
        pass
    finally:
        if manager.disconnect(websocket) is not None:
            await manager.broadcast_to_lobby(lobby_code, {"type": "left", "user": user})
