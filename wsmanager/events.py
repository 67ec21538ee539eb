"""Close events: every refusal and close the library performs, told to the application.

    def closed(event: CloseEvent) -> None:
        print(event.code, event.reason, event.lobby_code, event.user_id)

    remove = manager.add_close_listener(closed)

``ConnectionManager.add_close_listener`` registers a listener; the manager
calls it synchronously, in the connection's event loop, for:

* each refusal (``refused=True``): a handshake accepted-then-closed because of
  capacity (4002 ``server_full`` / ``lobby_full`` / ``user_limit``), shutdown
  (1013 ``shutting_down``), ``serve()``'s checks (4001 ``unauthorized``, 4008
  ``forbidden_origin``, 1008 ``invalid_id``) or a newer handshake of the same
  user under ``on_user_limit="replace"`` (4003 ``replaced``). A False answer of
  ``can_accept_connection()`` is no event (the app closes that socket itself);
* each close of a registered connection (``refused=False``): 4004 ``stale``
  (the heartbeat), 4006 ``slow_consumer``, 4005 ``rate_limited``, 4003
  ``replaced``, 4007 ``bad_message``, 1009 ``message_too_big``, 1003
  ``binary_not_supported``, 1011 ``internal_error``, 1001 ``server_shutdown``
  and ``close_connection()`` by the app, with the code it was given.

The event is reported when the library decides the close, before the close
frame is written (the client may already be gone). A connection the client
closed itself, or whose send failed, is no event (``on_disconnect`` of
``serve()`` sees every removal). A listener that raises is logged and the
others still run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["CloseEvent", "CloseListener", "CloseListeners"]


@dataclass(frozen=True, eq=False)
class CloseEvent:
    """One refusal or close performed by the library (see the module doc)."""

    websocket: Any
    """The Starlette ``WebSocket`` (or what the app passed to ``connect()``)."""
    code: int
    """The WebSocket close code sent (``wsmanager.codes``)."""
    reason: str
    """The close reason sent (``"stale"``, ``"lobby_full"``, ...)."""
    lobby_code: str | None
    """The lobby it was in or asked for; None when unknown (a refusal before an id was valid)."""
    user_id: str | None
    """Its user; None when unknown (``unauthorized``, ``forbidden_origin``, ``invalid_id``)."""
    refused: bool
    """True: refused during the handshake, never registered; False: a registered connection closed."""


CloseListener = Callable[[CloseEvent], None]
"""``listener(event)``: called synchronously; its return value is ignored."""


class CloseListeners:
    """The listeners of one manager (``manager.add_close_listener``)."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[CloseListener] = []

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def add(self, listener: CloseListener) -> Callable[[], None]:
        """Register ``listener``; returns a function that removes it (idempotent).
        Raises TypeError for a non-callable."""
        if not callable(listener):
            raise TypeError(f"close listener must be callable, not {type(listener).__name__}")
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def report(
        self,
        websocket: Any,
        code: int,
        reason: str,
        lobby_code: str | None,
        user_id: str | None,
        *,
        refused: bool,
    ) -> None:
        """Call every listener with one :class:`CloseEvent` (nothing to do without listeners)."""
        if not self._listeners:
            return
        event = CloseEvent(websocket, int(code), reason, lobby_code, user_id, refused)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("close listener failed", extra={"reason": "listener_error"})
