"""The baseline for the benchmarks: the seed's plain-Python manager.

Statement for statement (for the methods the benchmarks use; ``ping_user`` is
left out) the hand-written FastAPI ``ConnectionManager`` of the
pattern (/work/shared/seed/websocket-management.md): a dict lobby -> set of
websockets, a dict websocket -> (lobby, user), a dict user -> websocket,
last-message times by user, ``json.dumps`` for serialization, capacity and
statistics computed by summing the sizes of every lobby (O(number of lobbies)
per call), and sends awaited one after the other. Its defects (a set iterated
across ``await``s, the overwritten user mapping, ...) are kept on purpose: it
is what the benchmarks compare against, not something to use.

``connect_bookkeeping`` is the part of ``async connect()`` after
``await websocket.accept()``, for the rows that time the bookkeeping alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class BaselineManager:
    """The seed's ConnectionManager, for timing and memory comparisons."""

    def __init__(self, max_connections: int = 500, max_per_lobby: int = 10) -> None:
        self.max_connections = max_connections
        self.max_per_lobby = max_per_lobby
        self.active_connections: dict[str, set[Any]] = {}
        self.connection_info: dict[Any, tuple[str, str]] = {}
        self.user_connections: dict[str, Any] = {}
        self._pending_pings: dict[str, asyncio.Event] = {}
        self._last_message_times: dict[str, float] = {}

    def can_accept_connection(self, lobby_code: str) -> tuple[bool, str]:
        """(True, "") or (False, reason); sums every lobby like the seed."""
        total = sum(len(conns) for conns in self.active_connections.values())
        if total >= self.max_connections:
            return False, "server_full"
        lobby_count = len(self.active_connections.get(lobby_code, set()))
        if lobby_count >= self.max_per_lobby:
            return False, "lobby_full"
        return True, ""

    async def connect(self, websocket: Any, lobby_code: str, user_id: str) -> None:
        """Accept and register ``websocket``, as the seed does."""
        await websocket.accept()
        # inline, as in the seed (a call to connect_bookkeeping would cost the seed a frame)
        if lobby_code not in self.active_connections:
            self.active_connections[lobby_code] = set()
        self.active_connections[lobby_code].add(websocket)
        self.connection_info[websocket] = (lobby_code, user_id)
        self.user_connections[user_id] = websocket
        self._last_message_times[user_id] = time.time()

    def connect_bookkeeping(self, websocket: Any, lobby_code: str, user_id: str) -> None:
        """Register ``websocket``: the seed's ``connect`` after ``accept()``."""
        if lobby_code not in self.active_connections:
            self.active_connections[lobby_code] = set()
        self.active_connections[lobby_code].add(websocket)
        self.connection_info[websocket] = (lobby_code, user_id)
        self.user_connections[user_id] = websocket
        self._last_message_times[user_id] = time.time()

    def disconnect(self, websocket: Any) -> tuple[str, str] | None:
        """Remove ``websocket``; return its (lobby, user), or None if unknown."""
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
        self._pending_pings.pop(user_id, None)
        return info

    async def broadcast_to_lobby(
        self, lobby_code: str, message: dict[str, Any], exclude_user_id: str | None = None
    ) -> int:
        """``json.dumps`` once, then one awaited ``send_text`` per member."""
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
        """Send to the user's (last registered) websocket."""
        websocket = self.user_connections.get(user_id)
        if not websocket:
            return False
        try:
            await websocket.send_text(json.dumps(message))
            return True
        except Exception:
            self.disconnect(websocket)
            return False

    def record_pong(self, user_id: str) -> None:
        """Note a pong: refresh the user's time and wake a pending ping."""
        self._last_message_times[user_id] = time.time()
        ping_event = self._pending_pings.get(user_id)
        if ping_event:
            ping_event.set()

    def update_last_message(self, user_id: str) -> None:
        """Refresh the user's last-message time."""
        self._last_message_times[user_id] = time.time()

    def is_user_connected(self, user_id: str) -> bool:
        """Whether ``user_id`` has a connection."""
        return user_id in self.user_connections

    def get_lobby_users(self, lobby_code: str) -> set[str]:
        """The user ids connected to ``lobby_code``."""
        users = set()
        for ws in self.active_connections.get(lobby_code, set()):
            info = self.connection_info.get(ws)
            if info:
                users.add(info[1])
        return users

    def get_stats(self) -> dict[str, Any]:
        """Counts and capacity; sums every lobby like the seed."""
        total = sum(len(conns) for conns in self.active_connections.values())
        return {
            "total_connections": total,
            "max_connections": self.max_connections,
            "capacity_percent": round(total / self.max_connections * 100, 1),
            "active_lobbies": len(self.active_connections),
        }

    @staticmethod
    def dumps(message: Any) -> str:
        """Serialize a message like the seed: ``json.dumps`` with its defaults."""
        return json.dumps(message)
