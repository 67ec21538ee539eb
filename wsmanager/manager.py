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
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from starlette.websockets import WebSocket, WebSocketState

from ._core import Core, dumps
from .backends import Backend, InMemoryBackend
from .codes import close_code_for

if TYPE_CHECKING:
    from .backends.redis import RedisBackend

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
    """

    def __init__(
        self,
        max_connections: int = 500,
        max_per_lobby: int = 10,
        *,
        max_per_user: int | None = None,
        max_id_bytes: int = 1024,
        clock: Callable[[], float] | None = None,
        backend: Backend | None = None,
    ) -> None:
        super().__init__(
            max_connections,
            max_per_lobby,
            max_per_user=max_per_user,
            max_id_bytes=max_id_bytes,
            clock=clock,
        )
        self._ping_waiters: dict[str, _PingWaiter] = {}
        # -- backend (issue 6): None on the single-process path, which then
        # makes no backend call at all.
        self.backend: Backend = backend if backend is not None else InMemoryBackend()
        self.backend.bind(self)
        self._backplane: RedisBackend | None = (
            cast("RedisBackend", self.backend) if self.backend.clustered else None
        )

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
        bp = self._backplane
        if bp is not None and not reason:  # backend: the cluster-wide slot
            try:
                reason = await bp.reserve(websocket, lobby_code, user_id)
            except BaseException:
                self._release(websocket)
                bp.release(websocket)
                raise
            if reason:
                self._release(websocket)
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
            if bp is not None:
                bp.release(websocket)
            raise
        self._commit(websocket)
        if bp is not None:
            bp.commit(websocket)
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
        bp = self._backplane
        if bp is None:
            if not self._lobby_count(lobby_code):
                return 0
            return await self._deliver_lobby(lobby_code, dumps(message), exclude_user_id)
        # backend: other nodes get the same text, queued before local delivery
        bp.ensure_running()
        data = dumps(message)
        remote = bp.publish_lobby(lobby_code, data, exclude_user_id)
        if not self._lobby_count(lobby_code):
            return remote
        return remote + await self._deliver_lobby(lobby_code, data, exclude_user_id)

    async def send_to_user(self, user_id: str, message: Any) -> bool:
        """Send ``message`` to every open connection of ``user_id``.

        True if at least one connection got it. Never raises for a failing
        connection: it is removed.
        """
        bp = self._backplane
        if bp is None:
            if not Core.is_user_connected(self, user_id):
                return False
            return await self._deliver_user(user_id, dumps(message))
        # backend: reach the user's connections on other nodes too
        bp.ensure_running()
        data = dumps(message)
        remote = bp.publish_user(user_id, data) > 0
        if not Core.is_user_connected(self, user_id):
            return remote
        return await self._deliver_user(user_id, data) or remote

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

    # ------------------------------------------------ backend (issue 6) hooks

    async def start(self) -> None:
        """Start the backend (a no-op in memory): for an app's lifespan startup.

        With a Redis backend this connects, registers this node and waits up
        to its ``connect_timeout``; it never raises for an unreachable Redis
        (the node serves locally and keeps retrying). Without this call the
        backend starts on the first ``connect()``.
        """
        await self.backend.start()

    async def stop(self) -> None:
        """Stop the backend: a Redis node leaves the cluster cleanly (its
        connections stop counting at once instead of after the lease)."""
        await self.backend.stop()

    def disconnect(self, websocket: WebSocket) -> tuple[str, str] | None:
        """Remove ``websocket``; ``(lobby_code, user_id)``, or None if unknown."""
        info = Core.disconnect(self, websocket)
        if info is not None and self._backplane is not None:
            self._backplane.release(websocket)
        return info

    def can_accept_connection(self, lobby_code: str) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)``: advisory, like the seed's.

        With a clustered backend it also checks the cluster counts of the
        view this node keeps (other nodes' handshakes in progress are not in
        it); ``connect()`` decides atomically either way.
        """
        verdict = Core.can_accept_connection(self, lobby_code)
        bp = self._backplane
        if bp is None or not verdict[0]:
            return verdict
        view = bp.view
        pending = len(bp._cids) - len(bp.own.nodes.get(bp.node_id, ()))
        if view.total + pending >= self.max_connections:
            return False, "server_full"
        if view.lobbies.get(lobby_code, 0) >= self.max_per_lobby:
            return False, "lobby_full"
        return verdict

    def is_user_connected(self, user_id: str, *, local: bool = False) -> bool:
        """Whether ``user_id`` has an open connection, on any node of the
        cluster (``local=True``: on this process)."""
        if Core.is_user_connected(self, user_id):
            return True
        bp = self._backplane
        return bp is not None and not local and bp.view.users.get(user_id, 0) > 0

    def get_lobby_users(self, lobby_code: str, *, local: bool = False) -> set[str]:
        """User ids connected to ``lobby_code`` on any node (``local=True``:
        on this process)."""
        users = Core.get_lobby_users(self, lobby_code)
        bp = self._backplane
        if bp is not None and not local:
            users.update(bp.view.lobby_users.get(lobby_code, ()))
        return users

    def get_stats(self, *, local: bool = False) -> dict[str, Any]:
        """The seed's stats, for the cluster when a clustered backend is up.

        Cluster-wide: ``total_connections``, ``capacity_percent``,
        ``active_lobbies``, ``connected_users``. The other counters are this
        process's. ``local`` holds this process's own seed figures and
        ``backplane`` the backend's health (``up``, ``last_error``, ...).
        ``local=True`` returns this process's stats only.
        """
        stats = Core.get_stats(self)
        bp = self._backplane
        if bp is None or local:
            return stats
        keys = ("total_connections", "capacity_percent", "active_lobbies", "connected_users")
        stats["local"] = {k: stats[k] for k in keys}
        view = bp.view
        total = view.total
        stats["total_connections"] = total
        stats["capacity_percent"] = (
            round(total / self.max_connections * 100, 1) if self.max_connections else 100.0
        )
        stats["active_lobbies"] = len(view.lobbies)
        stats["connected_users"] = len(view.users)
        stats["backplane"] = bp.stats()
        return stats

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
