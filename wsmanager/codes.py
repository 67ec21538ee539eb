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
    TRY_AGAIN_LATER = 1013  # refused while shutting down
    UNAUTHORIZED = 4001  # the seed's code: authentication failed
    CAPACITY = 4002  # the seed's code: server_full / lobby_full / user_limit
    REPLACED = 4003  # replaced by a newer connection of the same user
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
    "replaced": CloseCode.REPLACED,
    "stale": CloseCode.STALE,
    "rate_limited": CloseCode.RATE_LIMITED,
    "slow_consumer": CloseCode.SLOW_CONSUMER,
    "bad_message": CloseCode.BAD_MESSAGE,
    "message_too_big": CloseCode.MESSAGE_TOO_BIG,
    "binary_not_supported": CloseCode.UNSUPPORTED_DATA,
    "forbidden_origin": CloseCode.FORBIDDEN_ORIGIN,
    "server_shutdown": CloseCode.GOING_AWAY,
}


def close_code_for(reason: str) -> int:
    """The close code for a refusal or close reason (1008 for an unknown one)."""
    return int(CLOSE_CODES.get(reason, CloseCode.POLICY_VIOLATION))
