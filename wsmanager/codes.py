"""Close codes and reasons used by wsmanager: one table, documented in the README.

Every close the library performs uses a code from :data:`CLOSE_CODES` with the
matching reason string, so clients can switch on either.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes sent by wsmanager."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    UNSUPPORTED_DATA = 1003  # binary frame where JSON text was expected
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009  # inbound message over max_message_bytes
    INTERNAL_ERROR = 1011  # the application's message handler raised
    TRY_AGAIN_LATER = 1013  # refused while shutting down
    UNAUTHORIZED = 4001  # the seed's code: authentication failed
    CAPACITY = 4002  # the seed's code: server_full / lobby_full / user_limit
    REPLACED = 4003  # replaced by a newer connection of the same user (on_user_limit="replace")
    STALE = 4004  # no answer to a health ping within ping_timeout
    RATE_LIMITED = 4005  # inbound rate limit exceeded persistently
    SLOW_CONSUMER = 4006  # outbound backlog over its bound
    BAD_MESSAGE = 4007  # malformed or non-object JSON, persistently
    FORBIDDEN_ORIGIN = 4008  # Origin header not in the allow-list


# reason string -> close code. Reasons are what `can_accept_connection` and the
# refusal closes report; a client may show them to the user.
CLOSE_CODES: dict[str, CloseCode] = {
    "unauthorized": CloseCode.UNAUTHORIZED,
    "server_full": CloseCode.CAPACITY,
    "lobby_full": CloseCode.CAPACITY,
    "user_limit": CloseCode.CAPACITY,
    "shutting_down": CloseCode.TRY_AGAIN_LATER,
    "lease_lost": CloseCode.TRY_AGAIN_LATER,  # shed after the node's backplane lease expired
    "replaced": CloseCode.REPLACED,
    "stale": CloseCode.STALE,
    "rate_limited": CloseCode.RATE_LIMITED,
    "slow_consumer": CloseCode.SLOW_CONSUMER,
    "bad_message": CloseCode.BAD_MESSAGE,
    "message_too_big": CloseCode.MESSAGE_TOO_BIG,
    "binary_not_supported": CloseCode.UNSUPPORTED_DATA,
    "forbidden_origin": CloseCode.FORBIDDEN_ORIGIN,
    "server_shutdown": CloseCode.GOING_AWAY,
    "internal_error": CloseCode.INTERNAL_ERROR,
    "invalid_id": CloseCode.POLICY_VIOLATION,
}


def close_code_for(reason: str) -> int:
    """The close code for a refusal or close reason (1008 for an unknown one)."""
    return int(CLOSE_CODES.get(reason, CloseCode.POLICY_VIOLATION))


# Error messages sent (as {"type": "error", "error": <reason>, ...}) without
# closing, by ConnectionManager.serve(). Persistent errors end in a close:
#
# * "bad_json": text that is not RFC 8259 JSON with finite numbers: malformed
#   or empty text, NaN / Infinity / -Infinity literals, a number that
#   overflows a double (1e999), an integer over Python's digit limit, nesting
#   deeper than the recursion limit.
# * "not_an_object": JSON that is not an object (array, string, number, null).
# * "bad_message": an object that breaks the library's own protocol: a
#   ``health_ping`` whose "timestamp" is neither a number nor null/absent, a
#   ``lobby_join`` / ``lobby_leave`` whose "lobby" is not a string or whose
#   "ref" is malformed (see wsmanager.joining).
#   (A ``health_pong``'s fields are ignored; any other object, whatever its
#   "type", reaches the application's handler.)
#   After ``max_bad_messages`` of these three in a row the connection is
#   closed with 4007 "bad_message".
# * "rate_limited": the first message dropped by the inbound token bucket
#   (``rate_limit`` messages/s, ``rate_burst`` at once). Further drops are
#   silent; after ``rate_limit_close_after`` drops without the bucket filling
#   up again (the client never slowed down) the connection is closed with
#   4005 "rate_limited".
#
# Closed at once: binary frames (1003 "binary_not_supported"; text that is not
# valid UTF-8 is failed by the server's WebSocket layer itself with 1007,
# before the application sees it), messages over
# ``max_message_bytes`` (1009 "message_too_big"), a handler that raised
# (1011 "internal_error"), an outbound backlog over ``max_backlog`` messages or
# ``max_backlog_bytes`` bytes (4006 "slow_consumer"), shutdown (1001
# "server_shutdown"), a user at ``max_per_user`` opening a new connection with
# ``on_user_limit="replace"`` (its oldest connection: 4003 "replaced", counted
# in get_stats()["closed"]). Refused before registration, always as
# accept-then-close so browsers see the code, and counted once in
# get_stats()["refused"]: 4001 "unauthorized", 4002 capacity, 4008
# "forbidden_origin", 1013 "shutting_down", 1008 "invalid_id".
ERROR_REASONS: tuple[str, ...] = ("bad_json", "not_an_object", "bad_message", "rate_limited")
