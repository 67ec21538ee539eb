"""Reading pongs while the app does not read.

A pong is an inbound message, and the manager hears of it only when
something reads the socket. An endpoint that only pushes never reads, and the
seed's loop does not read while its message handler awaits (``ping_user()``
from the handler, a slow handler): in both cases the client's answers would
sit unread in the server's receive queue and the heartbeat would close a
healthy client as stale.

So ``connect()`` puts a :class:`Reader` in front of the websocket's ASGI
``receive`` (Starlette's ``WebSocket._receive``). While no ping is
outstanding it only counts the app's pending receives (no Task, no buffer).
When a ping goes out (the heartbeat's or ``ping_user()``'s) and the app is
not inside a receive, the reader reads on the app's behalf, in one short-lived
task, until the pong arrives, the ping times out, or the app calls receive:

* a ``{"type": "health_pong"}`` text message it reads is recorded
  (``record_pong_ws``: liveness, the round trip, a waiting ``ping_user()``)
  and consumed;
* any other message counts as liveness (``touch``) and is held, in order, for
  the app's next receives (at most :data:`MAX_HELD`; past that the reader
  stops reading until the app catches up, so a client cannot make the
  manager buffer without bound);
* a ``websocket.disconnect`` removes the connection from the manager (the
  client left) and is held for the app too; nothing is read after it.

Messages the app reads itself pass through unchanged (the app still sees,
and reports, every pong it reads), so an endpoint that reads loses, reorders
and misses nothing: it gets every message the reader held, in order, before
anything newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Receive
from starlette.websockets import WebSocket

from .servers import asgi_receive, replace_asgi_receive

if TYPE_CHECKING:
    from .manager import ConnectionManager

__all__ = ["MAX_HELD", "Reader", "Receiving", "loop_of", "pinged"]

#: Most messages read on the app's behalf and held until it reads them.
MAX_HELD = 16


def _is_pong(message: Message) -> bool:
    text = message.get("text")
    if text is None or "health_pong" not in text:  # cheap filter before parsing
        return False
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return type(data) is dict and data.get("type") == "health_pong"


class _Failed:
    """What the server's receive raised while read on the app's behalf:
    raised to the app by its next receive."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class _Pending:
    """A reader's state while a ping is outstanding or messages are held."""

    __slots__ = ("ended", "held", "pump", "ws")

    def __init__(self, ws: Any) -> None:
        self.ws: Any = ws  # the websocket (None once ended: no cycle kept)
        self.held: deque[Message | _Failed] = deque()
        self.pump: asyncio.Task[None] | None = None
        self.ended = False  # a websocket.disconnect (or an error) went by: read no more


class _Home:
    """Where a reader reports (its :class:`Receiving`) and the loop it reads
    in: one object shared by the readers of a manager in a loop, so that each
    reader spends one slot on both."""

    __slots__ = ("loop", "owner")

    def __init__(self, owner: Receiving, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop


class Receiving:
    """The per-manager side of the readers: how they report to the manager
    (held weakly, like the heartbeat's reference)."""

    __slots__ = ("_due", "_home", "_manager")

    def __init__(self, manager: ConnectionManager, pong_due: Callable[[Any, Any], bool]) -> None:
        self._manager = weakref.ref(manager)
        self._due = pong_due  # pong_due(manager, websocket): a ping awaits its pong
        self._home: _Home | None = None  # the last loop's, shared by its readers

    def home(self, loop: asyncio.AbstractEventLoop) -> _Home:
        """The :class:`_Home` of this manager's readers in ``loop``."""
        home = self._home
        if home is None or home.loop is not loop:
            home = self._home = _Home(self, loop)
        return home

    def attach(self, websocket: Any, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Put a :class:`Reader` in front of ``websocket``'s receive (once;
        a websocket that is not a Starlette ``WebSocket`` is left alone).

        ``loop``: the running loop (looked up when None). Returns True when a
        reader bound to that loop fronts the websocket (see :func:`loop_of`).
        """
        if not isinstance(websocket, WebSocket):
            return False
        inner = asgi_receive(websocket)
        if inner is None:
            return False
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no running loop: nothing to read for
                return False
        if type(inner) is Reader:
            reader_loop = inner.home.loop
            inner.home = self.home(reader_loop)
            return reader_loop is loop
        home = self._home
        if home is None or home.loop is not loop:
            home = self.home(loop)
        replace_asgi_receive(websocket, Reader(inner, home))
        return True

    def due(self, websocket: Any) -> bool:
        manager = self._manager()
        return manager is not None and self._due(manager, websocket)

    def pong(self, websocket: Any) -> None:
        manager = self._manager()
        if manager is not None:
            manager.record_pong_ws(websocket)

    def touch(self, websocket: Any) -> None:
        manager = self._manager()
        if manager is not None:
            manager.touch(websocket)

    def left(self, websocket: Any) -> None:
        manager = self._manager()
        if manager is not None:
            manager.disconnect(websocket)


class Reader:
    """Stands in for one websocket's ASGI ``receive``; see the module's doc."""

    # Four slots (64 bytes with the GC header, one per connection): the
    # manager and loop share one _Home, and the app's receive in progress is
    # always a coroutine, read from itself rather than counted.
    __slots__ = ("current", "home", "inner", "pending")

    def __init__(self, inner: Receive, home: _Home) -> None:
        self.inner = inner
        self.home = home
        # the app's last receive (a coroutine: the server's own, or a frame of
        # ours around it): in progress until it finishes
        self.current: Any = None
        self.pending: _Pending | None = None  # None: no ping outstanding, nothing held

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the reader reads in (its connection's)."""
        return self.home.loop

    @property
    def owner(self) -> Receiving:
        """The manager side the reader reports to."""
        return self.home.owner

    def __call__(self) -> Awaitable[Message]:
        if self.pending is not None:
            receiving: Any = self._receive_pending()
        else:
            receiving = self.inner()
            if type(receiving) is not CoroutineType:
                receiving = self._counted(receiving)
        # No frame of ours around the server's coroutine (no allocation, no
        # extra await per message): whether the app's receive is in progress
        # is read from the coroutine itself (see reading()).
        self.current = receiving
        return receiving  # type: ignore[no-any-return]

    def reading(self) -> bool:
        """True while a receive of the app is in progress."""
        current = self.current
        if current is None:
            return False
        if current.cr_frame is None:  # it finished
            self.current = None
            return False
        return True

    # ------------------------------------------------------------ internals

    async def _counted(self, receiving: Awaitable[Message]) -> Message:
        """A server receive that is not a coroutine: made one (see reading())."""
        return await receiving

    async def _receive_pending(self) -> Message:
        while True:
            st = self.pending
            if st is None:  # settled meanwhile
                return await self()
            if st.held:
                item = st.held.popleft()
                if not st.ended:
                    self.loop.call_soon(self._check)
                if isinstance(item, _Failed):
                    raise item.exc
                return item
            if st.pump is None:
                break
            # this coroutine is the app's receive in progress (self.current):
            # the pump stops after the read it is in
            await asyncio.wait((st.pump,))
        message = await self.inner()
        if message.get("type") == "websocket.disconnect":
            st.ended = True
            st.ws = None
        else:  # a ping may still await its pong once the app stops reading
            self.loop.call_soon(self._check)
        return message

    def pinged(self, websocket: Any) -> None:
        """A ping was sent to ``websocket``: read for its pong while the app does not."""
        if asyncio.get_running_loop() is not self.loop:
            with contextlib.suppress(RuntimeError):  # its loop is closed: so is the socket
                self.loop.call_soon_threadsafe(self.pinged, websocket)
            return
        st = self.pending
        if st is None:
            self.pending = _Pending(websocket)
        elif st.ended:
            return
        self._check()

    def _check(self) -> None:
        """Start reading on the app's behalf if a pong is due and the app is
        not reading; forget the state once nothing is due or held."""
        st = self.pending
        if st is None or st.pump is not None or st.ended:
            return
        if self.owner.due(st.ws):
            if not self.reading() and len(st.held) < MAX_HELD and not self.loop.is_closed():
                st.pump = self.loop.create_task(self._pump(st), name="wsmanager-pong-reader")
        elif not st.held:
            self.pending = None

    async def _pump(self, st: _Pending) -> None:
        owner, ws, held = self.owner, st.ws, st.held
        try:
            while not self.reading() and len(held) < MAX_HELD and owner.due(ws):
                try:
                    message = await self.inner()
                except Exception as exc:  # the server's receive failed: the app gets it
                    held.append(_Failed(exc))
                    st.ended = True
                    break
                if message.get("type") == "websocket.receive":
                    if _is_pong(message):
                        owner.pong(ws)
                        continue
                    owner.touch(ws)  # any message is a sign of life
                    held.append(message)
                    continue
                held.append(message)  # websocket.disconnect: the client left
                st.ended = True
                owner.left(ws)
                break
        finally:
            st.pump = None
            if st.ended:
                st.ws = None
        self._check()


def loop_of(websocket: Any) -> asyncio.AbstractEventLoop | None:
    """The event loop ``connect()`` attached ``websocket``'s reader in (the
    loop the connection belongs to), or None when it has no reader."""
    reader = asgi_receive(websocket)
    return reader.loop if type(reader) is Reader else None


def pinged(websocket: Any) -> None:
    """Tell ``websocket``'s reader that a ping was just sent to it (no-op
    for a websocket ``connect()`` did not attach a reader to)."""
    reader = asgi_receive(websocket)
    if type(reader) is Reader:
        reader.pinged(websocket)
