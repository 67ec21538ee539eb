"""Demo: a lobby chat on wsmanager and its browser client (in memory, no external service).

    make demo          # then open http://127.0.0.1:8000

Pick a name and a lobby; the page shows the lobby's members (live), their
latency, chat, direct messages and a server panel fed by ``/stats``.
Prometheus metrics are on ``/metrics``.

The endpoint is ``manager.serve()`` with an ``on_connect`` / ``on_disconnect``
hook (welcome, member list); the manager's built-in heartbeat pings silent
connections (its ``health_ping`` carries the connection's last round trip, which
the page shows as "latency") and closes the ones that stop answering with 4004
"stale"; ``manager.lifespan`` closes every connection with 1001 on shutdown.

Settings (environment, all optional; the defaults are the seed's):
  LOBBY_CHAT_MAX_CONNECTIONS, LOBBY_CHAT_MAX_PER_LOBBY  limits (default: the shared ``manager``)
  LOBBY_CHAT_PING_INTERVAL   seconds of silence before a health_ping (default 15)
  LOBBY_CHAT_PING_TIMEOUT    seconds to answer it before the close 4004 "stale" (default 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import wsmanager
from wsmanager import Connection, ConnectionManager
from wsmanager.client import mount_client
from wsmanager.codes import CloseCode
from wsmanager.metrics import ManagerMetrics

STATIC = Path(__file__).resolve().parent / "static"
NAME_RE = re.compile(r"^[\w][\w .-]{0,23}$")
LOBBY_RE = re.compile(r"^[\w-]{1,32}$")
MAX_TEXT = 500
# Member lists carry latencies: after a pong, re-announce the lobby at most this often (s).
ANNOUNCE_DELAY = 0.25


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


class LobbyChat:
    """The chat around a manager: its hooks, message handler and member lists."""

    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager
        self.metrics = ManagerMetrics(manager)  # fills its latency histogram from the manager's pongs
        self.lobbies: dict[str, dict[WebSocket, str]] = {}  # lobby -> {websocket: user}, served here
        self.lobby_of: dict[WebSocket, str] = {}
        self._dirty: set[str] = set()  # lobbies whose latencies changed since the last announce
        self._flush: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- members

    def members(self, lobby: str) -> list[dict[str, Any]]:
        """The lobby's members, each with the best latency of its connections (ms, or None)."""
        latency: dict[str, float] = {}
        for websocket, user in self.lobbies.get(lobby, {}).items():
            ms = self.manager.latency_ms(websocket)
            if ms is not None and (user not in latency or ms < latency[user]):
                latency[user] = round(ms, 1)
        users = sorted(self.manager.get_lobby_users(lobby))
        return [{"user": u, "latency_ms": latency.get(u)} for u in users]

    async def announce(self, lobby: str) -> None:
        message = {"type": "members", "lobby": lobby, "members": self.members(lobby)}
        self.metrics.record_sent(await self.manager.broadcast_to_lobby(lobby, message))

    def latency_measured(self, websocket: Any, _latency_ms: float) -> None:
        """A latency listener: a member's latency changed; announce its lobby soon."""
        lobby = self.lobby_of.get(websocket)
        if lobby is None:
            return
        self._dirty.add(lobby)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._announce_dirty())

    async def _announce_dirty(self) -> None:
        await asyncio.sleep(ANNOUNCE_DELAY)
        dirty, self._dirty = self._dirty, set()
        for lobby in sorted(dirty):
            await self.announce(lobby)

    # ------------------------------------------------------------------ hooks

    async def joined(self, conn: Connection) -> None:
        """on_connect: the connection is registered."""
        self.lobbies.setdefault(conn.lobby_code, {})[conn.websocket] = conn.user_id
        self.lobby_of[conn.websocket] = conn.lobby_code
        await conn.send({"type": "welcome", "user": conn.user_id, "lobby": conn.lobby_code})
        await self.announce(conn.lobby_code)

    async def left(self, conn: Connection) -> None:
        """on_disconnect: the connection was removed (it left, went stale, ...)."""
        self.lobby_of.pop(conn.websocket, None)
        sockets = self.lobbies.get(conn.lobby_code)
        if sockets is not None:
            sockets.pop(conn.websocket, None)
            if not sockets:
                del self.lobbies[conn.lobby_code]
        await self.announce(conn.lobby_code)

    # ----------------------------------------------------------------- messages

    async def handle(self, conn: Connection, data: dict[str, Any]) -> None:
        """Every valid message (health pings and pongs never get here)."""
        kind = data.get("type")
        lobby, user = conn.lobby_code, conn.user_id
        if kind == "chat":
            text = str(data.get("text", ""))[:MAX_TEXT]
            message = {"type": "chat", "from": user, "text": text, "ts": time.time()}
            self.metrics.record_sent(await self.manager.broadcast_to_lobby(lobby, message))
        elif kind == "dm":
            to = str(data.get("to", ""))
            text = str(data.get("text", ""))[:MAX_TEXT]
            if to not in self.manager.get_lobby_users(lobby):
                error = {"type": "error", "error": "not_in_lobby", "text": f"{to} is not in this lobby"}
                await conn.send(error)
                return
            message = {"type": "dm", "from": user, "to": to, "text": text, "ts": time.time()}
            if await self.manager.send_to_user(to, message):
                self.metrics.record_sent()
            if to != user and await self.manager.send_to_user(user, message):  # every tab of the sender
                self.metrics.record_sent()

    # ---------------------------------------------------------------- endpoint

    async def serve(self, websocket: WebSocket, lobby: str, token: str) -> None:
        user: str | None = token.strip()
        if not NAME_RE.match(user or ""):
            user = None  # serve() refuses (and counts) it: accept, then close 4001 "unauthorized"
        elif not LOBBY_RE.match(lobby):
            # accept, then close: a browser sees the code and reason only after a handshake
            self.metrics.record_refusal("bad_lobby")
            await websocket.accept()
            await websocket.close(code=CloseCode.POLICY_VIOLATION, reason="bad_lobby")
            return
        await self.manager.serve(
            websocket, lobby, user, self.handle, on_connect=self.joined, on_disconnect=self.left
        )

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {**self.manager.get_stats()}
        lobbies = {lobby: len(conns) for lobby, conns in self.manager.active_connections.items()}
        stats["lobbies"] = dict(sorted(lobbies.items(), key=lambda kv: (-kv[1], kv[0]))[:20])
        return stats


def create_app(
    manager: ConnectionManager | None = None,
    *,
    ping_interval: float = 15.0,
    ping_timeout: float = 10.0,
) -> FastAPI:
    """The demo app around ``manager`` (default: the shared ``wsmanager.manager``),
    whose heartbeat is set to ``ping_interval`` / ``ping_timeout``."""
    manager = wsmanager.manager if manager is None else manager
    manager.ping_interval = ping_interval
    manager.ping_timeout = ping_timeout
    chat = LobbyChat(manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # manager.lifespan: heartbeat started now, 1001 "server_shutdown" to every client on exit
        remove = manager.add_latency_listener(chat.latency_measured)
        try:
            async with manager.lifespan(app):
                yield
        finally:
            remove()
            if chat._flush is not None:
                chat._flush.cancel()

    app = FastAPI(title="wsmanager lobby chat", lifespan=lifespan)
    app.state.chat = chat
    mount_client(app)  # /wsmanager/wsmanager.js
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return chat.stats()

    app.add_route("/metrics", chat.metrics.endpoint, include_in_schema=False)

    @app.websocket("/ws/{lobby_code}")
    async def lobby_socket(websocket: WebSocket, lobby_code: str, token: str = "") -> None:
        await chat.serve(websocket, lobby_code, token)

    return app


def _app_from_env() -> FastAPI:
    max_conn = os.environ.get("LOBBY_CHAT_MAX_CONNECTIONS")
    max_lobby = os.environ.get("LOBBY_CHAT_MAX_PER_LOBBY")
    manager = None
    if max_conn or max_lobby:
        manager = ConnectionManager(int(max_conn or 500), int(max_lobby or 10))
    return create_app(
        manager,
        ping_interval=_env_float("LOBBY_CHAT_PING_INTERVAL", 15.0),
        ping_timeout=_env_float("LOBBY_CHAT_PING_TIMEOUT", 10.0),
    )


app = _app_from_env()
