"""Three endpoint styles on one manager, for the liveness tests on a real
uvicorn server: a push-only endpoint (connects, then never reads), the seed's
loop and ``serve()``, whose handlers can call ``ping_user()``.

Settings come from the environment: WSM_TEST_PING_INTERVAL and
WSM_TEST_PING_TIMEOUT (seconds, or "none" for no heartbeat)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect

from wsmanager import ConnectionManager, Stats

__all__ = ["app", "manager"]


def _seconds(name: str, default: str) -> float | None:
    raw = os.environ.get(name, default)
    return None if raw == "none" else float(raw)


manager = ConnectionManager(
    max_connections=100,
    max_per_lobby=100,
    ping_interval=_seconds("WSM_TEST_PING_INTERVAL", "0.3"),
    ping_timeout=_seconds("WSM_TEST_PING_TIMEOUT", "0.5"),
)
app = FastAPI(lifespan=manager.lifespan)


async def handle_message(lobby_code: str, user_id: str, data: dict[str, Any]) -> None:
    kind = data.get("type")
    if kind == "ping_me":  # the handler awaits a round trip to its own client
        ok, latency = await manager.ping_user(user_id, timeout=float(data.get("timeout", 2.0)))
        await manager.send_to_user(user_id, {"type": "pinged", "ok": ok, "latency_ms": latency})
    elif kind == "hold":  # a slow handler: the client keeps sending meanwhile
        await asyncio.sleep(float(data.get("seconds", 0.5)))
        await manager.send_to_user(user_id, {"type": "held"})
    else:
        await manager.send_to_user(user_id, {"type": "echo", "data": data})


@app.websocket("/push/{lobby_code}")
async def push_only(websocket: WebSocket, lobby_code: str, token: str = Query(...)) -> None:
    """Connects, then only pushes (from the /notify route): never reads."""
    if not await manager.connect(websocket, lobby_code, token):
        return
    try:
        await asyncio.Event().wait()
    finally:
        manager.disconnect(websocket)


@app.websocket("/seed/{lobby_code}")
async def seed_loop(websocket: WebSocket, lobby_code: str, token: str = Query(...)) -> None:
    """The seed's endpoint loop."""
    user_id = token
    await manager.connect(websocket, lobby_code, user_id)
    try:
        while True:
            data = await websocket.receive_json()
            manager.update_last_message(user_id)
            if data.get("type") == "health_pong":
                manager.record_pong(user_id)
                continue
            await handle_message(lobby_code, user_id, data)
    except WebSocketDisconnect:
        manager.disconnect(websocket)


@app.websocket("/serve/{lobby_code}")
async def served(websocket: WebSocket, lobby_code: str, token: str = Query(...)) -> None:
    await manager.serve(websocket, lobby_code, token, handle_message)


@app.get("/notify/{lobby_code}")
async def notify(lobby_code: str) -> dict[str, int]:
    return {"sent": await manager.broadcast_to_lobby(lobby_code, {"type": "notice"})}


@app.get("/stats")
async def stats() -> Stats:
    return manager.get_stats()
