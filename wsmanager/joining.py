"""Lobbies a client asks for: :func:`wsmanager.endpoint.serve`'s ``lobby_join`` /
``lobby_leave`` messages and the app's ``on_join`` hook.

The wire format (README, "Lobbies from the client")::

    client -> server  {"type": "lobby_join",  "lobby": L, "ref": R, "since": {"epoch": E, "offset": N}}
                      {"type": "lobby_leave", "lobby": L, "ref": R}
    server -> client  {"type": "lobby_joined",       "lobby": L, "ref": R}
                      {"type": "lobby_join_refused", "lobby": L, "reason": why, "ref": R}
                      {"type": "lobby_left",         "lobby": L, "was_member": bool, "ref": R}
                      {"type": "lobby_leave_refused", "lobby": L, "reason": "forbidden", "ref": R}

``ref`` is optional (a string of at most :data:`MAX_REF_CHARS` characters or
an integer of at most 53 bits, a JavaScript safe integer): the answer carries
it back, so a client can match answers to requests; without one the answer
has no ``ref``. Requests are answered one at a time, in order with the
connection's other messages (the handler's included).

``since`` is optional too (absent or null: none): with history on, the
position of the last message of ``L`` the client saw; once admitted, it is
sent what it missed of ``L`` and a ``recovery`` message, before
``lobby_joined`` (without ``since``: a ``lobby_position`` message; see
:mod:`wsmanager.history`). A ``since`` that is not ``{"epoch": string,
"offset": integer from 0 to 2**53 - 1}`` (epoch at most 64 characters) is a
``bad_message``, like a bad ``ref``.

The app decides which lobbies a client may join: ``serve(...,
on_join=hook)``, ``hook(connection, lobby) -> True | False | str`` (or an
awaitable of it). Only ``True`` admits; a non-empty ``str`` refuses with that
reason, anything else with ``"forbidden"``. Without a hook every client
request is refused with ``"forbidden"``, leaves included: a client changes
its memberships only in an app that opted in. The app's own
``manager.join()`` / ``manager.leave()`` calls never go through the hook.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocketDisconnect

from ._core import dumps
from .history import Since, parse_since_field

if TYPE_CHECKING:
    from .endpoint import Connection

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_LOBBIES_PER_CONNECTION",
    "JOIN",
    "JOIN_REFUSAL_REASONS",
    "LEAVE",
    "MAX_REF_CHARS",
    "JoinHook",
    "LobbyRequests",
    "check_request",
]

JOIN = "lobby_join"
LEAVE = "lobby_leave"

MAX_REF_CHARS = 128
"""Longest string ``ref`` a request may carry (its answer echoes it)."""

_MAX_SAFE_INT = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER: the ref comes back exact

DEFAULT_MAX_LOBBIES_PER_CONNECTION = 32
"""``serve(max_lobbies_per_connection=)``'s default: a client's join is refused
with ``"too_many_lobbies"`` once its connection is in this many lobbies."""

JOIN_REFUSAL_REASONS: tuple[str, ...] = (
    "forbidden",
    "invalid_lobby",
    "too_many_lobbies",
    "lobby_full",
    "internal_error",
)
"""The reasons of ``lobby_join_refused`` the library gives (an ``on_join``
hook may give its own):

* ``forbidden``: the hook did not return ``True``, or ``serve()`` has no hook;
* ``invalid_lobby``: an empty lobby, one over ``max_id_bytes`` in UTF-8, or
  one with a lone surrogate (``"\\ud800"``: not UTF-8);
* ``too_many_lobbies``: the connection is in ``max_lobbies_per_connection``
  lobbies already (the first one and the app's own joins count);
* ``lobby_full``: ``manager.join()`` refused it (``max_per_lobby``, cluster-wide
  with a clustered backend; counted in ``get_stats()["refused"]``);
* ``internal_error``: the hook raised (its traceback is logged).
"""

JoinVerdict = bool | str
JoinHook = Callable[["Connection", str], "JoinVerdict | Awaitable[JoinVerdict]"]
"""``on_join(connection, lobby)`` for :func:`wsmanager.endpoint.serve`, sync or
async: ``True`` admits, a non-empty ``str`` refuses with it as the reason,
anything else refuses with ``"forbidden"``."""


def check_request(data: dict[str, Any]) -> str:
    """For a ``lobby_join`` / ``lobby_leave`` message: ``""`` when its fields
    have the right types, else what is wrong (the detail of a ``bad_message``
    error: ``lobby`` not a string, ``ref`` neither absent/null, a string of at
    most :data:`MAX_REF_CHARS` characters nor an integer within 2**53 - 1, a
    ``lobby_join``'s ``since`` that :func:`wsmanager.history.parse_since_field`
    refuses)."""
    if type(data.get("lobby")) is not str:
        return f"{data['type']} needs a string lobby"
    if data["type"] == JOIN:
        try:
            parse_since_field(data.get("since"))
        except ValueError as exc:
            return str(exc)
    ref = data.get("ref")
    if ref is None:
        return ""
    if type(ref) is str:
        return "" if len(ref) <= MAX_REF_CHARS else f"ref longer than {MAX_REF_CHARS} characters"
    if type(ref) is int and -_MAX_SAFE_INT <= ref <= _MAX_SAFE_INT:
        return ""
    return "ref must be a string, an integer within 2**53 - 1, or null"


def _answer(kind: str, lobby: str, ref: Any, **fields: Any) -> str:
    message: dict[str, Any] = {"type": kind, "lobby": lobby, **fields}
    if ref is not None:
        message["ref"] = ref
    return dumps(message)


def _valid_lobby(lobby: str, max_bytes: int) -> bool:
    """The manager's id rules: not empty, at most ``max_bytes`` in UTF-8 (a
    lone surrogate, which JSON text can carry, is not UTF-8)."""
    try:
        return lobby != "" and len(lobby.encode("utf-8")) <= max_bytes
    except UnicodeEncodeError:
        return False


class LobbyRequests:
    """Answers the ``lobby_join`` / ``lobby_leave`` requests of one connection
    run by ``serve()``; checked with :func:`check_request` first."""

    __slots__ = ("conn", "max_lobbies", "on_join")

    def __init__(self, conn: Connection, on_join: JoinHook | None, max_lobbies: int) -> None:
        self.conn = conn
        self.on_join = on_join
        self.max_lobbies = max_lobbies

    async def handle(self, data: dict[str, Any]) -> None:
        """Answer one request (its reply goes to this connection only)."""
        if data["type"] == JOIN:
            await self.join(data["lobby"], data.get("ref"), since=parse_since_field(data.get("since")))
        else:
            self.leave(data["lobby"], data.get("ref"))

    def _reply(self, text: str) -> None:
        conn = self.conn
        conn.manager.delivery.post(conn.websocket, text)

    def _refuse(self, lobby: str, ref: Any, reason: str) -> None:
        conn = self.conn
        logger.info(
            "lobby join refused: %s",
            reason,
            extra={"lobby": lobby, "user": conn.user_id, "reason": reason},
        )
        self._reply(_answer("lobby_join_refused", lobby, ref, reason=reason))

    async def join(self, lobby: str, ref: Any, *, since: Since | None = None) -> None:
        """Decide a client's request to join ``lobby`` and answer it; once
        admitted, recovery from ``since`` (see ``ConnectionManager.join``)
        comes before the answer."""
        conn = self.conn
        manager = conn.manager
        websocket = conn.websocket
        if self.on_join is None:
            self._refuse(lobby, ref, "forbidden")
            return
        if not _valid_lobby(lobby, manager.max_id_bytes):
            self._refuse(lobby, ref, "invalid_lobby")
            return
        lobbies = manager.lobbies_of(websocket)
        if lobby in lobbies:  # joined already: nothing to decide
            self._reply(_answer("lobby_joined", lobby, ref))
            return
        if len(lobbies) >= self.max_lobbies:
            self._refuse(lobby, ref, "too_many_lobbies")
            return
        reason = await self._ask(lobby)
        if websocket not in manager:  # removed while the hook ran: no answer to give
            return
        if reason:
            self._refuse(lobby, ref, reason)
            return
        try:
            joined = await manager.join(websocket, lobby, since=since)
        except (TypeError, ValueError):  # the manager's own id rules
            self._refuse(lobby, ref, "invalid_lobby")
            return
        if joined:
            self._reply(_answer("lobby_joined", lobby, ref))
        elif websocket in manager:
            self._refuse(lobby, ref, "lobby_full")

    async def _ask(self, lobby: str) -> str:
        """The hook's verdict: ``""`` to admit, else the refusal reason."""
        hook = self.on_join
        assert hook is not None
        try:
            verdict: Any = hook(self.conn, lobby)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:
            logger.exception(
                "on_join hook failed; the join is refused",
                extra={"lobby": lobby, "user": self.conn.user_id, "reason": "internal_error"},
            )
            return "internal_error"
        if verdict is True:
            return ""
        if type(verdict) is str and verdict:
            return verdict
        return "forbidden"

    def leave(self, lobby: str, ref: Any) -> None:
        """A client's request to leave ``lobby``: allowed for any of its
        memberships (the first one included: it stays registered) when the
        app has an ``on_join`` hook; answered with ``was_member``."""
        conn = self.conn
        if self.on_join is None:
            self._reply(_answer("lobby_leave_refused", lobby, ref, reason="forbidden"))
            return
        manager = conn.manager
        was_member = _valid_lobby(lobby, manager.max_id_bytes) and manager.leave(conn.websocket, lobby)
        self._reply(_answer("lobby_left", lobby, ref, was_member=was_member))
