"""ConnectionManager: the seed's API on top of the C registry.

The synchronous methods (``can_accept_connection``, ``disconnect``,
``record_pong``, ``update_last_message``, ``is_user_connected``,
``get_lobby_users``, ``get_stats``) are the C core's. This module adds the
methods that must await a socket: ``connect``, ``broadcast_to_lobby``,
``send_to_user`` and ``ping_user``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from ._core import Core, dumps
from .codes import close_code_for
from .health import HealthMonitor

logger = logging.getLogger(__name__)

__all__ = ["ConnectionManager"]


@dataclass
class _PingWaiter:
    """One outstanding ``ping_user`` ping, shared by every concurrent caller."""

    future: asyncio.Future[float]
    started: float  # perf_counter() when the ping was sent
    callers: int = 0


class ConnectionManager(Core):
    """Registry of WebSocket connections by lobby and by user, with limits.

    A drop-in replacement for the hand-written ``ConnectionManager`` of the
    FastAPI pattern: same names, defaults and return values. Differences a
    caller can notice are fixes:

    * a user may hold several connections (tabs); each one counts, and the
      user stays connected while any is open. ``max_per_user`` caps them:
      an extra connection is refused with close code 4002, reason
      ``"user_limit"``.
    * capacity is reserved before ``accept()``: concurrent handshakes never
      overshoot ``max_connections`` / ``max_per_lobby``.
    * sends never raise; a connection whose send fails is removed.
    * a heartbeat runs by itself (``ping_interval`` / ``ping_timeout``, see
      ``wsmanager.health``): a connection silent for ``ping_interval`` seconds
      gets ``{"type": "health_ping", "timestamp": ...}`` and, still silent
      ``ping_timeout`` seconds later, is closed with 4004 ``"stale"`` and
      removed. An entry whose endpoint died without ``disconnect()`` (e.g. on
      malformed JSON) is reclaimed. ``touch(websocket)`` and
      ``record_pong_ws(websocket)`` report one connection, where the seed's
      ``update_last_message(user_id)`` / ``record_pong(user_id)`` vouch for
      every connection of the user.
    """

    def __init__(
        self,
        max_connections: int = 500,
        max_per_lobby: int = 10,
        *,
        max_per_user: int | None = None,
        max_id_bytes: int = 1024,
        clock: Callable[[], float] | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 10.0,
    ) -> None:
        super().__init__(
            max_connections,
            max_per_lobby,
            max_per_user=max_per_user,
            max_id_bytes=max_id_bytes,
            clock=clock,
        )
        self._ping_waiters: dict[str, _PingWaiter] = {}
        self._health = HealthMonitor(self, ping_interval=ping_interval, ping_timeout=ping_timeout)

    # ------------------------------------------------------------------ connect

    async def connect(self, websocket: WebSocket, lobby_code: str, user_id: str) -> bool:
        """Admit, accept and register ``websocket`` in ``lobby_code`` as ``user_id``.

        Returns True once registered. When a limit is reached meanwhile (another
        handshake took the last slot), the socket is accepted and closed with
        code 4002 and the reason (``server_full``, ``lobby_full``,
        ``user_limit``; 1013 ``shutting_down`` during shutdown), and False is
        returned; the endpoint's next ``receive_*`` then raises
        ``WebSocketDisconnect`` like any client that left.

        Raises TypeError / ValueError, before touching the socket, for a non-str,
        empty or oversized id, or a websocket that is already connected; the
        registry is then unchanged.
        """
        reason = self._reserve(websocket, lobby_code, user_id)
        if reason:
            logger.info(
                "connection refused: %s",
                reason,
                extra={"lobby": lobby_code, "user": user_id, "reason": reason},
            )
            await self._refuse(websocket, reason)
            return False
        try:
            if websocket.application_state == WebSocketState.CONNECTING:
                await websocket.accept()
        except BaseException:
            self._release(websocket)
            raise
        self._commit(websocket)
        self._health.watch(websocket)  # heartbeat: runs in this loop; reclaims the entry if the endpoint dies
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connected", extra={"lobby": lobby_code, "user": user_id})
        if len(self) >= self.max_connections:
            logger.warning("server at capacity: %d connections", len(self), extra={"reason": "server_full"})
        return True

    async def _refuse(self, websocket: WebSocket, reason: str) -> None:
        """Accept-then-close, so that browsers see the code and the reason.

        Closing before ``accept()`` fails the handshake with HTTP 403, which a
        browser reports as 1006 without a reason.
        """
        code = close_code_for(reason)
        try:
            if websocket.application_state == WebSocketState.CONNECTING:
                await websocket.accept()
            await websocket.close(code=code, reason=reason)
        except Exception:  # the client is already gone: nothing to tell it
            return
        # Starlette refuses receive_*() once the application closed, with a
        # RuntimeError the seed's endpoint does not catch. Re-arm the state so
        # that its next receive waits for the client's close and raises the
        # ordinary WebSocketDisconnect instead.
        websocket.application_state = WebSocketState.CONNECTED

    # ------------------------------------------------------------------- sends

    async def broadcast_to_lobby(
        self,
        lobby_code: str,
        message: Any,
        exclude_user_id: str | None = None,
    ) -> int:
        """Send ``message`` (serialized once) to every connection in the lobby.

        Returns how many connections it was delivered to. Never raises for a
        failing or vanishing recipient: a connection whose send fails is
        removed; one that disconnects meanwhile is skipped. ``exclude_user_id``
        skips every connection of that user.
        """
        if not self._lobby_count(lobby_code):
            return 0
        return await self._deliver_lobby(lobby_code, dumps(message), exclude_user_id)

    async def send_to_user(self, user_id: str, message: Any) -> bool:
        """Send ``message`` to every open connection of ``user_id``.

        True if at least one connection got it. Never raises for a failing
        connection: it is removed.
        """
        if not self.is_user_connected(user_id):
            return False
        return await self._deliver_user(user_id, dumps(message))

    # Local delivery of serialized text: the seam a backplane publishes into.

    async def _deliver_lobby(self, lobby_code: str, data: str, exclude_user_id: str | None) -> int:
        """Send ``data`` to this process's connections in the lobby; the count."""
        sent = 0
        for websocket in self._lobby_targets(lobby_code, exclude_user_id):
            if websocket not in self:  # left while an earlier send awaited
                continue
            if await self._send(websocket, data):
                sent += 1
        return sent

    async def _deliver_user(self, user_id: str, data: str) -> bool:
        """Send ``data`` to this process's connections of the user."""
        delivered = False
        for websocket in self._user_targets(user_id):
            if websocket in self and await self._send(websocket, data):
                delivered = True
        return delivered

    async def _send(self, websocket: WebSocket, data: str) -> bool:
        try:
            await websocket.send_text(data)
        except Exception as exc:
            self._drop(websocket, exc)
            return False
        return True

    def _drop(self, websocket: WebSocket, exc: BaseException | None = None) -> None:
        """Remove a connection whose send failed."""
        info = self.disconnect(websocket)
        if info is not None:
            logger.info(
                "send failed, connection removed: %s",
                type(exc).__name__ if exc else "closed",
                extra={"lobby": info[0], "user": info[1], "reason": "send_failed"},
            )

    # ------------------------------------------------------------------ health

    async def ping_user(self, user_id: str, timeout: float = 2.0) -> tuple[bool, float | None]:
        """Ping every connection of ``user_id`` and wait for a pong.

        Returns ``(True, latency_ms)`` when ``record_pong(user_id)`` is called
        within ``timeout`` seconds, else ``(False, None)``; ``(False, None)``
        at once for a user with no connection. Concurrent calls for one user
        share the outstanding ping instead of overwriting each other.
        """
        targets = self._user_targets(user_id)
        if not targets:
            return False, None
        loop = asyncio.get_running_loop()
        waiter = self._ping_waiters.get(user_id)
        if waiter is None or waiter.future.done() or waiter.future.get_loop() is not loop:
            waiter = _PingWaiter(loop.create_future(), time.perf_counter())
            self._ping_waiters[user_id] = waiter
            data = dumps({"type": "health_ping", "timestamp": time.time()})
            waiter.callers += 1
            try:
                sent = False
                for websocket in targets:
                    if await self._send(websocket, data):
                        self._note_ping(websocket)
                        sent = True
            finally:
                waiter.callers -= 1
            if not sent:
                if self._ping_waiters.get(user_id) is waiter and waiter.callers == 0:
                    del self._ping_waiters[user_id]
                    waiter.future.cancel()
                return False, None
        waiter.callers += 1
        try:
            answered_at = await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except asyncio.TimeoutError:
            return False, None
        finally:
            waiter.callers -= 1
            if waiter.callers == 0 and self._ping_waiters.get(user_id) is waiter:
                del self._ping_waiters[user_id]
                if not waiter.future.done():
                    waiter.future.cancel()
        return True, (answered_at - waiter.started) * 1000.0

    def record_pong(self, user_id: str) -> None:
        """Record a ``health_pong`` from ``user_id``: it is alive, and any
        ``ping_user`` waiting for it returns."""
        super().record_pong(user_id)
        waiter = self._ping_waiters.get(user_id)
        if waiter is not None and not waiter.future.done() and not waiter.future.get_loop().is_closed():
            waiter.future.set_result(time.perf_counter())

    def record_pong_ws(self, websocket: Any) -> float | None:
        """Record a ``health_pong`` received on ``websocket``: that connection
        (only) is alive, and any ``ping_user`` waiting for its user returns.
        Returns the round-trip time in ms of the ping it answers, or None."""
        latency = super().record_pong_ws(websocket)
        if self._ping_waiters:
            info = self._info(websocket)
            waiter = self._ping_waiters.get(info[1]) if info else None
            if waiter is not None and not waiter.future.done() and not waiter.future.get_loop().is_closed():
                waiter.future.set_result(time.perf_counter())
        return latency

    # ------------------------------------------------- heartbeat (health.py)

    @property
    def health(self) -> HealthMonitor:
        """The heartbeat: ``await manager.health.sweep()`` runs one sweep now."""
        return self._health

    @property
    def ping_interval(self) -> float | None:
        """Seconds of silence before a connection gets a ``health_ping``
        (None: no heartbeat). Settable."""
        return self._health.ping_interval

    @ping_interval.setter
    def ping_interval(self, value: float | None) -> None:
        self._health.ping_interval = value

    @property
    def ping_timeout(self) -> float | None:
        """Seconds a pinged connection has to send anything before it is
        closed with 4004 ``stale`` (None: never). Settable."""
        return self._health.ping_timeout

    @ping_timeout.setter
    def ping_timeout(self, value: float | None) -> None:
        self._health.ping_timeout = value

    async def start(self) -> None:
        """Start the heartbeat in the running loop, e.g. from a lifespan.
        Optional: the first ``connect()`` starts it too."""
        await self._health.start()

    async def stop(self) -> None:
        """Stop the heartbeat (it restarts with the next ``connect()``)."""
        await self._health.stop()

    async def __aenter__(self) -> ConnectionManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------- read-only seed views

    @property
    def active_connections(self) -> Mapping[str, frozenset[WebSocket]]:
        """lobby_code -> websockets (a read-only snapshot; O(connections))."""
        lobbies: dict[str, set[WebSocket]] = {}
        for websocket, lobby, _user in self._snapshot():
            lobbies.setdefault(lobby, set()).add(websocket)
        return MappingProxyType({k: frozenset(v) for k, v in lobbies.items()})

    @property
    def connection_info(self) -> Mapping[WebSocket, tuple[str, str]]:
        """websocket -> (lobby_code, user_id) (a read-only snapshot)."""
        return MappingProxyType({ws: (lobby, user) for ws, lobby, user in self._snapshot()})

    @property
    def user_connections(self) -> Mapping[str, WebSocket]:
        """user_id -> the user's newest websocket (a read-only snapshot).

        Use ``send_to_user`` to reach every connection of a user.
        """
        users: dict[str, WebSocket] = {}
        for ws, _lobby, user in self._snapshot():
            if user not in users:
                targets = self._user_targets(user)
                users[user] = targets[-1] if targets else ws
        return MappingProxyType(users)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} connections={len(self)}/{self.max_connections}"
            f" max_per_lobby={self.max_per_lobby} max_per_user={self.max_per_user}>"
        )
