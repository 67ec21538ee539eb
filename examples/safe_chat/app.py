"""A lobby chat on ``manager.serve()`` with a graceful-shutdown lifespan.

    uvicorn examples.safe_chat.app:app

``serve()`` replaces the hand-written receive loop: refusals are
accept-then-close (browsers see 4001 / 4002 / 4008 and the reason), bad input
gets an error message or a documented close code, the entry is always
removed. ``lifespan=manager.lifespan`` makes SIGTERM / Ctrl-C close every
connection with 1001 "server_shutdown" after flushing queued messages, before
uvicorn stops.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, WebSocket

from wsmanager import ConnectionManager, Stats

manager = ConnectionManager(
    max_connections=500,
    max_per_lobby=50,
    rate_limit=20,  # messages/s per connection, bursts of 20
    allowed_origins=None,  # e.g. {"https://chat.example.com"} against cross-site hijacking
    shutdown_timeout=10,
)

app = FastAPI(title="wsmanager safe chat", lifespan=manager.lifespan)


async def authenticate(token: str) -> str | None:
    """Your token check; here any non-empty name up to 64 characters."""
    name = token.strip()
    return name if 0 < len(name) <= 64 else None


async def handle_message(lobby_code: str, user_id: str, data: dict[str, Any]) -> None:
    """Called for each valid JSON object; pings and pongs never get here."""
    if data.get("type") == "chat":
        text = str(data.get("text", ""))[:500]
        await manager.broadcast_to_lobby(lobby_code, {"type": "chat", "from": user_id, "text": text})
    elif data.get("type") == "dm":
        dm = {"type": "dm", "from": user_id, "text": data.get("text")}
        await manager.send_to_user(str(data.get("to")), dm)


@app.websocket("/ws/{lobby_code}")
async def lobby_socket(websocket: WebSocket, lobby_code: str, token: str = Query("")) -> None:
    await manager.serve(websocket, lobby_code, await authenticate(token), handle_message)


@app.get("/stats")
async def stats() -> Stats:
    return manager.get_stats()
