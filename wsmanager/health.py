"""The heartbeat: pings silent connections, closes the ones that stay silent,
and reclaims entries whose endpoint ended without ``disconnect()``.

One :class:`HealthMonitor` belongs to each ``ConnectionManager`` (its
``health`` attribute). The scan itself is the C core's ``_sweep``: connections
sit on two time-ordered lists (idle, by last receive; waiting, by ping time),
so a sweep costs O(connections due), not O(connections).

Event loops: a manager may be used from several loops, one after the other
(``TestClient`` without ``with`` runs each session in its own loop) or at the
same time (in several threads). Every loop that registers connections gets
its own monitor task, which stops when the last connection handled in that
loop has ended, when ``stop()`` is called, or when the loop cancels its tasks
on shutdown. A connection is pinged and closed from the loop that accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketState

from ._core import dumps
from .codes import CloseCode
from .receiving import loop_of, pinged
from .settings import optional_seconds as _check_period

if TYPE_CHECKING:
    from .manager import ConnectionManager

logger = logging.getLogger(__name__)

__all__ = ["STALE_REASONS", "HealthMonitor", "SweepResult", "health_ping"]

#: Keys of ``get_stats()["stale_closed"]``: why connections were removed as stale.
STALE_REASONS = ("no_pong", "send_failed", "handler_exited")

_BATCH = 1024  # most pings (and most closes) dispatched by one C call
_LATE = 0.001  # wake this long after a deadline, so that the sweep finds it due
# The context the endpoint watch's done-callback runs in: one shared empty
# one, so that add_done_callback() does not copy the task's context per connect.
_CALLBACK_CONTEXT = contextvars.Context()


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    pinged: int  # connections silent for ping_interval, sent a health_ping
    expired: int  # connections silent ping_timeout after their ping: closed, removed
    more: bool  # a batch came back full: more may be due right now


@dataclass(eq=False)
class _LoopState:
    """The heartbeat's objects bound to one event loop."""

    loop: asyncio.AbstractEventLoop
    monitor: asyncio.Task[None] | None = None
    pinned: bool = False  # started explicitly: runs until stop()
    handlers: int = 0  # connections whose endpoint task runs in this loop
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # pings, probes
    closing: set[asyncio.Task[None]] = field(default_factory=set)  # stale closes
    waker: asyncio.Future[None] | None = None


def health_ping(timestamp: float, latency_ms: float | None = None) -> str:
    """The serialized ``{"type": "health_ping", "timestamp": ..., "latency_ms": ...}``.

    ``latency_ms`` is the connection's last measured round trip (the one its
    previous pong answered), rounded to a microsecond, or null while none was
    measured: the browser client shows it as its ``latency``.
    """
    return dumps(
        {
            "type": "health_ping",
            "timestamp": timestamp,
            "latency_ms": None if latency_ms is None else round(latency_ms, 3),
        }
    )


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _is_closed(websocket: Any) -> bool:
    return bool(
        getattr(websocket, "client_state", None) == WebSocketState.DISCONNECTED
        or getattr(websocket, "application_state", None) == WebSocketState.DISCONNECTED
    )


class HealthMonitor:
    """Heartbeat and stale-connection cleanup of one ``ConnectionManager``.

    * a connection silent (nothing reported received: ``touch``,
      ``update_last_message``, ``record_pong``...) for ``ping_interval``
      seconds is sent ``{"type": "health_ping", "timestamp": <unix time>,
      "latency_ms": <its last round trip in ms, or null>}``;
    * one still silent ``ping_timeout`` seconds after that ping is closed with
      code 4004, reason ``"stale"``, and removed from every table;
    * a connection whose endpoint ended (e.g. crashed on malformed JSON)
      without ``disconnect()`` is removed as soon as that is seen, once a probe
      shows its socket is gone.

    ``ping_interval=None`` turns the heartbeat off (leaked entries are still
    reclaimed); ``ping_timeout=None`` keeps sending pings but never closes.

    The monitor starts with the first ``connect()`` in each event loop, unless
    the manager has an injected ``clock``: then call ``await sweep()`` (or
    ``start()``) yourself.
    """

    def __init__(
        self,
        manager: ConnectionManager,
        *,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 10.0,
    ) -> None:
        # weak: the manager owns its monitor, and a manager nobody uses any
        # more is freed by reference counting (its monitor tasks then end)
        self._manager_ref = weakref.ref(manager)
        self._interval = _check_period("ping_interval", ping_interval)
        self._timeout = _check_period("ping_timeout", ping_timeout)
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        # websocket -> loop of its endpoint, for the ones without a reader
        # (receiving.loop_of tells the loop of the others)
        self._owners: dict[WebSocket, _LoopState] = {}
        # endpoint task -> the websocket it connected (a list when it connected several):
        # one bound method is every task's done-callback, so a connect allocates nothing
        self._endpoints: dict[asyncio.Task[Any], WebSocket | list[WebSocket]] = {}
        self._on_endpoint_done = self._endpoints_done

    # ------------------------------------------------------------- settings

    @property
    def ping_interval(self) -> float | None:
        """Seconds of silence before a connection is pinged; None: no heartbeat."""
        return self._interval

    @ping_interval.setter
    def ping_interval(self, value: float | None) -> None:
        self._interval = _check_period("ping_interval", value)
        self._reschedule()

    @property
    def ping_timeout(self) -> float | None:
        """Seconds a pinged connection has to answer; None: never closed."""
        return self._timeout

    @ping_timeout.setter
    def ping_timeout(self, value: float | None) -> None:
        self._timeout = _check_period("ping_timeout", value)
        self._reschedule()

    @property
    def running(self) -> bool:
        """True while a monitor task runs in some event loop."""
        return any(st.monitor is not None and not st.monitor.done() for st in list(self._states.values()))

    @property
    def _autostart(self) -> bool:
        # The monitor sleeps in loop seconds until the clock's next deadline:
        # with an injected clock that is only right if it runs at real speed,
        # so whoever injects one drives sweeps (or calls start()).
        manager = self._manager_ref()
        return manager is not None and manager.clock is None

    # ------------------------------------------------------------ lifecycle

    def watch(
        self, websocket: WebSocket, loop: asyncio.AbstractEventLoop | None = None, *, owned: bool = False
    ) -> None:
        """Called by ``connect()`` once ``websocket`` is registered.

        Makes sure a monitor runs in ``loop`` (the running loop; looked up
        when None), and takes the current task as the connection's endpoint:
        when it ends while the connection is still registered, the entry is
        reclaimed. ``owned``: ``receiving.loop_of(websocket)`` is ``loop``, so
        the heartbeat need not remember the connection's loop itself.
        """
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        st = self._states.get(loop) or self._state(loop)
        task = asyncio.current_task(loop)
        if task is not None:
            endpoints = self._endpoints
            known = endpoints.get(task)
            if known is None:  # a task not watched yet: is it an endpoint?
                # Not when it only runs connect() (wrapped in a task of its own by
                # ``wait_for`` on Python < 3.12, ``gather``, ``create_task``)
                if getattr(task.get_coro(), "__name__", "") != "connect":
                    st.handlers += 1
                    if not owned:
                        self._owners[websocket] = st
                    endpoints[task] = websocket
                    task.add_done_callback(self._on_endpoint_done, context=_CALLBACK_CONTEXT)
            else:
                st.handlers += 1
                if not owned:
                    self._owners[websocket] = st
                if isinstance(known, list):
                    known.append(websocket)
                else:
                    endpoints[task] = [known, websocket]
        monitor = st.monitor
        if (monitor is None or monitor.done()) and self._autostart:
            self._ensure_monitor(st)

    async def start(self) -> None:
        """Run the monitor in the current loop until :meth:`stop` (for a lifespan)."""
        st = self._state(asyncio.get_running_loop())
        st.pinned = True
        self._ensure_monitor(st)

    async def stop(self) -> None:
        """Stop the monitor and the pings in flight, in every loop.

        Closes of stale connections already under way complete. The next
        ``connect()`` starts the monitor again (set ``ping_interval = None`` to
        turn the heartbeat off for good).
        """
        current = asyncio.get_running_loop()
        for st in list(self._states.values()):
            st.pinned = False
            if st.loop is current:
                tasks = [t for t in (st.monitor, *st.tasks) if t is not None and not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            elif not st.loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    st.loop.call_soon_threadsafe(self._cancel_in_loop, st)

    # ---------------------------------------------------------------- sweep

    async def sweep(self, *, wait: bool = False) -> SweepResult:
        """Run one sweep now: ping the connections due, close the expired ones.

        The pings and closes run as tasks of their connection's loop, so a
        stuck client delays nobody; ``wait=True`` awaits the ones of the
        current loop (tests, or a scheduler of your own).
        """
        interval = self._interval
        manager = self._manager_ref()
        if interval is None or manager is None:
            return SweepResult(0, 0, False)
        timeout = math.inf if self._timeout is None else self._timeout
        delivery = manager.delivery
        to_ping, expired = delivery.sweep(interval, timeout, _BATCH)
        if expired and delivery.backplane is not None:  # removed in C: tell the cluster
            for websocket, _lobby, _user in expired:
                delivery.release(websocket)
        here = self._state(asyncio.get_running_loop())
        spawned: list[asyncio.Task[None]] = []
        if to_ping:
            timestamp = time.time()
            latency = manager.latency_ms
            unknown = health_ping(timestamp)  # shared by the connections never measured
            for websocket in to_ping:
                rtt = latency(websocket)
                data = unknown if rtt is None else health_ping(timestamp, rtt)
                self._dispatch(here, spawned, self._ping, websocket, data)
        for websocket, lobby, user in expired:
            if delivery.removal_callbacks:  # serve()'s on_disconnect runs now, not after the close
                delivery.removed(websocket)
            self._dispatch(here, spawned, self._close_stale, websocket, lobby, user)
        if wait and spawned:
            await asyncio.gather(*spawned, return_exceptions=True)
        self._forget_if_idle(here)  # a sweep from a loop that has nothing else here
        return SweepResult(len(to_ping), len(expired), len(to_ping) >= _BATCH or len(expired) >= _BATCH)

    # ------------------------------------------------------------- internals

    def _state(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        st = self._states.get(loop)
        if st is None:
            closed = [lp for lp in list(self._states) if lp.is_closed()]
            for old in closed:
                self._states.pop(old, None)
            if closed:  # endpoint tasks a closed loop never finished: their callbacks never run
                for t in [t for t in self._endpoints if t.get_loop().is_closed()]:
                    del self._endpoints[t]
            st = self._states[loop] = _LoopState(loop)
        return st

    def _ensure_monitor(self, st: _LoopState) -> None:
        if self._interval is not None and (st.monitor is None or st.monitor.done()):
            st.monitor = st.loop.create_task(self._run(st), name="wsmanager-heartbeat")

    def _forget_if_idle(self, st: _LoopState) -> None:
        idle = st.handlers == 0 and not st.pinned and st.monitor is None and not (st.tasks or st.closing)
        if idle and self._states.get(st.loop) is st:
            del self._states[st.loop]

    def _cancel_in_loop(self, st: _LoopState) -> None:
        for t in (st.monitor, *st.tasks):
            if t is not None:
                t.cancel()

    def _reschedule(self) -> None:
        """Settings changed: wake the monitors so they recompute their deadline."""
        for st in list(self._states.values()):
            if st.loop.is_closed():
                continue
            with contextlib.suppress(RuntimeError):
                if st.pinned or (st.handlers and self._autostart):
                    st.loop.call_soon_threadsafe(self._ensure_monitor, st)
                if st.waker is not None:
                    st.loop.call_soon_threadsafe(_wake, st.waker)

    def _delay(self) -> float:
        """Seconds until the next sweep can find something due."""
        interval = self._interval
        assert interval is not None
        timeout = math.inf if self._timeout is None else self._timeout
        manager = self._manager_ref()
        if manager is None:
            return interval
        now = manager.delivery.now()
        due = manager.delivery.next_deadline(interval, timeout)
        # Anything registered or touched from now on is due at now + interval or later.
        wake = now + interval if due is None else min(due, now + interval)
        return max(0.0, wake - now) + _LATE

    async def _run(self, st: _LoopState) -> None:
        try:
            while self._interval is not None and self._manager_ref() is not None:
                fut = st.loop.create_future()
                st.waker = fut
                handle = st.loop.call_later(self._delay(), _wake, fut)
                try:
                    await fut
                finally:
                    handle.cancel()
                    st.waker = None
                more = True
                while more and self._interval is not None:
                    more = (await self.sweep()).more
                    await asyncio.sleep(0)  # let the pings just spawned run
        finally:
            if st.monitor is asyncio.current_task():
                st.monitor = None
            self._forget_if_idle(st)

    def _spawn(
        self, st: _LoopState, coro: Coroutine[Any, Any, None], *, closing: bool = False
    ) -> asyncio.Task[None]:
        task = st.loop.create_task(coro)
        bucket = st.closing if closing else st.tasks
        bucket.add(task)

        def done(t: asyncio.Task[None]) -> None:
            bucket.discard(t)
            self._forget_if_idle(st)

        task.add_done_callback(done)
        return task

    def _dispatch(
        self,
        here: _LoopState,
        spawned: list[asyncio.Task[None]],
        fn: Callable[..., Coroutine[Any, Any, None]],
        websocket: WebSocket,
        *args: Any,
    ) -> None:
        """Run ``fn(websocket, *args)`` as a task of the websocket's own loop."""
        closing = fn == self._close_stale
        owner = self._owners.get(websocket) if self._owners else None
        if owner is None:  # its reader knows its loop
            loop = loop_of(websocket)
            owner = here if loop is None else self._states.get(loop, here)
        if owner is here:
            spawned.append(self._spawn(here, fn(websocket, *args), closing=closing))
            return
        try:
            owner.loop.call_soon_threadsafe(lambda: self._spawn(owner, fn(websocket, *args), closing=closing))
        except RuntimeError:  # its loop is closed: so is the connection
            if not closing:
                self._reclaim(websocket, "handler_exited")

    async def _ping(self, websocket: WebSocket, data: str) -> None:
        manager = self._manager_ref()
        if manager is None or websocket not in manager:  # left since the sweep
            return
        if _is_closed(websocket) or not await manager.delivery.send(websocket, data):
            self._reclaim(websocket, "send_failed")
        else:
            pinged(websocket)  # an endpoint that does not read now still gets its pong seen

    async def _close_stale(self, websocket: WebSocket, lobby: str, user: str) -> None:
        """Close a connection the sweep found silent (already out of the registry)."""
        code = int(CloseCode.STALE)
        logger.info(
            "stale connection closed: no answer to health ping",
            extra={"lobby": lobby, "user": user, "reason": "no_pong", "code": code},
        )
        manager = self._manager_ref()
        if manager is not None and manager.delivery.close_listeners:
            manager.delivery.close_listeners.report(websocket, code, "stale", lobby, user, refused=False)
        if _is_closed(websocket):
            return
        try:
            await websocket.close(code=code, reason="stale")
        except Exception:  # the client is gone already: nothing to tell it
            return
        # Let the endpoint's next receive_*() wait for the client's close and
        # raise WebSocketDisconnect (as the seed's endpoint expects), instead
        # of Starlette's RuntimeError for a receive after the app closed.
        if websocket.client_state != WebSocketState.DISCONNECTED:
            websocket.application_state = WebSocketState.CONNECTED

    def _endpoints_done(self, task: asyncio.Task[Any]) -> None:
        """An endpoint task that called ``connect()`` has ended: each websocket it connected."""
        known = self._endpoints.pop(task, None)
        st = self._states.get(task.get_loop())
        if known is None or st is None:  # its loop's state is gone only once the loop closed
            return
        if isinstance(known, list):
            for websocket in known:
                self._endpoint_done(websocket, st, task)
            return
        manager = self._manager_ref()
        if st.handlers > 1 and not self._owners and (manager is None or known not in manager):
            st.handlers -= 1  # the common end (disconnected, others remain): _endpoint_done inline
            return
        self._endpoint_done(known, st, task)

    def _endpoint_done(self, websocket: WebSocket, st: _LoopState, task: asyncio.Task[Any]) -> None:
        """The endpoint task that called ``connect()`` for ``websocket`` has ended."""
        st.handlers -= 1
        if self._owners:
            self._owners.pop(websocket, None)
        manager = self._manager_ref()
        if manager is not None and websocket in manager:  # it never called disconnect()
            if task.cancelled() or _is_closed(websocket) or st.loop.is_closed():
                self._reclaim(websocket, "handler_exited")
            else:
                self._spawn(st, self._probe(websocket))
        if st.handlers == 0:  # (while handlers remain, the loop's state is not idle)
            if not st.pinned and st.monitor is not None:
                st.monitor.cancel()
            self._forget_if_idle(st)

    async def _probe(self, websocket: WebSocket) -> None:
        """Is the socket of an endpoint that ended still open? A ping tells:
        if it cannot be sent, the entry is reclaimed; if it can, ``connect()``
        was called from a helper task and the heartbeat keeps watching."""
        manager = self._manager_ref()
        if manager is None:
            return
        sent = False
        # Sent directly, not through the connection's queue: the probe needs
        # the outcome of this very send, and order no longer matters for an
        # endpoint that has ended. Bounded, for a client that does not read.
        data = health_ping(time.time(), manager.latency_ms(websocket))
        try:
            await asyncio.wait_for(websocket.send_text(data), manager.close_timeout)
            sent = True
        except Exception:  # closed, broken, or stuck: the entry is a leak
            sent = False
        finally:
            if not sent:
                self._reclaim(websocket, "handler_exited")

    def _reclaim(self, websocket: WebSocket, reason: str) -> None:
        manager = self._manager_ref()
        if manager is None:
            return
        info = manager.delivery.reap(websocket, reason)
        if info is not None:
            manager.delivery.release(websocket)
        logger.log(
            logging.INFO if info else logging.DEBUG,  # else _drop() logged it already
            "stale connection removed: %s",
            reason,
            extra={
                "lobby": info[0] if info else None,
                "user": info[1] if info else None,
                "reason": reason,
                "code": int(CloseCode.STALE),
            },
        )

    def __repr__(self) -> str:
        return (
            f"<HealthMonitor ping_interval={self._interval} ping_timeout={self._timeout}"
            f" running={self.running}>"
        )
