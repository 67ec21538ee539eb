"""The baseline for the benchmarks: a plain-Python manager written the seed's way.

Same data structures and algorithms as the hand-written FastAPI
``ConnectionManager`` of the pattern: a dict lobby -> set of websockets, a dict
websocket -> (lobby, user), a dict user -> websocket, last-message times by
user, ``json.dumps`` for serialization, and capacity / statistics computed by
summing the sizes of every lobby (O(number of lobbies) per call).

Only the synchronous bookkeeping is here: ``connect_bookkeeping`` is what the
seed's ``async connect()`` does after ``await websocket.accept()``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class BaselineManager:
    """The seed's registry, in plain Python, for timing and memory comparisons."""

    def __init__(self, max_connections: int = 500, max_per_lobby: int = 10) -> None:
        self.max_connections = max_connections
        self.max_per_lobby = max_per_lobby
        self.active_connections: dict[str, set[object]] = {}
        self.connection_info: dict[object, tuple[str, str]] = {}
        self.user_connections: dict[str, object] = {}
        self._pending_pings: dict[str, asyncio.Event] = {}
        self._last_message_times: dict[str, float] = {}

    def can_accept_connection(self, lobby_code: str) -> tuple[bool, str]:
        """(True, "") or (False, reason); sums every lobby like the seed."""
        total = sum(len(members) for members in self.active_connections.values())
        if total >= self.max_connections:
            return False, "server_full"
        if len(self.active_connections.get(lobby_code, ())) >= self.max_per_lobby:
            return False, "lobby_full"
        return True, ""

    def connect_bookkeeping(self, websocket: object, lobby_code: str, user_id: str) -> None:
        """Register ``websocket``: the part of the seed's ``connect`` after ``accept()``."""
        members = self.active_connections.get(lobby_code)
        if members is None:
            members = self.active_connections[lobby_code] = set()
        members.add(websocket)
        self.connection_info[websocket] = (lobby_code, user_id)
        self.user_connections[user_id] = websocket
        self._last_message_times[user_id] = time.time()

    def disconnect(self, websocket: object) -> tuple[str, str] | None:
        """Remove ``websocket``; return its (lobby, user), or None if unknown."""
        info = self.connection_info.get(websocket)
        if info is None:
            return None
        lobby_code, user_id = info
        members = self.active_connections.get(lobby_code)
        if members is not None:
            members.discard(websocket)
            if not members:
                del self.active_connections[lobby_code]
        del self.connection_info[websocket]
        self.user_connections.pop(user_id, None)
        self._last_message_times.pop(user_id, None)
        self._pending_pings.pop(user_id, None)
        return info

    def record_pong(self, user_id: str) -> None:
        """Note a pong: refresh the user's time and wake a pending ping."""
        self._last_message_times[user_id] = time.time()
        event = self._pending_pings.get(user_id)
        if event is not None:
            event.set()

    def update_last_message(self, user_id: str) -> None:
        """Refresh the user's last-message time."""
        self._last_message_times[user_id] = time.time()

    def is_user_connected(self, user_id: str) -> bool:
        """Whether ``user_id`` has a connection."""
        return user_id in self.user_connections

    def get_lobby_users(self, lobby_code: str) -> set[str]:
        """The user ids connected to ``lobby_code``."""
        users: set[str] = set()
        for websocket in self.active_connections.get(lobby_code, ()):
            info = self.connection_info.get(websocket)
            if info is not None:
                users.add(info[1])
        return users

    def get_stats(self) -> dict[str, Any]:
        """Counts and capacity; sums every lobby like the seed."""
        total = sum(len(members) for members in self.active_connections.values())
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
