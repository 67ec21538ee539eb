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

import json
import os
from typing import Any
from urllib.parse import parse_qs

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


class SeedManager:
    """The seed's ConnectionManager: its data structures and its sends."""

    def __init__(self, max_connections: int = 500, max_per_lobby: int = 10) -> None:
        self.max_connections = max_connections
        self.max_per_lobby = max_per_lobby
        self.active_connections: dict[str, set[WebSocket]] = {}
        self.connection_info: dict[WebSocket, tuple[str, str]] = {}
        self.user_connections: dict[str, WebSocket] = {}
        self._last_message_times: dict[str, float] = {}

    def can_accept_connection(self, lobby_code: str) -> tuple[bool, str]:
        total = sum(len(conns) for conns in self.active_connections.values())
        if total >= self.max_connections:
            return False, "server_full"
        if len(self.active_connections.get(lobby_code, set())) >= self.max_per_lobby:
            return False, "lobby_full"
        return True, ""

    async def connect(self, websocket: WebSocket, lobby_code: str, user_id: str) -> None:
        import time

        await websocket.accept()
        self.active_connections.setdefault(lobby_code, set()).add(websocket)
        self.connection_info[websocket] = (lobby_code, user_id)
        self.user_connections[user_id] = websocket
        self._last_message_times[user_id] = time.time()

    def disconnect(self, websocket: WebSocket) -> tuple[str, str] | None:
        info = self.connection_info.get(websocket)
        if not info:
            return None
        lobby_code, user_id = info
        if lobby_code in self.active_connections:
            self.active_connections[lobby_code].discard(websocket)
            if not self.active_connections[lobby_code]:
                del self.active_connections[lobby_code]
        del self.connection_info[websocket]
        self.user_connections.pop(user_id, None)
        self._last_message_times.pop(user_id, None)
        return info

    def update_last_message(self, user_id: str) -> None:
        import time

        self._last_message_times[user_id] = time.time()

    async def broadcast_to_lobby(
        self, lobby_code: str, message: dict[str, Any], exclude_user_id: str | None = None
    ) -> int:
        if lobby_code not in self.active_connections:
            return 0
        data = json.dumps(message)
        disconnected = []
        sent_count = 0
        for websocket in self.active_connections[lobby_code]:
            if exclude_user_id:
                info = self.connection_info.get(websocket)
                if info and info[1] == exclude_user_id:
                    continue
            try:
                await websocket.send_text(data)
                sent_count += 1
            except Exception:
                disconnected.append(websocket)
        for ws in disconnected:
            self.disconnect(ws)
        return sent_count

    async def send_to_user(self, user_id: str, message: dict[str, Any]) -> bool:
        websocket = self.user_connections.get(user_id)
        if not websocket:
            return False
        try:
            await websocket.send_text(json.dumps(message))
            return True
        except Exception:
            self.disconnect(websocket)
            return False


seed = SeedManager(max_connections=MAX, max_per_lobby=MAX)


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
