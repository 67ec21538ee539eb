"""Everything wsmanager reads of a server's private state, in one module.

ASGI gives an application ``receive`` and ``send`` and nothing else. Where
wsmanager does better than ASGI allows, it reads private attributes of
uvicorn, websockets and Starlette; every such read is here, so that a new
release of one of them means one file to check:

* :func:`direct_transport` (uvicorn's websockets-sansio protocol and its
  ``transport``, websockets' connection state, Starlette's exception-handler
  ``sender`` closure): the transport a pre-built frame may be written to;
* :func:`abort_transport`: the TCP connection under a stuck close;
* :func:`asgi_receive` / :func:`replace_asgi_receive`: Starlette's
  ``WebSocket._receive``, where :mod:`wsmanager.receiving` puts its reader;
* :data:`asgi_send`: Starlette's ``WebSocket._send``, the raw ASGI send
  the ordinary send path calls (what ``send_text()`` ends in, minus two
  coroutine frames);
* :data:`FANOUT_READS`: the same reads (``application_state``, ``_send``),
  named for the C fan-out of a lobby broadcast;
* :func:`direct_frames_possible`: whether uvicorn's websockets-sansio
  protocol is loaded at all (else no connection can take a direct frame);
* one log record of uvicorn's (below).

Every read degrades to the plain ASGI path when the attribute is missing:
a release that renames one turns an optimisation off, never a send.

Log records: uvicorn's default WebSocket protocol (websockets-sansio)
decodes text frames itself and, for a frame that is not valid UTF-8, closes
the connection with 1007 (RFC 6455, section 8.1) and logs ``"Invalid UTF-8
sequence received from client."`` at ERROR *with a traceback*: any client
can write tracebacks into the server's log at will, without the application
ever seeing the frame. :func:`quiet_client_faults` turns that record into
what it is, a client's fault: INFO, without the traceback. The close code
the client gets is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import sys
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Send
from starlette.websockets import WebSocket, WebSocketState

__all__ = [
    "CLIENT_FAULT_RECORDS",
    "DIRECT_ATTR",
    "FANOUT_READS",
    "abort_transport",
    "asgi_receive",
    "asgi_send",
    "direct_frames_possible",
    "direct_transport",
    "quiet_client_faults",
    "replace_asgi_receive",
]

logger = logging.getLogger("wsmanager.manager")  # the records of direct frames keep their logger name
_CONNECTED = WebSocketState.CONNECTED

#: (logger name, message) of server log records that report a client's bad
#: input with a traceback; logged at INFO without it once
#: :func:`quiet_client_faults` ran.
CLIENT_FAULT_RECORDS: frozenset[tuple[str, str]] = frozenset(
    {("uvicorn.error", "Invalid UTF-8 sequence received from client.")}
)


class _ClientFaultFilter(logging.Filter):
    """Downgrades the records of :data:`CLIENT_FAULT_RECORDS` in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.name, record.msg) in CLIENT_FAULT_RECORDS and record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info = None
            record.exc_text = None
            # the level was checked at ERROR: check it again at INFO
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


_FILTER = _ClientFaultFilter()


def quiet_client_faults() -> None:
    """Install the filter on the loggers of :data:`CLIENT_FAULT_RECORDS`
    (idempotent; done when :mod:`wsmanager` is imported). Records are still
    logged, at INFO; only their traceback is dropped."""
    for name in {name for name, _msg in CLIENT_FAULT_RECORDS}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


# -- transports -----------------------------------------------------------


def abort_transport(websocket: Any) -> bool:
    """Abort the TCP connection under ``websocket`` when the server exposes it.

    ASGI offers no abort; uvicorn's ``send`` is a method of its protocol
    object, which holds the transport (possibly wrapped by middleware closures,
    followed a few levels). Returns whether a transport was aborted.
    """
    stack: list[Any] = [getattr(websocket, "_send", None)]
    for _ in range(8):
        if not stack:
            break
        fn = stack.pop()
        transport = getattr(getattr(fn, "__self__", None), "transport", None)
        abort = getattr(transport, "abort", None)
        if callable(abort):
            abort()
            return True
        for cell in getattr(fn, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                if callable(cell.cell_contents):
                    stack.append(cell.cell_contents)
    return False


# -- direct frames -------------------------------------------------------
#
# A server->client frame is unmasked, so one text frame's bytes are the same
# for every recipient of a broadcast. On uvicorn's websockets-sansio protocol
# (uvicorn's default when ``websockets`` is installed), a send frames (and,
# with permessage-deflate, compresses) the text once per recipient; the
# manager instead builds one uncompressed text frame (FIN, opcode 1, RSV 0:
# allowed in a permessage-deflate session by RFC 7692 section 6) per message
# and writes it to each ready connection's transport. Only where the ASGI
# ``send`` is that protocol's own method, reached through known pass-through
# wrappers; any other server, or a middleware that wraps ``send``, keeps the
# ordinary path.

_SANSIO_MODULE = "uvicorn.protocols.websockets.websockets_sansio_impl"
DIRECT_ATTR = "_wsmanager_direct"  # cached on the WebSocket: the protocol, or None
_pass_through: dict[Any, int] | None = None  # code object -> index of the `send` cell
_OPEN: Any = None  # websockets' State.OPEN
_UNRESOLVED: Any = object()  # DIRECT_ATTR not set yet


def _pass_through_codes() -> dict[Any, int]:
    """Code objects of closures known to pass every message to ``send``
    unchanged (Starlette's exception-handler ``sender``)."""
    global _pass_through
    if _pass_through is None:
        found: dict[Any, int] = {}
        with contextlib.suppress(Exception):
            from starlette import _exception_handler

            stack = [_exception_handler.wrap_app_handling_exceptions.__code__]
            while stack:
                code = stack.pop()
                if code.co_name == "sender" and "send" in code.co_freevars:
                    found[code] = code.co_freevars.index("send")
                stack.extend(c for c in code.co_consts if hasattr(c, "co_consts"))
        _pass_through = found
    return _pass_through


def _resolve_direct(websocket: Any) -> Any:
    """The uvicorn sans-I/O protocol whose ``send`` ``websocket``'s ASGI send
    is, through known pass-through wrappers only; else None."""
    module = sys.modules.get(_SANSIO_MODULE)
    cls = getattr(module, "WebSocketsSansIOProtocol", None)
    if cls is None:
        return None
    global _OPEN
    if _OPEN is None:
        from websockets.protocol import State

        _OPEN = State.OPEN
    codes = _pass_through_codes()
    fn = getattr(websocket, "_send", None)
    for _ in range(8):
        owner = getattr(fn, "__self__", None)
        if owner is not None:
            if type(owner) is cls and getattr(fn, "__func__", None) is cls.send:
                return owner
            return None
        index = codes.get(getattr(fn, "__code__", None))
        closure = getattr(fn, "__closure__", None)
        if index is None or not closure:
            return None
        try:
            fn = closure[index].cell_contents
        except ValueError:
            return None
    return None


def direct_frames_possible() -> bool:
    """Whether any connection of this process can be on uvicorn's
    websockets-sansio protocol (its module is loaded); when False,
    :func:`direct_transport` is None for every connection and a broadcast
    need not ask it per recipient."""
    return _SANSIO_MODULE in sys.modules


def direct_transport(websocket: Any) -> Any:
    """The transport to write a pre-built frame for ``websocket`` to, when
    that is exactly what its send would do now; else None."""
    if type(websocket) is not WebSocket or websocket.application_state is not _CONNECTED:
        return None
    # getattr/setattr, never ``websocket.__dict__``: reading that materializes
    # a GC-tracked dict per WebSocket (CPython 3.11+ keeps instance attributes
    # inline), and thousands of new tracked objects trigger collections
    proto = getattr(websocket, DIRECT_ATTR, _UNRESOLVED)
    if proto is _UNRESOLVED:
        proto = _resolve_direct(websocket)
        setattr(websocket, DIRECT_ATTR, proto)
    if proto is None:
        return None
    try:
        conn = proto.conn
        transport = proto.transport
        if (
            proto.handshake_complete
            and not proto.close_sent
            and proto.initial_response is None
            and not proto.disconnected
            and proto.writable.is_set()  # uvicorn's flow control: paused -> ordinary path
            and conn.state is _OPEN
            and not conn.writes  # nothing of the protocol's own still to flush first
            and transport is not None
            and not transport.is_closing()
        ):
            return transport
    except AttributeError:
        # These are uvicorn's and websockets' private attributes: a release that
        # renames one turns the fast path off for good, never a failed send.
        setattr(websocket, DIRECT_ATTR, None)
        logger.warning("direct frames disabled: unknown uvicorn protocol layout", exc_info=True)
    return None


# -- Starlette's send and receive ---------------------------------------------

#: ``asgi_send(websocket)``: the raw ASGI ``send`` of a Starlette
#: ``WebSocket`` (its ``_send``: the server's send, possibly wrapped by
#: middleware), what ``WebSocket.send()`` calls once its state checks passed.
#: A C-level getter, not a Python function: the ordinary send path calls it
#: once per recipient. The caller does Starlette's bookkeeping: call it only
#: while ``application_state`` is ``CONNECTED``, and on ``OSError`` set
#: ``application_state`` to ``DISCONNECTED`` (``WebSocket.send`` does both).
asgi_send: Callable[[WebSocket], Send] = operator.attrgetter("_send")


#: What the C fan-out (``Core._fanout_lobby``, csrc/fanout.c) reads of each
#: recipient, the same reads as :data:`asgi_send`'s callers make:
#: ``(class, state attribute, sentinel, send attribute)``. Only an exact
#: instance of ``class`` whose ``application_state`` *is* ``CONNECTED`` has
#: its ``_send`` (Starlette's raw ASGI send) called inline; any other
#: recipient goes back to Python (``WebSocket.send_text``).
FANOUT_READS: tuple[type[WebSocket], str, WebSocketState, str] = (
    WebSocket,
    "application_state",
    _CONNECTED,
    "_send",
)


def asgi_receive(websocket: Any) -> Any:
    """The ASGI ``receive`` a Starlette ``WebSocket`` reads from (its
    ``_receive``), or None when ``websocket`` keeps none there."""
    return getattr(websocket, "_receive", None)


def replace_asgi_receive(websocket: WebSocket, receive: Receive) -> None:
    """Make ``websocket`` read from ``receive`` from now on (Starlette's
    ``WebSocket.receive`` calls its ``_receive``)."""
    websocket._receive = receive
