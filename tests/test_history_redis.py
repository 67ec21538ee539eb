"""History and recovery on the Redis backplane (issue 12): one stream per
lobby, offsets and epoch kept by one Lua script, recovery on any node.

Two managers ("nodes") on one event loop and a real redis-server; the same
with real uvicorn processes (kill -9, restarts) is in
tests/test_history_redis_uvicorn.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.asgi_fakes import FakePeer
from tests.redis_server import RedisServer
from tests.servers import until
from wsmanager import ConnectionManager
from wsmanager.backends.redis import Publisher, RedisBackend
from wsmanager.backends.redis_history import history_keys

pytestmark = pytest.mark.slow

_namespaces = itertools.count()


@asynccontextmanager
async def cluster(url: str | list[str], n: int = 2, **kwargs: Any) -> AsyncIterator[list[ConnectionManager]]:
    ns = f"hr{next(_namespaces)}"
    kwargs.setdefault("history_size", 100)
    nodes = [
        ConnectionManager(backend=RedisBackend(url, namespace=ns, lease=1.0, connect_timeout=5.0), **kwargs)
        for _ in range(n)
    ]
    for node in nodes:
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def bp(node: ConnectionManager) -> RedisBackend:
    assert isinstance(node.backend, RedisBackend)
    return node.backend


def notes(peer: FakePeer) -> list[int]:
    return [t["n"] for t in peer.texts() if t.get("type") == "note"]


def offsets(peer: FakePeer, lobby: str = "room") -> list[int]:
    return [t["_pos"]["offset"] for t in peer.texts() if t.get("_pos", {}).get("lobby") == lobby]


def of_type(peer: FakePeer, kind: str) -> list[dict[str, Any]]:
    return [t for t in peer.texts() if t.get("type") == kind]


async def connected(node: ConnectionManager, lobby: str, user: str, **kw: Any) -> FakePeer:
    peer = FakePeer()
    assert await node.connect(peer.ws, lobby, user, **kw)
    return peer


def test_every_member_on_every_node_sees_the_same_offsets(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            pa = await connected(a, "room", "alice")
            pb = await connected(b, "room", "bob")
            assert of_type(pa, "lobby_position")[0]["offset"] == 0
            for i in range(5):
                await (a if i % 2 else b).broadcast_to_lobby("room", {"type": "note", "n": i})
            await until(lambda: len(notes(pa)) == 5 and len(notes(pb)) == 5, "both got 5")
            assert offsets(pa) == offsets(pb) == [1, 2, 3, 4, 5]
            assert notes(pa) == notes(pb) and sorted(notes(pa)) == [0, 1, 2, 3, 4]  # one order for all
            epochs = {t["_pos"]["epoch"] for t in pa.texts() + pb.texts() if "_pos" in t}
            assert len(epochs) == 1 and epochs == {of_type(pb, "lobby_position")[0]["epoch"]}

    asyncio.run(main())


def test_offline_for_n_messages_gets_them_on_the_other_node_then_live_ones(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            watcher = await connected(a, "room", "watcher")
            p1 = await connected(a, "room", "carol")
            await a.broadcast_to_lobby("room", {"type": "note", "n": 0})
            await until(lambda: notes(p1) == [0], "carol got 0")
            last = p1.texts()[-1]["_pos"]
            a.disconnect(p1.ws)
            for i in range(1, 8):  # offline for 7
                await a.broadcast_to_lobby("room", {"type": "note", "n": i})
            await until(lambda: len(notes(watcher)) == 8, "the watcher got 8")
            p2 = await connected(b, "room", "carol", since=(last["epoch"], last["offset"]))
            await b.broadcast_to_lobby("room", {"type": "note", "n": 8})
            await until(lambda: 8 in notes(p2), "carol got the live one")
            assert notes(p2) == list(range(1, 9))
            (rec,) = of_type(p2, "recovery")
            assert rec["recovered"] is True and rec["offset"] == 8
            kinds = [t["type"] for t in p2.texts()]
            assert kinds.index("recovery") == 7  # after the 7 replayed, before the live one

    asyncio.run(main())


def test_recovered_false_when_the_gap_exceeds_the_history(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, history_size=3) as (a, b):
            p1 = await connected(a, "room", "dave")
            pos = of_type(p1, "lobby_position")[0]
            for i in range(4):
                await a.broadcast_to_lobby("room", {"type": "note", "n": i})
            await until(lambda: len(notes(p1)) == 4, "dave got 4")
            a.disconnect(p1.ws)
            for i in range(4, 8):
                await a.broadcast_to_lobby("room", {"type": "note", "n": i})
            p2 = await connected(b, "room", "dave", since=(pos["epoch"], 4))  # missed 4 > 3
            (rec,) = of_type(p2, "recovery")
            assert rec["recovered"] is False and notes(p2) == []
            p3 = await connected(b, "room", "erin", since=(pos["epoch"], 5))  # missed 3: kept
            assert notes(p3) == [5, 6, 7] and of_type(p3, "recovery")[0]["recovered"] is True
            p4 = await connected(b, "room", "fred", since=("otherepoch", 5))
            assert notes(p4) == [] and of_type(p4, "recovery")[0]["recovered"] is False

    asyncio.run(main())


def test_excluded_user_is_not_replayed_what_it_was_excluded_from(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            p1 = await connected(a, "room", "gus")
            pos = of_type(p1, "lobby_position")[0]
            a.disconnect(p1.ws)
            await a.broadcast_to_lobby("room", {"type": "note", "n": 1})
            await a.broadcast_to_lobby("room", {"type": "note", "n": 2}, exclude_user_id="gus")
            await a.broadcast_to_lobby("room", {"type": "note", "n": 3})
            p2 = await connected(b, "room", "gus", since=(pos["epoch"], pos["offset"]))
            assert notes(p2) == [1, 3] and of_type(p2, "recovery")[0]["recovered"] is True

    asyncio.run(main())


def test_concurrent_publishing_during_recovery_no_gap_no_duplicate(redis: RedisServer) -> None:
    """Two publishers (a node and a Publisher process-alike) keep broadcasting
    while clients reconnect to the other node, again and again: each client
    sees offsets strictly increasing by one from its position."""

    async def main() -> None:
        async with cluster(redis.url, history_size=100_000) as (a, b):
            ns = bp(a).namespace
            stop = asyncio.Event()

            async def publish_from_node() -> None:
                i = 0
                while not stop.is_set():
                    await a.broadcast_to_lobby("room", {"type": "note", "n": i})
                    i += 1
                    await asyncio.sleep(0.001)

            async def publish_from_worker() -> None:
                async with Publisher(redis.url, namespace=ns, history_size=100_000) as pub:
                    while not stop.is_set():
                        await pub.broadcast_to_lobby("room", {"type": "note", "n": -1})
                        await asyncio.sleep(0.001)

            tasks = [asyncio.create_task(publish_from_node()), asyncio.create_task(publish_from_worker())]
            try:
                for round_ in range(12):
                    first = await connected(a, "room", f"u{round_}")
                    await until(lambda p=first: len(offsets(p)) >= 3, "a few live messages")  # type: ignore[misc]
                    pos = first.texts()[-1]["_pos"]
                    a.disconnect(first.ws)
                    await asyncio.sleep(0.005 * (round_ % 3))
                    second = await connected(b, "room", f"u{round_}", since=(pos["epoch"], pos["offset"]))
                    await until(lambda p=second: len(offsets(p)) >= 10, "replay then live")  # type: ignore[misc]
                    seen = offsets(second)
                    assert seen == list(range(pos["offset"] + 1, pos["offset"] + 1 + len(seen))), seen
                    (rec,) = of_type(second, "recovery")
                    assert rec["recovered"] is True
                    b.disconnect(second.ws)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

    asyncio.run(main())


# -- join(since=) with a clustered backend -----------------------------------


def test_join_with_since_on_the_other_node_replays_what_was_missed_then_live_ones(redis: RedisServer) -> None:
    """A connection of node B joins "room" (a lobby node B has no member
    of, so no subscription yet) with the position it had on node A: it gets
    exactly what it missed, in order, the recovery message, then live ones;
    a join with another epoch gets ``recovered: false``, one while a member
    replays nothing."""

    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            watcher = await connected(a, "room", "watcher")
            p1 = await connected(a, "home", "hana")
            assert await a.join(p1.ws, "room")
            await a.broadcast_to_lobby("room", {"type": "note", "n": 0})
            await until(lambda: notes(p1) == [0], "hana got 0")
            last = [t for t in p1.texts() if t.get("type") == "note"][-1]["_pos"]
            a.disconnect(p1.ws)
            for i in range(1, 6):  # offline for 5
                await a.broadcast_to_lobby("room", {"type": "note", "n": i})
            await until(lambda: len(notes(watcher)) == 6, "the watcher got 6")
            p2 = await connected(b, "home", "hana")
            assert await b.join(p2.ws, "room", since=(last["epoch"], last["offset"]))
            await a.broadcast_to_lobby("room", {"type": "note", "n": 6})
            await until(lambda: 6 in notes(p2), "hana got the live one")
            assert notes(p2) == [1, 2, 3, 4, 5, 6]
            assert offsets(p2) == [2, 3, 4, 5, 6, 7]
            (rec,) = of_type(p2, "recovery")
            assert rec == {
                "type": "recovery",
                "lobby": "room",
                "recovered": True,
                "epoch": last["epoch"],
                "offset": 6,
            }
            kinds = [
                t["type"] for t in p2.texts() if t.get("lobby", t.get("_pos", {}).get("lobby")) == "room"
            ]
            assert kinds == ["note"] * 5 + ["recovery", "note"]
            # a member already: it missed nothing, nothing replayed
            assert await b.join(p2.ws, "room", since=(last["epoch"], 0))
            assert len(of_type(p2, "recovery")) == 1 and notes(p2) == [1, 2, 3, 4, 5, 6]
            # another epoch: recovered false, nothing replayed, live ones after
            p3 = await connected(b, "home", "ivan")
            assert await b.join(p3.ws, "room", since=("otherepoch12", 3))
            (rec3,) = of_type(p3, "recovery")
            assert rec3["recovered"] is False and rec3["offset"] == 7 and notes(p3) == []
            await b.broadcast_to_lobby("room", {"type": "note", "n": 7})
            await until(lambda: notes(p3) == [7] and 7 in notes(p2), "both got 7")

    asyncio.run(main())


def test_join_with_since_racing_broadcasts_from_both_nodes_sees_each_offset_once(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, history_size=10_000) as (a, b):
            stop = asyncio.Event()

            async def publisher(node: ConnectionManager) -> None:
                i = 0
                while not stop.is_set():
                    await node.broadcast_to_lobby("room", {"type": "note", "n": i})
                    i += 1
                    await asyncio.sleep(0.001)

            watcher = await connected(a, "room", "watcher")
            tasks = [asyncio.create_task(publisher(a)), asyncio.create_task(publisher(b))]
            try:
                for round_ in range(6):
                    want = 5 * (round_ + 1)
                    await until(lambda w=want: len(offsets(watcher)) >= w, "more messages")  # type: ignore[misc]
                    pos = [t for t in watcher.texts() if "_pos" in t][-1]["_pos"]
                    peer = await connected(b if round_ % 2 else a, "home", f"j{round_}")
                    node = b if round_ % 2 else a
                    assert await node.join(peer.ws, "room", since=(pos["epoch"], pos["offset"]))
                    await until(lambda p=peer: len(offsets(p)) >= 10, "replay then live")  # type: ignore[misc]
                    seen = offsets(peer)
                    assert seen == list(range(pos["offset"] + 1, pos["offset"] + 1 + len(seen))), seen
                    (rec,) = of_type(peer, "recovery")
                    assert rec["recovered"] is True
            finally:
                stop.set()
                await asyncio.gather(*tasks)

    asyncio.run(main())


def test_get_stats_history_counts_appends_and_recoveries_with_redis(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, history_size=3) as (a, b):
            p1 = await connected(a, "room", "kim")
            pos = of_type(p1, "lobby_position")[0]
            for i in range(4):
                await a.broadcast_to_lobby("room", {"type": "note", "n": i})
            await b.broadcast_to_lobby("room", {"type": "note", "n": 4})
            await until(lambda: len(notes(p1)) == 5, "kim got 5")
            await until(lambda: a.get_stats()["history"]["appended"] == 4, "a's appends confirmed")
            await until(lambda: b.get_stats()["history"]["appended"] == 1, "b's append confirmed")
            await connected(b, "room", "lee", since=(pos["epoch"], 3))  # missed 2: replayed
            await connected(b, "room", "max", since=(pos["epoch"], 0))  # missed 5 > 3 kept
            got = b.get_stats()["history"]
            assert (got["recoveries"], got["recovered"], got["not_recovered"], got["replayed"]) == (
                2,
                1,
                1,
                2,
            )
            assert (got["lobbies"], got["entries"], got["bytes"], got["dropped"], got["backlog"]) == (
                0,
                0,
                0,
                0,
                0,
            )

    asyncio.run(main())


# -- broadcasting while the backplane is down -------------------------------


def test_a_broadcast_while_redis_is_down_reaches_local_members_and_is_a_gap_recovery_reports() -> None:
    """docs/history.md, Outages: with Redis stopped, a broadcast reaches this
    node's members without a position and is not kept; it is counted in
    ``get_stats()["history"]["dropped"]`` and, once Redis is back (here with
    its data: saved, stopped, started again), the lobby's offset skips it, so
    a client that missed it gets ``recovered: false``, never a silent gap."""

    async def main(server: RedisServer) -> None:
        async with cluster(server.url) as (a, b):
            pa = await connected(a, "room", "ann")
            pb = await connected(b, "room", "ben")
            for i in (1, 2):
                await a.broadcast_to_lobby("room", {"type": "note", "n": i})
            await until(lambda: notes(pa) == notes(pb) == [1, 2], "both got 1, 2")
            epoch = pb.texts()[-1]["_pos"]["epoch"]
            client = aioredis.from_url(server.url)
            await client.save()
            await client.aclose()
            server.kill()
            await until(lambda: not bp(a).up and not bp(b).up, "both see the backplane down")
            assert await a.broadcast_to_lobby("room", {"type": "note", "n": 3}) == 1  # ann only
            assert pa.texts()[-1] == {"type": "note", "n": 3}  # no position: it is not kept
            assert a.get_stats()["history"]["dropped"] == 1
            server.start()  # loads the saved data: the same epoch, offset 2
            await until(lambda: bp(a).up and bp(b).up, "both back up")
            _stream, meta = history_keys(bp(a).namespace, "room")
            client = aioredis.from_url(server.url)
            try:
                await until_async(lambda: client.hget(meta, "o"), b"3", "the gap marked: offset 3 skipped")
                assert await client.hget(meta, "e") == epoch.encode()
            finally:
                await client.aclose()
            b.disconnect(pb.ws)
            again = await connected(b, "room", "ben", since=(epoch, 2))
            (rec,) = of_type(again, "recovery")
            assert rec == {
                "type": "recovery",
                "lobby": "room",
                "recovered": False,
                "epoch": epoch,
                "offset": 3,
            }
            assert notes(again) == []
            await b.broadcast_to_lobby("room", {"type": "note", "n": 4})
            await until(lambda: notes(again) == [4] and notes(pa)[-1] == 4, "live again, on both nodes")
            assert offsets(again) == [4]
            late = await connected(a, "room", "cy", since=(epoch, 3))  # after the gap: recoverable
            assert of_type(late, "recovery")[0]["recovered"] is True and offsets(late) == [4]
            stats = a.get_stats()["history"]
            assert stats["dropped"] == 1 and stats["backlog"] == 0

    server = RedisServer()
    server.start()
    try:
        asyncio.run(main(server))
    finally:
        server.close()


async def until_async(read: Callable[[], Any], want: Any, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await read() != want:
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)
