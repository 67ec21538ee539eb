"""History and recovery (issue 12): the Python side of the core's rings.

With ``ConnectionManager(history_size=N)`` every lobby message gets its
position added by the core (``csrc/history.c``) as the last member of its JSON
object::

    {"type": "chat", "text": "hi", "_pos": {"lobby": "room-1", "epoch": "k3v9q0c1m2ab", "offset": 17}}

``offset`` counts the lobby's messages from 1; ``epoch`` names the lobby's
history (random, 12 characters of ``[0-9a-v]``) and changes whenever it is
lost (a new process, the lobby's ring expired). A client that reconnects
with the last position it saw, ``since=(epoch, offset)``, is sent what it
missed, then a :func:`recovery_message`; one that enters a lobby without a
``since`` is sent the lobby's :func:`position_message`, so that it knows its
position before the lobby's first message. This module checks a ``since``
(from an app or, through ``serve()``, from a client) and builds those
messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "MAX_EPOCH_CHARS",
    "MAX_OFFSET",
    "POSITION_KEY",
    "SINCE_PARAM",
    "RecoveryCounts",
    "Since",
    "check_since",
    "parse_since_field",
    "parse_since_param",
    "place_replay",
    "position_message",
    "position_of",
    "recovery_message",
]

POSITION_KEY = "_pos"
"""The member the core adds to each lobby message when history is on."""

MAX_OFFSET = 2**53 - 1
"""Largest offset a ``since`` may name: JavaScript's ``Number.MAX_SAFE_INTEGER``
(a browser reads offsets as doubles; past it they are no longer exact)."""

MAX_EPOCH_CHARS = 64
"""Longest epoch a ``since`` may name (the core's are 12 characters)."""

SINCE_PARAM = "wsm_since"
"""The query parameter a client of ``serve()`` names its position in the URL's
lobby with: ``?wsm_since=<epoch>:<offset>`` (see :func:`parse_since_param`)."""

_MAX_OFFSET_DIGITS = len(str(MAX_OFFSET))

Since = tuple[str, int]
"""A position: ``(epoch, offset)`` of the last lobby message a client saw."""


def check_since(value: Any) -> Since | None:
    """``value`` as a position, or None for None.

    A position is a 2-item tuple or list ``(epoch, offset)``: ``epoch`` a str
    of at most :data:`MAX_EPOCH_CHARS` characters (any str: one that is not
    the lobby's current epoch means "not recoverable"), ``offset`` an int
    (not a bool, not a float) from 0 to :data:`MAX_OFFSET`. Raises
    ``TypeError`` for a wrong shape or type (a float offset, NaN included)
    and ``ValueError`` for a value out of range (a negative or huge offset,
    a long epoch); the message starts with ``since``.
    """
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"since must be None or (epoch: str, offset: int), not {_describe(value)}")
    epoch, offset = value
    if not isinstance(epoch, str):
        raise TypeError(f"since: epoch must be a str, not {type(epoch).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        shown = "NaN" if isinstance(offset, float) and math.isnan(offset) else type(offset).__name__
        raise TypeError(f"since: offset must be an int, not {shown}")
    if len(epoch) > MAX_EPOCH_CHARS:
        raise ValueError(f"since: epoch must be at most {MAX_EPOCH_CHARS} characters, got {len(epoch)}")
    if not 0 <= offset <= MAX_OFFSET:
        shown = str(offset) if offset.bit_length() <= 128 else f"an int of {offset.bit_length()} bits"
        raise ValueError(f"since: offset must be an int from 0 to {MAX_OFFSET}, got {shown}")
    return (str(epoch), int(offset))


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__


def recovery_message(lobby_code: str, recovered: bool, epoch: str, offset: int) -> dict[str, Any]:
    """What a recovering connection is sent after the replayed messages:
    ``{"type": "recovery", "lobby": ..., "recovered": bool, "epoch": str,
    "offset": int}``, ``epoch`` / ``offset`` the lobby's position now (the
    next live message has ``offset + 1``)."""
    return {"type": "recovery", "lobby": lobby_code, "recovered": recovered, "epoch": epoch, "offset": offset}


def position_message(lobby_code: str, epoch: str, offset: int) -> dict[str, Any]:
    """What a connection entering a lobby without a ``since`` is sent, history
    on, before any live message of the lobby: ``{"type": "lobby_position",
    "lobby": ..., "epoch": str, "offset": int}``, the lobby's position now (the
    next message has ``offset + 1``; 0: none yet in this epoch). A client that
    keeps it and reconnects with it as ``since`` gets every message it missed,
    even if it received none before losing its connection."""
    return {"type": "lobby_position", "lobby": lobby_code, "epoch": epoch, "offset": offset}


def parse_since_param(value: str) -> Since:
    """The position in a ``wsm_since`` query parameter, ``<epoch>:<offset>``
    (split at the last ``:``; ``offset`` ASCII decimal digits), checked as
    :func:`check_since` does. Raises ``ValueError`` (message starting with
    ``since``) for anything else: no ``:``, an offset that is not digits
    (a sign, a fraction, ``NaN``, other scripts' digits), out of range, an
    epoch over :data:`MAX_EPOCH_CHARS` characters."""
    epoch, colon, digits = value.rpartition(":")
    if not colon:
        raise ValueError("since: expected <epoch>:<offset>")
    if not (digits.isascii() and digits.isdigit()) or len(digits) > _MAX_OFFSET_DIGITS:
        raise ValueError(f"since: the offset must be 1 to {_MAX_OFFSET_DIGITS} decimal digits")
    offset = int(digits)
    if len(epoch) > MAX_EPOCH_CHARS or offset > MAX_OFFSET:
        check_since((epoch, offset))  # raises its ValueError
    return (epoch, offset)


def parse_since_field(value: Any) -> Since | None:
    """The ``since`` member of a client's ``lobby_join``: absent / null (None)
    or ``{"epoch": str, "offset": int}`` (no other members), checked as
    :func:`check_since` does. Raises ``ValueError`` (message starting with
    ``since``) for anything else, so a bad one is answered, never raised."""
    if value is None:
        return None
    if type(value) is not dict or set(value) != {"epoch", "offset"}:
        raise ValueError('since must be null or {"epoch": string, "offset": integer}')
    try:
        return check_since((value["epoch"], value["offset"])) or ("", 0)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


_POS_TAIL = '"_pos":{"lobby":'


def position_of(text: str) -> tuple[str, str, int] | None:
    """``(lobby, epoch, offset)`` of a lobby message's text as sent with
    history on (its last member, ``"_pos"``), or None for a text without one
    (a direct message, history off). Reads only the end of the text."""
    i = text.rfind(_POS_TAIL)
    if i < 0 or not text.endswith("}}"):
        return None
    try:
        pos = json.loads(text[i + 7 : -1])
    except ValueError:
        return None
    if type(pos) is not dict:
        return None
    lobby, epoch, offset = pos.get("lobby"), pos.get("epoch"), pos.get("offset")
    if type(lobby) is not str or type(epoch) is not str or type(offset) is not int:
        return None
    return lobby, epoch, offset


def place_replay(held: list[str], lobby: str, epoch: str, top: int, first: Sequence[str]) -> list[str]:
    """A recovering connection's held messages with its replay: ``first``
    (the replayed texts and the recovery or position message) before
    everything held, and the held messages of ``lobby`` in ``epoch`` at or
    below ``top`` (the replay has them, or they precede the position told)
    left out. Messages of other lobbies, or direct ones, keep their order."""
    out = list(first)
    for text in held:
        pos = position_of(text)
        if pos is not None and pos[0] == lobby and pos[1] == epoch and pos[2] <= top:
            continue
        out.append(text)
    return out


class RecoveryCounts:
    """A manager's recovery counters (``get_stats()["history"]``): recoveries
    asked for, answered ``recovered`` true / false, messages replayed."""

    __slots__ = ("not_recovered", "recovered", "recoveries", "replayed")

    def __init__(self) -> None:
        self.recoveries = 0
        self.recovered = 0
        self.not_recovered = 0
        self.replayed = 0

    def count(self, recovered: bool, replayed: int) -> None:
        """One recovery answered ``recovered``, ``replayed`` messages sent."""
        self.recoveries += 1
        if recovered:
            self.recovered += 1
        else:
            self.not_recovered += 1
        self.replayed += replayed
