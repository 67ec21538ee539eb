"""Demo: a lobby chat on wsmanager and its browser client (in memory, no external service).

    make demo          # then open http://127.0.0.1:8000

Pick a name and a lobby; the page shows the lobby's members (live), their
latency, chat, direct messages and a server panel fed by ``/stats``.
Prometheus metrics are on ``/metrics``.

Settings (environment, all optional; the defaults are the seed's):
  LOBBY_CHAT_MAX_CONNECTIONS, LOBBY_CHAT_MAX_PER_LOBBY  limits (default: the shared ``manager``)
  LOBBY_CHAT_PING_INTERVAL   seconds of silence before a health_ping (default 15)
  LOBBY_CHAT_PING_TIMEOUT    seconds to answer it before the close 4004 "stale" (default 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import wsmanager
from wsmanager import ConnectionManager, dumps
from wsmanager.client import mount_client
from wsmanager.codes import CloseCode
from wsmanager.metrics import ManagerMetrics

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
NAME_RE = re.compile(r"^[\w][\w .-]{0,23}$")
LOBBY_RE = re.compile(r"^[\w-]{1,32}$")
MAX_TEXT = 500


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


class LobbyChat:
    """The chat's state next to the manager: per-member latency, and the
    heartbeat that pings silent connections and closes stale ones."""

    def __init__(self, manager: ConnectionManager, *, ping_interval: float, ping_timeout: float) -> None:
        self.manager = manager
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.metrics = ManagerMetrics(manager)
        self.latency: dict[WebSocket, float] = {}  # last round trip of each connection, ms
        self.member_latency: dict[tuple[str, str], float] = {}  # (lobby, user) -> ms
        self._dirty: set[str] = set()  # lobbies whose member list changed since the last announce

    # ----------------------------------------------------------------- members

    def members(self, lobby: str) -> list[dict[str, Any]]:
        return [
            {"user": user, "latency_ms": self.member_latency.get((lobby, user))}
            for user in sorted(self.manager.get_lobby_users(lobby))
        ]

    async def announce(self, lobby: str) -> None:
        message = {"type": "members", "lobby": lobby, "members": self.members(lobby)}
        self.metrics.record_sent(await self.manager.broadcast_to_lobby(lobby, message))

    def forget(self, websocket: WebSocket, lobby: str, user: str) -> None:
        self.latency.pop(websocket, None)
        if not self.manager.get_lobby_users(lobby) & {user}:
            self.member_latency.pop((lobby, user), None)

    def pong(self, websocket: WebSocket, lobby: str, user: str) -> None:
        rtt = self.manager.record_pong_ws(websocket)
        if rtt is not None:
            self.latency[websocket] = rtt
            self.member_latency[(lobby, user)] = rtt
            self.metrics.observe_latency_ms(rtt)
            self._dirty.add(lobby)

    # --------------------------------------------------------------- heartbeat
    # Stand-in for the manager's built-in heartbeat (same sweep, same messages,
    # same 4004 "stale" close); the app switches to it once it is available.

    async def heartbeat(self) -> None:
        tick = min(1.0, max(0.05, min(self.ping_interval, self.ping_timeout) / 2))
        while True:
            await asyncio.sleep(tick)
            try:
                await self.beat()
            except Exception:  # keep beating; a failure here must not end health checks
                logger.exception("heartbeat failed")

    async def beat(self) -> None:
        to_ping, expired = self.manager._sweep(self.ping_interval, self.ping_timeout)
        for websocket, lobby, user in expired:
            logger.info("stale connection closed", extra={"lobby": lobby, "user": user, "reason": "stale"})
            self.metrics.record_stale()
            self.forget(websocket, lobby, user)
            self._dirty.add(lobby)
            with contextlib.suppress(Exception):
                await websocket.close(code=CloseCode.STALE, reason="stale")
        for websocket in to_ping:
            ping = {
                "type": "health_ping",
                "timestamp": time.time(),
                "latency_ms": self.latency.get(websocket),
            }
            with contextlib.suppress(Exception):
                await websocket.send_text(dumps(ping))
        dirty, self._dirty = self._dirty, set()
        for lobby in dirty:
            await self.announce(lobby)

    # ---------------------------------------------------------------- endpoint

    async def serve(self, websocket: WebSocket, lobby: str, token: str) -> None:
        user = token.strip()
        if not NAME_RE.match(user) or not LOBBY_RE.match(lobby):
            # accept, then close: a browser sees the code and reason only after a handshake
            reason = "unauthorized" if not NAME_RE.match(user) else "bad_lobby"
            self.metrics.record_refusal(reason)
            await websocket.accept()
            code = CloseCode.UNAUTHORIZED if reason == "unauthorized" else CloseCode.POLICY_VIOLATION
            await websocket.close(code=code, reason=reason)
            return
        if not await self.manager.connect(websocket, lobby, user):
            return  # refused with 4002 (lobby_full / server_full) or 1013
        try:
            await websocket.send_text(dumps({"type": "welcome", "user": user, "lobby": lobby}))
            await self.announce(lobby)
            while True:
                data = await websocket.receive_json()
                self.manager.touch(websocket)
                if isinstance(data, dict):
                    await self.handle(websocket, lobby, user, data)
        except ValueError:  # malformed JSON: say so, instead of leaving the client hanging
            with contextlib.suppress(Exception):
                await websocket.close(code=CloseCode.BAD_MESSAGE, reason="bad_message")
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: closed meanwhile (e.g. stale)
            pass
        finally:
            if self.manager.disconnect(websocket) is not None:
                self.forget(websocket, lobby, user)
                await self.announce(lobby)
            else:
                self.latency.pop(websocket, None)

    async def handle(self, websocket: WebSocket, lobby: str, user: str, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "health_pong":
            self.pong(websocket, lobby, user)
        elif kind == "chat":
            text = str(data.get("text", ""))[:MAX_TEXT]
            message = {"type": "chat", "from": user, "text": text, "ts": time.time()}
            self.metrics.record_sent(await self.manager.broadcast_to_lobby(lobby, message))
        elif kind == "dm":
            to = str(data.get("to", ""))
            text = str(data.get("text", ""))[:MAX_TEXT]
            if to not in self.manager.get_lobby_users(lobby):
                await websocket.send_text(dumps({"type": "error", "text": f"{to} is not in this lobby"}))
                return
            message = {"type": "dm", "from": user, "to": to, "text": text, "ts": time.time()}
            if await self.manager.send_to_user(to, message):
                self.metrics.record_sent()
            if to != user and await self.manager.send_to_user(user, message):  # every tab of the sender
                self.metrics.record_sent()

    def stats(self) -> dict[str, Any]:
        stats = self.manager.get_stats()
        lobbies = {lobby: len(conns) for lobby, conns in self.manager.active_connections.items()}
        stats["lobbies"] = dict(sorted(lobbies.items(), key=lambda kv: (-kv[1], kv[0]))[:20])
        return stats


def create_app(
    manager: ConnectionManager | None = None,
    *,
    ping_interval: float = 15.0,
    ping_timeout: float = 10.0,
) -> FastAPI:
    """The demo app around ``manager`` (default: the shared ``wsmanager.manager``)."""
    chat = LobbyChat(
        wsmanager.manager if manager is None else manager,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(chat.heartbeat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
