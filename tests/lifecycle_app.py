"""A seed-style app behind a middleware that holds every handshake inside
``accept()`` until the manager is shutting down: the window in which a
``shutdown()`` used to let handshakes commit after it began.

GET /stats reports the manager's counts; at exit the lifespan writes them to
the file named by WSM_EXIT_FILE (what a user would see after shutdown()).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from wsmanager import ConnectionManager

manager = ConnectionManager(max_connections=100, max_per_lobby=100, ping_interval=None, shutdown_timeout=5)
held = 0  # handshakes waiting inside accept()


class HoldAccept:
    """Pure ASGI middleware whose ``send`` awaits before passing on an
    ``accept`` (as an auth or tracing middleware may)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or scope["path"] != "/ws/held":
            await self.app(scope, receive, send)
            return

        async def held_send(message: Message) -> None:
            global held
            if message["type"] == "websocket.accept":
                held += 1
                # released once shutdown() began (the manager offers no event for it)
                while not manager.shutting_down:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                held -= 1
            await send(message)

        await self.app(scope, receive, held_send)


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    async with manager.lifespan(app):
        yield
    path = os.environ.get("WSM_EXIT_FILE")
    if path:
        stats = manager.get_stats()
        with open(path, "w") as f:  # noqa: ASYNC230 (a few bytes at exit)
            json.dump(
                {
                    "len": len(manager),
                    "total": stats["total_connections"],
                    "pending": stats["pending_connections"],
                },
                f,
            )


app = FastAPI(lifespan=lifespan)
app.add_middleware(HoldAccept)


@app.websocket("/ws/{lobby}")
async def endpoint(websocket: WebSocket, lobby: str, user: str = "") -> None:
    if not await manager.connect(websocket, lobby, user):
        return
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(websocket)


@app.get("/stats")
async def stats() -> dict[str, Any]:
    s = manager.get_stats()
    return {"held": held, "total": s["total_connections"], "pending": s["pending_connections"]}
