"""RedisBackend: one cluster of ConnectionManagers over a shared Redis.

* Delivery: a lobby's broadcasts travel on the lobby's own channel, a user's
  direct messages on the user's (:mod:`wsmanager.backends.routing`). A node
  subscribes to a lobby's channel while it holds a connection in that lobby
  and to a user's while it holds one of that user's connections, and
  unsubscribes after the last one left: a node receives only the traffic of
  the lobbies and users it serves. Sharded pub/sub (``SSUBSCRIBE`` /
  ``SPUBLISH``) is used on a Redis that has it (7.0+), plain ``SUBSCRIBE`` /
  ``PUBLISH`` otherwise. A broadcast or direct message is serialized once by
  the sender, delivered to its local connections, and, when the cluster view
  shows recipients on other nodes, queued for publication. One writer task
  per node publishes the queue in order and in batches (pipelines), so the
  messages of one node for one lobby (or user) reach every other node in the
  order they were sent. Receivers hand them to the manager's
  ``delivery.deliver_lobby`` / ``delivery.deliver_user``.
* Several Redis servers: ``RedisBackend(["redis://a", "redis://b"])`` (or a
  comma list in ``WSMANAGER_REDIS_URL``) spreads the lobby and user channels
  over them by rendezvous hashing. The first URL is the primary: it holds
  capacity and presence (the keys of :mod:`._lua`) and the control channel
  every node subscribes to. Losing any of them is an outage of the node's
  backplane (below).
* Capacity: ``connect()`` reserves in Redis with a Lua script that checks
  ``max_connections`` / ``max_per_lobby`` / ``max_per_user`` against the
  cluster counts and takes the slot in the same step; commit and release are
  scripts too. Counts include handshakes in progress.
* Rooms: ``manager.join`` asks :meth:`RedisBackend.join`, whose script
  counts memberships (a connect's lobby and every joined one) against
  ``max_per_lobby`` and records the membership in this node's hash in one
  step; joins, leaves, commits and releases go to Redis in the order they
  happened. Channels follow memberships; the view counts them; remote
  membership changes of a lobby this node serves reach
  ``manager.presence_changed`` so presence diffs cover the cluster.
* Presence: each node registers its connections in a hash of its own and
  renews a lease (``lease`` seconds, default 10) every ``lease / 3``. Every
  node reaps nodes whose lease expired (kill -9, lost machine): their
  connections and reservations are freed. Join / leave / resync / gone events
  travel on the bus, in order with the messages, and keep each node's
  :class:`ClusterView`, from which the synchronous reads answer.
* Outages: local connections keep working; the node reports the backplane
  down (``get_stats()["backplane"]``, a WARNING log), drops cross-node
  messages instead of queueing them without bound, admits new connections on
  its local limits only, and reconnects with exponential backoff. Back up, it
  resubscribes to the control channel and to every lobby and user channel it
  needs, waits for Redis to confirm them, rewrites its whole presence (a Redis that restarted empty gets
  it back) and reloads the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the module
    raise ImportError(
        "wsmanager.backends.redis needs redis-py: install the extra with  pip install 'wsmanager[redis]'"
    ) from exc

from ..settings import DefaultFloat, DefaultInt, Setting, class_defaults, count, resolve, seconds
from ..stats import BackplaneStats
from ._lua import COMMIT, JOIN, LEAVE, OVER, PART, REAP, RELEASE, RENEW, RESERVE, REVIVE, SNAPSHOT, SYNC
from .publisher import Publisher, SyncPublisher
from .redis_history import StreamHistory
from .routing import (
    RECORD,
    frame_head,
    lobby_channel,
    lobby_record,
    parse_urls,
    shard_of,
    user_channel,
    user_record,
)
from .view import ClusterView

if TYPE_CHECKING:
    from ..manager import ConnectionManager

__all__ = ["Publisher", "RedisBackend", "SyncPublisher"]

T = TypeVar("T")


_NUMERIC = (
    "connect_timeout",
    "command_timeout",
    "backoff_max",
    "max_backlog",
    "max_backlog_bytes",
    "max_message_bytes",
    "admission_timeout",
    "health_interval",
    "health_timeout",
)


def _lease(name: str, value: object) -> float:
    """A lease: seconds from 0.001 to ``MAX_SECONDS`` (its milliseconds go to Redis as an int)."""
    lease = seconds(name, value)
    if lease < 0.001:
        raise ValueError(f"{name} must be at least 0.001 seconds, got {lease}")
    return lease


logger = logging.getLogger(__name__)

# Control channel: b"C" + JSON, a presence event (from the Lua scripts).
# Lobby and user channels: records of .routing (lobby_record, user_record)
# behind a frame_head. The writer packs every record of one channel queued
# meanwhile into one publish, so under load Redis and each receiver handle
# one message per batch, not per record.
_REC = RECORD
_U32 = struct.Struct("!I")
_LOBBY = b"L"
_CONTROL = ord("C")
# A node's own messages: b"S" + u32 length + sender id, then records each
# preceded by its u64 sequence number (per sender and channel, counting the
# messages dropped too), so that a receiver counts the ones it missed.
# Publishers send frame_head (b"M") messages, without sequence numbers.
_SEQ_HEAD = ord("S")
_SEQ_IDLE = 300.0  # seconds after which a sender forgets a channel's sequence
_U64 = struct.Struct("!Q")
_BATCH = 512  # commands per pipeline
_MAX_FRAME = 256 * 1024  # bytes of records per PUBLISH
_SUB_CHUNK = 1000  # channels per SUBSCRIBE command
_MESSAGE = (b"message", b"smessage")
_ACKS = (b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe")


class _Shard:
    """One Redis server of a session: a client for commands and a pub/sub
    connection, the channels subscribed there, and the count of
    (un)subscriptions sent and confirmed."""

    __slots__ = (
        "acked",
        "client",
        "conn",
        "early",
        "health",
        "index",
        "on_ack",
        "pub",
        "sent",
        "sharded",
        "sub",
        "sub_client",
        "subscribed",
    )

    def __init__(
        self, index: int, client: aioredis.Redis, sub_client: aioredis.Redis, health: aioredis.Redis
    ) -> None:
        self.index = index
        self.client = client
        self.sub_client = sub_client
        self.health = health  # PINGs of the health check, on a connection of their own
        self.sub = sub_client.pubsub()  # owns ``conn``
        self.conn: Any = None
        self.sharded = False
        self.pub = "PUBLISH"
        self.subscribed: set[bytes] = set()
        self.sent = 0
        self.acked = 0
        self.on_ack = asyncio.Event()
        self.early: list[Any] = []  # replies read while waiting for confirmations

    async def open(self, command_timeout: float) -> None:
        connect = self.sub.connect()  # type: ignore[no-untyped-call]
        await _detached(connect, command_timeout)
        self.conn = self.sub.connection
        info = await _detached(self.client.info("server"), command_timeout)
        version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2] if x.isdigit())
        self.sharded = version >= (7, 0)
        self.pub = "SPUBLISH" if self.sharded else "PUBLISH"

    async def change(self, channels: list[bytes], subscribe: bool) -> None:
        """Send (un)subscriptions for ``channels`` (not awaiting confirmation)."""
        if subscribe:
            cmd = "SSUBSCRIBE" if self.sharded else "SUBSCRIBE"
            self.subscribed.update(channels)
        else:
            cmd = "SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE"
            self.subscribed.difference_update(channels)
        for i in range(0, len(channels), _SUB_CHUNK):
            chunk = channels[i : i + _SUB_CHUNK]
            self.sent += len(chunk)
            await self.conn.send_command(cmd, *chunk)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _detached(coro: Awaitable[T], timeout: float) -> T:
    """Run one redis-py call in a task of its own and wait at most ``timeout``.

    The caller's cancellation is not passed on: redis-py 8.1 can swallow a
    cancellation delivered inside ``execute_command`` and leave the client
    hanging (see the report), so a call is left to finish on its own; its
    connection is closed with the session's client anyway. Raises
    ``TimeoutError`` (a RedisError) when the call takes longer.
    """
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        raise RedisTimeoutError(f"no answer from Redis within {timeout}s")
    return task.result()


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds. Unlike ``wait_for`` on
    3.10/3.11, a cancellation of the caller is never swallowed."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


class RedisBackend:
    """The Redis backplane. See the module docstring for what it guarantees.

    ``url``: a redis-py URL (``redis://``, ``rediss://``, ``unix://``), or
    several (a list, or one string with URLs separated by commas): the lobby
    and user channels are spread over them (rendezvous hashing,
    :mod:`wsmanager.backends.routing`), the first one (``url``, the primary)
    holds capacity, presence and the control channel. TypeError / ValueError
    for no URL, a repeated one or a wrong type.
    ``namespace``: prefix of every key and channel; managers that
    share one form a cluster. ``lease``: seconds after which a silent node's
    connections are freed (renewed every ``lease / 3``). ``connect_timeout``:
    how long the first ``connect()`` waits for the backplane before admitting
    on local limits. ``max_backlog``: messages queued for Redis beyond this
    are dropped (and counted) rather than held without bound;
    ``max_backlog_bytes``: the same bound in bytes of queued records.
    ``max_message_bytes``: a broadcast or direct message larger than this
    (its record, in bytes) is delivered locally only, and counted in
    ``oversize`` and ``dropped``. ``admission_timeout``: longest wait of a
    ``connect()`` for its reservation script; past it the handshake is
    admitted on local limits, as in an outage. ``health_interval`` /
    ``health_timeout``: every ``health_interval`` each Redis gets a PING on a
    connection of its own; no answer within ``health_timeout`` is an outage.

    The numeric settings (``lease`` at least 0.001 s, ``connect_timeout``,
    ``command_timeout``, ``backoff_max``, ``admission_timeout``,
    ``health_interval``, ``health_timeout``: seconds > 0, at most
    ``wsmanager.settings.MAX_SECONDS`` (100 years); ``max_backlog``,
    ``max_backlog_bytes``, ``max_message_bytes``: an int >= 1) are checked
    at construction and on assignment, with a TypeError / ValueError naming
    the setting (``wsmanager.settings``). A new ``lease`` applies from the
    next renewal. A subclass may set any of them as a class attribute: it is
    checked when the class is created and becomes the default of its
    instances (a keyword argument still wins).
    """

    clustered = True
    connect_timeout = Setting(seconds)
    command_timeout = Setting(seconds)
    backoff_max = Setting(seconds)
    max_backlog = Setting(count(1))
    max_backlog_bytes = Setting(count(1))
    max_message_bytes = Setting(count(1))
    admission_timeout = Setting(seconds)
    health_interval = Setting(seconds)
    health_timeout = Setting(seconds)
    _class_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = _NUMERIC
        checks = {"lease": _lease, **{n: RedisBackend.__dict__[n].check for n in names}}
        cls._class_defaults = class_defaults(cls, cls._class_defaults, checks)

    def __init__(
        self,
        url: str | Sequence[str] = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "wsm",
        lease: float = DefaultFloat(10.0),
        node_id: str | None = None,
        connect_timeout: float = DefaultFloat(2.0),
        command_timeout: float = DefaultFloat(5.0),
        backoff_max: float = DefaultFloat(5.0),
        max_backlog: int = DefaultInt(10_000),
        max_backlog_bytes: int = DefaultInt(16 * 1024 * 1024),
        max_message_bytes: int = DefaultInt(4 * 1024 * 1024),
        admission_timeout: float = DefaultFloat(0.25),
        health_interval: float = DefaultFloat(0.25),
        health_timeout: float = DefaultFloat(0.5),
    ) -> None:
        d = self._class_defaults  # a subclass's class-attribute settings
        lease = resolve(d, "lease", lease)
        connect_timeout = resolve(d, "connect_timeout", connect_timeout)
        command_timeout = resolve(d, "command_timeout", command_timeout)
        backoff_max = resolve(d, "backoff_max", backoff_max)
        max_backlog = resolve(d, "max_backlog", max_backlog)
        max_backlog_bytes = resolve(d, "max_backlog_bytes", max_backlog_bytes)
        max_message_bytes = resolve(d, "max_message_bytes", max_message_bytes)
        admission_timeout = resolve(d, "admission_timeout", admission_timeout)
        health_interval = resolve(d, "health_interval", health_interval)
        health_timeout = resolve(d, "health_timeout", health_timeout)
        self._argv: list[str] = []
        self.lease = lease
        self.urls: list[str] = parse_urls(url)
        self.url = self.urls[0]  # the primary
        self.namespace = namespace
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.backoff_max = backoff_max
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.max_message_bytes = max_message_bytes
        self.admission_timeout = admission_timeout
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        prefix = "{" + namespace + "}:"
        self._channel = prefix + "bus"
        self._keys = [
            prefix + "total",
            prefix + "lobbies",
            prefix + "users",
            prefix + "nodes",
            prefix + "node:" + self.node_id,
        ]
        self._argv = [self._channel, self.node_id, self._lease_ms, prefix + "node:"]
        self._node_b = self.node_id.encode()
        self._manager: ConnectionManager | None = None
        # this node's connections, as Redis should know them
        self._cids: dict[Any, str] = {}  # websocket -> cid
        # cid -> [user, state 0|1, lobbies (memberships, the connect() lobby first)]
        self._entries: dict[str, list[Any]] = {}
        # (cid, lobby) -> the answer of a JOIN queued or in flight
        self._joining: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._ids = itertools.count(1)
        self.view = ClusterView()  # every node, this one included
        self.own = ClusterView()  # this node only
        # channels this node needs: channel -> local connections (memberships)
        # that need it; changed channels wait in _sub_changes for the writer
        self._refs: dict[bytes, int] = {}
        self._sub_changes: set[bytes] = set()
        self._shards: list[_Shard] = []  # per session, index as in self.urls
        # per event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._client: aioredis.Redis | None = None
        self._ops: deque[tuple[str, Any]] = deque()
        self._backlog_bytes = 0  # of the records in _ops
        # sequence numbers: channel -> last one this node used (sender);
        # channel -> sender -> last one received (receiver)
        self._seq: dict[bytes, list[int]] = {}  # channel -> [last seq, _seq_clock at last use]
        self._seq_clock = 0  # the number of _prune_seq calls (one per lease / 3)
        self._seen: dict[bytes, dict[bytes, int]] = {}
        #: lobby channel -> (epoch, offset) of the last history message received on it
        self._offsets: dict[bytes, tuple[bytes, int]] = {}
        # the other nodes as this node last knew them, kept through an outage:
        # counts the messages dropped meanwhile, and holds their seats in a
        # Redis that restarted empty until they rejoin (REVIVE)
        self._known = ClusterView()
        self._lease_lost = False  # reaped while alive: shed what is over a limit
        self._epoch: bytes | None = None  # the epoch token of Redis' state this node registered in
        self._shedding: set[asyncio.Task[None]] = set()
        self._unchecked: set[str] = set()  # cids admitted on a "lost" answer, not yet connected
        self._closing: set[str] = set()  # cids being shed, not yet released
        self._shed_on_commit: set[str] = set()  # handshakes to shed once connected
        self._syncs = 0  # SYNCs sent whose "s" event this node has not read yet
        self._syncs_sent = 0
        # cid -> user of releases queued or in flight: a reservation of the
        # same user releases them first, in its own script
        self._releasing: dict[str, str] = {}
        self._session = False  # connected to Redis (maybe still syncing)
        self.up = False  # subscribed, synced: cross-node delivery works
        self._dirty = False  # Redis may disagree with _entries: resync
        self._resync: asyncio.Event | None = None
        self._ever_up = False
        self._stopping = False
        # counters
        self.published = 0
        self.received = 0
        self.received_bytes = 0  # of lobby / user channel messages
        self.published_bytes = 0
        self.dropped = 0
        self.outages = 0
        self.resyncs = 0
        self.reaped = 0
        self.local_admissions = 0  # admitted on local limits while down
        self.missed = 0  # sequence gaps seen by this node as a receiver
        self.oversize = 0  # messages over max_message_bytes (also in dropped)
        self.subscriber_cuts = 0  # subscriber connections Redis closed while it answered
        self.lease_losses = 0  # times this node found itself reaped while alive
        self.shed = 0  # connections closed (1013 lease_lost) to get back under a limit
        self.revived_nodes = 0  # nodes whose last known seats this node put back after a restart
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._applying = False  # subscriptions sent, confirmations awaited
        #: history streams (issue 12, .redis_history), made on first use
        self.history: StreamHistory | None = None

    @property
    def lease(self) -> float:
        """Seconds after which a silent node's connections are freed."""
        return self._lease

    @lease.setter
    def lease(self, value: float) -> None:
        lease = _lease("lease", value)
        self._lease = lease
        self._lease_ms = str(int(lease * 1000))
        if self._argv:
            self._argv[2] = self._lease_ms

    def __repr__(self) -> str:
        url = self.url if len(self.urls) == 1 else self.urls
        return f"RedisBackend({url!r}, namespace={self.namespace!r}, node_id={self.node_id!r})"

    # -------------------------------------------------------------- routing

    def lobby_channel(self, lobby: str) -> bytes:
        """The channel of ``lobby``'s broadcasts (see :mod:`.routing`)."""
        return lobby_channel(self.namespace, lobby)

    def user_channel(self, user: str) -> bytes:
        """The channel of ``user``'s direct messages (see :mod:`.routing`)."""
        return user_channel(self.namespace, user)

    def shard_of(self, channel: bytes) -> int:
        """Index in ``urls`` of the Redis that carries ``channel``."""
        return shard_of(channel, self.urls)

    def subscribed_channels(self) -> set[bytes]:
        """The channels this node needs now (a lobby's while it holds a
        member, a user's while it holds a connection of the user)."""
        return set(self._refs)

    def _ref(self, channel: bytes, delta: int) -> None:
        n = self._refs.get(channel, 0) + delta
        if n > 0:
            self._refs[channel] = n
            if n == delta:  # 0 -> n: subscribe
                self._sub_changes.add(channel)
                self._kick()
        else:
            self._refs.pop(channel, None)
            self._seen.pop(channel, None)  # a later subscription starts counting afresh
            self._offsets.pop(channel, None)
            if self.history is not None:
                self.history.local_only.pop(channel, None)
            self._sub_changes.add(channel)
            self._kick()

    # ------------------------------------------------------------ lifecycle

    def bind(self, manager: ConnectionManager) -> None:
        if self._manager is not None and self._manager is not manager:
            raise ValueError("a RedisBackend serves one ConnectionManager")
        self._manager = manager

    def ensure_running(self, *, after_stop: bool = False) -> None:
        """Start the backplane on the running loop unless it runs there already.

        After ``stop()`` on this loop only ``after_stop=True`` (a new
        ``connect()``) or ``start()`` restarts it: the broadcasts of a server
        that is shutting down do not rejoin the cluster.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop and (
            (self._task is not None and not self._task.done()) or (self._stopping and not after_stop)
        ):
            return
        if self._loop is not loop:
            self._reset_session(outage=False)
        self._loop = loop
        self._stopping = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._resync = asyncio.Event()
        self._task = loop.create_task(self._supervise(), name=f"wsmanager-backplane-{self.node_id}")

    async def start(self) -> None:
        """Start, and wait up to ``connect_timeout`` for Redis. Never raises for
        an unreachable Redis: the node serves locally and keeps retrying."""
        self.ensure_running(after_stop=True)
        await self.wait_up(self.connect_timeout)
        if not self.up:
            logger.warning(
                "backplane not up after %.1fs (%s): serving local connections only",
                self.connect_timeout,
                self.last_error,
                extra={"reason": "backplane_down"},
            )

    async def wait_up(self, timeout: float) -> bool:
        """True once the backplane is up (within ``timeout`` seconds, checked
        as a setting: TypeError / ValueError naming ``timeout``)."""
        timeout = seconds("timeout", timeout)
        if self.up or self._ready is None:
            return self.up
        await _wait_event(self._ready, timeout)
        return self.up

    async def stop(self) -> None:
        """Leave the cluster: free this node's connections in Redis, stop tasks."""
        self._stopping = True
        task, self._task = self._task, None
        client = self._client
        if client is not None and self.up:
            try:
                await self._flush(client)
                await self._eval(client, LEAVE)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                logger.info("backplane: leave failed: %r (the lease will expire)", exc)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._reset_session(outage=False)

    # ----------------------------------------------------------- capacity

    async def reserve(self, websocket: Any, lobby: str, user: str) -> str:
        """Take a slot cluster-wide: ``""`` or the refusal reason."""
        self.ensure_running(after_stop=True)
        if not self.up and not self._ever_up:
            await self.wait_up(self.connect_timeout)
        cid = f"{next(self._ids)}"
        self._cids[websocket] = cid
        self._entries[cid] = [user, 0, [lobby]]
        client = self._client
        if not self.up or client is None:
            self.local_admissions += 1
            self._mark_dirty()
            return ""
        m = self._manager
        assert m is not None
        max_user = m.max_per_user
        releasing = [c for c, u in self._releasing.items() if u == user]
        limits = (m.max_connections, m.max_per_lobby, -1 if max_user is None else max_user)
        resyncs = self._syncs_sent
        try:  # bounded by admission_timeout: a hung Redis does not hold the handshake
            script = client.eval(RESERVE, 5, *self._keys, *self._argv, cid, lobby, user, *limits, *releasing)
            res = await _detached(script, self.admission_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._note_error(exc)
            self.local_admissions += 1
            self._mark_dirty()
            return ""
        except BaseException:
            self._mark_dirty()  # cancelled: the script may have run
            raise
        reason = res.decode() if isinstance(res, bytes) else str(res)
        if self._cids.get(websocket) != cid:
            # released meanwhile: the manager replaced this handshake by a
            # newer one of the same user ("replace" policy)
            if not reason:  # the script took a slot nobody will commit
                self._releasing[cid] = user
                self._presence("r", cid)
            return "replaced"
        if reason == "lost":  # Redis forgot this node: admit; the resync registers it
            # and then sheds what is over a limit, the newest first (a SYNC sent
            # meanwhile already registered the node again: the same loss)
            self._lost_lease(counted=self._syncs_sent != resyncs)
            self._unchecked.add(cid)  # once connected, checked again (shed if over)
            return ""
        if reason:
            del self._cids[websocket]
            del self._entries[cid]
        return reason

    def commit(self, websocket: Any) -> None:
        cid = self._cids.get(websocket)
        if cid is None:
            return
        entry = self._entries[cid]
        if entry[1]:
            return
        entry[1] = 1
        if cid in self._unchecked:  # admitted while this node was unknown to Redis
            self._unchecked.discard(cid)
            self._lease_lost = True
            self._mark_dirty()
        self.view.add(self.node_id, cid, entry[2], entry[0])
        self.own.add(self.node_id, cid, entry[2], entry[0])
        for lobby in entry[2]:
            self._ref(self.lobby_channel(lobby), 1)
        self._ref(self.user_channel(entry[0]), 1)
        self._presence("c", cid)
        if cid in self._shed_on_commit:
            self._shed_on_commit.discard(cid)
            self._close_shed(websocket)

    def release(self, websocket: Any) -> None:
        cid = self._cids.pop(websocket, None)
        if cid is None:
            return
        entry = self._entries.pop(cid)
        self._unchecked.discard(cid)
        self._closing.discard(cid)
        self._shed_on_commit.discard(cid)
        if entry[1]:
            self.view.remove(self.node_id, cid)
            self.own.remove(self.node_id, cid)
            for lobby in entry[2]:
                self._ref(self.lobby_channel(lobby), -1)
            self._ref(self.user_channel(entry[0]), -1)
        if self._session:
            self._releasing[cid] = entry[0]
        self._presence("r", cid)

    # -------------------------------------------------------------- rooms

    async def join(self, websocket: Any, lobby: str) -> str:
        """Make connection ``websocket`` a member of ``lobby`` cluster-wide
        (``manager.join``, after its local slot is held): ``""`` (a member
        now) or ``"lobby_full"`` (``max_per_lobby`` memberships in the
        cluster, checked and taken in one script, in order after this node's
        earlier commits, leaves and releases). The node subscribes to the
        lobby's channel (confirmed by Redis) before the membership is
        visible. While the backplane is down the join is admitted on local
        limits (counted in ``local_admissions``) and written to Redis by the
        resync. An unknown ``websocket`` (gone meanwhile): ``""``, nothing
        recorded."""
        cid = self._cids.get(websocket)
        if cid is None:
            return ""
        entry = self._entries[cid]
        pending = self._joining.get((cid, lobby))
        if pending is not None:  # the same join, concurrently: one answer
            return await asyncio.shield(pending)
        if lobby in entry[2]:
            return ""
        entry[2].append(lobby)
        if entry[1]:
            self._ref(self.lobby_channel(lobby), 1)
        if not self._session or not self.up:
            self.local_admissions += 1
            self._mark_dirty()
            self._joined(cid, entry, lobby)
            return ""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._joining[(cid, lobby)] = fut
        resyncs = self.resyncs
        self._ops.append(("j", (cid, lobby, fut)))
        self._kick()
        try:
            reason = await fut
        except BaseException:  # cancelled: the script may still run; undo after it, in order
            self._part(cid, lobby)
            raise
        finally:
            if self._joining.get((cid, lobby)) is fut:
                del self._joining[(cid, lobby)]
        if self._entries.get(cid) is not entry or lobby not in entry[2]:
            # released meanwhile (the queue, or a reservation's script, undid it
            # in Redis too): the manager finds the connection gone
            return "" if reason == "lost" else reason
        if reason == "lost":  # Redis forgot this node or connection: the resync records it
            self._lost_lease(counted=self.resyncs != resyncs)
            reason = ""
        if reason:
            entry[2].remove(lobby)
            if entry[1]:
                self._ref(self.lobby_channel(lobby), -1)
            if self.resyncs != resyncs:  # a resync meanwhile may have written it
                self._mark_dirty()
            return reason
        self._joined(cid, entry, lobby)
        return ""

    def _joined(self, cid: str, entry: list[Any], lobby: str) -> None:
        if entry[1]:
            self.view.join(self.node_id, cid, lobby)
            self.own.join(self.node_id, cid, lobby)

    def leave(self, websocket: Any, lobby: str) -> None:
        """Connection ``websocket`` left ``lobby`` (``manager.leave``): its
        membership ends cluster-wide (queued, in order, like ``release``);
        the node unsubscribes from the lobby's channel once no local
        connection is a member. A no-op for an unknown connection or lobby."""
        cid = self._cids.get(websocket)
        if cid is not None:
            self._part(cid, lobby)

    def _part(self, cid: str, lobby: str) -> None:
        entry = self._entries.get(cid)
        if entry is None or lobby not in entry[2]:
            return
        entry[2].remove(lobby)
        if entry[1]:
            self.view.leave(self.node_id, cid, lobby)
            self.own.leave(self.node_id, cid, lobby)
            self._ref(self.lobby_channel(lobby), -1)
        self._presence("x", (cid, lobby))

    def _presence(self, op: str, arg: Any) -> None:
        if self._session:
            self._ops.append((op, arg))
            self._kick()
        else:
            self._dirty = True  # the next session's sync carries it

    def pending_count(self) -> int:
        """Handshakes of this node holding a cluster reservation."""
        return len(self._cids) - len(self.own.nodes.get(self.node_id, ()))

    def reconcile(self) -> int:
        """Release connections the manager removed without telling the backend
        (e.g. a sweep that bypassed ``disconnect``). Returns how many."""
        m = self._manager
        if m is None or len(self.own.nodes.get(self.node_id, ())) == len(m):
            return 0
        stale = [ws for ws, cid in self._cids.items() if self._entries[cid][1] and ws not in m]
        for ws in stale:
            self.release(ws)
        return len(stale)

    # ------------------------------------------------------------ history

    def history_publish(self, lobby: str, data: str, exclude_user_id: str | None) -> int | None:
        """Keep ``data`` in ``lobby``'s stream with the next offset and
        publish it to every node, this one included (queued, in order;
        :mod:`.redis_history`): the count of the lobby's connections (this
        node's and, per the view, the others'). None while the backplane is
        down: nothing kept or published (the caller delivers locally), the
        message counted as lost and its lobby's history marked with a gap
        once Redis is back (:meth:`StreamHistory.lost`). None too for a
        message over ``max_message_bytes`` or the backlog bounds: not kept,
        a marked gap (:meth:`StreamHistory.publish`); the caller's
        :meth:`publish_lobby` then counts it in ``oversize`` / ``dropped``
        as without history.
        TypeError when ``data`` is not a JSON object's text."""
        m = self._manager
        if m is None:
            return None
        if self.history is None:
            self.history = StreamHistory(self)
        if not self.up:
            self.history.lost(lobby)
            return None
        if self.history.publish(lobby, data, exclude_user_id, m.history_size or 1, m.history_ttl):
            return None  # over max_message_bytes or the backlog bounds: a marked gap, local only
        return self.remote_lobby_count(lobby, exclude_user_id)

    async def history_since(
        self, lobby: str, since: tuple[str, int] | None, user_id: str | None
    ) -> tuple[bool, str, int, list[str]]:
        """``(recovered, epoch, top, texts)``: see :meth:`StreamHistory.read`;
        Redis errors, and no answer within ``admission_timeout``, give
        ``(False, "", 0, [])`` (logged): the client is told
        ``recovered: false`` and refetches, the handshake is not held."""
        m = self._manager
        assert m is not None
        if self.history is None:
            self.history = StreamHistory(self)
        try:
            return await self.history.read(lobby, since, user_id, m.history_size or 1, m.history_ttl)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._note_error(exc)
            reason = "admission_timeout" if isinstance(exc, asyncio.TimeoutError) else "backplane_down"
            extra = {"lobby": lobby, "reason": reason}
            logger.info("history: recovery read failed: %r", exc, extra=extra)
            return False, "", 0, []

    def shard_client(self, index: int) -> aioredis.Redis | None:
        """The command client of ``urls[index]`` in the current session, or
        None while the backplane is down."""
        shards = self._shards
        return shards[index].client if self.up and index < len(shards) else None

    def publish_command(self, index: int) -> str:
        """``SPUBLISH`` (Redis 7+) or ``PUBLISH`` for ``urls[index]``."""
        shards = self._shards
        return shards[index].pub if index < len(shards) else "PUBLISH"

    async def wait_listening(self, channel: bytes, timeout: float) -> bool:
        """True once Redis confirmed this node's subscription to ``channel``
        (one it needs: a local member of the lobby), so that every message
        published on it from now on reaches this node. False when the
        backplane is down or no confirmation came within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.up:
            shard = self._shards[self.shard_of(channel)]
            if (
                not self._applying
                and channel not in self._sub_changes
                and channel in shard.subscribed
                and shard.acked >= shard.sent
            ):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.001))  # confirmations come within a round trip
        return False

    # ----------------------------------------------------------- delivery

    def remote_lobby_count(self, lobby: str, exclude_user_id: str | None = None) -> int:
        """Connections of ``lobby`` on other nodes, per the view."""
        n = self.view.lobbies.get(lobby, 0) - self.own.lobbies.get(lobby, 0)
        if n and exclude_user_id is not None:
            n -= self.view.lobby_user_count(lobby, exclude_user_id) - self.own.lobby_user_count(
                lobby, exclude_user_id
            )
        return n

    def remote_user_count(self, user: str) -> int:
        return self.view.users.get(user, 0) - self.own.users.get(user, 0)

    def publish_lobby(self, lobby: str, data: str, exclude_user_id: str | None) -> int:
        """Queue ``data`` for the lobby's connections on other nodes; their count."""
        if not self.up:  # dropped if the other nodes last known had recipients
            if (
                self._known.lobbies.get(lobby, 0)
                - (0 if exclude_user_id is None else self._known.lobby_user_count(lobby, exclude_user_id))
                > 0
            ):
                self._drop(self.lobby_channel(lobby))
            return 0
        n = self.remote_lobby_count(lobby, exclude_user_id)
        if n <= 0:
            return 0
        self._publish(self.lobby_channel(lobby), lobby_record(lobby, data, exclude_user_id))
        return n

    def publish_user(self, user: str, data: str) -> int:
        """Queue ``data`` for the user's connections on other nodes; their count."""
        if not self.up:
            if self._known.users.get(user, 0) > 0:
                self._drop(self.user_channel(user))
            return 0
        n = self.remote_user_count(user)
        if n <= 0:
            return 0
        self._publish(self.user_channel(user), user_record(user, data))
        return n

    def _publish(self, channel: bytes, frame: bytes) -> None:
        """Queue one record for ``channel`` with its sequence number, or drop
        it (counted): larger than ``max_message_bytes``, or the backlog at
        ``max_backlog`` records / ``max_backlog_bytes`` bytes."""
        size = len(frame)
        if size > self.max_message_bytes:
            self.oversize += 1
            if self.oversize == 1 or self.oversize % 1000 == 0:
                logger.warning(
                    "backplane: %d message(s) over max_message_bytes (%d) delivered locally only",
                    self.oversize,
                    self.max_message_bytes,
                    extra={"reason": "message_too_big"},
                )
            self._drop(channel)
            return
        if self.backlog_full(size):
            self._drop(channel)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("backplane backlog full: %d messages dropped", self.dropped)
            return
        seq = self._next_seq(channel)
        self._backlog_bytes += size
        self._ops.append(("p", (channel, seq, frame)))
        self._kick()

    def listens(self, channel: bytes) -> bool:
        """True while this node needs ``channel`` (a local member of its
        lobby or user): it is, or is about to be, subscribed to it."""
        return channel in self._refs

    def backlog_full(self, size: int) -> bool:
        """True when one more record of ``size`` bytes would pass
        ``max_backlog`` records or ``max_backlog_bytes`` bytes, counting the
        publish backlog and the history queue (:class:`StreamHistory`)
        together: one bound for the node's memory of queued messages."""
        h = self.history
        count = len(self._ops) + (h.queued if h is not None else 0)
        nbytes = self._backlog_bytes + (h.queued_bytes if h is not None else 0)
        return count >= self.max_backlog or nbytes + size > self.max_backlog_bytes

    def _drop(self, channel: bytes) -> None:
        """A message for ``channel`` that does not reach the cluster: counted
        in ``dropped``; its sequence number is used up, so receivers count it
        in ``missed``."""
        self.dropped += 1
        self._next_seq(channel)

    def _next_seq(self, channel: bytes) -> int:
        entry = self._seq.get(channel)
        if entry is None:
            entry = self._seq[channel] = [0, 0]
        entry[0] += 1
        entry[1] = self._seq_clock
        return entry[0]

    def _prune_seq(self) -> None:
        """Forget the sequence of channels unused for about ``_SEQ_IDLE``
        seconds (bounded memory; called once per lease / 3); the next message
        on one starts again at 1, which a receiver takes as a new sequence,
        not as a gap."""
        self._seq_clock += 1
        idle = self._seq_clock - int(_SEQ_IDLE * 3 / self.lease)
        for channel in [c for c, (_, used) in self._seq.items() if used < idle]:
            del self._seq[channel]

    def _lost_lease(self, *, counted: bool = False) -> None:
        """Redis forgot this node while its session lasted (its lease expired:
        the process was frozen or cut off longer than ``lease``, and other
        nodes reaped it). The resync registers it again; then it sheds its
        newest connections over a limit (:meth:`_shed`). ``counted``: this
        loss is one already seen (an answer older than a later SYNC)."""
        if not self._lease_lost and not counted:
            self._lease_lost = True
            self.lease_losses += 1
            logger.warning(
                "backplane: this node's lease expired while it was alive", extra={"reason": "lease_lost"}
            )
        self._mark_dirty()

    async def _shed(self, client: aioredis.Redis) -> None:
        """After a lost lease and the resync: close this node's newest
        connections while the cluster is over ``max_connections``,
        ``max_per_lobby`` or ``max_per_user`` (close code 1013, reason
        ``lease_lost``: the client may come back when there is room). The
        other nodes admitted into the seats while this one was gone; its
        newest connections are the ones a correct cluster would have refused."""
        self._lease_lost = False
        m = self._manager
        if m is None:
            return
        max_user = m.max_per_user
        limits = (m.max_connections, m.max_per_lobby, -1 if max_user is None else max_user)
        raw = await self._eval(client, OVER, *limits, *self._closing)
        by_cid = {cid: ws for ws, cid in self._cids.items()}
        for item in raw or ():
            cid = item.decode() if isinstance(item, bytes) else str(item)
            ws = by_cid.get(cid)
            if ws is None:
                continue
            self._closing.add(cid)
            self.shed += 1
            if self._entries[cid][1]:
                self._close_shed(ws)
            else:  # a handshake: closed once connected (commit)
                self._shed_on_commit.add(cid)
        if raw:
            logger.warning(
                "backplane: closed %d connection(s) over a limit after a lost lease",
                len(raw),
                extra={"reason": "lease_lost", "code": 1013},
            )

    def _close_shed(self, websocket: Any) -> None:
        m = self._manager
        assert m is not None
        task = asyncio.ensure_future(m.close_connection(websocket, "lease_lost"))
        self._shedding.add(task)
        task.add_done_callback(self._shedding.discard)

    def _mark_dirty(self) -> None:
        self._dirty = True
        if self._resync is not None:
            self._resync.set()

    def _kick(self) -> None:
        wake = self._wake
        if wake is not None and not wake.is_set():
            wake.set()

    # ------------------------------------------------------- the session

    async def _supervise(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                await self._run_session()
            except asyncio.CancelledError:
                self._reset_session(outage=False)
                raise
            except Exception as exc:
                self._note_error(exc)
            was_up = self.up
            self._reset_session(outage=True)
            if was_up:
                delay = 0.05
            if self._stopping:
                break
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff_max)

    def _redis(self, url: str, socket_timeout: float | None) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            url,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            socket_keepalive=True,
        )

    async def _run_session(self) -> None:
        # per Redis: a client for commands, pub/sub on its own client (no read
        # timeout on an idle subscription)
        shards = [
            _Shard(i, self._redis(url, self.command_timeout), self._redis(url, None), self._redis(url, None))
            for i, url in enumerate(self.urls)
        ]
        client = shards[0].client
        tasks: list[asyncio.Task[None]] = []
        try:
            for shard in shards:
                await shard.open(self.command_timeout)
            primary = shards[0]
            primary.sent += 1
            await primary.conn.send_command("SUBSCRIBE", self._channel)
            self._sub_changes.clear()  # every channel needed is subscribed below
            wanted: list[list[bytes]] = [[] for _ in shards]
            for channel in self._refs:
                wanted[self.shard_of(channel)].append(channel)
            for shard in shards:
                await shard.change(wanted[shard.index], True)
            for shard in shards:  # the confirmations; anything else is kept for the reader
                while shard.acked < shard.sent:
                    read = shard.conn.read_response(push_request=True)
                    reply = await asyncio.wait_for(read, self.command_timeout)
                    if isinstance(reply, list) and reply and reply[0] in _ACKS:
                        shard.acked += 1
                    else:
                        shard.early.append(reply)
            self._shards = shards
            self._client = client
            self._session = True
            self._ops.clear()  # superseded by the sync below
            self._backlog_bytes = 0
            await self._revive(client)
            await self._sync(client)
            if self._lease_lost:
                await self._shed(client)
            raw = await self._eval(client, SNAPSHOT)
            self._load_snapshot(raw)
            self.up = True
            self._ever_up = True
            if self.down_since is not None:
                logger.warning(
                    "backplane up again after %.1fs",
                    time.monotonic() - self.down_since,
                    extra={"reason": "backplane_up"},
                )
            self.down_since = None
            assert self._ready is not None
            self._ready.set()
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(self._read_loop(shard)) for shard in shards]
            tasks.append(loop.create_task(self._write_loop(client)))
            tasks.append(loop.create_task(self._keep_loop(client)))
            tasks.append(loop.create_task(self._health_loop(shards)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            raise ConnectionError("backplane task ended")  # pragma: no cover
        finally:
            for t in tasks:
                t.cancel()
            if tasks:  # bounded: a task stuck in redis-py must not hold the node
                await asyncio.wait(tasks, timeout=1.0)
            self._session = False
            self._client = None
            self._shards = []
            for shard in shards:
                with contextlib.suppress(BaseException):
                    await shard.sub.aclose()  # type: ignore[no-untyped-call]
                for c in (shard.client, shard.sub_client, shard.health):
                    with contextlib.suppress(BaseException):
                        await c.aclose()

    def _reset_session(self, *, outage: bool) -> None:
        was_up = self.up
        self.up = False
        self._session = False
        self._client = None
        self._syncs = 0  # the next session reads the bus afresh
        if self._ready is not None:
            self._ready.clear()
        dropped = sum(1 for op, _ in self._ops if op == "p")  # records
        if any(op != "p" for op, _ in self._ops) or self._releasing:
            self._dirty = True
        self._admit_joins(self._ops)
        self._ops.clear()
        self._backlog_bytes = 0
        self._releasing.clear()
        self.dropped += dropped
        # answers are local only while down: forget the other nodes (their
        # last known connections stay in _known)
        others = [n for n in self.view.nodes if n != self.node_id]
        if others:
            self._known = ClusterView()
            for node in others:
                for cid, (user, lobbies) in self.view.nodes[node].items():
                    self._known.add(node, cid, lobbies, user)
        changed: set[str] = set()
        for node in others:
            changed |= self.view.drop_node(node)
        self._remote_changed(changed)
        if outage and was_up:
            self.outages += 1
            self.down_since = time.monotonic()
            logger.warning(
                "backplane down (%s): serving local connections only, reconnecting",
                self.last_error,
                extra={"reason": "backplane_down"},
            )

    def _admit_joins(self, ops: Iterable[tuple[str, Any]]) -> None:
        """Joins whose script may not have run (an outage): admitted on local
        limits; the resync writes them."""
        for op, arg in ops:
            if op == "j" and not arg[2].done():
                self.local_admissions += 1
                self._dirty = True
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    arg[2].set_result("")

    def _remote_changed(self, lobbies: Iterable[str]) -> None:
        """Other nodes' memberships of ``lobbies`` changed: the presence of
        those this node serves is re-read (``manager.presence_changed``)."""
        m = self._manager
        if m is None or m.presence is None:
            return
        own = self.own.lobbies
        for lobby in lobbies:
            if lobby in own:
                m.presence_changed(lobby)

    def _note_error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"

    async def _eval(self, client: aioredis.Redis, script: str, *args: Any) -> Any:
        return await _detached(client.eval(script, 5, *self._keys, *self._argv, *args), self.command_timeout)

    def rejoin_window(self) -> float:
        """Seconds the seats of the nodes this node last knew are held in a
        Redis that restarted empty, waiting for them to rejoin:
        ``max(lease, 1.5 * backoff_max + connect_timeout)``, the longest a
        live node with these settings takes to reconnect (its backoff with
        jitter, then one connection attempt)."""
        return max(self.lease, 1.5 * self.backoff_max + self.connect_timeout)

    async def _revive(self, client: aioredis.Redis) -> None:
        """In a Redis that lost the cluster's state (restarted empty: no
        epoch key), the first node back registers the other nodes it last
        knew, with their connections, under a lease of ``rejoin_window()``:
        their seats count until each rejoins (its SYNC replaces them) or,
        dead, is reaped. Without it a node back first would admit into seats
        that connections on nodes not yet back still hold."""
        known, self._known = self._known, ClusterView()
        flat: list[Any] = []
        for node, conns in known.nodes.items():
            if node == self.node_id or not conns:
                continue
            flat += (node, len(conns))
            for cid, (user, lobbies) in conns.items():
                flat += (cid, json.dumps([user, 1, *lobbies]))
        window = int(self.rejoin_window() * 1000)
        raw = await self._eval(client, REVIVE, window, os.urandom(8).hex(), *flat)
        revived, epoch, present = int(raw[0]), raw[1], int(raw[2])
        if epoch == self._epoch and not present and self._entries:  # reaped during the outage
            self._lost_lease()
        self._epoch = epoch
        if revived > 0:
            self.revived_nodes += int(revived)
            logger.warning(
                "backplane: Redis lost the cluster's state; holding the seats of %d node(s) for %.1fs",
                revived,
                self.rejoin_window(),
                extra={"reason": "backplane_revive"},
            )

    async def _sync(self, client: aioredis.Redis) -> None:
        """Make Redis' record of this node equal to ``_entries``."""
        self._dirty = False
        flat: list[Any] = []
        for cid, (user, state, lobbies) in self._entries.items():
            flat += (cid, user, state, len(lobbies), *lobbies)
        self._syncs += 1
        self._syncs_sent += 1
        await self._eval(client, SYNC, *flat)
        self.resyncs += 1

    def _load_snapshot(self, raw: list[Any]) -> None:
        changed: set[str] = set()
        for node in [n for n in self.view.nodes if n != self.node_id]:
            changed |= self.view.drop_node(node)
        for i in range(0, len(raw), 2):
            node = raw[i].decode()
            if node == self.node_id:
                continue
            pairs = raw[i + 1]
            for j in range(0, len(pairs), 2):
                user, state, *lobbies = json.loads(pairs[j + 1])
                if state == 1:
                    changed.update(self.view.add(node, pairs[j].decode(), lobbies, user))
        self._remote_changed(changed)

    async def _read_loop(self, shard: _Shard) -> None:
        m = self._manager
        assert m is not None
        delivery = m.delivery
        node_b = self._node_b
        rec_size = _REC.size
        with_history = bool(m.history_size)
        conn = shard.conn
        early = shard.early
        seen = self._seen
        while True:
            if early:
                reply = early.pop(0)
            else:
                try:
                    reply = await conn.read_response(push_request=True)
                except (RedisError, OSError) as exc:
                    await self._check_cut(shard, exc)
                    raise
            if not isinstance(reply, list) or len(reply) < 3:
                continue
            if reply[0] not in _MESSAGE:
                if reply[0] in _ACKS:
                    shard.acked += 1
                    shard.on_ack.set()
                continue
            payload: bytes = reply[2]
            if payload[0] == _CONTROL:
                self._on_control(payload)
                continue
            self.received_bytes += len(payload)
            (nlen,) = _U32.unpack_from(payload, 1)
            off = 5 + nlen
            sender = payload[5:off]
            if sender == node_b:
                continue
            sequenced = payload[0] == _SEQ_HEAD
            senders = seen.setdefault(reply[1], {}) if sequenced else {}
            end = len(payload)
            while off < end:
                if sequenced:
                    (seq,) = _U64.unpack_from(payload, off)
                    off += 8
                    last = senders.get(sender)
                    if last is not None and seq > last + 1:
                        self.missed += seq - last - 1
                    senders[sender] = seq  # lower than last: the sender started a new sequence
                kind, tlen, xlen, dlen = _REC.unpack_from(payload, off)
                off += rec_size
                target = payload[off : off + tlen].decode()
                off += tlen
                excl = payload[off : off + xlen].decode() if xlen else None
                off += xlen
                start, off = off, off + dlen
                self.received += 1
                if with_history and not sequenced and kind == _LOBBY:
                    self._count_skipped(reply[1], payload, start, off)
                if kind == _LOBBY:
                    if delivery.lobby_count(target):
                        await delivery.deliver_lobby(target, payload[start:off].decode(), excl)
                elif m.is_user_connected(target, local=True):
                    await delivery.deliver_user(target, payload[start:off].decode())

    def _count_skipped(self, channel: bytes, payload: bytes, start: int, end: int) -> None:
        """With history on, a lobby's messages come from the history script
        (frames without sequence numbers, from nodes and Publishers alike)
        with ``"_pos":{...,"epoch":E,"offset":N}`` at the end of their text
        (``payload[start:end]``): the offsets of one epoch follow each other,
        so a jump is messages this node missed (a subscriber cut, or gaps
        marked for messages dropped elsewhere), counted in ``missed``; the
        gaps marked for this node's own drops, which its members got locally,
        are not (:attr:`StreamHistory.local_only`). The first message after
        a subscription, and a new epoch, start counting afresh."""
        j = payload.rfind(b'","offset":', start, end)
        k = payload.rfind(b'"epoch":"', start, j) if j > 0 else -1
        if k < 0 or payload[end - 2 : end] != b"}}":
            return  # no position (a Publisher without history_size)
        try:
            offset = int(payload[j + 11 : end - 2])
        except ValueError:
            return
        epoch = payload[k + 9 : j]
        last = self._offsets.get(channel)
        self._offsets[channel] = (epoch, offset)
        h = self.history
        if last is None:
            return
        if last[0] != epoch:  # a new epoch: the gaps marked in the old one no longer show
            if h is not None:
                h.local_only.pop(channel, None)
            return
        skipped = offset - last[1] - 1
        if skipped <= 0:
            return
        own = h.local_only.get(channel, 0) if h is not None else 0
        if own and h is not None:
            if own > skipped:
                h.local_only[channel] = own - skipped
            else:
                del h.local_only[channel]
            skipped -= min(own, skipped)
        self.missed += skipped

    async def _check_cut(self, shard: _Shard, exc: BaseException) -> None:
        """The subscriber connection of ``shard`` failed. If that Redis still
        answers a PING, it cut this subscriber (its pub/sub output buffer
        limit, ``client-output-buffer-limit pubsub``, or CLIENT KILL): counted
        in ``subscriber_cuts`` and logged; the messages lost meanwhile show in
        ``missed`` when each sender's next message arrives."""
        try:
            await _detached(shard.health.ping(), self.health_timeout)
        except (RedisError, OSError):
            return  # Redis itself is gone: an outage
        self.subscriber_cuts += 1
        logger.warning(
            "backplane: Redis %s closed this node's subscriber connection (%s): resubscribing; "
            "messages lost meanwhile are counted in 'missed'",
            self.urls[shard.index],
            exc,
            extra={"reason": "subscriber_cut"},
        )

    def _on_control(self, payload: bytes) -> None:
        ev = json.loads(payload[1:])
        op, node = ev[0], ev[1]
        if node == self.node_id:
            if op == "s":
                self._syncs = max(0, self._syncs - 1)
            # reaped while alive: register again (a "g" published before this
            # node's latest SYNC is stale: that SYNC registered it again)
            elif op == "g" and not self._stopping and not self._syncs:
                self._lost_lease()
            return
        view = self.view
        changed: Iterable[str] = ()
        if op == "j":
            changed = view.add(node, ev[2], ev[4:], ev[3])
        elif op == "m":
            if view.join(node, ev[2], ev[3]):
                changed = (ev[3],)
        elif op == "p":
            if view.leave(node, ev[2], ev[3]):
                changed = (ev[3],)
        elif op == "l":
            changed = [lobby for cid in ev[2] for lobby in view.remove(node, cid)]
        elif op == "s":
            flat = ev[2] if isinstance(ev[2], list) else []
            entries = []
            i = 0
            while i < len(flat):
                n = flat[i + 2]
                entries.append((flat[i], flat[i + 3 : i + 3 + n], flat[i + 1]))
                i += 3 + n
            changed = view.replace_node(node, entries)
        elif op == "g":
            changed = view.drop_node(node)
        if changed:
            self._remote_changed(changed)

    async def _write_loop(self, client: aioredis.Redis) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if self._sub_changes:
                await self._apply_subscriptions()
                continue
            if not self._ops:
                wake.clear()
                await wake.wait()
                continue
            await self._flush(client)

    async def _apply_subscriptions(self) -> None:
        """Make each Redis' subscriptions match the channels needed, and wait
        until Redis confirmed them: a node's presence (sent after this) is
        never visible before it listens to the channels it needs."""
        self._applying = True
        try:
            await self._apply_changes()
        finally:
            self._applying = False

    async def _apply_changes(self) -> None:
        changes, self._sub_changes = self._sub_changes, set()
        shards = self._shards
        todo: dict[tuple[int, bool], list[bytes]] = {}
        for channel in changes:
            shard = shards[self.shard_of(channel)]
            want = channel in self._refs
            if want != (channel in shard.subscribed):
                todo.setdefault((shard.index, want), []).append(channel)
        for (index, want), channels in todo.items():
            await shards[index].change(channels, want)
        for index in {index for index, _ in todo}:
            shard = shards[index]
            deadline = time.monotonic() + self.command_timeout
            while shard.acked < shard.sent:
                shard.on_ack.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RedisTimeoutError(f"no subscription confirmation within {self.command_timeout}s")
                await _wait_event(shard.on_ack, left)

    async def _flush(self, client: aioredis.Redis) -> None:
        """Send everything queued, in order: records packed into one PUBLISH
        per channel (on the channel's Redis), presence changes as script
        calls on the primary, one pipeline per Redis per round trip."""
        ops = self._ops
        head = bytes((_SEQ_HEAD,)) + frame_head(self._node_b)[1:]
        while ops:
            if ops[0][0] == "p":
                await self._flush_records(head)
                continue
            pipe = client.pipeline(transaction=False)
            kinds: list[tuple[str, Any]] = []
            releases: list[str] = []
            sent_releases: list[str] = []
            commands = 0
            max_per_lobby = self._manager.max_per_lobby if self._manager is not None else 0
            while ops and commands < _BATCH and ops[0][0] != "p":
                op, arg = ops.popleft()
                if op == "r":  # consecutive releases: one script call
                    releases.append(arg)
                    sent_releases.append(arg)
                    if ops and ops[0][0] == "r":
                        continue
                    pipe.eval(RELEASE, 5, *self._keys, *self._argv, *releases)
                    releases = []
                elif op == "j":  # (cid, lobby, future of the answer)
                    pipe.eval(JOIN, 5, *self._keys, *self._argv, arg[0], arg[1], max_per_lobby)
                elif op == "x":  # (cid, lobby)
                    pipe.eval(PART, 5, *self._keys, *self._argv, arg[0], arg[1])
                else:
                    pipe.eval(COMMIT, 5, *self._keys, *self._argv, arg)
                kinds.append((op, arg))
                commands += 1
            try:
                results = await _detached(pipe.execute(raise_on_error=False), self.command_timeout)
            except BaseException:
                self._admit_joins(kinds)
                raise
            for cid in sent_releases:
                self._releasing.pop(cid, None)
            for (op, arg), res in zip(kinds, results, strict=True):
                if op == "j":
                    if isinstance(res, Exception):
                        self._admit_joins([(op, arg)])
                        self._mark_dirty()
                    elif not arg[2].done():
                        arg[2].set_result(res.decode() if isinstance(res, bytes) else str(res))
                elif isinstance(res, Exception) or (op == "c" and res == 0):
                    self._mark_dirty()

    async def _flush_records(self, head: bytes) -> None:
        """Publish the records at the head of the queue: per channel one
        message (up to ``_MAX_FRAME`` bytes), in the order queued."""
        ops = self._ops
        frames: dict[bytes, list[bytes]] = {}
        size = 0
        count = 0
        while ops and ops[0][0] == "p" and count < _BATCH * 8:
            channel, seq, record = ops[0][1]
            if size and size + len(record) > _MAX_FRAME:
                break
            ops.popleft()
            frames.setdefault(channel, []).extend((_U64.pack(seq), record))
            size += len(record)
            count += 1
        self._backlog_bytes -= size
        shards = self._shards
        pipes: dict[int, Any] = {}
        sent: dict[int, list[int]] = {}  # shard -> records per PUBLISH, in order
        for channel, records in frames.items():
            shard = shards[self.shard_of(channel)]
            pipe = pipes.get(shard.index)
            if pipe is None:
                pipe = pipes[shard.index] = shard.client.pipeline(transaction=False)
            message = head + b"".join(records)
            pipe.execute_command(shard.pub, channel, message)
            self.published_bytes += len(message)
            sent.setdefault(shard.index, []).append(len(records) // 2)
        # not confirmed by Redis: counted as dropped (their receivers count
        # them in missed, unless Redis ran them before failing to answer)
        try:
            timeout = self.command_timeout
            results = await asyncio.gather(
                *(_detached(pipe.execute(raise_on_error=False), timeout) for pipe in pipes.values()),
                return_exceptions=True,
            )
        except BaseException:  # cancelled (the session ends)
            self.dropped += count
            raise
        failure: BaseException | None = None
        for index, res in zip(pipes, results, strict=True):
            if isinstance(res, BaseException):
                self.dropped += sum(sent[index])
                failure = res
                continue
            for n, one in zip(sent[index], res, strict=True):
                if isinstance(one, Exception):
                    self.dropped += n
                    failure = one
                else:
                    self.published += n
        if failure is not None:
            raise failure

    async def _health_loop(self, shards: list[_Shard]) -> None:
        """Every ``health_interval``, PING each Redis on a connection of its
        own; one without an answer within ``health_timeout`` (hung: SIGSTOP,
        a long DEBUG SLEEP or CLIENT PAUSE, a lost network) ends the session
        at once: the node is down (``up`` false, cross-node messages dropped
        and counted, admissions on local limits) and reconnects."""
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await asyncio.gather(*(self._ping(s) for s in shards))
            except (RedisError, OSError) as exc:
                self._note_error(exc)
                self._reset_session(outage=True)  # down now, not after the session's cleanup
                raise

    async def _ping(self, shard: _Shard) -> None:
        """One health-check PING: RedisTimeoutError without an answer within
        ``health_timeout``. An answer that arrived while this process's loop
        was blocked (a long synchronous call, the process frozen) is taken:
        the loop gets a few turns to read it before the verdict."""
        task = asyncio.ensure_future(shard.health.ping())
        task.add_done_callback(_retrieve)
        await asyncio.wait({task}, timeout=self.health_timeout)
        for _ in range(8):
            if task.done():
                break
            await asyncio.sleep(0)
        if not task.done():
            raise RedisTimeoutError(f"no answer to PING within {self.health_timeout}s")
        task.result()

    async def _keep_loop(self, client: aioredis.Redis) -> None:
        """Renew the lease, reap dead nodes, resync when Redis disagrees."""
        interval = self.lease / 3
        resync = self._resync
        assert resync is not None
        loop = asyncio.get_running_loop()
        next_tick = 0.0
        while True:
            if loop.time() >= next_tick:
                next_tick = loop.time() + interval
                if not await self._eval(client, RENEW):
                    self._lost_lease()
                self.reconcile()
                self._prune_seq()
                reaped = await self._eval(client, REAP, 16)
                if reaped:
                    self.reaped += int(reaped)
                    logger.info("backplane: reclaimed %d dead node(s)", reaped)
            if self._dirty:
                logger.info("backplane: resyncing this node's presence")
                resync.clear()
                await self._sync(client)
                if self._lease_lost:
                    await self._shed(client)
                continue
            if resync.is_set():  # asked for while a sync (e.g. the session's first) was running
                resync.clear()
                continue
            await _wait_event(resync, max(0.0, next_tick - loop.time()))

    # --------------------------------------------------------------- stats

    def stats(self) -> BackplaneStats:
        return {
            "backend": "redis",
            "up": self.up,
            "node_id": self.node_id,
            "nodes_with_connections": len(self.view.nodes),
            "lease_seconds": self.lease,
            "down_for_seconds": (
                None if self.down_since is None else round(time.monotonic() - self.down_since, 3)
            ),
            "last_error": self.last_error,
            "published": self.published,
            "received": self.received,
            "published_bytes": self.published_bytes,
            "received_bytes": self.received_bytes,
            "channels": len(self._refs),
            "redis_servers": len(self.urls),
            "sharded_pubsub": bool(self._shards) and all(s.sharded for s in self._shards),
            "dropped": self.dropped,
            "backlog": len(self._ops),
            "backlog_bytes": self._backlog_bytes + (self.history.queued_bytes if self.history else 0),
            "missed": self.missed,
            "oversize": self.oversize,
            "subscriber_cuts": self.subscriber_cuts,
            "lease_losses": self.lease_losses,
            "shed": self.shed,
            "revived_nodes": self.revived_nodes,
            "outages": self.outages,
            "resyncs": self.resyncs,
            "reaped_nodes": self.reaped,
            "local_admissions": self.local_admissions,
        }
