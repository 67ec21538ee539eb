"""Demo: a lobby chat on wsmanager and its browser client (in memory, no external service).

    make demo          # then open http://127.0.0.1:8000

Pick a name and a lobby; the page shows the lobby's members (live, each with
its latency), chat, direct messages and a live view of the server, pushed over
the page's own WebSocket (no polling): the lobbies with their capacity, a
histogram of the round trips the heartbeat measured, the counters of
``get_stats()`` and a feed of the manager's refusals and closes (stale, slow
consumer, rate limited...), told by ``manager.add_close_listener``. Buttons
start simulated clients inside the server (``simulate.py``: a frozen one, a
flooder, a non-reader) so a visitor watches each protection act.
Prometheus metrics are on ``/metrics``; ``/stats`` answers with the same
counters for curl.

The endpoint is ``manager.serve()`` with an ``on_connect`` / ``on_disconnect``
hook (welcome, member list); the manager's built-in heartbeat pings silent
connections and closes the ones that stop answering with 4004 "stale";
``manager.lifespan`` closes every connection with 1001 on shutdown.

Settings (environment, all optional):
  LOBBY_CHAT_MAX_CONNECTIONS, LOBBY_CHAT_MAX_PER_LOBBY  limits (default 500 and 10)

The app's manager has ``presence_events=True``: each member gets the lobby's
``{"type": "presence", "joins": [...], "leaves": [...]}`` diffs, which the page
shows in its member list (a user with several tabs joins once and leaves once).
  LOBBY_CHAT_PING_INTERVAL   seconds of silence before a health_ping (default 5)
  LOBBY_CHAT_PING_TIMEOUT    seconds to answer it before the close 4004 "stale" (default 5)
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import re
import time
from collections import deque
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
from wsmanager.events import CloseEvent
from wsmanager.metrics import ManagerMetrics

from .simulate import KINDS, Simulator

STATIC = Path(__file__).resolve().parent / "static"
NAME_RE = re.compile(r"^[\w][\w .-]{0,23}$")
LOBBY_RE = re.compile(r"^[\w-]{1,32}$")
MAX_TEXT = 500
# Member lists carry latencies: after a pong, re-announce the lobby at most this often (s).
ANNOUNCE_DELAY = 0.25
# The dashboard is pushed at most this often (s), when something changed.
PUSH_INTERVAL = 0.2
FEED_SIZE = 30  # events kept (and sent) in the feed
LATENCY_SAMPLES = 500  # round trips kept for the histogram
# Histogram bucket upper bounds (ms); the last bucket is everything above.
LATENCY_BOUNDS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
SIMULATION_LIMIT = 6  # simulated clients running at once
STAT_KEYS = (
    "total_connections",
    "max_connections",
    "capacity_percent",
    "active_lobbies",
    "connected_users",
    "max_per_lobby",
    "pending_connections",
    "backlogged_connections",
    "rate_limited_messages",
    "pings_sent",
    "pongs_received",
    "refused",
    "closed",
)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def latency_histogram(samples: list[float]) -> dict[str, Any]:
    """``samples`` (ms) counted into :data:`LATENCY_BOUNDS_MS` buckets, with p50 / p99."""
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    for ms in samples:
        counts[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
    ordered = sorted(samples)

    def pct(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)

    return {
        "bounds_ms": list(LATENCY_BOUNDS_MS),
        "counts": counts,
        "samples": len(samples),
        "p50": pct(0.5),
        "p99": pct(0.99),
    }


class LobbyChat:
    """The chat around a manager: its hooks, message handler, member lists and live dashboard."""

    def __init__(
        self, manager: ConnectionManager, *, push_interval: float = PUSH_INTERVAL, sim_interval: float = 0.02
    ) -> None:
        self.manager = manager
        self.metrics = ManagerMetrics(manager)  # fills its latency histogram from the manager's pongs
        self.lobbies: dict[str, dict[WebSocket, str]] = {}  # lobby -> {websocket: user}, served here
        self.lobby_of: dict[WebSocket, str] = {}
        self._dirty: set[str] = set()  # lobbies whose latencies changed since the last announce
        self._flush: asyncio.Task[None] | None = None
        # the dashboard: pushed to every page when something changed, at most every push_interval
        self.push_interval = push_interval
        self.feed: deque[dict[str, Any]] = deque(maxlen=FEED_SIZE)
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._seq = 0
        self._push: asyncio.Task[None] | None = None
        self._stale = False  # changed since the last push
        self.simulator = Simulator(
            manager,
            self.serve_simulated,
            interval=sim_interval,
            limit=SIMULATION_LIMIT,
            on_change=self.changed,
        )

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

    def latency_measured(self, websocket: Any, latency_ms: float) -> None:
        """A latency listener: a member's latency changed; announce its lobby soon."""
        self.latencies.append(latency_ms)
        self.changed()
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

    # --------------------------------------------------------------- dashboard

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Add an event to the feed (pushed with the next dashboard)."""
        self._seq += 1
        self.feed.appendleft({"seq": self._seq, "ts": time.time(), "kind": kind, "text": text, **fields})
        self.changed()

    def closed(self, event: CloseEvent) -> None:
        """A close listener: the manager refused or closed a connection."""
        if event.reason == "server_shutdown":
            return  # every page gets it itself; nobody would see the feed
        who = event.user_id or "a client"
        where = f" in {event.lobby_code}" if event.lobby_code else ""
        if event.refused:
            text = f"{who} refused{where}: {event.reason}"
        else:
            text = f"{who} closed{where}: {event.reason}"
        self.event(
            "refused" if event.refused else "closed",
            text,
            code=event.code,
            reason=event.reason,
            lobby=event.lobby_code,
            user=event.user_id,
        )

    def dashboard(self) -> dict[str, Any]:
        """What every page shows of the server: stats, lobbies, latency histogram, simulations, feed."""
        stats = self.manager.get_stats()
        sizes = {lobby: len(sockets) for lobby, sockets in self.manager.active_connections.items()}
        top = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:12]
        capacity = self.manager.max_per_lobby
        return {
            "type": "dashboard",
            "at": time.time(),
            "stats": {k: stats.get(k) for k in STAT_KEYS},
            "lobbies": [{"lobby": lobby, "connections": n, "capacity": capacity} for lobby, n in top],
            "latency": latency_histogram(list(self.latencies)),
            "simulated": [sim.as_dict() for sim in self.simulator.running.values()],
            "feed": list(self.feed),
        }

    def changed(self) -> None:
        """Something the dashboard shows changed: push it to every page soon."""
        self._stale = True
        if self._push is None or self._push.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nobody to push to
                self._push = asyncio.get_running_loop().create_task(self._push_dashboard())

    async def _push_dashboard(self) -> None:
        while self._stale:  # a change during a push is pushed next
            await asyncio.sleep(self.push_interval)
            self._stale = False
            message = self.dashboard()
            for lobby in list(self.lobbies):
                self.metrics.record_sent(await self.manager.broadcast_to_lobby(lobby, message))

    def simulate(self, kind: str, lobby: str, by: str) -> None:
        """Start a simulated client of ``kind`` in ``lobby`` (asked for by ``by``)."""
        sim = self.simulator.start(kind, lobby)
        if sim is None:
            self.event(
                "simulation", f"{by} asked for a {kind}: {self.simulator.limit} simulated clients run already"
            )
            return
        self.event(
            "simulation", f"{by} started {sim.user} in {lobby}: it {KINDS[kind]}", user=sim.user, lobby=lobby
        )

    async def serve_simulated(self, websocket: WebSocket, lobby: str, user: str) -> None:
        """The endpoint for a simulated client (see ``simulate.py``)."""
        await self.manager.serve(
            websocket, lobby, user, self.handle, on_connect=self.joined, on_disconnect=self.left
        )

    async def shutdown(self) -> None:
        """Stop the simulated clients and the pending pushes."""
        await self.simulator.close()
        for task in (self._flush, self._push):
            if task is not None:
                task.cancel()

    # ------------------------------------------------------------------ hooks

    async def joined(self, conn: Connection) -> None:
        """on_connect: the connection is registered."""
        self.lobbies.setdefault(conn.lobby_code, {})[conn.websocket] = conn.user_id
        self.lobby_of[conn.websocket] = conn.lobby_code
        await conn.send({"type": "welcome", "user": conn.user_id, "lobby": conn.lobby_code})
        await conn.send(self.dashboard())
        await self.announce(conn.lobby_code)
        self.changed()

    async def left(self, conn: Connection) -> None:
        """on_disconnect: the connection was removed (it left, went stale, ...)."""
        self.lobby_of.pop(conn.websocket, None)
        sockets = self.lobbies.get(conn.lobby_code)
        if sockets is not None:
            sockets.pop(conn.websocket, None)
            if not sockets:
                del self.lobbies[conn.lobby_code]
        await self.announce(conn.lobby_code)
        self.changed()

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
        elif kind == "simulate":
            what = data.get("kind")
            if not isinstance(what, str) or what not in KINDS:
                await conn.send(
                    {"type": "error", "error": "bad_simulation", "text": "unknown simulated client"}
                )
                return
            self.simulate(what, lobby, user)

    # ---------------------------------------------------------------- endpoint

    async def serve(self, websocket: WebSocket, lobby: str, token: str) -> None:
        user: str | None = token.strip()
        if not NAME_RE.match(user or ""):
            user = None  # serve() refuses (and counts) it: accept, then close 4001 "unauthorized"
        elif not LOBBY_RE.match(lobby):
            # accept, then close: a browser sees the code and reason only after a handshake
            self.metrics.record_refusal("bad_lobby")
            self.event(
                "refused",
                f"{user} refused: bad_lobby",
                code=int(CloseCode.POLICY_VIOLATION),
                reason="bad_lobby",
                user=user,
            )
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
    ping_interval: float = 5.0,
    ping_timeout: float = 5.0,
    rate_limit: float = 10.0,
    rate_burst: float = 20.0,
    rate_limit_close_after: int = 40,
    max_backlog: int = 200,
    push_interval: float = PUSH_INTERVAL,
    sim_interval: float = 0.02,
) -> FastAPI:
    """The demo app around ``manager`` (default: the shared ``wsmanager.manager``),
    whose heartbeat is set to ``ping_interval`` / ``ping_timeout`` (s), its inbound
    rate limit to ``rate_limit`` messages/s (``rate_burst`` at once, closed with 4005
    after ``rate_limit_close_after`` drops) and its backlog bound to ``max_backlog``
    messages (4006 beyond). ``push_interval``: seconds between dashboard pushes at
    most; ``sim_interval``: the simulated clients' pace (s, 0: as fast as the loop runs)."""
    manager = wsmanager.manager if manager is None else manager
    manager.ping_interval = ping_interval
    manager.ping_timeout = ping_timeout
    manager.set_rate_limit(rate_limit, rate_burst, close_after=rate_limit_close_after)
    manager.max_backlog = max_backlog
    chat = LobbyChat(manager, push_interval=push_interval, sim_interval=sim_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # manager.lifespan: heartbeat started now, 1001 "server_shutdown" to every client on exit
        remove_latency = manager.add_latency_listener(chat.latency_measured)
        remove_close = manager.add_close_listener(chat.closed)
        try:
            async with manager.lifespan(app):
                try:
                    yield
                finally:
                    await chat.simulator.close()
        finally:
            remove_latency()
            remove_close()
            await chat.shutdown()

    app = FastAPI(title="wsmanager lobby chat", lifespan=lifespan)
    app.state.chat = chat
    mount_client(app)  # /wsmanager/wsmanager.js
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

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
    # presence events on: each member is told who joins and leaves its lobby (coalesced)
    manager = ConnectionManager(int(max_conn or 500), int(max_lobby or 10), presence_events=True)
    return create_app(
        manager,
        ping_interval=_env_float("LOBBY_CHAT_PING_INTERVAL", 5.0),
        ping_timeout=_env_float("LOBBY_CHAT_PING_TIMEOUT", 5.0),
    )


app = _app_from_env()
