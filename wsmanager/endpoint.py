"""The safe endpoint: one connection from handshake to cleanup.

A new app writes::

    @app.websocket("/ws/{lobby_code}")
    async def ws(websocket: WebSocket, lobby_code: str, token: str = "") -> None:
        await manager.serve(websocket, lobby_code, await authenticate(token), handle_message)

instead of the pattern's hand-written loop. ``handle_message(lobby_code,
user_id, data)`` is the pattern's handler; a handler that needs its connection
(to answer only the sender, or to know the websocket) takes
``(connection, data)`` instead, where ``connection`` is a :class:`Connection`.
The keyword-only hooks ``on_connect(connection)`` and
``on_disconnect(connection)`` run once the connection is registered and once
it is removed (announce a member list, keep app state per connection)::

    async def joined(conn: Connection) -> None:
        await conn.send({"type": "welcome", "user": conn.user_id})
        await manager.broadcast_to_lobby(conn.lobby_code, {"type": "joined", "user": conn.user_id})

    await manager.serve(websocket, lobby_code, user_id, handle_message, on_connect=joined)
 :func:`serve` refuses with
accept-then-close (so browsers see the code and reason), keeps liveness and
pongs per websocket, answers bad input with a documented error or close code
(see :mod:`wsmanager.codes`) and never a traceback, applies the inbound rate
limit, and always removes the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from starlette.websockets import WebSocket, WebSocketDisconnect

from ._core import dumps, encode_message
from .history import SINCE_PARAM, Since, parse_since_param
from .joining import DEFAULT_MAX_LOBBIES_PER_CONNECTION, JOIN, LEAVE, JoinHook, LobbyRequests, check_request
from .settings import count

if TYPE_CHECKING:
    from .manager import ConnectionManager

logger = logging.getLogger(__name__)

__all__ = [
    "Connection",
    "ConnectionHandler",
    "Handler",
    "Hook",
    "JoinHook",
    "MessageHandler",
    "error_message",
    "hook_signals",
    "origin_allowed",
    "serve",
]


@dataclass(frozen=True, eq=False)
class Connection:
    """One connection run by :func:`serve`, as its hooks and a
    ``(connection, data)`` handler see it."""

    manager: ConnectionManager
    websocket: WebSocket
    lobby_code: str
    user_id: str

    async def send(self, message: Any, *, default: Callable[[Any], Any] | None = None) -> bool:
        """Send ``message`` (serialized as JSON) to this connection only, in
        order with the broadcasts it gets; never waits for a slow client
        (see ``ConnectionManager``). False, without sending, once the manager
        no longer holds the connection (it left or was closed). Serialization,
        its errors and ``default`` (else the manager's ``json_default``) as in
        ``ConnectionManager.broadcast_to_lobby``."""
        # a message that cannot be serialized raises, as in broadcast_to_lobby
        data = encode_message(message, default if default is not None else self.manager.json_default)
        if self.websocket not in self.manager:
            return False
        return await self.manager.delivery.send(self.websocket, data)

    @property
    def latency_ms(self) -> float | None:
        """Round trip in ms of the last ping this connection answered, or None."""
        return self.manager.latency_ms(self.websocket)

    @property
    def lobbies(self) -> set[str]:
        """The lobbies this connection is in now (``manager.lobbies_of``): its
        first one (``lobby_code``, unless it left it) and those it joined."""
        return self.manager.lobbies_of(self.websocket)

    @property
    def connected(self) -> bool:
        """True while the manager still holds this connection (False once it
        was closed as stale, as a slow consumer, at shutdown, or removed)."""
        return self.websocket in self.manager


MessageHandler = Callable[[str, str, dict[str, Any]], Awaitable[Any]]
"""``await handler(lobby_code, user_id, message)`` for every valid message:
the signature of the pattern's ``handle_message``."""

ConnectionHandler = Callable[[Connection, dict[str, Any]], Awaitable[Any]]
"""``await handler(connection, message)``: a handler that needs its connection."""

Handler = MessageHandler | ConnectionHandler
"""Either handler form; :func:`serve` tells them apart by their number of
positional parameters (exactly 2: the connection form, else the pattern's)."""

Hook = Callable[[Connection], Awaitable[Any]]
"""``await hook(connection)``: ``on_connect`` / ``on_disconnect`` of :func:`serve`."""


def _takes_connection(handler: Callable[..., Any]) -> bool:
    """True for a ``(connection, data)`` handler: one that takes exactly two
    positional parameters. Anything else (three, ``*args``, a signature that
    cannot be read) is called as the pattern's ``(lobby_code, user_id, data)``."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(k in positional for k in kinds) == 2


# verdicts of Core._allow
_ALLOW, _DROP_NOTIFY, _DROP, _CLOSE = 0, 1, 2, 3


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class _NonFinite(ValueError):
    """A number of a client's message that is not a finite double."""


def _reject_constant(name: str) -> NoReturn:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: not JSON (RFC 8259, section 6)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value - value != 0.0:  # 1e999: overflows a double to infinity
        raise _NonFinite(literal)
    return value


# Client messages are parsed as RFC 8259 JSON with finite numbers only, so that
# whatever reaches a handler can be sent on by the manager (whose encoder
# refuses NaN and infinities as JSON does).
_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode

_BAD_TIMESTAMP = "health_ping timestamp must be a finite number or null"


def _parse(text: str) -> tuple[dict[str, Any] | None, str, str]:
    """``(message, "", "")`` for a text frame the endpoint accepts, else
    ``(None, error, detail)`` with ``error`` one of ``codes.ERROR_REASONS``.
    Never raises on any ``str``."""
    try:
        data = _decode(text)
    except _NonFinite:
        return None, "bad_json", "numbers must be finite: no NaN, Infinity or overflowing exponent"
    except RecursionError:
        return None, "bad_json", "nested too deeply"
    except ValueError:  # JSONDecodeError; an integer over sys.get_int_max_str_digits()
        return None, "bad_json", "malformed JSON"
    if type(data) is not dict:
        return None, "not_an_object", "expected a JSON object"
    kind = data.get("type")
    if kind == "health_ping":
        stamp = data.get("timestamp")
        if stamp is not None and type(stamp) is not float and type(stamp) is not int:
            return None, "bad_message", _BAD_TIMESTAMP
    elif kind in (JOIN, LEAVE):
        problem = check_request(data)
        if problem:
            return None, "bad_message", problem
    return data, "", ""


def error_message(reason: str, detail: str = "") -> str:
    """The serialized ``{"type": "error", "error": reason, "detail": ...}``."""
    return dumps({"type": "error", "error": reason, "detail": detail})


def origin_allowed(manager: ConnectionManager, websocket: WebSocket) -> bool:
    """Whether the handshake's ``Origin`` passes ``manager.allowed_origins``.

    No allow-list: every origin passes. A request without an ``Origin``
    header (not a browser, so not a cross-site hijack) passes too.
    """
    allowed = manager.allowed_origins
    if allowed is None:
        return True
    origin = websocket.headers.get("origin")
    return origin is None or origin in allowed


async def serve(
    manager: ConnectionManager,
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
    """Admit ``websocket`` into ``lobby_code`` as ``user_id``, then read its
    messages until it leaves, calling ``handler`` for each valid one.

    * ``handler`` is ``await handler(lobby_code, user_id, data)`` (the
      pattern's ``handle_message``) or, when it takes exactly two
      positional parameters, ``await handler(connection, data)`` with the
      :class:`Connection` (websocket, lobby, user, ``send()`` to it alone).
    * ``on_connect(connection)`` is awaited once the connection is
      registered (it already counts in ``get_lobby_users`` and receives
      broadcasts), before its first message is read. If it raises, the
      error is logged and the connection closed with 1011
      "internal_error" (a ``WebSocketDisconnect`` just means the client
      left).
    * ``on_disconnect(connection)`` runs once the connection has been
      removed from the manager, whoever removed it (the client left, a
      close by the library such as stale, slow consumer or shutdown, an
      error, a cancellation): exactly once for every connection that was
      registered, i.e. whenever ``on_connect`` was called, and never before
      ``on_connect`` returned. When the library removes the connection it
      starts at once, in a task of its own, without waiting for the client's
      side of the close handshake (a frozen client may never send it);
      ``serve()`` returns only once it has finished. If it raises, the error
      is logged. Refused connections call neither hook.

    * refusals are sent as accept-then-close: a falsy ``user_id`` (failed
      authentication) 4001 "unauthorized", an ``Origin`` not in
      ``allowed_origins`` 4008 "forbidden_origin", an invalid id 1008
      "invalid_id", capacity 4002, shutdown 1013.
    * ``{"type": "health_pong"}`` records a pong for this websocket (and
      wakes ``ping_user``; its other fields are ignored);
      ``{"type": "health_ping"}`` is answered with ``{"type": "health_pong",
      "timestamp": <the ping's>}``, where the timestamp must be a number or
      null/absent; neither reaches the handler. Every message counts as a
      sign of life.
    * messages are RFC 8259 JSON with finite numbers: malformed JSON
      (including ``NaN`` / ``Infinity`` literals, numbers that overflow a
      double such as ``1e999``, integers over Python's digit limit, nesting
      deeper than the recursion limit, empty text) is answered with an error
      message ``bad_json``, JSON that is not an object with
      ``not_an_object``, a ``health_ping`` whose timestamp is not a number
      with ``bad_message``; ``max_bad_messages`` of these in a row close with
      4007 "bad_message". Duplicate keys: the last one wins. Any other
      object, whatever its ``type``, reaches the handler. Binary frames close
      with 1003, text over ``max_message_bytes`` with 1009, a handler that
      raises with 1011 (its traceback is logged: that is an application
      bug). No client input makes ``serve()`` itself raise or log an error.
    * the inbound rate limit (``rate_limit``) drops excess messages; see
      :mod:`wsmanager.codes` for the policy.
    * the connection is removed from the manager however the loop ends,
      cancellation included.
    * history (``history_size`` set): a client names the last message of
      ``lobby_code`` it saw with the query parameter
      ``?wsm_since=<epoch>:<offset>``; it is sent what it missed, then
      ``{"type": "recovery", ...}``, before any live message; without it, a
      ``{"type": "lobby_position", ...}`` first (see
      :mod:`wsmanager.history`). A malformed ``wsm_since`` (no ``:``, an
      offset that is not 1 to 16 ASCII digits or over 2**53 - 1, an epoch
      over 64 characters) is answered with ``recovered: false``, as a
      position no longer kept: the client refetches. ``lobby_join`` takes a
      ``since`` too (:mod:`wsmanager.joining`).
    * lobbies beyond ``lobby_code``: the client asks with ``{"type":
      "lobby_join", "lobby": L, "ref": R}`` / ``{"type": "lobby_leave", ...}``
      and gets ``lobby_joined`` / ``lobby_join_refused`` (with a ``reason``) /
      ``lobby_left`` (with ``was_member``) / ``lobby_leave_refused``, ``ref``
      echoed (wire format and reasons: :mod:`wsmanager.joining`). ``on_join(
      connection, lobby)``, sync or async, decides each join: only ``True``
      admits, a non-empty ``str`` refuses with that reason, anything else
      (or a hook that raises: logged, ``internal_error``) with
      ``"forbidden"``. Without ``on_join`` every client join and leave is
      refused (``"forbidden"``): clients change memberships only where the
      app opts in. With it, a client may leave any of its lobbies, the first
      one included (it stays connected). A join is refused with
      ``too_many_lobbies`` once the connection is in
      ``max_lobbies_per_connection`` lobbies (default 32, an ``int`` >= 1:
      ``TypeError`` / ``ValueError`` otherwise, before anything is sent), with
      ``invalid_lobby`` for an empty lobby, one over ``max_id_bytes`` or not
      UTF-8, with
      ``lobby_full`` when ``manager.join()`` refuses it. A request whose
      ``lobby`` is not a string or whose ``ref`` is not a string of at most 128
      characters, an integer within 2**53 - 1 or null gets the error
      ``bad_message`` (counted toward ``max_bad_messages``). Requests go
      through the rate limit like any message, and are answered one at a time
      in order with the others. The app's own ``manager.join()`` never calls
      the hook.
    """
    max_lobbies = count(1)("max_lobbies_per_connection", max_lobbies_per_connection)
    if not origin_allowed(manager, websocket):
        logger.info(
            "connection refused: forbidden_origin",
            extra={"lobby": lobby_code, "reason": "forbidden_origin"},
        )
        await manager.delivery.refuse(websocket, "forbidden_origin", count=True, lobby_code=lobby_code)
        return
    if not user_id:
        logger.info("connection refused: unauthorized", extra={"lobby": lobby_code, "reason": "unauthorized"})
        await manager.delivery.refuse(websocket, "unauthorized", count=True, lobby_code=lobby_code)
        return
    try:
        since = _since_of(websocket, lobby_code)
        admitted = await manager.connect(websocket, lobby_code, user_id, since=since)
    except (TypeError, ValueError) as exc:
        logger.info("connection refused: invalid_id (%s)", exc, extra={"reason": "invalid_id"})
        await manager.delivery.refuse(websocket, "invalid_id", count=True)
        return
    if not admitted:
        return
    conn = Connection(manager, websocket, lobby_code, user_id)
    call: Callable[[str, str, dict[str, Any]], Awaitable[Any]]
    if _takes_connection(handler):
        with_conn: Any = handler

        def call(_lobby: str, _user: str, data: dict[str, Any]) -> Awaitable[Any]:
            return with_conn(conn, data)  # type: ignore[no-any-return]
    else:
        call = handler  # type: ignore[assignment]
    departure = _Departure(conn, on_disconnect) if on_disconnect is not None else None
    if departure is not None:
        manager.delivery.on_removal(websocket, departure.removed)
    try:
        connected = on_connect is None or await _run_hook(on_connect, conn, "on_connect")
        if departure is not None:
            departure.arm()
        if connected:
            lobbies = LobbyRequests(conn, on_join, max_lobbies)
            await _read_loop(manager, websocket, lobby_code, user_id, call, lobbies)
        else:
            await manager.close_connection(websocket, "internal_error")
    except WebSocketDisconnect:
        pass
    finally:
        manager.delivery.forget_removal(websocket)
        manager.disconnect(websocket)
        if departure is not None:
            await departure.finish()


_UNRECOVERABLE: Since = ("", 0)  # matches no epoch: "recovered": false, the lobby's position


def _since_of(websocket: WebSocket, lobby_code: str) -> Since | None:
    """The client's position in ``lobby_code`` from the handshake's
    ``wsm_since`` query parameter, or None without one. A malformed one
    (see :func:`wsmanager.history.parse_since_param`) is logged and answered
    as a position that cannot be recovered: ``recovered: false``."""
    raw = websocket.query_params.get(SINCE_PARAM)
    if raw is None:
        return None
    try:
        return parse_since_param(raw)
    except ValueError as exc:
        logger.info("bad %s: %s", SINCE_PARAM, exc, extra={"lobby": lobby_code, "reason": "bad_since"})
        return _UNRECOVERABLE


async def _await_client_close(websocket: WebSocket, timeout: float) -> None:
    """The manager removed the connection and closes it in the background:
    read and drop what the client still sends until the close handshake ends
    (the server's ``websocket.disconnect``), for at most ``timeout`` seconds.
    Returning from the endpoint before the close frame is sent lets the
    server drop the TCP connection without it (the client then sees 1006
    instead of the code)."""

    async def drain() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    with contextlib.suppress(Exception):  # gone, or silent past the timeout
        await asyncio.wait_for(drain(), timeout)


class _Departure:
    """Runs ``on_disconnect`` exactly once, after ``on_connect`` returned: as
    soon as the manager removes the connection (a stale close, a slow
    consumer, shutdown: the client's close handshake may take a while yet),
    or when :func:`serve` ends."""

    __slots__ = ("armed", "conn", "hook", "loop", "pending", "started", "task")

    def __init__(self, conn: Connection, hook: Hook) -> None:
        self.conn = conn
        self.hook = hook
        self.loop = asyncio.get_running_loop()
        self.armed = False  # on_connect has returned
        self.pending = False  # removed before that: start once armed
        self.started = False
        self.task: asyncio.Task[bool] | None = None

    def removed(self) -> None:
        """The manager removed the entry (called from any loop or thread)."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self.loop:
            self._removed_here()
        else:
            with contextlib.suppress(RuntimeError):  # serve()'s loop is closed: so is the socket
                self.loop.call_soon_threadsafe(self._removed_here)

    def _removed_here(self) -> None:
        if self.armed:
            self._start()
        else:
            self.pending = True

    def arm(self) -> None:
        """on_connect has returned: a removal may now run on_disconnect."""
        self.armed = True
        if self.pending:
            self._start()

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.task = self.loop.create_task(self._run())

    async def _run(self) -> bool:
        with contextlib.suppress(WebSocketDisconnect):
            return await _run_hook(self.hook, self.conn, "on_disconnect")
        return False

    async def finish(self) -> None:
        """serve() ends: run the hook now, or wait for the run under way."""
        if not self.started:
            self.started = True
            await self._run()
        elif self.task is not None:
            await asyncio.shield(self.task)


async def _run_hook(hook: Hook, conn: Connection, name: str) -> bool:
    """Await ``hook(conn)``; False (after logging it) if it raised. A
    ``WebSocketDisconnect`` (the client left) is passed on."""
    try:
        await hook(conn)
    except (WebSocketDisconnect, asyncio.CancelledError):
        raise
    except Exception:
        logger.exception(
            "%s hook failed",
            name,
            extra={"lobby": conn.lobby_code, "user": conn.user_id, "reason": "internal_error"},
        )
        return False
    return True


async def _read_loop(
    manager: ConnectionManager,
    websocket: WebSocket,
    lobby_code: str,
    user_id: str,
    handler: MessageHandler,
    lobbies: LobbyRequests,
) -> None:
    receive = websocket.receive
    touch = manager.touch
    delivery = manager.delivery
    allow = delivery.allow()
    post = delivery.post
    parse = _parse
    bad_in_a_row = 0
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":  # websocket.disconnect
            return
        if websocket not in manager:  # closed by the manager meanwhile (slow consumer, shutdown, replaced)
            # its close is on the way: returning now would let the server drop
            # the TCP connection before the close frame is sent (the client
            # would see 1006, not the code)
            await _await_client_close(websocket, manager.close_timeout)
            return
        touch(websocket)
        verdict = allow(websocket)
        if verdict:
            if verdict == _CLOSE:
                await manager.close_connection(websocket, "rate_limited")
                return
            if verdict == _DROP_NOTIFY:
                post(websocket, error_message("rate_limited", "message dropped: too many messages"))
            continue
        text = message.get("text")
        if text is None:
            await manager.close_connection(websocket, "binary_not_supported")
            return
        n = len(text)  # characters: a lower bound of the UTF-8 size, 4x an upper one
        max_bytes = manager.max_message_bytes  # read per message: an assignment applies at once
        if n > max_bytes or (n * 4 > max_bytes and not text.isascii() and _utf8_len(text) > max_bytes):
            await manager.close_connection(websocket, "message_too_big")
            return
        data, error, detail = parse(text)
        if data is None:
            bad_in_a_row += 1
            if bad_in_a_row >= manager.max_bad_messages:
                await manager.close_connection(websocket, "bad_message")
                return
            post(websocket, error_message(error, detail))
            continue
        bad_in_a_row = 0
        kind = data.get("type")
        if kind == "health_pong":
            manager.record_pong_ws(websocket)
            delivery.wake_ping_waiter(user_id)
            continue
        if kind == "health_ping":
            post(websocket, dumps({"type": "health_pong", "timestamp": data.get("timestamp")}))
            continue
        if kind in (JOIN, LEAVE):
            await lobbies.handle(data)
            continue
        try:
            await handler(lobby_code, user_id, data)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:
            logger.exception(
                "message handler failed; closing the connection",
                extra={"lobby": lobby_code, "user": user_id, "reason": "internal_error"},
            )
            await manager.close_connection(websocket, "internal_error")
            return


def hook_signals(manager: ConnectionManager) -> Callable[[], None]:
    """On SIGTERM / SIGINT, run ``manager.shutdown()`` first, then the
    handler that was installed before (uvicorn's, which then stops the
    server). Returns a function that puts the previous handlers back.

    A second signal during the shutdown is passed on at once. Outside the
    main thread (no signals there) nothing is hooked.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    requested: list[asyncio.Task[None]] = []  # keeps the shutdown task alive
    hooked = {"signalled": False}

    def chain(signum: int, frame: FrameType | None) -> None:
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def begin(signum: int, frame: FrameType | None) -> None:
        task = loop.create_task(manager.shutdown())
        requested.append(task)
        task.add_done_callback(lambda _t: chain(signum, frame))

    def handler(signum: int, frame: FrameType | None) -> None:
        if hooked["signalled"] or loop.is_closed():
            chain(signum, frame)
            return
        hooked["signalled"] = True
        loop.call_soon_threadsafe(begin, signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def unhook() -> None:
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)

    return unhook
