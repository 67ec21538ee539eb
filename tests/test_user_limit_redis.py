"""``on_user_limit="replace"`` and refusal counts with the Redis backplane:
two managers ("nodes") on one event loop and a real redis-server.

Documented behaviour: a node replaces the user's connections it holds itself
(its releases go into the same Lua script as the new reservation, so the
cluster count never refuses the replacement); a user whose connections are
all on other nodes is refused with 4002 "user_limit", as with "refuse".
"""

from __future__ import annotations

import asyncio

import pytest
import redis as redis_sync

from tests.asgi_fakes import FakePeer
from tests.redis_server import RedisServer
from tests.servers import until
from tests.test_backplane import bp, cluster

pytestmark = pytest.mark.slow


def user_count(server: RedisServer, namespace: str, user: str) -> int:
    """The cluster-wide count Redis holds for ``user`` (reserved + connected)."""
    client = redis_sync.Redis.from_url(server.url)
    try:
        return int(client.hget("{" + namespace + "}:users", user) or 0)
    finally:
        client.close()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_same_node_replacement_works_with_the_backplane(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_user=1, on_user_limit="replace") as (a, b):
            ns = bp(a).namespace
            old = FakePeer()
            assert await a.connect(old.ws, "L", "u")
            new = FakePeer()
            assert await a.connect(new.ws, "L", "u")
            await settle()
            assert (old.close_code, old.close_reason) == (4003, "replaced")
            assert a._user_targets("u") == [new.ws]
            await until(lambda: user_count(redis, ns, "u") == 1, "Redis counts u once")
            await until(lambda: b.get_stats()["total_connections"] == 1, "b sees one connection")
            stats = a.get_stats()
            assert stats["closed"] == {"replaced": 1} and not any(stats["refused"].values())
            a.disconnect(new.ws)
            await until(lambda: user_count(redis, ns, "u") == 0, "Redis forgets u")

    asyncio.run(main())


def test_same_node_storm_of_50_ends_with_exactly_one_cluster_wide(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_user=1, on_user_limit="replace", max_per_lobby=100) as (a, b):
            ns = bp(a).namespace
            peers = [FakePeer(accept_yields=i % 5) for i in range(50)]
            await asyncio.gather(*(a.connect(p.ws, "L", "u") for p in peers))
            await settle()
            open_ = [p for p in peers if p.close_code is None]
            assert len(open_) == 1
            replaced = [p for p in peers if p is not open_[0]]
            assert all((p.close_code, p.close_reason) == (4003, "replaced") for p in replaced)
            stats = a.get_stats(local=True)
            assert stats["total_connections"] == 1 and stats["pending_connections"] == 0
            assert stats["closed"] == {"replaced": 49} and not any(stats["refused"].values())
            await until(lambda: user_count(redis, ns, "u") == 1, "Redis counts u once")
            await until(lambda: b.get_stats()["total_connections"] == 1, "b sees one connection")
            a.disconnect(open_[0].ws)
            await until(lambda: user_count(redis, ns, "u") == 0, "Redis forgets u")

    asyncio.run(main())


def test_across_nodes_the_policy_falls_back_to_refusing(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_user=1, on_user_limit="replace") as (a, b):
            held = FakePeer()
            assert await a.connect(held.ws, "L", "u")
            other = FakePeer()
            assert not await b.connect(other.ws, "L", "u")
            assert (other.close_code, other.close_reason) == (4002, "user_limit")
            await settle()
            assert held.close_code is None and a._user_targets("u") == [held.ws]
            # the backplane's refusal counts once, on the node that refused
            assert b.get_stats()["refused"]["user_limit"] == 1
            assert a.get_stats()["refused"]["user_limit"] == 0
            assert b.get_stats(local=True)["pending_connections"] == 0
            a.disconnect(held.ws)

    asyncio.run(main())


def test_cluster_view_refusal_of_can_accept_connection_counts_once(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_lobby=1) as (a, b):
            held = FakePeer()
            assert await a.connect(held.ws, "L", "u")
            await until(lambda: b.get_stats()["total_connections"] == 1, "b sees the connection")
            assert b.can_accept_connection("L") == (False, "lobby_full")
            assert {k: v for k, v in b.get_stats()["refused"].items() if v} == {"lobby_full": 1}
            a.disconnect(held.ws)

    asyncio.run(main())
