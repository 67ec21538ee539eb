"""ConnectionManager: the seed's API on top of the C registry.

The synchronous methods (``can_accept_connection``, ``disconnect``,
``record_pong``, ``update_last_message``, ``is_user_connected``,
``get_lobby_users``, ``get_stats``) are the C core's. This module adds the
methods that must await a socket: ``connect``, ``broadcast_to_lobby``,
``send_to_user`` and ``ping_user``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, cast

from starlette.websockets import WebSocket, WebSocketState

from ._core import Core, encode_message
from .backends import Backend, InMemoryBackend
from .codes import CloseCode
from .delivery import Delivery
from .events import CloseListener
from .health import HealthMonitor, health_ping
from .history import (
    RecoveryCounts,
    Since,
    check_since,
    place_replay,
    position_message,
    recovery_message,
)
from .joining import DEFAULT_MAX_LOBBIES_PER_CONNECTION
from .presence import Presence
from .receiving import Receiving, pinged
from .servers import abort_transport
from .settings import (
    Check,
    CoreSetting,
    DefaultFloat,
    DefaultInt,
    Setting,
    class_defaults,
    count,
    optional_count,
    optional_rate,
    optional_seconds,
    resolve,
    seconds,
)
from .stats import HistoryStats, Stats

if TYPE_CHECKING:
    from .endpoint import Handler, Hook
    from .joining import JoinHook

if TYPE_CHECKING:
    from .backends.redis import RedisBackend

logger = logging.getLogger(__name__)

__all__ = ["ConnectionManager"]


class _HistorySetting(CoreSetting[Any]):
    """``history_size``: the core's setting, and the instance's ``_history``
    flag (on or off), which a broadcast reads instead of calling the core."""

    def __set__(self, obj: Any, value: Any) -> None:
        super().__set__(obj, value)
        on = self.base.__get__(obj, type(obj)) > 0
        obj.__dict__["_history"] = on
        if on:  # get_stats() reads the history figures from now on
            obj.__dict__["_history_used"] = True


_NO_HISTORY: HistoryStats = {
    "lobbies": 0,
    "entries": 0,
    "bytes": 0,
    "appended": 0,
    "dropped": 0,
    "backlog": 0,
    "recoveries": 0,
    "recovered": 0,
    "not_recovered": 0,
    "replayed": 0,
}

_RATE = optional_rate(0)  # set_rate_limit's checks (wsmanager.settings)
_BURST = optional_rate(1)
_CLOSE_AFTER = count(0)


@dataclass
class _PingWaiter:
    """One outstanding ``ping_user`` ping, shared by every concurrent caller."""

    future: asyncio.Future[float]
    started: float  # perf_counter() when the ping was sent
    callers: int = 0


_CONNECTED = WebSocketState.CONNECTED
_CONNECTING = WebSocketState.CONNECTING
# the core's own max_connections getter: connect() reads it without the Setting descriptor's Python call
_core_max_connections = Core.__dict__["max_connections"].__get__
# the core's own figures (no super() per call); typed Any: get_stats() completes them into a Stats
_core_get_stats: Callable[[Core], Any] = Core.get_stats


def _exact_str(value: str) -> str:
    """``value`` as an exact ``str``: a subclass (validated by the core) is
    copied without running its own ``__hash__`` / ``__eq__`` / ``__str__``,
    so that the Python-side tables keyed by lobby (presence) never run them."""
    return value if type(value) is str else str.__str__(value)


def _weak_pong_hook(manager: ConnectionManager) -> Callable[[str, Any, float | None], None]:
    """The manager's ``_on_pong`` through a weak reference (the core holds
    its hooks strongly)."""
    ref = weakref.ref(manager)

    def call(user_id: str, websocket: Any, latency: float | None) -> None:
        target = ref()
        if target is not None:
            target._on_pong(user_id, websocket, latency)

    return call


class ConnectionManager(Core):
    """Registry of WebSocket connections by lobby and by user, with limits.

    A drop-in replacement for the hand-written ``ConnectionManager`` of the
    FastAPI pattern: same names, defaults and return values. Differences a
    caller can notice are fixes:

    * a user may hold several connections (tabs); each one counts, and the
      user stays connected while any is open. ``max_per_user`` caps them:
      an extra connection is refused with close code 4002, reason
      ``"user_limit"``; with ``on_user_limit="replace"`` it is admitted
      instead and the user's oldest connection is closed with 4003
      ``"replaced"`` (one session per user: ``max_per_user=1``).
    * capacity is reserved before ``accept()``: concurrent handshakes never
      overshoot ``max_connections`` / ``max_per_lobby``.
    * sends never raise; a connection whose send fails is removed.
    * sends never wait for a slow client: a send that cannot complete at
      once is queued on that connection (order kept) and written by its own
      task; past ``max_backlog`` messages or ``max_backlog_bytes`` bytes the
      connection is closed with 4006 ``"slow_consumer"``.

    Keyword-only settings beyond the seed's: ``max_backlog`` and
    ``max_backlog_bytes`` (outbound backlog per connection), ``rate_limit``
    (inbound messages per second per connection, None: off), ``rate_burst``
    (bucket size, default ``max(1, rate_limit)``), ``rate_limit_close_after``
    (drops before a 4005 close, 0: never close), ``max_message_bytes`` and
    ``max_bad_messages`` (for :meth:`serve`), ``allowed_origins`` (None: any
    Origin; else browsers from other origins are refused with 4008),
    ``close_timeout`` (seconds a close handshake may take before the socket is
    aborted), ``shutdown_timeout`` (default for :meth:`shutdown`) and
    ``direct_frames`` (default True: on uvicorn's websockets-sansio protocol,
    a message is framed once, uncompressed, and the same frame bytes written
    to every ready recipient's transport; connections behind any other
    server, a middleware that wraps ``send``, a paused (slow) transport or a
    backlog take the ordinary ``send`` path. False: always the ordinary path).
    * a heartbeat runs by itself (``ping_interval`` / ``ping_timeout``, see
      ``wsmanager.health``): a connection silent for ``ping_interval`` seconds
      gets ``{"type": "health_ping", "timestamp": ...}`` and, still silent
      ``ping_timeout`` seconds later, is closed with 4004 ``"stale"`` and
      removed. An entry whose endpoint died without ``disconnect()`` (e.g. on
      malformed JSON) is reclaimed. ``touch(websocket)`` and
      ``record_pong_ws(websocket)`` report one connection, where the seed's
      ``update_last_message(user_id)`` / ``record_pong(user_id)`` vouch for
      every connection of the user. Each ``health_ping`` carries
      ``"latency_ms"``, the connection's last round trip (null before its
      first pong), which the browser client reports as its latency;
      ``latency_ms(websocket)`` reads it on the server and
      ``add_latency_listener()`` is told of every new measurement.
    * ``backend``: where the manager's reach ends. ``InMemoryBackend()`` (the
      default) is this process; ``RedisBackend(url)`` (``wsmanager.backends.redis``)
      joins every process and machine sharing that Redis into one cluster:
      broadcasts, direct messages, limits and presence then span all of them.
    * ``serve()`` runs a whole connection (see ``wsmanager.endpoint``), with
      ``on_connect`` / ``on_disconnect`` hooks.
    * ``delivery``: the send path (:class:`wsmanager.delivery.Delivery`):
      outboxes, fan-out, background closes; also the interface ``serve()``,
      the heartbeat and the backends use. Applications need not touch it.
    * an empty manager is still truthy (``manager or default`` keeps it).
    * ``json_default``: a converter for the sends, ``json_default(obj) ->``
      something encodable, called only for objects the encoder does not
      handle natively (see :func:`wsmanager.dumps`); a send's own
      ``default=`` overrides it.

    Every numeric setting is checked at construction and on assignment
    (``manager.max_message_bytes = ...``), see ``wsmanager.settings``: a
    wrong type (bool, str, None where no "off" exists, float for a count)
    raises TypeError, NaN, an infinity or an out-of-range value ValueError,
    each naming the setting; a count above ``sys.maxsize`` or a duration
    above 100 years (``wsmanager.settings.MAX_SECONDS``) is out of range.
    The same checks apply to the ``timeout`` of :meth:`shutdown` and
    :meth:`ping_user`.

    A subclass may set any numeric setting as a class attribute
    (``class LobbyOf50(ConnectionManager): max_per_lobby = 50``): it is
    checked when the class is created (TypeError / ValueError naming the
    setting and the class) and becomes the default of its instances, enforced
    by the core like a keyword argument; a keyword argument still wins (for
    ``max_per_user``, ``rate_limit`` and ``rate_burst``, whose defaults are
    None, passing None counts as leaving it out: assign None after
    construction to turn a class default off). Later assignments are checked
    as on the base class.
    """

    _class_defaults: ClassVar[dict[str, Any]] = {}  # a subclass's class-attribute settings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._class_defaults = class_defaults(cls, cls._class_defaults, _class_setting_checks())

    # Numeric settings (wsmanager.settings): checked on every assignment.
    max_connections = CoreSetting(Core.__dict__["max_connections"], count(0))
    max_per_lobby = CoreSetting(Core.__dict__["max_per_lobby"], count(0))
    max_per_user = CoreSetting(Core.__dict__["max_per_user"], optional_count(1))
    max_id_bytes = CoreSetting(Core.__dict__["max_id_bytes"], count(1))
    max_backlog = Setting(count(1))
    max_backlog_bytes = Setting(count(1))
    max_message_bytes = Setting(count(1))
    max_bad_messages = Setting(count(1))
    close_timeout = Setting(seconds)
    shutdown_timeout = Setting(seconds)
    history_size = _HistorySetting(Core.__dict__["history_size"], optional_count(0))
    history_ttl = CoreSetting(Core.__dict__["history_ttl"], optional_seconds)
    _history = False  # history_size > 0 (kept by _HistorySetting): one attribute read per broadcast
    _history_used = False  # history_size was > 0 at some point: get_stats() reads its figures

    def __init__(
        self,
        max_connections: int = DefaultInt(500),
        max_per_lobby: int = DefaultInt(10),
        *,
        max_per_user: int | None = None,
        max_id_bytes: int = DefaultInt(1024),
        clock: Callable[[], float] | None = None,
        max_backlog: int = DefaultInt(1024),
        max_backlog_bytes: int = DefaultInt(1 << 20),
        rate_limit: float | None = None,
        rate_burst: float | None = None,
        rate_limit_close_after: int = DefaultInt(100),
        max_message_bytes: int = DefaultInt(64 * 1024),
        max_bad_messages: int = DefaultInt(10),
        allowed_origins: Collection[str] | None = None,
        close_timeout: float = DefaultFloat(5.0),
        shutdown_timeout: float = DefaultFloat(10.0),
        ping_interval: float | None = DefaultFloat(20.0),
        ping_timeout: float | None = DefaultFloat(10.0),
        backend: Backend | None = None,
        direct_frames: bool = True,
        on_user_limit: str = "refuse",
        json_default: Callable[[Any], Any] | None = None,
        presence_events: bool = False,
        presence_interval: float = 0.2,
        history_size: int | None = None,
        history_ttl: float | None = None,
    ) -> None:
        d = self._class_defaults  # a subclass's class-attribute settings: {} here
        if d:
            max_connections = resolve(d, "max_connections", max_connections)
            max_per_lobby = resolve(d, "max_per_lobby", max_per_lobby)
            max_per_user = resolve(d, "max_per_user", max_per_user, none_is_unset=True)
            max_id_bytes = resolve(d, "max_id_bytes", max_id_bytes)
            max_backlog = resolve(d, "max_backlog", max_backlog)
            max_backlog_bytes = resolve(d, "max_backlog_bytes", max_backlog_bytes)
            rate_limit = resolve(d, "rate_limit", rate_limit, none_is_unset=True)
            rate_burst = resolve(d, "rate_burst", rate_burst, none_is_unset=True)
            rate_limit_close_after = resolve(d, "rate_limit_close_after", rate_limit_close_after)
            max_message_bytes = resolve(d, "max_message_bytes", max_message_bytes)
            max_bad_messages = resolve(d, "max_bad_messages", max_bad_messages)
            close_timeout = resolve(d, "close_timeout", close_timeout)
            shutdown_timeout = resolve(d, "shutdown_timeout", shutdown_timeout)
            ping_interval = resolve(d, "ping_interval", ping_interval)
            ping_timeout = resolve(d, "ping_timeout", ping_timeout)
            history_size = resolve(d, "history_size", history_size, none_is_unset=True)
            history_ttl = resolve(d, "history_ttl", history_ttl, none_is_unset=True)
        cls = ConnectionManager
        super().__init__(
            cls.max_connections.validate(max_connections),
            cls.max_per_lobby.validate(max_per_lobby),
            max_per_user=cls.max_per_user.validate(max_per_user),
            max_id_bytes=cls.max_id_bytes.validate(max_id_bytes),
            clock=clock,
        )
        self._ping_waiters: dict[str, _PingWaiter] = {}
        #: the send path (wsmanager.delivery); the backplane is set below
        self.delivery = Delivery(
            self, backplane=None, direct_frames=bool(direct_frames), ping_waiters=self._ping_waiters
        )
        self._health = HealthMonitor(self, ping_interval=ping_interval, ping_timeout=ping_timeout)
        self._receiving = Receiving(self, Core._pong_due)  # reads pongs while the app does not
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.max_message_bytes = max_message_bytes
        self.max_bad_messages = max_bad_messages
        if isinstance(allowed_origins, (str, bytes)):  # a str is a Collection[str] of its characters
            raise TypeError(
                f"allowed_origins must be a collection of origins, not one {type(allowed_origins).__name__}:"
                f" write {{{allowed_origins!r}}}"
            )
        self.allowed_origins: frozenset[str] | None = (
            None if allowed_origins is None else frozenset(allowed_origins)
        )
        if self.allowed_origins is not None and not all(isinstance(o, str) for o in self.allowed_origins):
            raise TypeError("allowed_origins must hold str origins such as 'https://app.example'")
        self.close_timeout = close_timeout
        self.shutdown_timeout = shutdown_timeout
        self.on_user_limit = on_user_limit
        self.json_default = json_default
        self.set_rate_limit(rate_limit, rate_burst, close_after=rate_limit_close_after)
        # -- history (issue 12): off (0) unless asked; the core keeps the rings
        self.history_ttl = history_ttl
        self.history_size = history_size
        self._recovery_counts = RecoveryCounts()
        self._shutdown_task: asyncio.Task[None] | None = None
        # event loop -> {id(websocket): websocket}: reserved handshakes in flight
        # (no Future per connect: shutdown() waits on one future, made only while it waits)
        self._handshakes: dict[asyncio.AbstractEventLoop, dict[int, Any]] = {}
        self._handshakes_waiter: asyncio.Future[None] | None = None
        # handshakes whose reservation shutdown() released while they hung in accept()
        self._overtaken: set[Any] = set()
        # clustered joins awaiting the backend: (id(websocket), lobby) -> their answer
        self._joins_in_flight: dict[tuple[int, str], asyncio.Future[bool | None]] = {}
        # -- backend (issue 6): None on the single-process path, which then
        # makes no backend call at all.
        self.backend: Backend = backend if backend is not None else InMemoryBackend()
        self.backend.bind(self)
        self._backplane: RedisBackend | None = (
            cast("RedisBackend", self.backend) if self.backend.clustered else None
        )
        # The core holds its hooks strongly: hand it functions that hold the
        # manager weakly, so that dropping the manager frees it at once.
        self.delivery.backplane = self._backplane
        self._set_drop_hook(self.delivery.drop_hook(), self._backplane is not None)
        if self._backplane is not None and type(self) is ConnectionManager:
            # cluster-aware presence and capacity reads; the single-process
            # manager keeps them as plain C calls
            self.__class__ = _ClusteredConnectionManager
        self._latency_listeners: list[Callable[[Any, float], None]] = []
        if self._history and self._backplane is not None and not hasattr(self.backend, "history_publish"):
            raise NotImplementedError(
                f"history_size with a clustered backend needs {type(self.backend).__name__}"
                ".history_publish (see wsmanager.backends.Backend)"
            )
        # -- presence events (issue 11): None, and no cost anywhere, unless asked
        if not isinstance(presence_events, bool):
            raise TypeError(f"presence_events must be a bool, not {type(presence_events).__name__}")
        interval = seconds("presence_interval", presence_interval)
        #: the presence coalescer (wsmanager.presence), or None when presence_events is off
        self.presence: Presence | None = None
        if presence_events:
            self._track_presence(True)  # the core marks the lobbies whose membership changes
            self.presence = Presence(self, interval, Core._take_dirty)
            # disconnect() / leave() / the heartbeat's removals are the core's
            # own methods, with no Python layer: this class adds the flusher's
            # wake-up to them (see _PresenceConnectionManager), so that it sleeps while
            # nothing changes; without presence they stay plain C calls
            self.__class__ = _presence_class(type(self))

    @property
    def direct_frames(self) -> bool:
        """Write one pre-built frame to each ready recipient's transport on
        uvicorn's websockets-sansio protocol (see the class doc). Settable."""
        return self.delivery.direct_frames

    @direct_frames.setter
    def direct_frames(self, value: bool) -> None:
        self.delivery.direct_frames = value

    @property
    def json_default(self) -> Callable[[Any], Any] | None:
        """The manager-wide JSON converter of the sends (None: none); a
        send's ``default=`` overrides it. Assigning a non-callable raises
        ``TypeError``."""
        return self._json_default

    @json_default.setter
    def json_default(self, value: Callable[[Any], Any] | None) -> None:
        if value is not None and not callable(value):
            raise TypeError(f"json_default must be callable or None, not {type(value).__name__}")
        self._json_default = value

    def __bool__(self) -> bool:
        """Always True: a manager is a service, not a container, so an empty
        one is still truthy (``manager or default`` keeps it)."""
        return True

    @property
    def on_user_limit(self) -> str:
        """What a new connection of a user already holding ``max_per_user``
        connections gets: ``"refuse"`` (the default: it is refused with 4002
        ``"user_limit"``) or ``"replace"`` (it is admitted, and the user's
        oldest connection is removed at once and closed with 4003
        ``"replaced"``; a handshake still in progress counts as a connection,
        after every open one). The replacement is decided in the same step as
        the capacity reservation, so concurrent handshakes of one user never
        overshoot the limit; it happens only when it makes room: a full server
        or lobby still refuses. With a clustered backend only this process's
        connections are replaced (see ``docs/redis-backplane.md``). Settable
        at run time; ValueError for any other value."""
        return "replace" if self._replace_oldest else "refuse"

    @on_user_limit.setter
    def on_user_limit(self, value: str) -> None:
        if not isinstance(value, str) or value not in ("refuse", "replace"):
            raise ValueError(f'on_user_limit must be "refuse" or "replace", not {value!r}')
        self._replace_oldest = value == "replace"

    def set_rate_limit(
        self, rate: float | None, burst: float | None = None, *, close_after: int = 100
    ) -> None:
        """Set the inbound limit: ``rate`` messages/s per connection (None or
        0: off), ``burst`` at once (default ``max(1, rate)``); after
        ``close_after`` drops without the client slowing down the connection
        is closed with 4005 (0: never). Applies to open connections too.
        Each is also an attribute (``rate_limit``, ``rate_burst``,
        ``rate_limit_close_after``) that can be assigned alone. TypeError /
        ValueError (naming the setting) for NaN, infinities, negatives, a
        burst under 1, bools or wrong types."""
        r = _RATE("rate_limit", rate) or 0.0
        burst = _BURST("rate_burst", burst)
        close_after = _CLOSE_AFTER("rate_limit_close_after", close_after)
        b = burst if burst is not None else max(1.0, r)
        self._set_rate_limit(r, b, close_after)
        self._rate_limit = r or None
        self._rate_burst_arg = burst  # as given: None follows the rate
        self._rate_burst = b if r > 0 else None
        self._rate_limit_close_after = close_after

    @property
    def rate_limit(self) -> float | None:
        """Inbound messages per second per connection, or None (off)."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float | None) -> None:
        self.set_rate_limit(value, self._rate_burst_arg, close_after=self._rate_limit_close_after)

    @property
    def rate_burst(self) -> float | None:
        """Messages a connection may send at once (None while the limit is off)."""
        return self._rate_burst

    @rate_burst.setter
    def rate_burst(self, value: float | None) -> None:
        self.set_rate_limit(self._rate_limit, value, close_after=self._rate_limit_close_after)

    @property
    def rate_limit_close_after(self) -> int:
        """Drops without the client slowing down before a 4005 close (0: never)."""
        return self._rate_limit_close_after

    @rate_limit_close_after.setter
    def rate_limit_close_after(self, value: int) -> None:
        self.set_rate_limit(self._rate_limit, self._rate_burst_arg, close_after=value)

    # ------------------------------------------------------------------ connect

    async def connect(
        self, websocket: WebSocket, lobby_code: str, user_id: str, *, since: Since | None = None
    ) -> bool:
        """Admit, accept and register ``websocket`` in ``lobby_code`` as ``user_id``.

        Returns True once registered. When a limit is reached meanwhile (another
        handshake took the last slot), the socket is accepted and closed with
        code 4002 and the reason (``server_full``, ``lobby_full``,
        ``user_limit``), and False is returned; the endpoint's next
        ``receive_*`` then raises ``WebSocketDisconnect`` like any client that
        left. A handshake that :meth:`shutdown` overtakes (it began while
        ``accept()`` or the backend's reservation was in progress) is closed
        with 1013 ``shutting_down`` and returns False: it is never registered.

        Returns False, registering and counting nothing, when the socket is
        already closed: the app closed it (e.g. an authentication refusal
        ``await websocket.close(4001)`` not followed by ``return``: nothing
        more is sent to it), or the client left during the handshake
        (``accept()`` failed: the server's ``send`` raised, or it delivered a
        disconnect instead of the connect event).

        With ``on_user_limit="replace"`` a user at ``max_per_user`` is
        admitted and its oldest connection closed with 4003 ``"replaced"``
        (its endpoint's next ``receive_*`` raises ``WebSocketDisconnect``); a
        handshake of the user still in ``accept()`` that is replaced gets the
        same close, and its ``connect()`` returns False.

        ``since=(epoch, offset)`` (history on, see ``history_size``): the last
        lobby message the client saw; once registered, and before any live
        message, the connection is sent the lobby's messages after it, then
        ``{"type": "recovery", "lobby", "recovered", "epoch", "offset"}``
        (``recovered`` False, nothing replayed, when the epoch changed or
        what it missed is no longer kept; see :mod:`wsmanager.history`).

        Raises TypeError / ValueError, before touching the socket, for a non-str,
        empty or oversized id, a bad ``since`` (see
        :func:`wsmanager.history.check_since`), or a websocket that is already
        connected; the registry is then unchanged.
        """
        if since is not None:
            since = check_since(since)
        state = websocket.application_state
        if state is WebSocketState.DISCONNECTED or state is WebSocketState.RESPONSE:
            logger.info(
                "connect() on a websocket the app already closed: not registered",
                extra={"lobby": lobby_code, "user": user_id, "reason": "closed"},
            )
            return False
        if self._replace_oldest:
            reason, replaced, _replaced_pending = self._reserve(websocket, lobby_code, user_id, True)
            if replaced:
                self._close_replaced(replaced, lobby_code, user_id)
        else:
            reason = self._reserve(websocket, lobby_code, user_id)
        if reason:
            logger.info(
                "connection refused: %s",
                reason,
                extra={"lobby": lobby_code, "user": user_id, "reason": reason},
            )
            await self.delivery.refuse(websocket, reason, lobby_code=lobby_code, user_id=user_id)
            return False
        # Reserved: shutdown() waits for this handshake to end (or releases its
        # reservation when it outlasts the shutdown's budget). Keyed by id():
        # Starlette's WebSocket hashes through a Python-level __hash__.
        loop = asyncio.get_running_loop()
        in_loop = self._handshakes.get(loop)
        if in_loop is None:
            in_loop = self._handshakes_of(loop)
        key = id(websocket)
        in_loop[key] = websocket
        try:
            bp = self._backplane
            try:
                reason = ""
                if bp is not None:  # backend: the cluster-wide slot
                    reason = await bp.reserve(websocket, lobby_code, user_id)
                connecting = websocket.application_state is _CONNECTING
                if not reason and not self.shutting_down and connecting:
                    try:
                        await websocket.accept()
                    except Exception as exc:  # the client left during the handshake
                        self._release(websocket)
                        if bp is not None:
                            bp.release(websocket)
                        logger.info(
                            "handshake failed, not registered: %s",
                            type(exc).__name__,
                            extra={"lobby": lobby_code, "user": user_id, "reason": "handshake_failed"},
                        )
                        return False
                if not reason and (self.shutting_down or websocket.application_state is not _CONNECTED):
                    # shutdown() began meanwhile (or the app closed the socket)
                    reason = "shutting_down" if self.shutting_down else "closed"
            except BaseException:
                self._release(websocket)
                if bp is not None:
                    bp.release(websocket)
                raise
            if reason == "replaced":  # by a newer handshake of the user, meanwhile
                await self._close_replaced_handshake(websocket, lobby_code, user_id)
                return False
            committed = False
            if not reason:
                try:
                    committed = self._commit(websocket)
                except BaseException:  # a failing injected clock: never leak the reservation
                    self._release(websocket)
                    if bp is not None:
                        bp.release(websocket)
                    raise
                if not committed and not self.shutting_down and websocket not in self._overtaken:
                    # The reservation is gone and no shutdown released it: the
                    # "replace" policy gave its place to a newer handshake of the user.
                    if bp is not None:
                        bp.release(websocket)
                    await self._close_replaced_handshake(websocket, lobby_code, user_id)
                    return False
                if not committed:  # shutdown() released the reservation while accept() hung
                    reason = "shutting_down"
            if not committed:
                self._release(websocket)
                if bp is not None:
                    bp.release(websocket)
                logger.info(
                    "connection refused: %s",
                    reason,
                    extra={"lobby": lobby_code, "user": user_id, "reason": reason},
                )
                if reason != "closed":
                    self._count_refusal(reason)  # the core counts only the refusals of its own checks
                    await self.delivery.refuse(websocket, reason, lobby_code=lobby_code, user_id=user_id)
                return False
            if bp is not None:
                bp.commit(websocket)
            # pongs are seen even while the app does not read; the reader also
            # tells the heartbeat which loop the connection belongs to
            read = self._receiving.attach(websocket, loop)
            # heartbeat: runs in this loop; reclaims the entry if the endpoint dies
            self._health.watch(websocket, loop, owned=read)
            if self.presence is not None:
                self.presence.entered(websocket, _exact_str(lobby_code))
            if self._history and bp is not None:  # held from here (no await since the commit)
                await self._recover_clustered(websocket, _exact_str(lobby_code), user_id, since)
            elif self._history or since is not None:  # no await since the commit: no live message came first
                self._recover(websocket, _exact_str(lobby_code), user_id, since)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("connected", extra={"lobby": lobby_code, "user": user_id})
            if len(self) >= _core_max_connections(self):
                logger.warning(
                    "server at capacity: %d connections", len(self), extra={"reason": "server_full"}
                )
            return True
        finally:
            in_loop.pop(key, None)  # (the loop's dict stays: the next connect reuses it)
            if self._overtaken:
                self._overtaken.discard(websocket)
            if self._handshakes_waiter is not None:  # a shutdown() waits for the handshakes
                self._handshake_ended(loop)

    async def join(self, websocket: WebSocket, lobby_code: str, *, since: Since | None = None) -> bool:
        """Add a connected ``websocket`` to another lobby (rooms); True once it is a member.

        The connection then gets that lobby's broadcasts (each once, however
        many lobbies it is in), counts in its ``get_lobby_users`` and against
        its ``max_per_lobby`` (which counts memberships, checked and taken
        atomically: concurrent joins never overshoot it; with a clustered
        backend, cluster-wide). Joining a lobby it is already in: True, no
        change; with a clustered backend, a join while another join of the
        same connection to that lobby awaits the cluster gets that join's
        answer (one place, one cluster membership). Returns False, changing
        nothing, with the reason logged:

        * ``"lobby_full"``: the lobby is at ``max_per_lobby`` (counted in
          ``get_stats()["refused"]["lobby_full"]``);
        * ``"not_connected"``: ``websocket`` is not a registered connection
          (never connected, still in its handshake, or disconnected).
        * ``"shutting_down"``: :meth:`shutdown` has begun (counted in
          ``get_stats()["refused"]["shutting_down"]``, as ``connect()``'s
          refusals then are); a join still waiting for a clustered backend's
          verdict when it begins is refused too.

        Raises TypeError / ValueError for a ``lobby_code`` ``connect()`` would
        refuse (not a str, empty, longer than ``max_id_bytes``), before
        anything changes. :meth:`leave` undoes it; ``disconnect()`` leaves
        every lobby.

        ``since=(epoch, offset)``: recovery as in :meth:`connect`, once the
        connection is a member and before any live message of the lobby (not
        when it was a member already: it missed nothing). A bad ``since``
        raises TypeError / ValueError before anything changes.
        """
        if since is not None:
            since = check_since(since)
        bp = self._backplane
        if bp is not None and self._joins_in_flight and isinstance(lobby_code, str):
            # the same connection is already being joined to this lobby: one
            # local place, one cluster membership; its answer is this one's
            flight = self._joins_in_flight.get((id(websocket), _exact_str(lobby_code)))
            if flight is not None and flight.get_loop() is asyncio.get_running_loop():
                theirs = await asyncio.shield(flight)
                return theirs if theirs is not None else await self.join(websocket, lobby_code)
        reason = self._join(websocket, lobby_code, bp is not None)
        if reason and reason != "member":
            self._log_join_refused(lobby_code, reason)
            return False
        if reason == "member":
            return True
        if bp is None:
            if self.presence is not None:
                self.presence.entered(websocket, _exact_str(lobby_code))
            if self._history or since is not None:  # no await since the membership began
                info = self._info(websocket)
                self._recover(websocket, _exact_str(lobby_code), info[1] if info is not None else None, since)
            return True
        # clustered: the local slot is held; the backend decides cluster-wide
        join = getattr(bp, "join", None)
        if join is None:
            self._join_settle(None, lobby_code)
            raise NotImplementedError(f"{type(bp).__name__} does not implement join() yet")
        key = (id(websocket), _exact_str(lobby_code))
        mine: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._joins_in_flight[key] = mine
        answer: bool | None = None  # None: it raised; a concurrent join of the same tries again
        try:
            answer = await self._join_clustered(websocket, lobby_code, join, bp, since)
            return answer
        finally:
            del self._joins_in_flight[key]
            mine.set_result(answer)

    async def _join_clustered(
        self,
        websocket: WebSocket,
        lobby_code: str,
        join: Callable[..., Awaitable[str]],
        bp: Any,
        since: Since | None = None,
    ) -> bool:
        """The backend's verdict on a join whose local place is held."""
        try:
            reason = await join(websocket, lobby_code)
        except BaseException:
            self._join_settle(None, lobby_code)
            raise
        if not reason and self.shutting_down:  # shutdown() began meanwhile
            getattr(bp, "leave")(websocket, lobby_code)  # noqa: B009 - not in RedisBackend yet
            reason = "shutting_down"
        if reason:
            self._join_settle(None, lobby_code)
            self._count_refusal(reason)
            self._log_join_refused(lobby_code, reason)
            return False
        # False: it disconnected meanwhile (or a concurrent join added it)
        if not self._join_settle(websocket, lobby_code) and not self._is_member(websocket, lobby_code):
            bp.leave(websocket, lobby_code)
            return False
        if self.presence is not None:
            self.presence.entered(websocket, _exact_str(lobby_code))
        if self._history:  # held from here (no await since the membership began)
            info = self._info(websocket)
            user = info[1] if info is not None else None
            await self._recover_clustered(websocket, _exact_str(lobby_code), user, since)
        elif since is not None:
            self._recover(websocket, _exact_str(lobby_code), None, since)
        return True

    async def _recover_clustered(
        self, websocket: Any, lobby_code: str, user_id: str | None, since: Since | None
    ) -> None:
        """:meth:`_recover` with a clustered backend's history: every message
        to ``websocket`` is held from now (before any await) until the
        backend read the lobby's history (after this node listens to the
        lobby's channel); then the replay and the recovery (or position)
        message go first, and the held messages of the lobby that the replay
        covers (offset <= the top read) are dropped: no gap, no duplicate."""
        delivery = self.delivery
        delivery.hold(websocket)
        recovered, epoch, top, texts = False, "", 0, []
        try:
            recovered, epoch, top, texts = await getattr(self.backend, "history_since")(  # noqa: B009
                lobby_code, since, user_id
            )
        finally:
            if since is None:
                last = position_message(lobby_code, epoch, top)
            else:
                last = recovery_message(lobby_code, recovered, epoch, top)
                self._recovery_counts.count(recovered, len(texts))
            first = [*texts, encode_message(last, None)]
            delivery.unhold(websocket, lambda held: place_replay(held, lobby_code, epoch, top, first))

    def _recover(self, websocket: Any, lobby_code: str, user_id: str | None, since: Since | None) -> None:
        """Send ``websocket`` what it missed of ``lobby_code`` since ``since``
        (not the messages broadcast with ``exclude_user_id=user_id``), then
        the recovery message; without ``since``, the lobby's position
        message. Synchronous: called right after the connection became a
        member, with no await in between, so every live message of the lobby
        is posted after these (post_all() keeps the order, also through a
        backlog and against a send that posts re-entrantly)."""
        if since is None:
            _recovered, epoch, top, _texts = self._history_since(lobby_code, "", 0)
            position = encode_message(position_message(lobby_code, epoch, top), None)
            self.delivery.post_all(websocket, [position])
            return
        recovered, epoch, top, texts = self._history_since(lobby_code, since[0], since[1], user_id)
        self._recovery_counts.count(recovered, len(texts))
        # one batch: a message posted while it is sent (even re-entrantly, from a send) comes after it
        last = encode_message(recovery_message(lobby_code, recovered, epoch, top), None)
        self.delivery.post_all(websocket, [*texts, last])

    def presence_changed(self, lobby_code: str) -> None:
        """A clustered backend's report that another node's membership of
        ``lobby_code`` changed: the next presence diff of that lobby re-reads
        its users. A no-op when ``presence_events`` is off."""
        if self.presence is not None:
            self.presence.changed(lobby_code)

    def _log_join_refused(self, lobby_code: str, reason: str) -> None:
        logger.info("join refused: %s", reason, extra={"lobby": lobby_code, "reason": reason})

    def _handshakes_of(self, loop: asyncio.AbstractEventLoop) -> dict[int, Any]:
        """The record of ``loop``'s handshakes in flight, made on its first
        connect and kept while empty (no dict per connect). The records of
        closed loops are dropped here (a loop running in another thread keeps
        its own), so a manager used from one loop after another keeps no
        closed loop but the last."""
        for other in [lp for lp in list(self._handshakes) if lp.is_closed()]:
            self._handshakes.pop(other, None)
        in_loop: dict[int, Any] = {}
        self._handshakes[loop] = in_loop
        return in_loop

    def _handshake_ended(self, loop: asyncio.AbstractEventLoop) -> None:
        """A handshake of ``loop`` ended while shutdown() waits: wake it once
        none of that loop is left."""
        waiter = self._handshakes_waiter
        if waiter is None or waiter.done() or waiter.get_loop() is not loop:
            return
        if not self._handshakes.get(loop):
            with contextlib.suppress(RuntimeError):  # its loop closed under it: nobody waits
                waiter.set_result(None)

    def _close_replaced(self, replaced: tuple[Any, ...], lobby_code: str, user_id: str) -> None:
        """Close the open connections the "replace" policy removed (already
        out of the registry) with 4003 "replaced", in the background."""
        if replaced and self.presence is not None:
            self.presence.wake()  # they left their lobbies
        for old in replaced:
            logger.info(
                "closing connection: replaced",
                extra={"lobby": lobby_code, "user": user_id, "reason": "replaced", "code": 4003},
            )
            self.delivery.close_later(old, "replaced")

    async def _close_replaced_handshake(self, websocket: WebSocket, lobby_code: str, user_id: str) -> None:
        """A handshake whose reservation a newer one of the same user took:
        accept (if not yet) and close it with 4003 "replaced"."""
        self.delivery.closed["replaced"] = self.delivery.closed.get("replaced", 0) + 1
        logger.info(
            "closing connection: replaced",
            extra={"lobby": lobby_code, "user": user_id, "reason": "replaced", "code": 4003},
        )
        await self.delivery.refuse(websocket, "replaced", lobby_code=lobby_code, user_id=user_id)

    # ------------------------------------------------------------------- sends

    async def broadcast_to_lobby(
        self,
        lobby_code: str,
        message: Any,
        exclude_user_id: str | None = None,
        *,
        default: Callable[[Any], Any] | None = None,
    ) -> int:
        """Send ``message`` (serialized once) to every connection in the lobby.

        Returns how many connections it was delivered to. Never raises for a
        failing or vanishing recipient: a connection whose send fails is
        removed; one that disconnects meanwhile is skipped: a connection gets
        the message only if it is still in the lobby when its turn comes (not
        if it left, or left and joined another lobby, while earlier recipients
        were sent it). ``exclude_user_id`` skips every connection of that user.

        ``message`` is serialized by :func:`wsmanager.dumps` (datetime, UUID,
        Decimal, Enum, dataclasses and pydantic models included), before
        anything is sent: a message that cannot be serialized raises
        ``TypeError`` (an unsupported type without a converter, or a converter
        that raised: the original is its ``__cause__``), ``ValueError``
        (NaN / Infinity) or ``RecursionError``, and reaches no one.
        ``default`` (else the manager's ``json_default``) converts the objects
        the encoder does not handle natively.

        With ``history_size`` set, ``message`` must serialize to a JSON object
        (else ``TypeError``): its position is added as its last member,
        ``"_pos": {"lobby", "epoch", "offset"}``, and it is kept in the
        lobby's history, even when no one is in the lobby (the return value
        counts live deliveries only); see :mod:`wsmanager.history`.
        """
        bp = self._backplane
        if bp is None:
            if self._history:
                return self._broadcast_kept(lobby_code, message, exclude_user_id, default)
            if not self._lobby_count(lobby_code):
                return 0
            data = encode_message(message, default if default is not None else self._json_default)
            return self.delivery.deliver_lobby_now(lobby_code, data, exclude_user_id)
        # backend: other nodes get the same text, queued before local delivery
        bp.ensure_running()
        data = encode_message(message, default if default is not None else self._json_default)
        if self._history:
            publish = getattr(bp, "history_publish", None)
            if publish is None:
                raise NotImplementedError(
                    "history_size with a clustered backend: see wsmanager.backends.Backend"
                )
            # kept with its position and published to every node, this one
            # included: its members get it from the lobby's channel, in offset order
            remote = publish(lobby_code, data, exclude_user_id)
            if remote is not None:
                return int(remote) + self._lobby_count(lobby_code)
            # the backplane is down: this node's members only, without a position
        remote = bp.publish_lobby(lobby_code, data, exclude_user_id)
        if not self._lobby_count(lobby_code):
            return remote
        return remote + await self.delivery.deliver_lobby(lobby_code, data, exclude_user_id)

    def _broadcast_kept(
        self,
        lobby_code: str,
        message: Any,
        exclude_user_id: str | None,
        default: Callable[[Any], Any] | None,
    ) -> int:
        """broadcast_to_lobby with history on (single process): the message
        gets its position and is kept in the lobby's ring, members or not."""
        data = encode_message(message, default if default is not None else self._json_default)
        data = self._history_append(lobby_code, data, exclude_user_id)
        if not self._lobby_count(lobby_code):
            return 0
        return self.delivery.deliver_lobby_now(lobby_code, data, exclude_user_id)

    async def send_to_user(
        self, user_id: str, message: Any, *, default: Callable[[Any], Any] | None = None
    ) -> bool:
        """Send ``message`` to every open connection of ``user_id``.

        True if at least one connection got it. Never raises for a failing
        connection: it is removed. A connection that stops being the user's
        before its turn (disconnected, or registered again as someone else)
        is skipped.
        Serialization, its errors and ``default`` as in
        :meth:`broadcast_to_lobby`.
        """
        bp = self._backplane
        if bp is None:
            if not Core.is_user_connected(self, user_id):
                return False
            data = encode_message(message, default if default is not None else self._json_default)
            return await self.delivery.deliver_user(user_id, data)
        # backend: reach the user's connections on other nodes too
        bp.ensure_running()
        data = encode_message(message, default if default is not None else self._json_default)
        remote = bp.publish_user(user_id, data) > 0
        if not Core.is_user_connected(self, user_id):
            return remote
        return await self.delivery.deliver_user(user_id, data) or remote

    async def close_connection(self, websocket: Any, reason: str, *, code: int | None = None) -> None:
        """Remove ``websocket`` and close it with ``reason`` (code from the
        table of :mod:`wsmanager.codes` unless given), without waiting for a
        slow client longer than ``close_timeout``."""
        await self.delivery.close_later(websocket, reason, code=code)

    async def shutdown(
        self,
        *,
        timeout: float | None = None,
        code: int = CloseCode.GOING_AWAY,
        reason: str = "server_shutdown",
    ) -> None:
        """Stop admitting (``can_accept_connection`` answers ``(False,
        "shutting_down")``), stop the heartbeat, give queued messages up to half
        of ``timeout`` (default ``shutdown_timeout``) to be written, then close
        every connection with ``code`` / ``reason`` (1001 "server_shutdown").
        Handshakes in progress when it begins (inside ``accept()`` or the
        backend's reservation) are never registered: each gets 1013
        ``shutting_down`` and its ``connect()`` returns False; they get up to
        half of ``timeout`` to end, then a stuck one loses its reserved slot
        and its connection is aborted. Returns within ``timeout``, with
        nothing registered: a client that does not take its close is
        aborted. Calling it again waits for the first call. ``timeout`` is
        checked like the ``shutdown_timeout`` setting (seconds > 0, at most
        100 years; TypeError / ValueError naming ``timeout``)."""
        if timeout is not None:
            timeout = seconds("timeout", timeout)
        if self._shutdown_task is not None and not self._shutdown_task.done():
            await asyncio.shield(self._shutdown_task)
            return
        self._shutdown_task = asyncio.ensure_future(self._shutdown(timeout, code, reason))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, timeout: float | None, code: int, reason: str) -> None:
        timeout = self.shutdown_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._set_shutting_down(True)
        logger.info("shutting down: closing %d connections", len(self), extra={"reason": reason})
        # Handshakes already reserved when shutdown began end refused (1013):
        # wait for their closes, so that none commits after this returns.
        handshakes = list(self._handshakes.get(loop, {}).values())
        if handshakes:
            self._handshakes_waiter = waiter = loop.create_future()
            try:
                await asyncio.wait((waiter,), timeout=max(0.0, (deadline - loop.time()) / 2))
            finally:
                self._handshakes_waiter = None
        for websocket in handshakes:
            # still in progress: stuck in accept() or the backend: free its slot, drop the client
            if self._handshakes.get(loop, {}).get(id(websocket)) is websocket:
                self._overtaken.add(websocket)
                self._release(websocket)
                if self._backplane is not None:
                    self._backplane.release(websocket)
                abort_transport(websocket)
        stop = getattr(self, "stop", None)
        if stop is not None:
            result = stop()
            if isinstance(result, Awaitable):
                await result
        writers = [b.task for b in self.delivery.outboxes.values() if b.task is not None and b.loop is loop]
        if writers:
            await asyncio.wait(writers, timeout=max(0.0, (deadline - loop.time()) / 2))
        close_budget = max(0.01, deadline - loop.time() - 0.05)
        for websocket, _lobby, _user in self._snapshot():
            self.delivery.close_later(websocket, reason, code=code, timeout=close_budget)
        closers = [t for t in self.delivery.closers if t.get_loop() is loop]
        if closers:
            await asyncio.wait(closers, timeout=max(0.01, deadline - loop.time()))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """A lifespan for Starlette / FastAPI (``FastAPI(lifespan=manager.lifespan)``):
        starts the heartbeat if the manager has one; on SIGTERM / SIGINT runs
        :meth:`shutdown` *before* the server closes the sockets itself (uvicorn
        would close them with 1012), then lets the server stop; on exit runs
        :meth:`shutdown` if nothing did."""
        from .endpoint import hook_signals

        start = getattr(self, "start", None)
        if start is not None:
            result = start()
            if isinstance(result, Awaitable):
                await result
        unhook = hook_signals(self)
        try:
            yield
        finally:
            unhook()
            await self.shutdown()
            self._set_shutting_down(False)
            self._shutdown_task = None

    async def serve(
        self,
        websocket: WebSocket,
        lobby_code: str,
        user_id: str | None,
        handler: Handler,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        on_join: JoinHook | None = None,
        max_lobbies_per_connection: int = DEFAULT_MAX_LOBBIES_PER_CONNECTION,
    ) -> None:
        """Run one connection from handshake to cleanup; see
        :func:`wsmanager.endpoint.serve`.

        ``handler`` is ``handler(lobby_code, user_id, data)`` (the pattern's)
        or ``handler(connection, data)``; ``on_connect(connection)`` runs once
        the connection is registered, ``on_disconnect(connection)`` once it
        is removed (every registered connection gets both, whatever ends it).
        ``connection`` is a :class:`wsmanager.endpoint.Connection`: its
        ``websocket``, ``lobby_code``, ``user_id`` and ``send(message)``.
        ``on_join(connection, lobby) -> True | False | str`` (sync or async)
        decides which lobbies the client may join with ``lobby_join``
        messages (none without it); at most ``max_lobbies_per_connection``
        memberships through them (see :mod:`wsmanager.joining`)."""
        from .endpoint import serve

        await serve(
            self,
            websocket,
            lobby_code,
            user_id,
            handler,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            on_join=on_join,
            max_lobbies_per_connection=max_lobbies_per_connection,
        )

    def get_stats(self, *, local: bool = False) -> Stats:
        """The seed's statistics plus counters: ``refused`` (refusals by
        reason: ``server_full``, ``lobby_full``, ``user_limit``,
        ``shutting_down`` and, from :meth:`serve`, ``unauthorized``,
        ``forbidden_origin``, ``invalid_id``; each refused handshake counts
        once, whether ``connect()``, ``serve()`` or a False answer of
        ``can_accept_connection()`` refused it), ``closed`` (closes the
        library performed, by reason, ``replaced`` included),
        ``backlogged_connections`` (connections with queued outbound messages)
        and ``rate_limited_messages`` (inbound messages dropped by the rate
        limit).

        With a clustered backend, ``total_connections``, ``capacity_percent``,
        ``active_lobbies`` and ``connected_users`` are the cluster's (the
        other counters stay this process's), ``local`` holds this process's
        four figures and ``backplane`` the backend's health (``up``,
        ``last_error``, ...). ``local=True``: this process's stats only.

        The keys and their types are :class:`wsmanager.Stats` (a
        ``TypedDict``: a misspelt key is a type error); every figure is read
        in O(1).
        """
        stats: Stats = _core_get_stats(self)
        delivery = self.delivery
        stats["closed"] = delivery.closed.copy()
        stats["backlogged_connections"] = len(delivery.outboxes)
        stats["rate_limited_messages"] = self._rate_stats()[0]
        bp = self._backplane
        stats["history"] = self._history_figures(bp)
        if bp is None or local:
            return stats
        stats["local"] = {
            "total_connections": stats["total_connections"],
            "capacity_percent": stats["capacity_percent"],
            "active_lobbies": stats["active_lobbies"],
            "connected_users": stats["connected_users"],
        }
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

    def _history_figures(self, bp: RedisBackend | None) -> HistoryStats:
        """``get_stats()["history"]``: the core's rings, the recovery counters
        and, with a clustered backend, its history writer's counters."""
        # a clustered backend without history (the Backend protocol does not
        # require it) has no history writer to read
        streams = None if bp is None else getattr(bp, "history", None)
        counts = self._recovery_counts
        if not self._history_used and streams is None and not counts.recoveries:
            return _NO_HISTORY.copy()  # history never on: no core call (get_stats stays O(1) and cheap)
        lobbies, entries, nbytes, appended = self._history_totals()
        dropped = backlog = 0
        if streams is not None:
            appended, dropped, backlog = streams.totals()
        return {
            "lobbies": lobbies,
            "entries": entries,
            "bytes": nbytes,
            "appended": appended,
            "dropped": dropped,
            "backlog": backlog,
            "recoveries": counts.recoveries,
            "recovered": counts.recovered,
            "not_recovered": counts.not_recovered,
            "replayed": counts.replayed,
        }

    # ------------------------------------------------------------------ health

    async def ping_user(self, user_id: str, timeout: float = 2.0) -> tuple[bool, float | None]:
        """Ping every connection of ``user_id`` and wait for a pong.

        Returns ``(True, latency_ms)`` when a pong of the user is recorded
        within ``timeout`` seconds, else ``(False, None)``; ``(False, None)``
        at once for a user with no connection. Concurrent calls for one user
        share the outstanding ping instead of overwriting each other.

        May be awaited from the endpoint's own message handler: while the
        endpoint does not read, the manager reads the pong for it (see
        :mod:`wsmanager.receiving`). A pong that arrives after ``timeout`` is
        no round trip: it enters neither ``latency_ms`` nor the statistics.
        ``timeout`` is checked like a setting (seconds > 0, at most 100 years;
        TypeError / ValueError naming ``timeout``) before anything is sent.
        """
        timeout = seconds("timeout", timeout)
        targets = self._user_targets(user_id)
        if not targets:
            return False, None
        loop = asyncio.get_running_loop()
        waiter = self._ping_waiters.get(user_id)
        if waiter is None or waiter.future.done() or waiter.future.get_loop() is not loop:
            waiter = _PingWaiter(loop.create_future(), time.perf_counter())
            self._add_ping_waiter(user_id, waiter)
            timestamp = time.time()
            waiter.callers += 1
            try:
                sent = False
                send = self.delivery.send
                for websocket in targets:
                    if await send(websocket, health_ping(timestamp, self.latency_ms(websocket))):
                        self._note_ping(websocket, timeout)  # a later pong is no round trip
                        pinged(websocket)  # read for the pong if the caller is the endpoint's handler
                        sent = True
            finally:
                waiter.callers -= 1
            if not sent:
                if self._ping_waiters.get(user_id) is waiter and waiter.callers == 0:
                    self._remove_ping_waiter(user_id)
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
                self._remove_ping_waiter(user_id)
                if not waiter.future.done():
                    waiter.future.cancel()
        return True, (answered_at - waiter.started) * 1000.0

    # record_pong(user_id) / record_pong_ws(websocket) are the C core's: while
    # a ping_user() waits, the core calls this hook with the user id after a
    # pong, so the common case (nobody waiting) runs no Python code.

    def _on_pong(self, user_id: str, websocket: Any, latency: float | None) -> None:
        """The core's pong hook, set only while someone listens."""
        if self._ping_waiters:
            self.delivery.wake_ping_waiter(user_id)
        if latency is not None and self._latency_listeners:
            self._notify_latency(websocket, latency)

    def _update_pong_hook(self) -> None:
        listening = bool(self._ping_waiters or self._latency_listeners)
        self._set_pong_hook(_weak_pong_hook(self) if listening else None)

    def _add_ping_waiter(self, user_id: str, waiter: _PingWaiter) -> None:
        self._ping_waiters[user_id] = waiter
        if len(self._ping_waiters) == 1:
            self._update_pong_hook()

    def _remove_ping_waiter(self, user_id: str) -> None:
        del self._ping_waiters[user_id]
        if not self._ping_waiters:
            self._update_pong_hook()

    def add_latency_listener(self, listener: Callable[[Any, float], None]) -> Callable[[], None]:
        """Call ``listener(websocket, latency_ms)`` for every round trip the
        manager measures: a pong answering a ping (the heartbeat's, or
        ``ping_user``'s), whether :meth:`serve` or the app reports it.
        ``websocket`` is None when the pong was reported per user
        (``record_pong(user_id)``). Listeners run synchronously where the
        pong is recorded; one that raises is logged and the others still run.
        Returns a function that removes the listener.

        ``latency_ms(websocket)`` gives a connection's last round trip at any
        time; :class:`wsmanager.metrics.ManagerMetrics` listens here to fill
        its latency histogram.
        """
        self._latency_listeners.append(listener)
        self._update_pong_hook()

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._latency_listeners.remove(listener)
            self._update_pong_hook()

        return remove

    def add_close_listener(self, listener: CloseListener) -> Callable[[], None]:
        """Call ``listener(event)`` for every refusal and every close the
        library performs (stale, slow consumer, rate limited, replaced, bad
        input, shutdown, ``close_connection()``), with a
        :class:`wsmanager.events.CloseEvent`: ``websocket``, ``code``,
        ``reason``, ``lobby_code``, ``user_id`` (None where unknown) and
        ``refused`` (True for a handshake never registered). Listeners run
        synchronously when the close is decided, before the close frame is
        written; one that raises is logged and the others still run. A
        client that leaves by itself is no event. Returns a function that
        removes the listener; a non-callable raises TypeError. See
        :mod:`wsmanager.events`."""
        return self.delivery.close_listeners.add(listener)

    def _notify_latency(self, websocket: Any, latency_ms: float) -> None:
        for listener in list(self._latency_listeners):
            try:
                listener(websocket, latency_ms)
            except Exception:
                logger.exception("latency listener failed", extra={"reason": "listener_error"})

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
        """Start the heartbeat and the backend in the running loop, e.g. from a
        lifespan. Optional: the first ``connect()`` starts both too.

        A Redis backend connects, registers this node and waits up to its
        ``connect_timeout``; it never raises for an unreachable Redis (the
        node serves locally and keeps retrying)."""
        await self._health.start()
        await self.backend.start()

    async def stop(self) -> None:
        """Stop the heartbeat and the backend (both restart with the next
        ``connect()``). A Redis node leaves the cluster: its connections stop
        counting at once instead of after the lease."""
        await self.backend.stop()
        await self._health.stop()
        if self.presence is not None:
            await self.presence.stop()

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
        for websocket, _first, _user in self._snapshot():
            for lobby in self.lobbies_of(websocket):  # every membership (rooms)
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


def _class_setting_checks() -> dict[str, Check[Any]]:
    """Each numeric setting a subclass may set as a class attribute -> its check."""
    checks: dict[str, Check[Any]] = {
        name: d.check for name, d in vars(ConnectionManager).items() if isinstance(d, Setting)
    }
    checks.update(
        rate_limit=_RATE,
        rate_burst=_BURST,
        rate_limit_close_after=_CLOSE_AFTER,
        ping_interval=optional_seconds,
        ping_timeout=optional_seconds,
    )
    return checks


class _ClusteredConnectionManager(ConnectionManager):
    """A ConnectionManager whose backend spans processes: presence and
    capacity reads also consult the cluster view. ``ConnectionManager(...,
    backend=<clustered>)`` becomes one, so that the single-process manager
    keeps these reads as plain C calls."""

    def can_accept_connection(self, lobby_code: str) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)``: advisory, like the seed's.

        With a clustered backend it also checks the cluster counts of the
        view this node keeps (other nodes' handshakes in progress are not in
        it); ``connect()`` decides atomically either way.
        """
        verdict = Core.can_accept_connection(self, lobby_code)  # counts its refusals
        bp = self._backplane
        if bp is None or not verdict[0]:  # pragma: no cover - clustered by construction
            return verdict
        view = bp.view
        if view.total + bp.pending_count() >= self.max_connections:
            self._count_refusal("server_full")
            return False, "server_full"
        if view.lobbies.get(lobby_code, 0) >= self.max_per_lobby:
            self._count_refusal("lobby_full")
            return False, "lobby_full"
        return verdict

    def leave(self, websocket: Any, lobby_code: str) -> bool:
        """Take ``websocket`` out of ``lobby_code`` (its first lobby included):
        True if it was a member. The cluster learns of it through the
        backend's ``leave``."""
        left = Core.leave(self, websocket, lobby_code)
        bp = self._backplane
        if left and bp is not None:
            leave = getattr(bp, "leave", None)
            if leave is None:
                raise NotImplementedError(f"{type(bp).__name__} does not implement leave() yet")
            leave(websocket, lobby_code)
        return left

    def is_user_connected(self, user_id: str, *, local: bool = False) -> bool:
        """Whether ``user_id`` has an open connection, on any node of the
        cluster (``local=True``: in this process)."""
        if Core.is_user_connected(self, user_id):
            return True
        bp = self._backplane
        return bp is not None and not local and bp.view.users.get(user_id, 0) > 0

    def get_lobby_users(self, lobby_code: str, *, local: bool = False) -> set[str]:
        """User ids connected to ``lobby_code`` on any node (``local=True``:
        in this process)."""
        users = Core.get_lobby_users(self, lobby_code)
        bp = self._backplane
        if bp is not None and not local:
            users.update(bp.view.lobby_users.get(lobby_code, ()))
        return users


class _PresenceConnectionManager(ConnectionManager):
    """``presence_events=True``: the core's methods that end memberships also
    wake the presence flusher (wsmanager.presence), which otherwise sleeps.
    ``ConnectionManager(presence_events=True)`` becomes one of these (a
    subclass of the class instantiated, with its name): see _presence_class."""

    __slots__ = ()

    def _presence_wake(self) -> None:
        presence = self.presence
        if presence is not None:
            presence.wake()

    def disconnect(self, websocket: Any) -> tuple[str, str] | None:
        """Remove ``websocket`` from the manager (every lobby); its
        ``(first_lobby_code, user_id)``, or None if it was not registered."""
        info = super().disconnect(websocket)
        if info is not None:
            self._presence_wake()
        return info

    def leave(self, websocket: Any, lobby_code: str) -> bool:
        """Take ``websocket`` out of ``lobby_code`` (its first lobby
        included): True if it was a member."""
        left = super().leave(websocket, lobby_code)
        if left:
            self._presence_wake()
        return left

    def _reap(self, websocket: Any, reason: str, /) -> tuple[str, str] | None:
        info = super()._reap(websocket, reason)
        if info is not None:
            self._presence_wake()
        return info

    def _sweep(
        self, ping_interval: float, ping_timeout: float, limit: int = -1, /
    ) -> tuple[list[Any], list[tuple[Any, str, str]]]:
        to_ping, expired = super()._sweep(ping_interval, ping_timeout, limit)
        if expired:
            self._presence_wake()
        return to_ping, expired


class _ClusteredPresenceConnectionManager(_PresenceConnectionManager, _ClusteredConnectionManager):
    """_PresenceConnectionManager over a clustered manager."""

    __slots__ = ()


def _presence_class(cls: type[ConnectionManager]) -> type[ConnectionManager]:
    """The class a manager of class ``cls`` with presence events on takes."""
    if issubclass(cls, _PresenceConnectionManager):
        return cls
    if cls is ConnectionManager:
        return _PresenceConnectionManager
    if cls is _ClusteredConnectionManager:
        return _ClusteredPresenceConnectionManager
    # an application's subclass (class-level settings): the hooks over it
    namespace = {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return cast("type[ConnectionManager]", type(cls.__name__, (_PresenceConnectionManager, cls), namespace))
