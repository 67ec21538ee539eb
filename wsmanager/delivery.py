"""The send path: how a serialized message reaches a socket.

One :class:`Delivery` per manager (``ConnectionManager.delivery``) holds
everything between a serialized text and the sockets: the inline sends, the
outboxes and writers of slow connections, the fan-out of a lobby or a user's
message, the drop hook the core calls on removals, the removal callbacks of
``serve()`` and the background closes. It is also the interface wsmanager's
own modules use to reach a manager beyond its public API
(:mod:`wsmanager.endpoint`, :mod:`wsmanager.health`, the backends):

* sends: :meth:`Delivery.post` (sync, never waits), :meth:`Delivery.send`,
  :meth:`Delivery.deliver_lobby`, :meth:`Delivery.deliver_user`;
* closes: :meth:`Delivery.refuse` (accept-then-close a handshake),
  :meth:`Delivery.close_later`;
* removals: :meth:`Delivery.on_removal` / :meth:`Delivery.forget_removal`
  (serve()'s callbacks), :meth:`Delivery.removed`, :meth:`Delivery.release`
  (tell a clustered backend);
* the core's operations they need: :meth:`Delivery.allow`,
  :meth:`Delivery.sweep`, :meth:`Delivery.next_deadline`,
  :meth:`Delivery.now`, :meth:`Delivery.reap`, :meth:`Delivery.lobby_count`,
  :meth:`Delivery.wake_ping_waiter`.

It reaches the C core (``wsmanager._core.Core``, the manager's base class)
through the core's documented methods (``wsmanager/_core.pyi``) and holds the
manager weakly, like the heartbeat: dropping the manager frees it at once.
What it reads of a server's private state goes through
:mod:`wsmanager.servers`.

A send is first tried inline: the send coroutine is stepped once, and when it
completes (the transport took the frame) no Task or Future is made. If it
suspends (the client does not read and the transport's buffer is over its
high-water mark), the suspended send and every later message for that
connection go to the connection's outbox, written in order by one writer
task; the broadcast moves on to the next member.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketState

from .codes import CloseCode, close_code_for
from .events import CloseListeners
from .servers import FANOUT_READS, abort_transport, asgi_send, direct_frames_possible, direct_transport

if TYPE_CHECKING:
    from .backends.redis import RedisBackend
    from .manager import ConnectionManager

# the records keep the logger name they had when this code was in manager.py
logger = logging.getLogger("wsmanager.manager")

__all__ = ["Delivery"]

_CONNECTED = WebSocketState.CONNECTED
#: a send being stepped: its awaitable's ``__await__()`` iterator
_Steps = Generator[Any, None, Any]
_DISCONNECTED = WebSocketState.DISCONNECTED
#: the C fan-out's spec: what it reads of a recipient (servers.FANOUT_READS),
#: then the ASGI message it sends: {"type": "websocket.send", "text": data}
_FANOUT_SPEC = (*FANOUT_READS, "type", "websocket.send", "text")
# kinds of Delivery._fanout_slow (csrc/fanout.h)
_FANOUT_POST, _FANOUT_SUSPENDED, _FANOUT_FAILED = 0, 1, 2


class _Outbox:
    """The outbound backlog of one connection whose send suspended."""

    __slots__ = ("held", "holds", "loop", "nbytes", "queue", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[tuple[str, int]] = deque()
        self.nbytes = 0
        self.task: asyncio.Task[None] | None = None
        #: messages kept back while the connection recovers (Delivery.hold), else None
        self.held: list[str] | None = None
        self.holds = 0


async def _resume(coro: _Steps, step: Any) -> None:
    """Finish driving ``coro`` (a send's ``__await__()`` iterator), which
    already yielded ``step`` to its caller.

    Does what an asyncio Task does with a coroutine: wait for the future it
    yielded (or one loop iteration for a bare yield), resume it, repeat; a
    cancellation is passed into the coroutine.
    """
    while True:
        try:
            if step is None:
                await asyncio.sleep(0)
            else:
                step._asyncio_future_blocking = False
                await asyncio.wait((step,))
        except BaseException as exc:
            if step is not None:
                step.cancel()
            try:
                step = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            step = coro.send(None)
        except StopIteration:
            return


# -- direct frames -------------------------------------------------------
#
# A server->client frame is unmasked, so one text frame's bytes are the same
# for every recipient of a broadcast: the manager builds one uncompressed
# text frame per message and writes it to each ready connection's transport
# where wsmanager.servers.direct_transport() finds one (uvicorn's
# websockets-sansio protocol, see there).


def _text_frame(data: str) -> bytes | None:
    """One unmasked, uncompressed, final text frame carrying ``data``; None
    if ``data`` is not valid UTF-8 (the ordinary path then reports it)."""
    try:
        payload = data.encode()
    except UnicodeEncodeError:
        return None
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


#: bare yields of one send resumed inline before it goes to a writer task
_INLINE_YIELDS = 4

# Why the core must call the drop hook when a connection is removed (bits).
_NOTIFY_OUTBOX = 1  # its writer holds queued messages
_NOTIFY_CALLBACK = 2  # serve() waits to hear of its removal


def _weak_method(obj: Any, method: Callable[[Any, Any], None]) -> Callable[[Any], None]:
    """``method`` bound to ``obj`` through a weak reference."""
    ref = weakref.ref(obj)

    def call(arg: Any) -> None:
        target = ref()
        if target is not None:
            method(target, arg)

    return call


class Delivery:
    """The send path of one manager; see the module's doc."""

    __slots__ = (
        "__weakref__",
        "_manager",
        "backplane",
        "close_listeners",
        "closed",
        "closers",
        "direct_frames",
        "outboxes",
        "ping_waiters",
        "removal_callbacks",
    )

    def __init__(
        self,
        manager: ConnectionManager,
        *,
        backplane: RedisBackend | None,
        direct_frames: bool,
        ping_waiters: dict[str, Any],
    ) -> None:
        self._manager = weakref.ref(manager)
        #: the clustered backend to tell of removals, or None (single process)
        self.backplane = backplane
        #: write one pre-built frame where servers.direct_transport() allows
        self.direct_frames = direct_frames
        #: websocket -> its outbound backlog; only connections whose last send
        #: suspended are here, so the common case costs one dict miss
        self.outboxes: dict[Any, _Outbox] = {}
        #: background closes in progress
        self.closers: set[asyncio.Task[None]] = set()
        #: closes performed, by reason (get_stats()["closed"])
        self.closed: dict[str, int] = {}
        #: told of every refusal and close performed (manager.add_close_listener, wsmanager.events)
        self.close_listeners = CloseListeners()
        #: user_id -> its ping_user() waiter (the manager's dict, shared)
        self.ping_waiters = ping_waiters
        #: websocket -> called once when its entry is removed, however (serve()'s on_disconnect)
        self.removal_callbacks: dict[Any, Callable[[], None]] = {}

    async def refuse(
        self,
        websocket: WebSocket,
        reason: str,
        *,
        count: bool = False,
        lobby_code: str | None = None,
        user_id: str | None = None,
    ) -> None:
        """Accept-then-close, so that browsers see the code and the reason.

        Closing before ``accept()`` fails the handshake with HTTP 403, which a
        browser reports as 1006 without a reason. ``count``: count the refusal
        in ``get_stats()["refused"]`` (refusals the core decided are counted
        already). The close listeners hear of it (``refused=True``, with
        ``lobby_code`` / ``user_id`` where the caller knows them).
        """
        core = self._manager()
        if count and core is not None:
            core._count_refusal(reason)
        code = close_code_for(reason)
        if self.close_listeners:
            self.close_listeners.report(websocket, code, reason, lobby_code, user_id, refused=True)
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

    # Local delivery of serialized text: the seam a backplane publishes into.

    # A send runs Python code (the server's, a middleware's send wrapper) that
    # may remove members or move them to another lobby or user before their
    # turn. The core counts removals: while the count is what it was before
    # the snapshot, every recipient left in it is still a member (one C call
    # per recipient); once it moved, each remaining recipient is checked
    # against the registry before it is sent anything.

    @staticmethod
    def _left_lobby(
        core: ConnectionManager, websocket: Any, lobby_code: str, exclude_user_id: str | None
    ) -> bool:
        """Whether ``websocket`` is no longer a recipient of the lobby's message."""
        info = core._info(websocket)
        return info is None or info[1] == exclude_user_id or not core._is_member(websocket, lobby_code)

    async def deliver_lobby(self, lobby_code: str, data: str, exclude_user_id: str | None) -> int:
        """Send ``data`` to this process's connections in the lobby without
        waiting for any of them; the count of connections that got it or have
        it queued. A recipient that is no longer in the lobby (or became the
        excluded user) when its turn comes is skipped."""
        return self.deliver_lobby_now(lobby_code, data, exclude_user_id)

    def deliver_lobby_now(self, lobby_code: str, data: str, exclude_user_id: str | None) -> int:
        """:meth:`deliver_lobby` without the coroutine (it never waits): for
        callers on the event loop's thread that need not await."""
        core = self._manager()
        if core is None:
            return 0
        if self.direct_frames and direct_frames_possible():
            mark = core._removals()  # before the snapshot: a removal while it is taken counts as a change
            targets = core._lobby_targets(lobby_code, exclude_user_id)
            return self._deliver_direct(core, targets, mark, lobby_code, data, exclude_user_id)
        # The ordinary ASGI send path (every server but uvicorn's sans-I/O
        # protocol), in C (csrc/fanout.c): per recipient still in the lobby,
        # one state check, the raw ASGI send (servers.FANOUT_READS) called
        # with its own message dict (a send wrapper may rewrite the message
        # in place, and a server may keep it: TestClient queues it), stepped
        # once. What is not for that path (another class, a closing state, a
        # backlog), a send that suspended and one that raised come back to
        # _fanout_slow, at their turn. About 3 us less per broadcast to 10
        # than the same loop in Python (benchmarks/bench_core.py, 20k conns,
        # GC on: 9.5 -> 6.2-6.6 us), a part of it from asking for every
        # member's object at once instead of missing the cache on each in turn.
        return core._fanout_lobby(
            lobby_code, exclude_user_id, data, _FANOUT_SPEC, self.outboxes, self._fanout_slow
        )

    def _fanout_slow(self, websocket: Any, kind: int, a: Any, b: Any) -> bool:
        """A recipient the C fan-out hands back: ``kind`` 0, ``post(websocket,
        a)`` (``a``: the text); 1, its send suspended (``a``: the send's
        ``__await__()`` iterator, ``b``: what it yielded); 2, its send raised
        ``a`` (an ``Exception``). Whether it got the message or has it queued."""
        if kind == _FANOUT_POST:
            return self.post(websocket, a)
        if kind == _FANOUT_SUSPENDED:
            return self._suspended(websocket, a, b)
        self._send_failed(websocket, a)
        return False

    def _deliver_direct(
        self,
        core: ConnectionManager,
        targets: list[Any],
        mark: int,
        lobby_code: str,
        data: str,
        exclude_user_id: str | None,
    ) -> int:
        """deliver_lobby where uvicorn's sans-I/O protocol is loaded: one
        pre-built frame written to each connection that takes one."""
        removals = core._removals
        outboxes = self.outboxes
        frame: bytes | None = None
        built = False
        sent = 0
        for websocket in targets:
            if removals() != mark and self._left_lobby(core, websocket, lobby_code, exclude_user_id):
                continue
            if websocket in outboxes:  # a backlog keeps its order: through the outbox
                if self.post(websocket, data):
                    sent += 1
                continue
            transport = direct_transport(websocket)
            if transport is not None:
                if not built:
                    frame, built = _text_frame(data), True
                if frame is not None:
                    try:
                        transport.write(frame)
                    except Exception as exc:
                        self.drop(websocket, exc)
                        continue
                    sent += 1
                    continue
            if self._send_now(websocket, data):
                sent += 1
        return sent

    async def deliver_user(self, user_id: str, data: str) -> bool:
        """Send ``data`` to this process's connections of the user (no waiting);
        a connection that stopped being the user's before its turn is skipped."""
        core = self._manager()
        if core is None:
            return False
        delivered = False
        removals = core._removals
        mark = removals()
        for websocket in core._user_targets(user_id):
            if removals() != mark:
                info = core._info(websocket)
                if info is None or info[1] != user_id:
                    continue
            if self.post(websocket, data):
                delivered = True
        return delivered

    async def send(self, websocket: WebSocket, data: str) -> bool:
        """Send ``data`` to one connection, in order with the others; never
        waits for a slow client. False if the connection failed or was closed
        as a slow consumer (it is then removed)."""
        return self.post(websocket, data)

    def post(self, websocket: Any, data: str) -> bool:
        """Send ``data`` to one connection without waiting: written now, or
        queued behind the connection's backlog (its writer task sends it);
        False if the connection failed (it is removed), is not registered,
        or was closed as a slow consumer."""
        box = self.outboxes.get(websocket)
        if box is not None:
            return self._enqueue(websocket, box, data)
        if self.direct_frames and direct_frames_possible():
            transport = direct_transport(websocket)
            if transport is not None:
                frame = _text_frame(data)
                if frame is not None:
                    try:
                        transport.write(frame)
                    except Exception as exc:
                        self.drop(websocket, exc)
                        return False
                    return True
        return self._send_now(websocket, data)

    def _send_now(self, websocket: Any, data: str) -> bool:
        """post() for a connection without a backlog and without a direct
        frame: the send stepped once; on suspension the connection gets an
        outbox."""
        if type(websocket) is WebSocket and websocket.application_state is _CONNECTED:
            # What send_text() would do, minus two coroutine frames of checks;
            # the caller keeps Starlette's bookkeeping (servers.asgi_send).
            coro = asgi_send(websocket)({"type": "websocket.send", "text": data}).__await__()
        else:
            coro = websocket.send_text(data).__await__()
        try:
            for step in coro:  # noqa: B007 (step is used below: what the send waits on)
                break
            else:
                return True
        except Exception as exc:
            self._send_failed(websocket, exc)
            return False
        return self._suspended(websocket, coro, step)

    @staticmethod
    def _send_coro(websocket: Any, data: str) -> _Steps:
        """The ``__await__()`` iterator of a send of ``data`` to ``websocket``
        (as :meth:`_send_now` makes it, which keeps its own copy: a hot path)."""
        if type(websocket) is WebSocket and websocket.application_state is _CONNECTED:
            return asgi_send(websocket)({"type": "websocket.send", "text": data}).__await__()
        steps: _Steps = websocket.send_text(data).__await__()
        return steps

    def _send_failed(self, websocket: Any, exc: BaseException) -> None:
        """A send raised: Starlette's bookkeeping (an ``OSError`` marks the
        application side DISCONNECTED, as ``WebSocket.send`` does), then the
        connection is removed."""
        if isinstance(exc, OSError) and type(websocket) is WebSocket:
            websocket.application_state = _DISCONNECTED
        self.drop(websocket, exc)

    def _suspended(self, websocket: Any, coro: _Steps, step: Any) -> bool:
        """The send ``coro`` suspended, yielding ``step``: hand it and the
        connection's later messages to an outbox and its writer task. False
        (and ``coro`` closed) if ``websocket`` is not registered.

        A bare yield (``step`` None: ``asyncio.sleep(0)``, anyio's
        ``checkpoint()``, which every send of Starlette's TestClient and of
        anyio memory streams begins with) asks only to be resumed on a later
        turn and waits for nothing: the send is resumed at once, up to
        :data:`_INLINE_YIELDS` times, before a writer task takes it over.
        False also if the resumed send raised (the connection is removed)."""
        for _ in range(_INLINE_YIELDS):
            if step is not None:
                break
            try:
                for step in coro:  # noqa: B007 (step is used below: what the send waits on)
                    break
                else:
                    return True
            except Exception as exc:
                self._send_failed(websocket, exc)
                return False
        core = self._manager()
        if core is None or websocket not in core:  # not registered (e.g. already closed): no backlog
            coro.close()
            return False
        box = _Outbox(asyncio.get_running_loop())
        self.outboxes[websocket] = box
        core._set_notify(websocket, _NOTIFY_OUTBOX, True)
        box.task = box.loop.create_task(self._writer(websocket, box, coro, step))
        return True

    def _enqueue(self, websocket: Any, box: _Outbox, data: str) -> bool:
        core = self._manager()
        if core is None:
            return False
        if box.loop is not asyncio.get_running_loop():  # left over from a closed loop
            del self.outboxes[websocket]
            core._set_notify(websocket, _NOTIFY_OUTBOX, False)
            return self.post(websocket, data)
        if box.held is not None:  # recovering (hold): kept back, in order, within max_backlog
            if len(box.held) + len(box.queue) >= core.max_backlog:
                logger.info(
                    "slow consumer: %d messages held during a recovery",
                    len(box.held),
                    extra={"reason": "slow_consumer", "code": int(CloseCode.SLOW_CONSUMER)},
                )
                self.close_later(websocket, "slow_consumer")
                return False
            box.held.append(data)
            return True
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        if len(box.queue) >= core.max_backlog or box.nbytes + size > core.max_backlog_bytes:
            logger.info(
                "slow consumer: %d messages, %d bytes queued",
                len(box.queue),
                box.nbytes,
                extra={"reason": "slow_consumer", "code": int(CloseCode.SLOW_CONSUMER)},
            )
            self.close_later(websocket, "slow_consumer")
            return False
        box.queue.append((data, size))
        box.nbytes += size
        return True

    async def _writer(self, websocket: Any, box: _Outbox, coro: _Steps, step: Any) -> None:
        """Finish the suspended send, then write the backlog in order."""
        manager = self._manager
        try:
            await _resume(coro, step)
            queue = box.queue
            while queue and _holds(manager(), websocket):  # disconnected: the rest is dropped
                data, size = queue.popleft()
                box.nbytes -= size
                await websocket.send_text(data)
        except Exception as exc:
            if self.outboxes.get(websocket) is box:
                del self.outboxes[websocket]
                self._set_notify(websocket, _NOTIFY_OUTBOX, False)
                self._send_failed(websocket, exc)
        finally:
            if self.outboxes.get(websocket) is box and box.held is None:  # a hold keeps its box
                del self.outboxes[websocket]
                self._set_notify(websocket, _NOTIFY_OUTBOX, False)

    # Holds (history recovery with a clustered backend, issue 12): between
    # the moment a connection becomes a member and the moment its replay is
    # known, every message to it (fan-out, post) is kept back in its outbox;
    # the fan-out hands connections with an outbox to post(), so the C paths
    # need nothing new.

    def hold(self, websocket: Any) -> None:
        """Keep back every message to ``websocket``, in order, until
        :meth:`unhold` (holds nest: the last unhold releases). More than
        ``max_backlog`` messages held closes it as a slow consumer."""
        box = self.outboxes.get(websocket)
        if box is None:
            box = self.outboxes[websocket] = _Outbox(asyncio.get_running_loop())
            self._set_notify(websocket, _NOTIFY_OUTBOX, True)
        if box.held is None:
            box.held = []
        box.holds += 1

    def unhold(self, websocket: Any, edit: Callable[[list[str]], list[str]]) -> bool:
        """End one hold of ``websocket``: its held messages become
        ``edit(held)`` (the caller adds its replay, drops duplicates); the
        last hold sends them, in order, before anything later. False when
        the connection is gone (removed meanwhile) or failed."""
        box = self.outboxes.get(websocket)
        if box is None or box.held is None:
            return False
        held = edit(box.held)
        box.holds -= 1
        if box.holds > 0:
            box.held = held
            return True
        box.held = None
        if box.task is not None and not box.task.done():  # a writer is sending its backlog
            return all(self._enqueue(websocket, box, text) for text in held)
        return self._drain(websocket, box, held)

    def post_all(self, websocket: Any, texts: list[str]) -> bool:
        """Send ``texts`` to ``websocket`` as one batch: in order, and before
        any message posted to it while they are being sent, even one posted
        re-entrantly (from a send wrapper that broadcasts, say: without this
        it would overtake the rest of the batch). A recovery's replay goes
        through here. Sent inline while sends complete, queued behind a
        backlog otherwise (``max_backlog`` applies as in :meth:`post`).
        False if the connection failed, is not registered, or was closed as
        a slow consumer."""
        box = self.outboxes.get(websocket)
        if box is not None:
            return all(self._enqueue(websocket, box, text) for text in texts)
        core = self._manager()
        if core is None or websocket not in core:
            return False
        box = self.outboxes[websocket] = _Outbox(asyncio.get_running_loop())
        self._set_notify(websocket, _NOTIFY_OUTBOX, True)
        return self._drain(websocket, box, texts)

    def _drain(self, websocket: Any, box: _Outbox, texts: list[str]) -> bool:
        """Send ``texts`` inline through ``box`` (registered in
        :attr:`outboxes`, no writer, not held): while they are sent, every
        post to ``websocket`` lands in ``box.held`` and is sent after them.
        A send that suspends hands the rest to a writer task; the box is
        dropped once everything went out inline."""
        outboxes = self.outboxes
        pending = deque(texts)
        box.held = []
        while pending:
            text = pending.popleft()
            step: Any = None
            sending = self._send_coro(websocket, text)
            coro: _Steps | None = sending
            try:
                for step in sending:  # noqa: B007 (step is used below: what the send waits on)
                    break
                else:
                    coro = None
            except Exception as exc:
                coro = None
                if outboxes.get(websocket) is box:
                    del outboxes[websocket]
                    self._set_notify(websocket, _NOTIFY_OUTBOX, False)
                self._send_failed(websocket, exc)
                return False
            if outboxes.get(websocket) is not box:  # removed (closed) during the send
                if coro is not None:
                    coro.close()
                return False
            if coro is not None:  # suspended: a writer finishes it, then the rest in order
                rest = [*pending, *box.held]
                box.held = None
                box.task = box.loop.create_task(self._writer(websocket, box, coro, step))
                return all(self._enqueue(websocket, box, t) for t in rest)
            if box.holds:  # a recovery began meanwhile (re-entrantly): its unhold sends the rest
                box.held[:0] = pending
                return True
            if not pending and box.held:  # posted meanwhile: next, in order
                pending.extend(box.held)
                box.held = []
        box.held = None
        del outboxes[websocket]
        self._set_notify(websocket, _NOTIFY_OUTBOX, False)
        return True

    def drop(self, websocket: WebSocket, exc: BaseException | None = None) -> None:
        """Remove a connection whose send failed."""
        core = self._manager()
        info = None if core is None else core.disconnect(websocket)
        if info is not None:
            logger.info(
                "send failed, connection removed: %s",
                type(exc).__name__ if exc else "closed",
                extra={"lobby": info[0], "user": info[1], "reason": "send_failed"},
            )

    # disconnect(websocket) is the C core's, with no Python layer on this hot
    # path: the core calls on_removed (the drop hook) only for a connection
    # with an outbound backlog, or for every removal when a backplane must
    # hear of it.

    def on_removed(self, websocket: Any) -> None:
        """The core's drop hook (see :meth:`drop_hook`)."""
        if self.outboxes:
            self.discard_outbox(websocket)
        if self.removal_callbacks:
            self.removed(websocket)
        if self.backplane is not None:
            self.backplane.release(websocket)

    def discard_outbox(self, websocket: Any) -> None:
        """Forget ``websocket``'s backlog and stop its writer."""
        box = self.outboxes.pop(websocket, None)
        if box is not None and box.task is not None and box.task is not asyncio.current_task():
            box.task.cancel()

    # Removal callbacks: every path that takes an entry out of the registry
    # (disconnect() and the closes built on it, _reap, which goes through the
    # core's disconnect, and HealthMonitor.sweep for what _sweep expired) ends
    # in removed(), so serve() learns of it at once, not only when the
    # client's close handshake completes. The core calls the drop hook only
    # for connections flagged with _NOTIFY_CALLBACK.

    def on_removal(self, websocket: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once when ``websocket``'s entry is removed,
        however (serve()'s on_disconnect)."""
        self.removal_callbacks[websocket] = callback
        self._set_notify(websocket, _NOTIFY_CALLBACK, True)

    def forget_removal(self, websocket: Any) -> None:
        """Drop ``websocket``'s removal callback without calling it."""
        if self.removal_callbacks.pop(websocket, None) is not None:
            self._set_notify(websocket, _NOTIFY_CALLBACK, False)

    def removed(self, websocket: Any) -> None:
        """``websocket``'s entry was removed: call its removal callback, if any."""
        callback = self.removal_callbacks.pop(websocket, None)
        if callback is not None:
            try:
                callback()
            except Exception:
                logger.exception("removal callback failed")

    # ------------------------------------------------------------- closing

    def close_later(
        self, websocket: Any, reason: str, *, code: int | None = None, timeout: float | None = None
    ) -> asyncio.Task[None]:
        """Remove ``websocket`` now and close it with ``reason`` in the
        background; a close that cannot complete within ``timeout`` (default
        ``close_timeout``) aborts the TCP connection."""
        core = self._manager()
        info = None if core is None else core.disconnect(websocket)
        if self.outboxes:
            self.discard_outbox(websocket)
        self.closed[reason] = self.closed.get(reason, 0) + 1
        if self.close_listeners:
            self.close_listeners.report(
                websocket,
                code or close_code_for(reason),
                reason,
                None if info is None else info[0],
                None if info is None else info[1],
                refused=False,
            )
        if info is not None and reason != "server_shutdown":
            logger.info(
                "closing connection: %s",
                reason,
                extra={
                    "lobby": info[0],
                    "user": info[1],
                    "reason": reason,
                    "code": code or close_code_for(reason),
                },
            )
        task = asyncio.get_running_loop().create_task(
            self._close_socket(websocket, reason, code, _close_timeout(core) if timeout is None else timeout)
        )
        self.closers.add(task)
        task.add_done_callback(self.closers.discard)
        return task

    async def _close_socket(self, websocket: Any, reason: str, code: int | None, timeout: float) -> None:
        code = close_code_for(reason) if code is None else code
        try:
            if websocket.application_state != WebSocketState.DISCONNECTED:
                await asyncio.wait_for(websocket.close(code=code, reason=reason), timeout)
        except Exception:  # stuck (a client that never reads) or gone
            abort_transport(websocket)
            return
        # As in refuse(): a seed-style endpoint's next receive_*() then sees the
        # client's close as WebSocketDisconnect instead of a RuntimeError.
        websocket.application_state = WebSocketState.CONNECTED

    # ------------------------------------------------- the core, for wsmanager's modules

    def _set_notify(self, websocket: Any, bit: int, flag: bool) -> None:
        core = self._manager()
        if core is not None:
            core._set_notify(websocket, bit, flag)

    def drop_hook(self) -> Callable[[Any], None]:
        """:meth:`on_removed` through a weak reference, for the core's
        ``_set_drop_hook`` (the core holds its hooks strongly)."""
        return _weak_method(self, Delivery.on_removed)

    def release(self, websocket: Any) -> None:
        """Tell a clustered backend that ``websocket`` left (no-op without one)."""
        if self.backplane is not None:
            self.backplane.release(websocket)

    def allow(self) -> Callable[[Any], int]:
        """The core's inbound rate check, ``allow(websocket) -> verdict``
        (0: pass; see ``wsmanager.endpoint``), bound: call it per message."""
        core = self._manager()
        assert core is not None
        return core._allow

    def lobby_count(self, lobby_code: str) -> int:
        """This process's connections in ``lobby_code`` (0 without a manager)."""
        core = self._manager()
        return 0 if core is None else core._lobby_count(lobby_code)

    def sweep(
        self, interval: float, timeout: float, batch: int
    ) -> tuple[list[Any], list[tuple[Any, str, str]]]:
        """The core's heartbeat sweep: ``(to_ping, expired)``; the expired are
        out of the registry already (see ``wsmanager.health``)."""
        core = self._manager()
        if core is None:
            return [], []
        return core._sweep(interval, timeout, batch)

    def next_deadline(self, interval: float, timeout: float) -> float | None:
        """When the next sweep can find something due (the core's clock), or None."""
        core = self._manager()
        return None if core is None else core._next_deadline(interval, timeout)

    def now(self) -> float:
        """The core's clock, seconds."""
        core = self._manager()
        assert core is not None
        return core._now()

    def reap(self, websocket: Any, reason: str) -> tuple[str, str] | None:
        """Remove an entry whose endpoint died; ``(lobby, user)`` or None."""
        core = self._manager()
        return None if core is None else core._reap(websocket, reason)

    def wake_ping_waiter(self, user_id: str) -> None:
        """A pong of ``user_id`` arrived: resolve its ``ping_user()`` waiter."""
        waiter = self.ping_waiters.get(user_id)
        if waiter is not None and not waiter.future.done() and not waiter.future.get_loop().is_closed():
            waiter.future.set_result(time.perf_counter())


def _holds(manager: ConnectionManager | None, websocket: Any) -> bool:
    return manager is not None and websocket in manager


def _close_timeout(manager: ConnectionManager | None) -> float:
    return 5.0 if manager is None else manager.close_timeout
