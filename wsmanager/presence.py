"""Presence events (issue 11): coalesced join / leave diffs per lobby.

Opt-in with ``ConnectionManager(presence_events=True, presence_interval=0.2)``.
A lobby's presence is the set of users with at least one connection in it
(``manager.get_lobby_users(lobby)``: cluster-wide with a clustered backend).
The C core marks each lobby whose membership changed (connect, join, leave,
any removal: disconnect, failed send, stale sweep, replace); at most once per
``presence_interval`` this module takes those marks and sends each changed
lobby's members one message::

    {"type": "presence", "lobby": L, "joins": [user_ids], "leaves": [user_ids]}

the diff between the users now and the users last announced (sorted lists).
A user with several tabs therefore joins once and leaves once; a join and a
leave within one interval cancel out and send nothing. A connection that
enters a lobby first gets the lobby's last announced state, so that the
diffs that follow apply to it exactly::

    {"type": "presence", "lobby": L, "joins": [...], "leaves": [], "state": true}

When presence is off nothing here exists: no task, no mark, no cost on
connect or broadcast. When it is on, one task per manager sends the diffs:
it sleeps until a membership changes (:meth:`Presence.wake`: the manager
calls it on connect, join, leave, disconnect, a stale or dead endpoint's
removal and a backend's report), then waits one ``presence_interval`` to
coalesce what else changes meanwhile, flushes, and sleeps again. A member
whose presence message cannot be sent is removed like on any failed send
(``wsmanager.delivery``); its leave is announced one interval later.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._core import dumps

if TYPE_CHECKING:
    from .manager import ConnectionManager

logger = logging.getLogger(__name__)

__all__ = ["Presence"]


class Presence:
    """The coalescer of one manager (``manager.presence``)."""

    def __init__(
        self,
        manager: ConnectionManager,
        interval: float,
        take_dirty: Callable[[ConnectionManager], list[str]],
    ) -> None:
        """``take_dirty(manager)``: the lobbies whose membership changed since
        its last call (the core's marks, on while this object exists)."""
        self._manager = weakref.ref(manager)
        self._take_dirty = take_dirty
        #: seconds between two presence messages of a lobby, at most one each
        self.interval = interval
        #: lobby -> the users its members were last told about
        self.announced: dict[str, frozenset[str]] = {}
        self._remote: set[str] = set()  # lobbies a backend reported changed
        self._task: asyncio.Task[None] | None = None
        self._due = False  # a change since the flusher last took the marks
        self._waiter: asyncio.Future[None] | None = None  # the parked flusher's
        #: how many times the flusher woke up to flush (once per interval at
        #: most, and only after a change: none while nothing changes)
        self.wakeups = 0

    # ------------------------------------------------------------ events

    def entered(self, websocket: Any, lobby_code: str) -> None:
        """``websocket`` entered ``lobby_code`` (connect or join): send it the
        last announced state, and make sure the flusher runs."""
        manager = self._manager()
        if manager is None:
            return
        users = sorted(self.announced.get(lobby_code, ()))
        message = {"type": "presence", "lobby": lobby_code, "joins": users, "leaves": [], "state": True}
        manager.delivery.post(websocket, dumps(message))
        self.wake()

    def changed(self, lobby_code: str) -> None:
        """Another node's membership of ``lobby_code`` changed (a backend's call)."""
        self._remote.add(lobby_code)
        self.wake()

    def wake(self) -> None:
        """A membership changed (the core has marked its lobby): the flusher
        sends the diffs one ``interval`` from now, starting if it is not
        running in the running loop. Cheap when it is awake already."""
        self._due = True
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not waiter.get_loop().is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:  # a call outside any loop: the flusher's loop runs it later
                running = waiter.get_loop()
            if running is waiter.get_loop():
                waiter.set_result(None)
                return
        self.ensure_running()

    # ------------------------------------------------------------- flush

    def flush(self) -> int:
        """Send every changed lobby its diff now; returns how many presence
        messages were delivered (one per member of each lobby that changed)."""
        manager = self._manager()
        if manager is None:
            return 0
        lobbies = self._take_dirty(manager)
        if self._remote:
            lobbies.extend(self._remote.difference(lobbies))
            self._remote.clear()
        sent = 0
        for lobby in lobbies:
            now = frozenset(manager.get_lobby_users(lobby))
            before = self.announced.get(lobby, frozenset())
            joins, leaves = now - before, before - now
            if now:
                self.announced[lobby] = now
            else:
                self.announced.pop(lobby, None)
            if not joins and not leaves:
                continue
            message = {"type": "presence", "lobby": lobby, "joins": sorted(joins), "leaves": sorted(leaves)}
            sent += manager.delivery.deliver_lobby_now(lobby, dumps(message), None)
        return sent

    # --------------------------------------------------------- the task

    def ensure_running(self) -> None:
        """Start the periodic flusher in the running loop if it is not running."""
        task = self._task
        if task is not None and not task.done():
            try:
                if task.get_loop() is asyncio.get_running_loop():
                    return
            except RuntimeError:
                return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name="wsmanager-presence")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._manager() is not None:
            if not self._due:  # nothing changed: sleep until something does
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    if self._waiter is waiter:
                        self._waiter = None
            self.wakeups += 1
            await asyncio.sleep(self.interval)  # what else changes meanwhile goes in the same diff
            self._due = False  # a change made by the flush itself (a failed send) wakes it again
            try:
                self.flush()
            except Exception:
                logger.exception("presence flush failed")

    async def stop(self) -> None:
        """Stop the flusher (it restarts with the next event)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(task, return_exceptions=True)
