"""History and recovery on the Redis backplane (issue 12): one stream per lobby.

Where: a lobby's history lives on the Redis that carries the lobby's channel
(:func:`wsmanager.backends.routing.shard_of`), because the script that keeps a
message must publish it in the same step: a Lua script can only publish on the
server it runs on. With one URL that is the primary; with several, lobbies'
histories spread over the servers as their channels do.

What: per lobby a stream and a small hash (keys and scripts in
:mod:`._lua`, ``HISTORY_APPEND`` / ``HISTORY_READ``). One script assigns the
next offset of the lobby's epoch, adds the position to the text
(``"_pos":{"lobby":L,"epoch":E,"offset":N}`` as its last member, the bytes
the in-memory core writes), appends it (``XADD ... MAXLEN ~ history_size``,
the keys expiring ``history_ttl`` after the newest message) and publishes it
on the lobby's channel. So every node, the sender included, receives a
lobby's messages in offset order from one place: a node does not deliver its
own history broadcasts locally, it gets them back from the channel like the
others (else its members could see offset 5, from another node, before its
own 4). The epoch is stored in the hash; when the hash is gone (Redis
restarted empty, the keys expired) the next script starts a new epoch at
offset 1.

Recovery (:meth:`StreamHistory.read`) runs after this node's subscription to
the lobby's channel is confirmed, so every message after the read's top
reaches the node; the manager holds the connection's live messages meanwhile
(``Delivery.hold``) and drops those the replay covers
(:func:`wsmanager.history.place_replay`).

:class:`StreamHistory` is the part a node uses; :func:`append_args` is shared
with :class:`wsmanager.backends.publisher.Publisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import NoScriptError, RedisError

from .._core import dumps
from ._lua import HISTORY_APPEND, HISTORY_READ
from .routing import frame_head, lobby_channel, lobby_record

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .redis import RedisBackend

__all__ = ["StreamHistory", "append_args", "gap_args", "history_keys", "new_epoch"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: the frame head of history records: no sender, so that no node skips them
#: (the sending node's members get its messages from the channel too)
HEAD = frame_head(b"")
_BATCH = 512  # scripts per pipeline
_GAP_RETRY = 0.25  # seconds between looks at the backplane while gaps wait to be marked
_APPEND_SHA = hashlib.sha1(HISTORY_APPEND.encode()).hexdigest()
_READ_SHA = hashlib.sha1(HISTORY_READ.encode()).hexdigest()
_EPOCH_DIGITS = "0123456789abcdefghijklmnopqrstuv"
_random = random.Random()  # seeded from os.urandom: epochs need to differ, not to be secret


def new_epoch() -> str:
    """A fresh epoch: 12 characters of ``[0-9a-v]`` (60 random bits), as the core's."""
    n = _random.getrandbits(60)
    return "".join(_EPOCH_DIGITS[(n >> (5 * i)) & 31] for i in range(12))


def history_keys(namespace: str, lobby: str) -> tuple[str, str]:
    """The stream and the hash of ``lobby``'s history (see :mod:`._lua`)."""
    prefix = "{" + namespace + "}:"
    return prefix + "hs:" + lobby, prefix + "hm:" + lobby


def ttl_ms(history_ttl: float | None) -> int:
    """``history_ttl`` as the scripts take it: milliseconds, 0 for none."""
    return 0 if not history_ttl else max(1, int(history_ttl * 1000))


def append_args(
    namespace: str,
    lobby: str,
    data: str,
    exclude_user_id: str | None,
    history_size: int,
    history_ttl: float | None,
    publish_command: str,
) -> list[Any]:
    """Keys then arguments of ``HISTORY_APPEND`` for one message (``data``:
    the serialized message). Raises TypeError when ``data`` is not a JSON
    object's text (its position could not be added), as the core does."""
    if len(data) < 2 or data[0] != "{" or data[-1] != "}":
        raise TypeError(
            "with history_size set, a lobby message must be a JSON object "
            '(its position is added to it as "_pos")'
        )
    head = data[:-1] if data == "{}" else data[:-1] + ","
    text = head + '"_pos":{"lobby":' + dumps(lobby) + ',"epoch":"'
    stream, meta = history_keys(namespace, lobby)
    return [
        stream,
        meta,
        lobby_channel(namespace, lobby),
        publish_command,
        HEAD,
        lobby,
        exclude_user_id or "",
        text,
        history_size,
        ttl_ms(history_ttl),
        new_epoch(),
    ]


def gap_args(namespace: str, lobby: str, n: int) -> list[Any]:
    """Keys then arguments of ``HISTORY_APPEND`` marking a gap of ``n``
    messages in ``lobby``'s history (its offset skips ``n``)."""
    stream, meta = history_keys(namespace, lobby)
    return [stream, meta, "", "", "", lobby, "", "", n, 0, ""]


async def _bounded(coro: Awaitable[T], timeout: float) -> T:
    """Await ``coro`` in a task of its own for at most ``timeout`` seconds
    (as the backend does: a cancellation is not passed into redis-py)."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        raise asyncio.TimeoutError(f"no answer from Redis within {timeout}s")
    return task.result()


class StreamHistory:
    """A node's side of the lobby streams: publishes in order, in pipelines
    (one writer task per event loop), and reads for recoveries.

    Counters: ``published`` (scripts that ran), ``dropped`` (messages lost:
    Redis unreachable or failing, over the backend's ``max_message_bytes``,
    or over its backlog bounds), ``recoveries`` / ``recovered`` (reads, and
    those that could replay); ``queued`` / ``queued_bytes``: messages waiting
    for Redis and the bytes of their records (counted against the backend's
    ``max_backlog`` / ``max_backlog_bytes`` with its publish backlog)."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        #: (shard index, script args, record bytes); gap marks are 0 bytes
        self._queue: deque[tuple[int, list[Any], int]] = deque()
        #: lobby -> the gap mark at the queue's tail (after its last message), grown in place
        self._tail_gaps: dict[str, list[Any]] = {}
        self.queued = 0
        self.queued_bytes = 0
        #: lobby channel -> gaps marked for messages this node delivered to its
        #: own members only (not kept): its receiver does not count them in
        #: ``missed`` (only for channels it listens to; forgotten on unsubscribe)
        self.local_only: dict[bytes, int] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.published = 0
        self.dropped = 0
        #: lobby -> messages lost (never kept) not yet marked as a gap in its history
        self.gaps: dict[str, int] = {}
        self.recoveries = 0
        self.recovered = 0

    # ------------------------------------------------------------ publish

    def publish(
        self, lobby: str, data: str, exclude_user_id: str | None, size: int, ttl: float | None
    ) -> str | None:
        """Queue ``data`` for ``lobby``'s stream and channel (in order with
        this node's other history messages): None. Not queued, the same rules
        as the plain backplane's (:meth:`RedisBackend.publish_lobby`): its
        record over the backend's ``max_message_bytes`` (``"oversize"``), or
        the backlog (this queue and the publish backlog together) at
        ``max_backlog`` records / ``max_backlog_bytes`` bytes (``"backlog"``):
        the message is counted in ``dropped`` and becomes a gap in the
        lobby's history at its place in this node's order (the offset skips
        it, so a recovery across it answers ``recovered: false``); the caller
        delivers it locally. TypeError for a non-object."""
        bp = self._backend
        index = bp.shard_of(bp.lobby_channel(lobby))
        args = append_args(bp.namespace, lobby, data, exclude_user_id, size, ttl, bp.publish_command(index))
        nbytes = len(lobby_record(lobby, data, exclude_user_id))
        if nbytes > bp.max_message_bytes:
            why = "oversize"
        elif bp.backlog_full(nbytes):
            why = "backlog"
        else:
            self._queue.append((index, args, nbytes))
            self.queued += 1
            self.queued_bytes += nbytes
            self._tail_gaps.clear()  # a later loss comes after this message
            self._wake_writer()
            return None
        gap = self._tail_gaps.get(lobby)
        if gap is not None:
            gap[8] += 1
        else:
            gap = self._tail_gaps[lobby] = gap_args(bp.namespace, lobby, 1)
            self._queue.append((index, gap, 0))
        self._local_only(lobby)
        self._drop(1, why)
        self._wake_writer()
        return why

    def lost(self, lobby: str) -> None:
        """A message of ``lobby`` could not be kept (the backplane is down;
        the caller delivered it locally, without a position): count it and
        mark the gap in the lobby's history once Redis answers again (its
        offset skips one), so that a recovery across it answers
        ``recovered: false`` instead of silently missing it."""
        self.gaps[lobby] = self.gaps.get(lobby, 0) + 1
        self._local_only(lobby)
        self._drop(1, "backplane down")
        self._wake_writer()

    def _local_only(self, lobby: str) -> None:
        channel = self._backend.lobby_channel(lobby)
        if self._backend.listens(channel):
            self.local_only[channel] = self.local_only.get(channel, 0) + 1

    def _wake_writer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._write_loop(), name="wsmanager-history-writer")
        assert self._wake is not None
        self._wake.set()

    async def _write_loop(self) -> None:
        queue = self._queue
        wake = self._wake
        assert wake is not None
        bp = self._backend
        while True:
            if self.gaps and bp.up:  # mark the gaps first: they precede what is queued
                for lobby, n in self.gaps.items():
                    index = bp.shard_of(bp.lobby_channel(lobby))
                    queue.appendleft((index, gap_args(bp.namespace, lobby, n), 0))
                self.gaps = {}
            if not queue:
                wake.clear()
                if self.gaps:  # the backplane is down: look again soon
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), _GAP_RETRY)
                else:
                    await wake.wait()
                continue
            batches: dict[int, list[list[Any]]] = {}
            self._tail_gaps.clear()  # the marks sent are no longer to be grown
            for _ in range(min(len(queue), _BATCH)):
                index, args, nbytes = queue.popleft()
                if nbytes:
                    self.queued -= 1
                    self.queued_bytes -= nbytes
                batches.setdefault(index, []).append(args)
            await asyncio.gather(*(self._send(index, batch) for index, batch in batches.items()))

    async def _send(self, index: int, batch: list[list[Any]]) -> None:
        client = self._backend.shard_client(index)
        if client is None:
            self._drop_batch(batch, "backplane down")
            return
        try:
            results = await self._pipeline(client, batch)
            if any(isinstance(r, NoScriptError) for r in results):  # Redis restarted: load, resend those
                await _bounded(client.script_load(HISTORY_APPEND), self._backend.command_timeout)
                again = [a for a, r in zip(batch, results, strict=True) if isinstance(r, NoScriptError)]
                results = [r for r in results if not isinstance(r, NoScriptError)]
                results += await self._pipeline(client, again)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._drop_batch(batch, repr(exc))
            return
        failed = [a for a, r in zip(batch, results, strict=True) if isinstance(r, Exception)]
        self.published += sum(1 for r in results if not isinstance(r, Exception) and r != 0)
        if failed:
            self._drop_batch(failed, repr(next(r for r in results if isinstance(r, Exception))))

    def _drop_batch(self, batch: list[list[Any]], why: str) -> None:
        """Scripts that did not run: their messages are lost (counted) and,
        like the gaps not yet marked, become gaps to mark."""
        gaps = self.gaps
        lost = 0
        for args in batch:
            lobby = args[5]
            n = int(args[8]) if args[7] == "" else 1
            gaps[lobby] = gaps.get(lobby, 0) + n
            lost += 0 if args[7] == "" else 1
        if lost:
            self._drop(lost, why)

    async def _pipeline(self, client: aioredis.Redis, batch: list[list[Any]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for args in batch:
            pipe.evalsha(_APPEND_SHA, 2, *args)
        result: list[Any] = await _bounded(pipe.execute(raise_on_error=False), self._backend.command_timeout)
        return result

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        if self.dropped == n or self.dropped // 1000 != (self.dropped - n) // 1000:
            logger.warning("history: %d lobby message(s) lost (%s)", self.dropped, why)

    # --------------------------------------------------------------- read

    async def read(
        self, lobby: str, since: tuple[str, int] | None, user_id: str | None, size: int, ttl: float | None
    ) -> tuple[bool, str, int, list[str]]:
        """``(recovered, epoch, top, texts)`` of ``lobby`` since ``since``
        (``None``: the position only), read once this node listens to the
        lobby's channel: ``texts`` the kept messages after ``since`` (not
        those broadcast with ``exclude_user_id=user_id``); ``recovered``
        False, nothing replayed, when the epoch differs or a message needed
        is no longer kept. The backplane down, or no subscription
        confirmed within the backend's ``admission_timeout`` (the wait for
        the subscription and the script are bounded by it each):
        ``(False, "", 0, [])``. Redis errors propagate as ``RedisError``; no
        answer to the script within ``admission_timeout`` (Redis holds
        writes: CLIENT PAUSE WRITE, a long script) as
        ``asyncio.TimeoutError``: the read is part of a handshake, bounded
        as its reservation is (docs/redis-backplane.md#faults)."""
        bp = self._backend
        self.recoveries += 1
        timeout = bp.admission_timeout
        if not await bp.wait_listening(bp.lobby_channel(lobby), timeout):
            return False, "", 0, []
        index = bp.shard_of(bp.lobby_channel(lobby))
        client = bp.shard_client(index)
        if client is None:
            return False, "", 0, []
        stream, meta = history_keys(bp.namespace, lobby)
        epoch, offset = since if since is not None else ("", 0)
        args = (2, stream, meta, epoch, offset, size, ttl_ms(ttl), new_epoch())
        call: Callable[[], Awaitable[Any]] = lambda: client.evalsha(_READ_SHA, *args)  # noqa: E731
        try:
            raw = await _bounded(call(), timeout)
        except NoScriptError:
            raw = await _bounded(client.eval(HISTORY_READ, *args), timeout)
        ok, now_epoch, top = bool(raw[0]), _text(raw[1]), int(raw[2])
        texts: list[str] = []
        if ok:
            self.recovered += 1
            for i in range(3, len(raw), 2):
                if user_id is None or _text(raw[i + 1]) != user_id:
                    texts.append(_text(raw[i]))
        return ok, now_epoch, top, texts

    def totals(self) -> tuple[int, int, int]:
        """``(appended, dropped, backlog)``: messages this node's scripts kept,
        messages lost (never kept: Redis down or failing, over
        ``max_message_bytes`` or the backlog bounds), messages queued."""
        return self.published, self.dropped, self.queued

    def stats(self) -> dict[str, int]:
        return {
            "history_published": self.published,
            "history_dropped": self.dropped,
            "history_backlog": self.queued,
            "recoveries": self.recoveries,
            "recovered": self.recovered,
        }


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else str(value)
