"""The seed's FastAPI endpoint, unchanged but for the import of ``manager``.

Only ``authenticate_token`` and ``handle_message``, which the seed leaves to
the application, are written here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect

from wsmanager import Stats, manager

__all__ = ["app", "authenticate_token", "handle_message", "manager", "websocket_endpoint"]

app = FastAPI()


async def authenticate_token(token: str) -> str | None:
    """Tokens are "user:<name>"; anything else is rejected."""
    if token.startswith("user:") and len(token) > 5:
        return token[5:]
    return None


async def handle_message(lobby_code: str, user_id: str, data: dict[str, Any]) -> None:
    if data.get("type") == "dm":
        await manager.send_to_user(data["to"], {"type": "dm", "from": user_id, "text": data.get("text")})
        return
    await manager.broadcast_to_lobby(
        lobby_code, {"type": "chat", "from": user_id, "text": data.get("text")}, exclude_user_id=None
    )


# ---- pasted from the seed (websocket-management.md, "FastAPI Endpoint") ----
@app.websocket("/ws/{lobby_code}")
async def websocket_endpoint(
    websocket: WebSocket,
    lobby_code: str,
    token: str = Query(...),
):
    user_id = await authenticate_token(token)
    if not user_id:
        await websocket.close(code=4001, reason="unauthorized")
        return
    
    can_accept, reason = manager.can_accept_connection(lobby_code)
    if not can_accept:
        await websocket.close(code=4002, reason=reason)
        return
    
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
# ---- end of the seed's endpoint ----


@app.get("/stats")
async def stats() -> Stats:
    return manager.get_stats()
