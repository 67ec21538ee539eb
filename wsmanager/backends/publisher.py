"""Publishing into a Redis-backed cluster from any process: a Celery task, a
script, a cron job. Re-exported as ``wsmanager.backends.redis.Publisher`` and
``wsmanager.backends.redis.SyncPublisher``.

A publisher holds no websocket, takes no capacity and registers no presence:
it reads the counts the nodes' Lua scripts keep on the primary Redis and
publishes on the lobby's / user's channel (:mod:`.routing`), where only the
nodes serving that lobby or user listen. Messages are serialized by
:func:`wsmanager.dumps`, the encoder the manager uses.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis

from .._core import dumps
from ..settings import optional_count, optional_seconds
from ._lua import HISTORY_APPEND, LOBBY_COUNT
from .redis_history import append_args
from .routing import frame_head, lobby_channel, lobby_record, parse_urls, shard_of, user_channel, user_record

__all__ = ["Publisher", "SyncPublisher"]


def _sharded(info: dict[str, Any]) -> bool:
    version = str(info.get("redis_version", "0")).split(".")
    return int(version[0]) >= 7 if version[0].isdigit() else False


class _Common:
    """What both publishers share: URLs, namespace, keys, encoding."""

    def __init__(
        self,
        url: str | Sequence[str],
        namespace: str,
        json_default: Callable[[Any], Any] | None,
        history_size: int | None = None,
        history_ttl: float | None = None,
    ) -> None:
        self.history_size = optional_count(1)("history_size", history_size)
        self.history_ttl = optional_seconds("history_ttl", history_ttl)
        self.urls = parse_urls(url)
        self.url = self.urls[0]
        self.namespace = namespace
        self.json_default = json_default
        self._prefix = "{" + namespace + "}:"
        sender = f"publisher:{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._head = frame_head(sender.encode())
        self._publish_cmd: list[str | None] = [None] * len(self.urls)

    def _encode(self, message: Any, default: Callable[[Any], Any] | None) -> str:
        return dumps(message, default=default if default is not None else self.json_default)

    def _lobby(self, lobby: str, message: Any, exclude: str | None, default: Any) -> tuple[bytes, int, bytes]:
        channel = lobby_channel(self.namespace, lobby)
        frame = self._head + lobby_record(lobby, self._encode(message, default), exclude)
        return channel, shard_of(channel, self.urls), frame

    def _kept(self, lobby: str, message: Any, exclude: str | None, default: Any, cmd: str) -> list[Any]:
        """Keys and arguments of the history script for one broadcast (history on)."""
        assert self.history_size is not None
        data = self._encode(message, default)
        return append_args(self.namespace, lobby, data, exclude, self.history_size, self.history_ttl, cmd)

    def _user(self, user: str, message: Any, default: Any) -> tuple[bytes, int, bytes]:
        channel = user_channel(self.namespace, user)
        frame = self._head + user_record(user, self._encode(message, default))
        return channel, shard_of(channel, self.urls), frame

    def _lobby_key(self, lobby: str) -> str:
        return self._prefix + "lu:" + lobby

    def __repr__(self) -> str:
        url = self.url if len(self.urls) == 1 else self.urls
        return f"{type(self).__name__}({url!r}, namespace={self.namespace!r})"


class Publisher(_Common):
    """Publish to a cluster of ``ConnectionManager(backend=RedisBackend(...))``
    nodes from any asyncio program, with the manager's method names and
    return values.

    ``url``: the same URL (or list of URLs, first the primary) and
    ``namespace`` the nodes use. ``json_default``: converter for objects the
    encoder does not handle (like the manager's). Connections are opened on
    first use (redis-py's pool) and closed by :meth:`aclose` or ``async
    with``. Redis errors propagate as ``redis.exceptions.RedisError``.
    Counts are the cluster's connected connections as the primary Redis has
    them (handshakes in progress excluded).

    ``history_size`` / ``history_ttl`` (keyword-only; the nodes' settings,
    checked like the manager's: TypeError / ValueError): when the nodes keep
    history, a Publisher must say so, and its broadcasts then go through the
    nodes' history script (:mod:`wsmanager.backends.redis_history`): kept in
    the lobby's stream with the next offset and published with their
    position, whether or not anyone is in the lobby, like a node's.
    """

    def __init__(
        self,
        url: str | Sequence[str] = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "wsm",
        json_default: Callable[[Any], Any] | None = None,
        history_size: int | None = None,
        history_ttl: float | None = None,
    ) -> None:
        super().__init__(url, namespace, json_default, history_size, history_ttl)
        self._clients = [aioredis.Redis.from_url(u) for u in self.urls]

    async def _command(self, shard: int) -> str:
        cmd = self._publish_cmd[shard]
        if cmd is None:
            info = await self._clients[shard].info("server")
            cmd = self._publish_cmd[shard] = "SPUBLISH" if _sharded(info) else "PUBLISH"
        return cmd

    async def _publish(self, shard: int, channel: bytes, frame: bytes) -> None:
        cmd = await self._command(shard)
        await self._clients[shard].execute_command(cmd, channel, frame)  # type: ignore[no-untyped-call]

    async def broadcast_to_lobby(
        self,
        lobby_code: str,
        message: Any,
        exclude_user_id: str | None = None,
        *,
        default: Callable[[Any], Any] | None = None,
    ) -> int:
        """Send ``message`` to every connection of ``lobby_code`` on every node
        (but ``exclude_user_id``'s). Returns how many connections it was
        handed to (0: nothing published). Serialization errors as
        ``ConnectionManager.broadcast_to_lobby`` (TypeError, ValueError,
        RecursionError), raised before anything is sent; with history on,
        TypeError for a message that is not a JSON object."""
        channel, shard, frame = self._lobby(lobby_code, message, exclude_user_id, default)
        kept = None
        if self.history_size is not None:
            kept = self._kept(lobby_code, message, exclude_user_id, default, await self._command(shard))
        count = int(
            await self._clients[0].eval(LOBBY_COUNT, 1, self._lobby_key(lobby_code), exclude_user_id or "")
        )
        if kept is not None:  # kept and published, members or not
            await self._clients[shard].eval(HISTORY_APPEND, 2, *kept)
        elif count:
            await self._publish(shard, channel, frame)
        return count

    async def send_to_user(
        self, user_id: str, message: Any, *, default: Callable[[Any], Any] | None = None
    ) -> bool:
        """Send ``message`` to every connection of ``user_id`` on every node.
        True if the user had a connection (the message was published)."""
        channel, shard, frame = self._user(user_id, message, default)
        if not await self.is_user_connected(user_id):
            return False
        await self._publish(shard, channel, frame)
        return True

    async def get_lobby_users(self, lobby_code: str) -> set[str]:
        """User ids with a connection in ``lobby_code`` on any node."""
        users = await self._clients[0].hkeys(self._lobby_key(lobby_code))
        return {u.decode() if isinstance(u, bytes) else u for u in users}

    async def is_user_connected(self, user_id: str) -> bool:
        """Whether ``user_id`` has an open connection on any node."""
        n = await self._clients[0].hget(self._prefix + "online", user_id)
        return n is not None and int(n) > 0

    async def aclose(self) -> None:
        """Close the connections to Redis."""
        for client in self._clients:
            await client.aclose()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class SyncPublisher(_Common):
    """:class:`Publisher` for synchronous code (a Celery task, a script): the
    same methods and keywords (``history_size`` / ``history_ttl`` included),
    blocking, on redis-py's synchronous client. Safe to share between threads
    (redis-py's connection pool)."""

    def __init__(
        self,
        url: str | Sequence[str] = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "wsm",
        json_default: Callable[[Any], Any] | None = None,
        history_size: int | None = None,
        history_ttl: float | None = None,
    ) -> None:
        super().__init__(url, namespace, json_default, history_size, history_ttl)
        self._clients = [redis.Redis.from_url(u) for u in self.urls]

    def _command(self, shard: int) -> str:
        cmd = self._publish_cmd[shard]
        if cmd is None:
            info = self._clients[shard].info("server")
            cmd = self._publish_cmd[shard] = "SPUBLISH" if _sharded(info) else "PUBLISH"
        return cmd

    def _publish(self, shard: int, channel: bytes, frame: bytes) -> None:
        self._clients[shard].execute_command(self._command(shard), channel, frame)  # type: ignore[no-untyped-call]

    def broadcast_to_lobby(
        self,
        lobby_code: str,
        message: Any,
        exclude_user_id: str | None = None,
        *,
        default: Callable[[Any], Any] | None = None,
    ) -> int:
        """As :meth:`Publisher.broadcast_to_lobby`."""
        channel, shard, frame = self._lobby(lobby_code, message, exclude_user_id, default)
        kept = None
        if self.history_size is not None:
            kept = self._kept(lobby_code, message, exclude_user_id, default, self._command(shard))
        count = int(self._clients[0].eval(LOBBY_COUNT, 1, self._lobby_key(lobby_code), exclude_user_id or ""))
        if kept is not None:  # kept and published, members or not
            self._clients[shard].eval(HISTORY_APPEND, 2, *kept)
        elif count:
            self._publish(shard, channel, frame)
        return count

    def send_to_user(
        self, user_id: str, message: Any, *, default: Callable[[Any], Any] | None = None
    ) -> bool:
        """As :meth:`Publisher.send_to_user`."""
        channel, shard, frame = self._user(user_id, message, default)
        if not self.is_user_connected(user_id):
            return False
        self._publish(shard, channel, frame)
        return True

    def get_lobby_users(self, lobby_code: str) -> set[str]:
        """As :meth:`Publisher.get_lobby_users`."""
        users: list[bytes] = self._clients[0].hkeys(self._lobby_key(lobby_code))  # type: ignore[assignment]
        return {u.decode() for u in users}

    def is_user_connected(self, user_id: str) -> bool:
        """As :meth:`Publisher.is_user_connected`."""
        n = self._clients[0].hget(self._prefix + "online", user_id)
        return n is not None and int(n) > 0

    def close(self) -> None:
        """Close the connections to Redis."""
        for client in self._clients:
            client.close()

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
