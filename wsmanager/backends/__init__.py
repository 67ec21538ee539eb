"""Backends: where a ConnectionManager's reach ends.

``InMemoryBackend`` (the default) keeps everything in this process: the
manager then runs exactly the single-process code, with no backend call on any
path. ``RedisBackend`` (``wsmanager.backends.redis``, extra ``wsmanager[redis]``)
joins every process and machine that shares a Redis into one cluster:
broadcasts, direct messages, limits and presence span all of them.

    from wsmanager import ConnectionManager
    from wsmanager.backends.redis import RedisBackend

    manager = ConnectionManager(backend=RedisBackend("redis://127.0.0.1:6379/0"))

or, for the module-level ``wsmanager.manager``, set ``WSMANAGER_REDIS_URL``
before the import (see :func:`backend_from_env`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .view import ClusterView

if TYPE_CHECKING:
    from ..manager import ConnectionManager

__all__ = ["Backend", "ClusterView", "InMemoryBackend", "backend_from_env"]


@runtime_checkable
class Backend(Protocol):
    """What a ConnectionManager asks of its backend.

    A backend with ``clustered = False`` is never called after :meth:`bind`:
    the manager keeps its single-process paths. A clustered backend is called
    at these points, all synchronous unless marked async:

    * ``await reserve(ws, lobby, user)`` after the local reservation, before
      ``accept()``: ``""`` or a refusal reason, decided cluster-wide;
    * ``commit(ws)`` once accepted, ``release(ws)`` when the handshake failed
      or the connection left (``disconnect``, failed send, stale sweep);
    * ``publish_lobby`` / ``publish_user`` with the text already serialized,
      after or before local delivery; they return the number of remote
      connections the message was handed to (an estimate from the view);
    * ``view``: the cluster's presence, for the sync read methods.
    * rooms (``manager.join`` / ``leave``): ``await join(ws, lobby)`` after
      the local membership is reserved (it counts against ``max_per_lobby``
      here), before it is visible: ``""`` to admit or a refusal reason
      (``"lobby_full"``) decided atomically cluster-wide; ``leave(ws, lobby)``
      (sync, queued like ``release``) when a membership other than by
      removal ends; ``release(ws)`` ends every membership of ``ws``. A
      backend without them makes ``manager.join`` raise NotImplementedError.
    * presence: when the backend learns that another node's membership of a
      lobby changed, it calls ``manager.presence_changed(lobby)`` (cheap, a
      no-op unless the manager has ``presence_events`` on) so that the
      presence diff of that lobby covers every node.
    * history (``history_size``, issue 12; the in-memory rings are the core's,
      ``csrc/history.c``): a clustered backend keeps one history per lobby for
      the cluster and implements ``history_publish(lobby, data,
      exclude_user_id) -> int | None`` (sync): assign the next offset of the
      lobby's epoch, add it to ``data`` exactly as the core does (the member
      ``"_pos":{"lobby":L,"epoch":E,"offset":N}`` before the final ``}``),
      keep it (trimmed to ``manager.history_size`` and ``history_ttl``) and
      publish it to **every** node, this one included, atomically (one Lua
      script): the manager does not deliver it locally, its members get it
      from the backend's lobby delivery like remote ones, so that every
      member sees one offset order (a local delivery could overtake a remote
      message with a lower offset). It returns the lobby's connection count,
      or None when it cannot keep the message (the manager then delivers it
      locally without a position). And ``await history_since(lobby, since,
      user_id) -> (recovered, epoch, top, texts)`` with the meaning of
      ``Core._history_since`` (``since`` None: the position only), answered
      only once every later message of the lobby is sure to reach this node.
      The manager holds the connection's messages (``Delivery.hold``) from
      the moment it becomes a member until the answer, then sends the replay
      and the recovery message first and drops the held messages of that
      lobby and epoch with an offset <= ``top``
      (:func:`wsmanager.history.place_replay`). ``RedisBackend`` does this
      with :mod:`wsmanager.backends.redis_history`. A clustered backend
      without ``history_publish`` makes ``ConnectionManager(history_size=N)``
      raise NotImplementedError.

    Messages from other nodes come back through the manager's
    ``_deliver_lobby`` / ``_deliver_user``.
    """

    clustered: bool

    def bind(self, manager: ConnectionManager) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class InMemoryBackend:
    """The default: one process, nothing shared, no server needed."""

    clustered = False

    def bind(self, manager: ConnectionManager) -> None:
        """Nothing to do: the manager's own registry is the whole truth."""

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""

    def stats(self) -> dict[str, Any]:
        return {"backend": "memory", "up": True}

    def __repr__(self) -> str:
        return "InMemoryBackend()"


def backend_from_env(environ: dict[str, str] | None = None) -> Backend:
    """The backend the environment asks for: ``InMemoryBackend()`` unless
    ``WSMANAGER_REDIS_URL`` is set, then a ``RedisBackend`` on that URL (or
    those URLs, separated by commas: the first is the primary) with
    ``WSMANAGER_REDIS_NAMESPACE`` (default ``"wsm"``) and
    ``WSMANAGER_LEASE_SECONDS`` (default 10) when set.
    Raises ImportError when redis-py is missing (``pip install wsmanager[redis]``).
    """
    env = os.environ if environ is None else environ
    url = env.get("WSMANAGER_REDIS_URL", "").strip()
    if not url:
        return InMemoryBackend()
    from .redis import RedisBackend

    kwargs: dict[str, Any] = {}
    if env.get("WSMANAGER_REDIS_NAMESPACE"):
        kwargs["namespace"] = env["WSMANAGER_REDIS_NAMESPACE"]
    if env.get("WSMANAGER_LEASE_SECONDS"):
        kwargs["lease"] = float(env["WSMANAGER_LEASE_SECONDS"])
    return RedisBackend(url, **kwargs)
