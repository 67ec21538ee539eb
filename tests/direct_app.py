"""A Starlette app on real uvicorn for tests/test_direct_frames.py.

``/ws/{lobby}/{user}``: ``{"op": "bcast", "n": N, "tag": T}`` broadcasts N
messages to the lobby; ``{"op": "mixed", ...}`` interleaves broadcasts,
``send_to_user`` and the endpoint's own ``send_json``; ``{"op": "sleep"}``
stops receiving for a while. ``/debug``: how many frames went direct and what
the send-counting middleware saw. Env: ``DIRECT_FRAMES=0`` turns the fast path
off, ``COUNT_SENDS=1`` wraps the app in a middleware that counts sends.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsmanager import ConnectionManager

manager = ConnectionManager(
    max_connections=100,
    max_per_lobby=100,
    max_backlog=64,
    max_backlog_bytes=256 * 1024,
    ping_interval=None,
    ping_timeout=None,
    direct_frames=os.environ.get("DIRECT_FRAMES", "1") != "0",
)
counted: dict[str, int] = {"sends": 0}


async def _payload(i: int, tag: str, size: int) -> dict[str, Any]:
    return {"tag": tag, "i": i, "pad": "é" * size}


async def endpoint(websocket: WebSocket) -> None:
    lobby = websocket.path_params["lobby"]
    user = websocket.path_params["user"]
    if not await manager.connect(websocket, lobby, user):
        return
    try:
        while True:
            msg = await websocket.receive_json()
            op = msg["op"]
            size = int(msg.get("size", 8))
            tag = str(msg.get("tag", ""))
            if op == "bcast":
                for i in range(int(msg["n"])):
                    await manager.broadcast_to_lobby(lobby, await _payload(i, tag, size))
            elif op == "mixed":
                target = str(msg["to"])
                for i in range(int(msg["n"])):
                    kind = i % 3
                    if kind == 0:
                        await manager.broadcast_to_lobby(lobby, await _payload(i, tag, size))
                    elif kind == 1:
                        await manager.send_to_user(target, await _payload(i, tag, size))
                    else:
                        await websocket.send_json(await _payload(i, tag, size))
            elif op == "sleep":
                await asyncio.sleep(float(msg["seconds"]))
            elif op == "count":
                n = await manager.broadcast_to_lobby(lobby, {"tag": tag})
                await websocket.send_json({"delivered": n})
    except WebSocketDisconnect:
        pass
    finally:
        manager.disconnect(websocket)


def _direct_count(websocket: Any) -> bool:
    return websocket.__dict__.get("_wsmanager_direct") is not None


async def debug(request: Request) -> JSONResponse:
    ws = list(manager.connection_info)
    return JSONResponse(
        {
            "sends": counted["sends"],
            "resolved_direct": sum(1 for w in ws if _direct_count(w)),
            "connections": len(ws),
            "closed": manager.get_stats()["closed"],
        }
    )


inner = Starlette(routes=[WebSocketRoute("/ws/{lobby}/{user}", endpoint), Route("/debug", debug)])


class CountSends:
    """A user's middleware that wraps ``send`` to count websocket messages."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting(message: Message) -> None:
            if message["type"] == "websocket.send":
                counted["sends"] += 1
            await send(message)

        await self.app(scope, receive, counting)


app: Any = CountSends(inner) if os.environ.get("COUNT_SENDS") == "1" else inner
