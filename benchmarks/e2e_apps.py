"""The three servers of bench_e2e.py, each a lobby chat that broadcasts every
``chat`` message to the sender's lobby.

* ``wsmanager``: ``manager.serve()`` and ``broadcast_to_lobby``.
* ``baseline``: the pattern's endpoint and its plain-Python
  ``ConnectionManager`` (a set per lobby, ``json.dumps``, one awaited send
  after the other), as written in the seed.
* ``socketio``: python-socketio's ``AsyncServer`` (ASGI), ``emit`` to a room.

Each also takes ``{"type": "fill", "to": user, "n": n, "size": bytes}``: n
direct messages to one user (the stuck member), to fill its pipes before
measuring.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

# The seed's ConnectionManager, as bench_core measures it (this file runs as a
# script from benchmarks/, where baseline.py is).
from baseline import BaselineManager
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsmanager import ConnectionManager

MAX = 5000


# ------------------------------------------------------------------ wsmanager

manager = ConnectionManager(max_connections=MAX, max_per_lobby=MAX)


async def _wsm_handle(lobby: str, user: str, data: dict[str, Any]) -> None:
    kind = data.get("type")
    if kind == "chat":
        await manager.broadcast_to_lobby(
            lobby, {"type": "chat", "from": user, "seq": data.get("seq"), "ts": data.get("ts")}
        )
    elif kind == "fill":
        text = "x" * int(data["size"])
        for _ in range(int(data["n"])):
            await manager.send_to_user(str(data["to"]), {"type": "fill", "text": text})


async def _wsm_endpoint(websocket: WebSocket) -> None:
    lobby = websocket.path_params["lobby"]
    await manager.serve(websocket, lobby, websocket.query_params.get("token"), _wsm_handle)


wsmanager_app = Starlette(routes=[WebSocketRoute("/ws/{lobby}", _wsm_endpoint)])


# ------------------------------------------------------------------- baseline


seed = BaselineManager(max_connections=MAX, max_per_lobby=MAX)


async def _seed_endpoint(websocket: WebSocket) -> None:
    lobby_code = websocket.path_params["lobby"]
    user_id = websocket.query_params.get("token")
    if not user_id:
        await websocket.close(code=4001, reason="unauthorized")
        return
    can_accept, reason = seed.can_accept_connection(lobby_code)
    if not can_accept:
        await websocket.close(code=4002, reason=reason)
        return
    await seed.connect(websocket, lobby_code, user_id)
    try:
        while True:
            data = await websocket.receive_json()
            seed.update_last_message(user_id)
            if data.get("type") == "chat":
                await seed.broadcast_to_lobby(
                    lobby_code,
                    {"type": "chat", "from": user_id, "seq": data.get("seq"), "ts": data.get("ts")},
                )
            elif data.get("type") == "fill":
                text = "x" * int(data["size"])
                for _ in range(int(data["n"])):
                    await seed.send_to_user(str(data["to"]), {"type": "fill", "text": text})
    except WebSocketDisconnect:
        seed.disconnect(websocket)


baseline_app = Starlette(routes=[WebSocketRoute("/ws/{lobby}", _seed_endpoint)])


# ------------------------------------------------------------------- socketio


def make_socketio_app() -> Any:
    import socketio

    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=None)
    lobby_of: dict[str, str] = {}
    sid_of: dict[str, str] = {}

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        lobby, user = query["lobby"][0], query["token"][0]
        lobby_of[sid] = lobby
        sid_of[user] = sid
        await sio.enter_room(sid, lobby)

    @sio.event  # type: ignore[untyped-decorator]
    async def disconnect(sid: str, *args: Any) -> None:
        lobby_of.pop(sid, None)

    @sio.event  # type: ignore[untyped-decorator]
    async def chat(sid: str, data: dict[str, Any]) -> None:
        await sio.emit(
            "chat", {"from": sid, "seq": data.get("seq"), "ts": data.get("ts")}, room=lobby_of[sid]
        )

    @sio.event  # type: ignore[untyped-decorator]
    async def fill(sid: str, data: dict[str, Any]) -> None:
        text = "x" * int(data["size"])
        for _ in range(int(data["n"])):
            await sio.emit("fill", {"text": text}, to=sid_of[str(data["to"])])

    return socketio.ASGIApp(sio)


def app_for(kind: str) -> Any:
    if kind == "wsmanager":
        return wsmanager_app
    if kind == "baseline":
        return baseline_app
    if kind == "socketio":
        return make_socketio_app()
    raise ValueError(kind)


if __name__ == "__main__":  # python benchmarks/e2e_apps.py KIND PORT [CPU]
    import sys

    import uvicorn

    kind, port = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(sys.argv[3])})
    uvicorn.run(app_for(kind), host="127.0.0.1", port=port, log_level="warning")
