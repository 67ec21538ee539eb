"""The Redis backplane with two managers ("nodes") on one event loop and a real redis-server.

Each test gets its own namespace on one shared redis-server; the restart test
gets a server of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.asgi_fakes import FakePeer
from tests.redis_server import RedisServer
from tests.servers import until
from wsmanager import ConnectionManager, InMemoryBackend, backend_from_env, manager
from wsmanager.backends.redis import Publisher, RedisBackend, SyncPublisher
from wsmanager.backends.routing import lobby_channel, shard_of

pytestmark = pytest.mark.slow

# the submodule (the package's attribute `manager` is the module-level instance)
manager_module = importlib.import_module("wsmanager.manager")

_namespaces = itertools.count()


@asynccontextmanager
async def cluster(
    url: str, n: int = 2, lease: float = 1.0, **limits: Any
) -> AsyncIterator[list[ConnectionManager]]:
    ns = f"t{next(_namespaces)}"
    nodes = [
        ConnectionManager(backend=RedisBackend(url, namespace=ns, lease=lease, connect_timeout=5.0), **limits)
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


async def join(node: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await node.connect(peer.ws, lobby, user)
    return peer


def test_in_memory_is_the_default_and_needs_no_server() -> None:
    assert isinstance(manager.backend, InMemoryBackend)
    assert isinstance(ConnectionManager().backend, InMemoryBackend)
    assert isinstance(backend_from_env({}), InMemoryBackend)
    assert "backplane" not in ConnectionManager().get_stats()


def test_environment_points_the_module_manager_at_redis() -> None:
    backend = backend_from_env(
        {
            "WSMANAGER_REDIS_URL": "redis://127.0.0.1:1/0",
            "WSMANAGER_REDIS_NAMESPACE": "prod",
            "WSMANAGER_LEASE_SECONDS": "3",
        }
    )
    assert isinstance(backend, RedisBackend)
    assert (backend.url, backend.namespace, backend.lease) == ("redis://127.0.0.1:1/0", "prod", 3.0)
    assert RedisBackend().lease <= 15


def test_broadcast_and_direct_message_cross_nodes(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_encode = manager_module.encode_message

    def counting_encode(obj: Any, default: Any) -> str:
        nonlocal calls
        calls += 1
        return str(real_encode(obj, default))

    monkeypatch.setattr(manager_module, "encode_message", counting_encode)

    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            alice = await join(a, "L", "alice")
            bob = await join(b, "L", "bob")
            carol = await join(b, "L", "carol")
            await until(lambda: a.get_stats()["total_connections"] == 3, "a sees 3 connections")
            assert await a.broadcast_to_lobby("L", {"n": 1}, exclude_user_id="carol") == 2
            assert calls == 1  # serialized once, for every node
            await until(lambda: bool(bob.texts()), "bob gets the broadcast")
            assert alice.texts() == [{"n": 1}] and bob.texts() == [{"n": 1}]
            assert await b.send_to_user("alice", {"dm": "hi"})
            await until(lambda: len(alice.texts()) == 2, "alice gets the dm")
            assert alice.texts()[-1] == {"dm": "hi"}
            assert carol.texts() == []  # excluded on her node too
            assert not await a.send_to_user("nobody", {"dm": 1})

    asyncio.run(main())


def test_datetimes_and_converters_cross_nodes_as_the_same_text(redis: RedisServer) -> None:
    when = datetime.datetime(2024, 11, 28, 12, 30, 5, 123, tzinfo=datetime.timezone.utc)

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    def convert(obj: Any) -> Any:
        return {"x": obj.x} if isinstance(obj, Point) else str(obj)

    async def main() -> None:
        async with cluster(redis.url, json_default=convert) as (a, b):
            alice = await join(a, "L", "alice")
            bob = await join(b, "L", "bob")
            await until(lambda: a.get_stats()["total_connections"] == 2, "a sees 2 connections")
            assert await a.broadcast_to_lobby("L", {"at": when, "p": Point(1)}) == 2
            await until(lambda: bool(bob.texts()), "bob gets the broadcast")
            expected = '{"at":"2024-11-28T12:30:05.000123+00:00","p":{"x":1}}'
            assert alice.frames[-1]["text"] == bob.frames[-1]["text"] == expected
            assert await a.send_to_user("bob", {"p": Point(2)}, default=lambda o: [o.x])
            await until(lambda: len(bob.texts()) == 2, "bob gets the dm")
            assert bob.texts()[-1] == {"p": [2]}
            with pytest.raises(TypeError, match="default"):
                await a.broadcast_to_lobby("L", {"p": Point(3)}, default=lambda o: 1 / 0)
            assert await a.broadcast_to_lobby("L", {"n": "after"}) == 2
            await until(lambda: len(bob.texts()) == 3, "bob gets the next broadcast")
            # the refused one was neither published nor delivered
            assert [t.get("n") for t in alice.texts()] == [None, "after"]
            assert bob.texts()[1:] == [{"p": [2]}, {"n": "after"}]

    asyncio.run(main())


def test_one_publisher_messages_arrive_in_order(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            await join(a, "L", "sender")
            peers = [await join(b, "L", f"u{i}") for i in range(3)]
            await until(lambda: a.get_stats()["total_connections"] == 4, "a sees 4")
            for i in range(300):
                await a.broadcast_to_lobby("L", {"seq": i})
            await until(lambda: all(len(p.texts()) == 300 for p in peers), "300 messages each")
            for p in peers:
                assert [m["seq"] for m in p.texts()] == list(range(300))

    asyncio.run(main())


def test_presence_and_stats_answer_for_the_cluster(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            alice = await join(a, "L1", "alice")
            await join(b, "L1", "bob")
            await join(b, "L2", "bob")
            await until(lambda: a.get_stats()["total_connections"] == 3, "a sees 3")
            assert a.is_user_connected("bob")
            assert not a.is_user_connected("bob", local=True)
            assert a.get_lobby_users("L1") == {"alice", "bob"}
            assert a.get_lobby_users("L1", local=True) == {"alice"}
            stats = a.get_stats()
            seen = (stats["total_connections"], stats["active_lobbies"], stats["connected_users"])
            assert seen == (3, 2, 2)
            assert stats["local"]["total_connections"] == 1
            assert stats["backplane"]["up"] is True
            assert a.get_stats(local=True)["total_connections"] == 1
            a.disconnect(alice.ws)
            await until(lambda: not b.is_user_connected("alice"), "b sees alice leave")
            assert b.get_stats()["total_connections"] == 2

    asyncio.run(main())


def test_limits_hold_across_nodes_under_a_concurrent_storm(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_connections=12, max_per_lobby=5, max_per_user=2) as (a, b):
            peers = [FakePeer(accept_yields=3) for _ in range(40)]
            nodes = [a, b] * 20
            storm = (
                node.connect(p.ws, "busy", f"u{i}")
                for i, (node, p) in enumerate(zip(nodes, peers, strict=True))
            )
            results = await asyncio.gather(*storm)
            assert sum(results) == 5
            refused = [p for p, ok in zip(peers, results, strict=True) if not ok]
            assert all(p.close_message and p.close_message["reason"] == "lobby_full" for p in refused)
            # per-user limit, across nodes
            assert await a.connect(FakePeer().ws, "m1", "multi")
            assert await b.connect(FakePeer().ws, "m2", "multi")
            third = FakePeer()
            assert not await a.connect(third.ws, "m3", "multi")
            assert third.close_message and third.close_message["reason"] == "user_limit"
            await until(lambda: a.get_stats()["total_connections"] == 7, "7 in the cluster")
            # server-wide limit, across lobbies and nodes: 5 slots left
            more = [n.connect(FakePeer(accept_yields=2).ws, f"x{i}", f"v{i}") for i, n in enumerate(nodes)]
            assert sum(await asyncio.gather(*more)) == 5
            await until(lambda: b.get_stats()["total_connections"] == 12, "12 in the cluster")
            assert a.can_accept_connection("other") == (False, "server_full")


def test_a_node_that_stops_renewing_is_reaped_after_its_lease(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, max_per_lobby=2) as (a, b):
            await join(a, "L", "alice")
            await join(b, "L", "bob")
            await until(lambda: a.get_stats()["total_connections"] == 2, "a sees 2")
            assert not await a.connect(FakePeer().ws, "L", "carol")
            # b freezes: no renewal, no cleanup (what kill -9 leaves behind)
            task = bp(b)._task
            assert task is not None
            task.cancel()
            await until(lambda: a.get_stats()["total_connections"] == 1, "b's connection reaped")
            assert a.get_lobby_users("L") == {"alice"}
            assert await a.connect(FakePeer().ws, "L", "carol")

    asyncio.run(main())


def test_redis_restart_empty_is_survived() -> None:
    async def main(server: RedisServer) -> None:
        async with cluster(server.url) as (a, b):
            alice = await join(a, "L", "alice")
            bob = await join(b, "L", "bob")
            await until(lambda: a.get_stats()["total_connections"] == 2, "a sees 2")
            server.kill()
            await until(lambda: not bp(a).up and not bp(b).up, "both report the backplane down")
            stats = a.get_stats()
            assert stats["backplane"]["up"] is False and stats["backplane"]["last_error"]
            # local connections keep working, and answers are local
            assert await a.broadcast_to_lobby("L", {"during": "outage"}) == 1
            assert alice.texts() == [{"during": "outage"}]
            assert a.get_lobby_users("L") == {"alice"}
            late = await join(b, "L", "late")  # admitted on local limits
            server.start()  # same port, empty
            await until(lambda: bp(a).up and bp(b).up, "both back up")
            await until(lambda: a.get_stats()["total_connections"] == 3, "presence restored")
            assert a.get_lobby_users("L") == {"alice", "bob", "late"}
            await a.broadcast_to_lobby("L", {"after": "restart"})
            await until(lambda: {"after": "restart"} in bob.texts(), "bob gets it")
            await until(lambda: {"after": "restart"} in late.texts(), "late gets it")

    server = RedisServer()
    server.start()
    try:
        asyncio.run(main(server))
    finally:
        server.close()


def test_a_stopped_node_leaves_at_once_and_only_a_connect_rejoins(redis: RedisServer) -> None:
    async def main() -> None:
        async with cluster(redis.url, lease=60.0) as (a, b):  # no lease expiry within the test
            alice = await join(a, "L", "alice")
            await join(b, "L", "bob")
            await until(lambda: b.get_stats()["total_connections"] == 2, "b sees 2")
            await a.stop()  # e.g. shutdown: a leaves without waiting for its lease
            await until(lambda: b.get_stats()["total_connections"] == 1, "a's connection gone at once")
            assert await a.broadcast_to_lobby("L", {"bye": 1}) == 1  # local only, and a stays out
            assert alice.texts() == [{"bye": 1}]
            assert not bp(a).up and b.get_stats()["total_connections"] == 1
            await join(a, "L", "carol")  # a connect rejoins, with every live connection
            await until(lambda: b.get_stats()["total_connections"] == 3, "a back with alice and carol")

    asyncio.run(main())


def test_publisher_counts_connected_members_and_honours_exclude(redis: RedisServer) -> None:
    """An asyncio Publisher (no socket, no capacity) with the manager's return values."""

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    async def main() -> None:
        async with cluster(redis.url) as [n1, n2]:
            alice = await join(n1, "L", "alice")
            alice2 = await join(n2, "L", "alice")  # a second tab, on the other node
            bob = await join(n2, "L", "bob")
            ns = bp(n1).namespace

            def as_dict(p: Point) -> dict[str, int]:
                return {"x": p.x}

            async with Publisher(redis.url, namespace=ns, json_default=as_dict) as pub:
                assert repr(pub) == f"Publisher({redis.url!r}, namespace={ns!r})"
                await until(lambda: n1.get_stats()["total_connections"] == 3, "three connected")
                assert await pub.get_lobby_users("L") == {"alice", "bob"}
                assert await pub.is_user_connected("alice") and not await pub.is_user_connected("carol")
                assert await pub.broadcast_to_lobby("L", Point(1), exclude_user_id="alice") == 1
                await until(lambda: bool(bob.texts()), "bob gets it")
                assert bob.texts() == [{"x": 1}]
                assert await pub.broadcast_to_lobby("L", {"all": True}) == 3
                peers = (alice, alice2, bob)
                await until(lambda: all({"all": True} in p.texts() for p in peers), "every tab gets it")
                assert alice.texts() == [{"all": True}]  # not the excluded one
                assert await pub.send_to_user("alice", [1]) is True
                await until(lambda: [1] in alice2.texts() and [1] in alice.texts(), "both tabs")
                assert await pub.send_to_user("carol", [1]) is False
                with pytest.raises(ValueError):
                    await pub.broadcast_to_lobby("L", float("nan"))
                assert n1.get_stats()["total_connections"] == 3  # took no capacity
            n2.disconnect(bob.ws)
            with SyncPublisher([redis.url], namespace=ns) as sync:
                await until(lambda: n1.get_stats()["total_connections"] == 2, "bob gone")
                assert sync.get_lobby_users("L") == {"alice"}
                assert not sync.is_user_connected("bob")
                assert sync.broadcast_to_lobby("L", {"s": 1}) == 2
            await until(lambda: {"s": 1} in alice2.texts(), "sync publisher reaches node 2")

    asyncio.run(main())


def test_several_redis_urls_and_the_rendezvous_hash() -> None:
    """A comma list or a list; the first URL is the primary; the channel->URL map
    ignores the list's order and moves only the removed URL's channels."""
    backend = RedisBackend("redis://a:6379/0, redis://b:6379/0", namespace="n")
    assert backend.urls == ["redis://a:6379/0", "redis://b:6379/0"] and backend.url == "redis://a:6379/0"
    assert repr(backend).startswith("RedisBackend(['redis://a:6379/0', 'redis://b:6379/0'], namespace='n'")
    assert isinstance(backend_from_env({"WSMANAGER_REDIS_URL": "redis://a,redis://b"}), RedisBackend)
    with pytest.raises(ValueError, match="twice"):
        RedisBackend(["redis://a", "redis://a"])
    with pytest.raises(ValueError, match="at least one"):
        RedisBackend(" , ")
    with pytest.raises(TypeError, match="url"):
        RedisBackend([b"redis://a"])  # type: ignore[list-item]
    urls = ["redis://a", "redis://b", "redis://c"]
    channels = [lobby_channel("n", f"room{i}") for i in range(300)]
    home = {c: urls[shard_of(c, urls)] for c in channels}
    assert {c: urls[::-1][shard_of(c, urls[::-1])] for c in channels} == home
    assert len(set(home.values())) == 3
    fewer = ["redis://a", "redis://c"]
    for c in channels:
        if home[c] != "redis://b":
            assert fewer[shard_of(c, fewer)] == home[c]


def test_a_sender_that_forgot_an_idle_channels_sequence_starts_a_new_one(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequence numbers are kept per channel only while it is in use (bounded
    memory): a sender that forgot one starts again at 1; the receiver takes it
    as a new sequence, not as messages missed."""
    redis_module = importlib.import_module("wsmanager.backends.redis")

    async def main() -> None:
        async with cluster(redis.url) as (a, b):
            bob = await join(b, "L", "bob")
            await until(lambda: a.get_stats()["total_connections"] == 1, "a sees bob")
            for n in range(3):
                await a.broadcast_to_lobby("L", {"n": n})
            await until(lambda: len(bob.texts()) == 3, "bob gets 3")
            monkeypatch.setattr(redis_module, "_SEQ_IDLE", 0.0)
            bp(a)._prune_seq()
            await a.broadcast_to_lobby("L", {"n": 3})
            await until(lambda: len(bob.texts()) == 4, "bob gets the 4th")
            assert bp(b).stats()["missed"] == 0
            bp(a).max_message_bytes = 10  # the next one is dropped: a gap of 1
            await a.broadcast_to_lobby("L", {"n": 4})
            bp(a).max_message_bytes = 1 << 20
            await a.broadcast_to_lobby("L", {"n": 5})
            await until(lambda: len(bob.texts()) == 5, "bob gets the 6th")
            assert bp(b).stats()["missed"] == 1
            assert bp(a).stats()["dropped"] == bp(a).stats()["oversize"] == 1

    asyncio.run(main())


def test_a_node_reaped_while_alive_never_leaves_a_lobby_over_its_limit(redis: RedisServer) -> None:
    """Node b's lease is made to expire and a reaps it while b is alive; b
    admits a handshake at once (its reservation may find b unknown: "lost").
    Whichever comes first, b registers again and the lobby ends at its
    limit: the newcomer is refused, or closed with 1013 lease_lost."""
    import redis.asyncio as aioredis

    from wsmanager.backends._lua import REAP

    async def main() -> None:
        async with cluster(redis.url, lease=30.0, max_per_lobby=2) as (a, b):
            await join(b, "L", "bob")
            await join(a, "L", "amy")
            await until(lambda: b.get_stats()["total_connections"] == 2, "b sees both")
            r = aioredis.Redis.from_url(redis.url)
            ns = bp(b).namespace
            await r.zadd(f"{{{ns}}}:nodes", {bp(b).node_id: 0})
            await r.eval(REAP, 5, *bp(a)._keys, *bp(a)._argv, 16)  # a reaps b
            late = FakePeer()
            admitted = await b.connect(late.ws, "L", "late")
            await until(lambda: a.get_stats()["total_connections"] == 2, "back at the limit")
            await until(lambda: not admitted or late.close_message is not None, "the newcomer shed")
            if admitted:
                assert late.close_message is not None
                assert (late.close_message["code"], late.close_message["reason"]) == (1013, "lease_lost")
            assert int(await r.hget(f"{{{ns}}}:lobbies", "L") or 0) == 2
            assert bp(b).stats()["lease_losses"] == 1
            await r.aclose()

    asyncio.run(main())
