"""The shape of ``ConnectionManager.get_stats()``: one home for its keys.

``get_stats()`` returns a plain ``dict`` (built by the C core, completed by
:meth:`wsmanager.ConnectionManager.get_stats`); these ``TypedDict`` classes
describe it for type checkers, so ``stats["total_conections"]`` (a typo) or
``stats["refused"]["server_ful"]`` is an error under ``mypy --strict``
instead of a ``KeyError`` in production. They cost nothing at run time.

    from wsmanager import Stats, manager

    def capacity(stats: Stats) -> float:
        return stats["capacity_percent"]

Counts are ``int`` and never go down (except the current figures:
``total_connections``, ``active_lobbies``, ``pending_connections``,
``connected_users``, ``backlogged_connections``); times are milliseconds.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 12):
    from typing import TypedDict
else:  # pydantic (a FastAPI route annotated ``-> Stats``) needs this one before 3.12
    from typing_extensions import TypedDict

__all__ = [
    "BackplaneStats",
    "ClusterStats",
    "CoreStats",
    "HistoryStats",
    "LatencyStats",
    "LocalStats",
    "RefusedStats",
    "StaleClosedStats",
    "Stats",
]


class RefusedStats(TypedDict):
    """``get_stats()["refused"]``: refused handshakes by reason, each counted
    once, whichever path refused it (``connect()``, ``serve()`` or a False
    answer of ``can_accept_connection()``)."""

    server_full: int
    """``max_connections`` reached (4002)."""
    lobby_full: int
    """``max_per_lobby`` reached (4002)."""
    user_limit: int
    """``max_per_user`` reached with ``on_user_limit="refuse"`` (4002)."""
    shutting_down: int
    """Arrived during ``shutdown()`` (1013)."""
    unauthorized: int
    """``serve()`` got a falsy user id (4001)."""
    forbidden_origin: int
    """``serve()``: ``Origin`` not in ``allowed_origins`` (4008)."""
    invalid_id: int
    """``serve()``: a non-str, empty or oversized lobby or user id (1008)."""


class LatencyStats(TypedDict):
    """``get_stats()["latency_ms"]``: round-trip percentiles, in
    milliseconds, over the last 1,024 pongs that answered a ping in time;
    ``None`` (and ``samples`` 0) before the first one."""

    p50: float | None
    p95: float | None
    p99: float | None
    samples: int
    """Round trips the percentiles are computed from (at most 1,024)."""


class StaleClosedStats(TypedDict):
    """``get_stats()["stale_closed"]``: connections the heartbeat removed, by
    reason (``wsmanager.health``)."""

    no_pong: int
    """No answer to a health ping within ``ping_timeout`` (closed 4004)."""
    send_failed: int
    """The health ping could not be sent (the client was gone)."""
    handler_exited: int
    """The endpoint died without ``disconnect()``: the entry was reclaimed."""


class CoreStats(TypedDict):
    """The figures the C core keeps (``wsmanager._core.Core.get_stats()``);
    every one is read in O(1)."""

    total_connections: int
    """Registered connections (the cluster's with a clustered backend)."""
    max_connections: int
    capacity_percent: float
    """``total_connections / max_connections * 100``, rounded to 0.1 (100.0
    when ``max_connections`` is 0)."""
    active_lobbies: int
    """Lobbies with at least one connection."""
    max_per_lobby: int
    pending_connections: int
    """Handshakes holding a reservation (inside ``accept()``)."""
    connected_users: int
    """Distinct users with at least one connection."""
    connects: int
    """Connections registered since the manager was made."""
    disconnects: int
    """Connections removed since the manager was made, whatever removed them."""
    pings_sent: int
    """Health pings sent (heartbeat and ``ping_user()``)."""
    pongs_received: int
    """Pongs recorded, late ones included."""
    max_per_user: int | None
    shutting_down: bool
    refused: RefusedStats
    latency_ms: LatencyStats
    stale_closed: StaleClosedStats


class LocalStats(TypedDict):
    """``get_stats()["local"]`` with a clustered backend: this process's
    share of the four figures that are otherwise the cluster's."""

    total_connections: int
    capacity_percent: float
    active_lobbies: int
    connected_users: int


class BackplaneStats(TypedDict):
    """``get_stats()["backplane"]``: the Redis backplane's health
    (``wsmanager.backends.redis.RedisBackend.stats()``)."""

    backend: str
    """``"redis"``."""
    up: bool
    """Redis reachable and this node's presence current."""
    node_id: str
    nodes_with_connections: int
    lease_seconds: float
    down_for_seconds: float | None
    """Seconds since Redis became unreachable; ``None`` while up."""
    last_error: str | None
    published: int
    received: int
    dropped: int
    """Messages that did not reach the cluster: sent while Redis was
    unreachable to lobbies / users with members on other nodes (as last
    known), queued or in flight when it failed, over ``max_backlog`` /
    ``max_backlog_bytes``, or over ``max_message_bytes``."""
    backlog: int
    """Operations waiting to be written to Redis."""
    outages: int
    resyncs: int
    reaped_nodes: int
    """Nodes whose lease expired and whose connections were freed."""
    local_admissions: int
    """Handshakes admitted on local counts while Redis was unreachable."""
    published_bytes: int
    """Bytes of lobby and user messages this node published (payloads)."""
    received_bytes: int
    """Bytes of lobby and user channel messages this node received: only the
    channels of lobbies and users it serves (per-lobby routing)."""
    channels: int
    """Lobby and user channels this node is subscribed to."""
    redis_servers: int
    """Redis URLs the channels are spread over (rendezvous hashing)."""
    sharded_pubsub: bool
    """Whether every server takes ``SSUBSCRIBE`` / ``SPUBLISH`` (Redis >= 7)."""
    backlog_bytes: int
    """Bytes of messages queued for Redis (bounded by ``max_backlog_bytes``)."""
    missed: int
    """Messages of other nodes this node should have received and did not:
    gaps in each sender's per-channel sequence numbers (Redis cut this
    subscriber, an outage, a sender's drops)."""
    oversize: int
    """Messages over ``max_message_bytes``, delivered locally only (also in
    ``dropped``)."""
    subscriber_cuts: int
    """Times Redis closed this node's subscriber connection while it still
    answered (its pub/sub output buffer limit); the node resubscribed."""
    lease_losses: int
    """Times this node found its lease expired while it was alive (frozen or
    cut off longer than ``lease``)."""
    shed: int
    """Connections closed with 1013 ``lease_lost`` after a lost lease, to get
    the cluster back under a limit."""
    revived_nodes: int
    """Nodes whose last known connections this node registered again in a
    Redis that restarted empty, until they rejoin or ``rejoin_window()``."""


class HistoryStats(TypedDict):
    """``get_stats()["history"]``: history and recovery (issue 12,
    docs/history.md); all 0 while ``history_size`` was never set."""

    lobbies: int
    """Lobbies with a ring in this process's memory now (0 with a clustered
    backend: the lobbies' histories are Redis streams)."""
    entries: int
    """Messages kept in those rings now."""
    bytes: int
    """Character data of those messages as CPython stores it (length x 1, 2
    or 4 bytes; for ASCII JSON its UTF-8 size), not counting the rings'
    slots."""
    appended: int
    """Lobby messages kept with a position so far: in memory, appends to the
    rings; with Redis, this node's appends the script confirmed."""
    dropped: int
    """Lobby messages broadcast with history on that could not be kept
    (Redis unreachable or failing): delivered to this node's members only,
    without a position, and counted as a gap (see docs/history.md)."""
    backlog: int
    """Messages waiting to be appended to Redis (0 in memory)."""
    recoveries: int
    """Recoveries asked for: ``connect()`` / ``join()`` with a ``since``
    (``serve()``'s ``wsm_since`` and ``lobby_join`` included)."""
    recovered: int
    """Of those, the ones answered ``recovered: true`` (all missed replayed)."""
    not_recovered: int
    """Of those, the ones answered ``recovered: false`` (epoch changed, gap
    larger than the history, entries expired, Redis unreachable)."""
    replayed: int
    """Messages replayed by the recoveries."""


class ClusterStats(TypedDict, total=False):
    """The keys ``get_stats()`` adds with a clustered backend (``RedisBackend``)
    unless called with ``local=True``: absent otherwise, so read them with
    ``stats.get("backplane")``."""

    local: LocalStats
    backplane: BackplaneStats


class Stats(CoreStats, ClusterStats):
    """What :meth:`wsmanager.ConnectionManager.get_stats` returns: the core's
    figures, the send path's counters and, with a clustered backend, the
    :class:`ClusterStats` keys."""

    closed: dict[str, int]
    """Closes the library performed on registered connections, by reason
    (``"slow_consumer"``, ``"rate_limited"``, ``"replaced"``,
    ``"server_shutdown"``, ...: reasons of :data:`wsmanager.CLOSE_CODES`); a
    reason appears once it happened. The heartbeat's closes are counted in
    ``stale_closed`` instead."""
    backlogged_connections: int
    """Connections with queued outbound messages (slow readers)."""
    history: HistoryStats
    rate_limited_messages: int
    """Inbound messages dropped by the rate limit."""
