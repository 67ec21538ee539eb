"""The safe endpoint: one connection from handshake to cleanup.

A new app writes::

    @app.websocket("/ws/{lobby_code}")
    async def ws(websocket: WebSocket, lobby_code: str, token: str = "") -> None:
        await manager.serve(websocket, lobby_code, await authenticate(token), handle_message)

instead of the pattern's hand-written loop. :func:`serve` refuses with
accept-then-close (so browsers see the code and reason), keeps liveness and
pongs per websocket, answers bad input with a documented error or close code
(see :mod:`wsmanager.codes`) and never a traceback, applies the inbound rate
limit, and always removes the entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from ._core import dumps

if TYPE_CHECKING:
    from .manager import ConnectionManager

logger = logging.getLogger(__name__)

__all__ = ["Handler", "error_message", "hook_signals", "origin_allowed", "serve"]

Handler = Callable[[str, str, dict[str, Any]], Awaitable[Any]]
"""``await handler(lobby_code, user_id, message)`` for every valid message:
the signature of the pattern's ``handle_message``."""

# verdicts of Core._allow
_ALLOW, _DROP_NOTIFY, _DROP, _CLOSE = 0, 1, 2, 3


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


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
) -> None:
    """Admit ``websocket`` into ``lobby_code`` as ``user_id``, then read its
    messages until it leaves, calling ``handler`` for each valid one.

    * refusals are sent as accept-then-close: a falsy ``user_id`` (failed
      authentication) 4001 "unauthorized", an ``Origin`` not in
      ``allowed_origins`` 4008 "forbidden_origin", an invalid id 1008
      "invalid_id", capacity 4002, shutdown 1013.
    * ``{"type": "health_pong"}`` records a pong for this websocket (and
      wakes ``ping_user``); ``{"type": "health_ping"}`` is answered with
      ``{"type": "health_pong", "timestamp": <the ping's>}``; neither reaches
      the handler. Every message counts as a sign of life.
    * malformed JSON and non-object JSON are answered with an error message
      (``bad_json`` / ``not_an_object``); ``max_bad_messages`` of them in a
      row close with 4007 "bad_message". Binary frames close with 1003, text
      over ``max_message_bytes`` with 1009, a handler that raises with 1011
      (its traceback is logged: that is an application bug).
    * the inbound rate limit (``rate_limit``) drops excess messages; see
      :mod:`wsmanager.codes` for the policy.
    * the connection is removed from the manager however the loop ends,
      cancellation included.
    """
    if not origin_allowed(manager, websocket):
        logger.info(
            "connection refused: forbidden_origin",
            extra={"lobby": lobby_code, "reason": "forbidden_origin"},
        )
        await manager._refuse(websocket, "forbidden_origin")
        return
    if not user_id:
        logger.info("connection refused: unauthorized", extra={"lobby": lobby_code, "reason": "unauthorized"})
        await manager._refuse(websocket, "unauthorized")
        return
    try:
        admitted = await manager.connect(websocket, lobby_code, user_id)
    except (TypeError, ValueError) as exc:
        logger.info("connection refused: invalid_id (%s)", exc, extra={"reason": "invalid_id"})
        await manager._refuse(websocket, "invalid_id")
        return
    if not admitted:
        return
    try:
        await _read_loop(manager, websocket, lobby_code, user_id, handler)
    except WebSocketDisconnect:
        pass
    finally:
        manager.disconnect(websocket)


async def _read_loop(
    manager: ConnectionManager,
    websocket: WebSocket,
    lobby_code: str,
    user_id: str,
    handler: Handler,
) -> None:
    receive = websocket.receive
    touch = manager.touch
    allow = manager._allow
    loads = json.loads
    max_bytes = manager.max_message_bytes
    bad_in_a_row = 0
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":  # websocket.disconnect
            return
        if websocket not in manager:  # closed by the manager meanwhile (slow consumer, shutdown)
            return
        touch(websocket)
        verdict = allow(websocket)
        if verdict:
            if verdict == _CLOSE:
                await manager.close_connection(websocket, "rate_limited")
                return
            if verdict == _DROP_NOTIFY:
                manager._post(websocket, error_message("rate_limited", "message dropped: too many messages"))
            continue
        text = message.get("text")
        if text is None:
            await manager.close_connection(websocket, "binary_not_supported")
            return
        n = len(text)  # characters: a lower bound of the UTF-8 size, 4x an upper one
        if n > max_bytes or (n * 4 > max_bytes and not text.isascii() and _utf8_len(text) > max_bytes):
            await manager.close_connection(websocket, "message_too_big")
            return
        try:
            data = loads(text)
        except ValueError:
            data = error = "bad_json"
        else:
            error = "" if type(data) is dict else "not_an_object"
        if error:
            bad_in_a_row += 1
            if bad_in_a_row >= manager.max_bad_messages:
                await manager.close_connection(websocket, "bad_message")
                return
            manager._post(websocket, error_message(error, "expected a JSON object"))
            continue
        bad_in_a_row = 0
        kind = data.get("type")
        if kind == "health_pong":
            manager.record_pong_ws(websocket)
            manager._wake_ping_waiter(user_id)
            continue
        if kind == "health_ping":
            manager._post(websocket, dumps({"type": "health_pong", "timestamp": data.get("timestamp")}))
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
