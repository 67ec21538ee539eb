"""Rooms on the Redis backplane (issue 11): memberships cluster-wide, with two
managers ("nodes") on one event loop and a real redis-server.

The same behaviours with real uvicorn processes are in
tests/test_backplane_uvicorn.py; these are the quick ones, and the ones that
need to look inside a node (its view, its channels, Redis' keys).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.asgi_fakes import FakePeer
from tests.redis_server import RedisServer
from tests.servers import until
from wsmanager import ConnectionManager
from wsmanager.backends.redis import Publisher, RedisBackend

pytestmark = pytest.mark.slow

_namespaces = itertools.count()


@asynccontextmanager
async def cluster(url: str, n: int = 2, **kwargs: Any) -> AsyncIterator[list[ConnectionManager]]:
    ns = f"rr{next(_namespaces)}"
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


async def connected(node: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await node.connect(peer.ws, lobby, user)
    return peer


def chat(peer: FakePeer) -> list[Any]:
    return [t for t in peer.texts() if t.get("type") != "presence"]


async def shard_subscribers(port: int, channel: bytes) -> int:
    client = aioredis.Redis(port=port)
    try:
        return int((await client.pubsub_shardnumsub(channel))[0][1])
    finally:
        await client.aclose()


def test_one_connection_in_three_lobbies_gets_each_remote_broadcast_once(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            x = await connected(a, "L1", "xavier")
            assert await a.join(x.ws, "L2") and await a.join(x.ws, "L3")
            others = [await connected(b, lobby, f"m-{lobby}") for lobby in ("L1", "L2", "L3")]
            await until(lambda: b.get_lobby_users("L3") == {"xavier", "m-L3"}, "b sees xavier in L3")
            for lobby in ("L1", "L2", "L3"):
                assert await b.broadcast_to_lobby(lobby, {"to": lobby}) == 2
            await until(lambda: len(chat(x)) == 3, "xavier gets three broadcasts")
            assert sorted(m["to"] for m in chat(x)) == ["L1", "L2", "L3"]
            for peer, lobby in zip(others, ("L1", "L2", "L3"), strict=True):
                assert chat(peer) == [{"to": lobby}]
            stats = b.get_stats()
            assert (stats["total_connections"], stats["active_lobbies"]) == (4, 3)
            # one connection, three channels of lobbies plus its user's
            assert bp(a).subscribed_channels() == {
                bp(a).lobby_channel("L1"),
                bp(a).lobby_channel("L2"),
                bp(a).lobby_channel("L3"),
                bp(a).user_channel("xavier"),
            }
            # the Publisher reads the joined members too
            async with Publisher(redis.url, namespace=bp(a).namespace) as pub:
                assert await pub.get_lobby_users("L2") == {"xavier", "m-L2"}
            a.leave(x.ws, "L2")
            await until(lambda: b.get_lobby_users("L2") == {"m-L2"}, "b sees xavier leave L2")
            await until(lambda: bp(a).lobby_channel("L2") not in bp(a).subscribed_channels(), "a drops L2")
            assert await shard_subscribers(redis.port, bp(a).lobby_channel("L2")) == 1
            async with Publisher(redis.url, namespace=bp(a).namespace) as pub:
                assert await pub.get_lobby_users("L2") == {"m-L2"}
            assert await b.broadcast_to_lobby("L2", {"after": "leave"}) == 1
            a.disconnect(x.ws)
            await until(lambda: b.get_lobby_users("L3") == {"m-L3"}, "disconnect ends every membership")
            assert b.get_stats()["total_connections"] == 3

    asyncio.run(main())


def test_a_join_storm_over_two_nodes_admits_exactly_max_per_lobby(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_connections=100, max_per_lobby=5) as (a, b):
            nodes = [a, b] * 10
            peers = [await connected(node, f"home{i}", f"u{i}") for i, node in enumerate(nodes)]
            results = await asyncio.gather(
                *(node.join(p.ws, "busy") for node, p in zip(nodes, peers, strict=True))
            )
            assert sum(results) == 5
            await until(lambda: len(a.get_lobby_users("busy")) == 5, "a sees 5 members")
            refused = a.get_stats()["refused"]["lobby_full"] + b.get_stats()["refused"]["lobby_full"]
            assert refused == 15
            # a connect counts memberships too, cluster-wide
            assert not await a.connect(FakePeer().ws, "busy", "late")
            # a leave frees a membership for the next join
            member = next(p for p, ok in zip(peers, results, strict=True) if ok)
            owner = nodes[peers.index(member)]
            owner.leave(member.ws, "busy")
            loser = next(p for p, ok in zip(peers, results, strict=True) if not ok)
            assert await nodes[peers.index(loser)].join(loser.ws, "busy")

    asyncio.run(main())


def test_a_frozen_nodes_memberships_are_freed_after_its_lease(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_lobby=2) as (a, b):
            alice = await connected(a, "home-a", "alice")
            bob = await connected(b, "home-b", "bob")
            assert await a.join(alice.ws, "L") and await b.join(bob.ws, "L")
            assert not await a.join((await connected(a, "home-c", "carol")).ws, "L")
            task = bp(b)._task  # b freezes: no renewal, no cleanup (what kill -9 leaves behind)
            assert task is not None
            task.cancel()
            await until(lambda: a.get_lobby_users("L") == {"alice"}, "b's membership reaped")
            dave = await connected(a, "home-d", "dave")
            assert await a.join(dave.ws, "L")

    asyncio.run(main())


def test_presence_diffs_cover_both_nodes_and_tabs(redis: RedisServer) -> None:
    """Node a's watcher learns of joins and leaves that happen only on node b."""

    async def main() -> None:
        async with cluster(redis.url, presence_events=True, presence_interval=60) as (a, b):
            pa = a.presence
            assert pa is not None
            watcher = await connected(a, "home", "watcher")
            assert await a.join(watcher.ws, "P")
            pa.flush()
            tab1 = await connected(b, "home-b", "alice")
            assert await b.join(tab1.ws, "P")  # on b only
            await until(lambda: a.get_lobby_users("P") == {"watcher", "alice"}, "a sees alice join")
            pa.flush()
            tab2 = await connected(a, "home", "alice")
            assert await a.join(tab2.ws, "P")  # alice's second tab: no new join
            pa.flush()
            b.leave(tab1.ws, "P")  # alice still in P through tab2 on a
            await until(lambda: bp(a).view.lobby_user_count("P", "alice") == 1, "a sees tab1 leave")
            pa.flush()
            bob = await connected(b, "P", "bob")  # on b only
            await until(lambda: "bob" in a.get_lobby_users("P"), "a sees bob")
            pa.flush()
            b.disconnect(bob.ws)  # on b only
            await until(lambda: "bob" not in a.get_lobby_users("P"), "a sees bob leave")
            pa.flush()
            a.disconnect(tab2.ws)  # now alice leaves P
            pa.flush()
            diffs = [t for t in watcher.texts() if t.get("type") == "presence" and t["lobby"] == "P"]
            assert [(d["joins"], d["leaves"]) for d in diffs if "state" not in d] == [
                (["watcher"], []),
                (["alice"], []),
                (["bob"], []),
                ([], ["bob"]),
                ([], ["alice"]),
            ]

    asyncio.run(main())


def test_memberships_survive_a_redis_restart() -> None:
    async def main(server: RedisServer) -> None:
        async with cluster(server.url, max_per_lobby=2) as (a, b):
            alice = await connected(a, "home-a", "alice")
            bob = await connected(b, "home-b", "bob")
            assert await a.join(alice.ws, "L")
            server.kill()
            await until(lambda: not bp(a).up and not bp(b).up, "both report the backplane down")
            assert await b.join(bob.ws, "L")  # admitted on local limits
            assert b.get_stats()["backplane"]["local_admissions"] == 1
            server.start()  # same port, empty
            await until(lambda: bp(a).up and bp(b).up, "both back up")
            await until(lambda: a.get_lobby_users("L") == {"alice", "bob"}, "memberships rewritten")
            assert not await a.join((await connected(a, "home-c", "carol")).ws, "L")  # full again
            await a.broadcast_to_lobby("L", {"after": "restart"})
            await until(lambda: {"after": "restart"} in bob.texts(), "bob gets it through his join")
            assert await shard_subscribers(server.port, bp(a).lobby_channel("L")) == 2

    server = RedisServer()
    server.start()
    try:
        asyncio.run(main(server))
    finally:
        server.close()


def test_a_cancelled_join_leaves_no_membership_behind(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_lobby=1) as (a, b):
            x = await connected(a, "home-x", "xavier")
            task = asyncio.ensure_future(a.join(x.ws, "L"))
            await asyncio.sleep(0)  # queued for Redis, not answered yet
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert a.lobbies_of(x.ws) == {"home-x"}
            assert bp(a).lobby_channel("L") not in bp(a).subscribed_channels()
            y = await connected(b, "home-y", "yann")
            assert await b.join(y.ws, "L")  # the slot was not kept by the cancelled join
            await until(lambda: a.get_lobby_users("L") == {"yann"}, "a sees only yann in L")

    asyncio.run(main())
