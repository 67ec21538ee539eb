"""The two refusals of docs/testing.md, for a real uvicorn (tests/test_docs.py):
a close before accept() (the hand-written pattern's) and serve()'s."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, WebSocket

from wsmanager import ConnectionManager

manager = ConnectionManager()
app = FastAPI(lifespan=manager.lifespan)


@app.websocket("/seed-style")
async def seed_style(websocket: WebSocket) -> None:
    await websocket.close(code=4001, reason="unauthorized")  # before accept()


@app.websocket("/served")
async def served(websocket: WebSocket) -> None:
    async def handle(lobby_code: str, user_id: str, data: dict[str, Any]) -> None: ...

    await manager.serve(websocket, "lobby", None, handle)  # no user: refused
