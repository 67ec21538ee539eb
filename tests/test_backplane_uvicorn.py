"""Two uvicorn processes running the seed's endpoint, one real redis-server, real clients.

The app is tests/cluster_app.py: the seed's endpoint unchanged, its module-level
``manager`` pointed at Redis by ``WSMANAGER_REDIS_URL`` (a 1 s lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from tests.redis_server import RedisServer, redis_server
from tests.servers import attempt_ws, uvicorn_server
from wsmanager.backends.routing import lobby_channel, shard_of

pytestmark = pytest.mark.slow

_namespaces = itertools.count()


@contextlib.contextmanager
def nodes(url: str, n: int = 2, namespace: str = "") -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    """``n`` uvicorn nodes of one fresh cluster (``url`` may be a comma list)."""
    env = {
        "WSMANAGER_REDIS_URL": url,
        "WSMANAGER_REDIS_NAMESPACE": namespace or f"uv{next(_namespaces)}",
        "WSMANAGER_LEASE_SECONDS": "1",
    }
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(uvicorn_server("tests.cluster_app:app", env=env)) for _ in range(n)]


async def get(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


async def wait_for(port: int, path: str, check: Any, what: str, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await get(port, path)
        if check(got):
            return got
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}; last answer {got}")
        await asyncio.sleep(0.05)


def total_is(n: int) -> Any:
    return lambda s: s["total_connections"] == n and s["backplane"]["up"]


def url(port: int, lobby: str, user: str) -> str:
    return f"ws://127.0.0.1:{port}/ws/{lobby}?token=user:{user}"


async def recv(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


def test_broadcast_and_direct_message_cross_two_processes(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        async with connect(url(p1, "L", "alice")) as alice, connect(url(p2, "L", "bob")) as bob:
            await wait_for(p1, "/stats", total_is(2), "node 1 sees both")
            await alice.send(json.dumps({"type": "chat", "text": "héllo"}))
            assert await recv(bob) == {"type": "chat", "from": "alice", "text": "héllo"}
            assert (await recv(alice))["from"] == "alice"
            await bob.send(json.dumps({"type": "dm", "to": "alice", "text": "psst"}))
            assert await recv(alice) == {"type": "dm", "from": "bob", "text": "psst"}
            assert await get(p1, "/presence/bob") == {"cluster": True, "local": False}
            assert await get(p1, "/lobby/L") == {"cluster": ["alice", "bob"], "local": ["alice"]}
        await wait_for(p2, "/stats", total_is(0), "both gone, seen from node 2")

    with nodes(redis.url) as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


async def attempt(port: int, lobby: str, user: str) -> ClientConnection | int:
    """A client: its open connection, or the close code / HTTP status it was refused with."""
    return await attempt_ws(url(port, lobby, user))


def test_lobby_limit_holds_under_a_storm_spread_over_both_nodes(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        results = await asyncio.gather(*(attempt((p1, p2)[i % 2], "busy", f"u{i}") for i in range(30)))
        admitted = [r for r in results if not isinstance(r, int)]
        assert len(admitted) == 10  # the seed's max_per_lobby, cluster-wide
        for port in (p1, p2):
            s = await wait_for(port, "/stats", total_is(10), "10 connections in the cluster")
            assert s["active_lobbies"] == 1
        for ws in admitted:
            await ws.close()

    with nodes(redis.url) as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


def test_kill_9_of_a_node_frees_its_capacity_within_the_lease(redis: RedisServer) -> None:
    async def main(p1: int, p2: int, victim: subprocess.Popen[bytes]) -> None:
        clients = [await connect(url((p1, p2)[i % 2], "full", f"u{i}")) for i in range(10)]
        await wait_for(p1, "/stats", total_is(10), "lobby full")
        assert await attempt(p1, "full", "late") in (403, 4002)
        victim.kill()  # SIGKILL: no cleanup at all
        victim.wait()
        # the reap's presence change (on the bus) may reach node 1's view before
        # the reply of its REAP script is counted: wait for both
        s = await wait_for(
            p1,
            "/stats",
            lambda s: total_is(5)(s) and s["backplane"]["reaped_nodes"] >= 1,
            "node 2's connections reclaimed and counted",
        )
        assert s["backplane"]["reaped_nodes"] == 1
        late = await attempt(p1, "full", "late")
        assert not isinstance(late, int)
        await late.close()
        for ws in clients:
            with contextlib.suppress(Exception):
                await ws.close()

    with nodes(redis.url) as [(p1, _), (p2, victim)]:
        asyncio.run(main(p1, p2, victim))


def test_a_redis_restart_is_survived() -> None:
    async def main(server: RedisServer, p1: int, p2: int) -> None:
        async with (
            connect(url(p1, "L", "alice")) as alice,
            connect(url(p1, "L", "amy")) as amy,
            connect(url(p2, "L", "bob")) as bob,
        ):
            await wait_for(p2, "/stats", total_is(3), "node 2 sees all three")
            server.kill()
            for port in (p1, p2):
                s = await wait_for(port, "/stats", lambda s: not s["backplane"]["up"], "backplane down")
                assert s["backplane"]["last_error"]
            # local traffic keeps flowing during the outage
            await alice.send(json.dumps({"type": "chat", "text": "still here"}))
            assert (await recv(amy))["text"] == "still here"
            assert (await recv(alice))["text"] == "still here"
            server.start()  # the same port, empty
            for port in (p1, p2):
                await wait_for(port, "/stats", total_is(3), "presence restored")
            # both nodes listen to lobby L again (sharded pub/sub on Redis 7)
            assert await subscribers(server.port, "rs:l:L") == 2
            await bob.send(json.dumps({"type": "chat", "text": "back"}))
            assert (await recv(alice))["text"] == "back"
            assert (await recv(amy))["text"] == "back"

    server = RedisServer()
    server.start()
    try:
        with nodes(server.url, namespace="rs") as [(p1, _), (p2, _)]:
            asyncio.run(main(server, p1, p2))
    finally:
        server.close()


def test_the_multiworker_example_runs_on_four_workers(redis: RedisServer) -> None:
    env = {"REDIS_URL": redis.url, "CHAT_NAMESPACE": f"ex{next(_namespaces)}", "WSMANAGER_LEASE_SECONDS": "2"}

    async def main(port: int) -> None:
        base = f"ws://127.0.0.1:{port}/ws/room?user="
        clients: list[ClientConnection] = []
        pids: set[int] = set()
        while len(clients) < 8 or (len(pids) < 2 and len(clients) < 40):  # until two workers hold sockets
            ws = await connect(base + f"u{len(clients)}")
            pids.add((await recv(ws))["worker_pid"])
            clients.append(ws)
        assert len(pids) >= 2
        n = len(clients)
        stats = await wait_for(port, "/stats", lambda s: s["total_connections"] == n, "all in the cluster")
        assert stats["backplane"]["up"]
        await clients[0].send(json.dumps({"type": "chat", "text": "to everyone"}))
        for ws in clients:
            while (msg := await recv(ws))["type"] != "chat":
                pass
            assert msg == {"type": "chat", "from": "u0", "text": "to everyone"}
        await clients[7].send(json.dumps({"type": "dm", "to": "u3", "text": "just you"}))
        while (msg := await recv(clients[3]))["type"] != "dm":
            pass
        assert msg["text"] == "just you"
        for ws in clients:
            await ws.close()

    with uvicorn_server("examples.multiworker.app:app", env=env, extra_args=["--workers", "4"]) as (port, _):
        asyncio.run(main(port))


async def subscribers(redis_port: int, channel: str) -> int:
    """Nodes subscribed to ``channel`` on that Redis, as Redis reports them."""
    client = aioredis.Redis(port=redis_port)
    try:
        info = await client.info("server")
        sharded = int(str(info["redis_version"]).split(".")[0]) >= 7
        if sharded:
            reply = await client.pubsub_shardnumsub(channel)
        else:
            reply = await client.pubsub_numsub(channel)
        return int(reply[0][1])
    finally:
        await client.aclose()


async def wait_subscribers(redis_port: int, channel: str, n: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while (got := await subscribers(redis_port, channel)) != n:
        if loop.time() > deadline:
            raise AssertionError(f"{channel}: {got} subscribers, expected {n}")
        await asyncio.sleep(0.05)


def test_a_node_receives_only_the_lobbies_it_serves(redis: RedisServer) -> None:
    """Node 1 serves lobby A only; 20 messages of lobby B between nodes 2 and 3
    never reach it (not subscribed on Redis, nothing received), A's do."""

    async def main(p1: int, p2: int, p3: int) -> None:
        async with (
            connect(url(p1, "A", "alice")) as alice,
            connect(url(p2, "A", "xavier")) as xavier,
            connect(url(p2, "B", "bob")) as bob,
            connect(url(p3, "B", "carol")) as carol,
        ):
            for port in (p1, p2, p3):
                await wait_for(port, "/stats", total_is(4), "every node sees the four")
            assert await subscribers(redis.port, "only:l:A") == 2
            assert await subscribers(redis.port, "only:l:B") == 2
            assert await subscribers(redis.port, "only:u:alice") == 1
            before = (await get(p1, "/stats"))["backplane"]
            for i in range(20):
                await bob.send(json.dumps({"type": "chat", "text": f"b{i}"}))
            for i in range(20):
                assert (await recv(carol))["text"] == f"b{i}"
            await xavier.send(json.dumps({"type": "chat", "text": "to A"}))
            assert (await recv(alice)) == {"type": "chat", "from": "xavier", "text": "to A"}
            after = (await get(p1, "/stats"))["backplane"]
            assert after["received"] - before["received"] == 1  # A's message only
            assert after["received_bytes"] > before["received_bytes"]
            three = (await get(p3, "/stats"))["backplane"]
            assert three["received"] == 20  # B's messages, not A's
            await alice.close()
            await wait_subscribers(redis.port, "only:l:A", 1)  # node 1 left A's channel
            await wait_subscribers(redis.port, "only:u:alice", 0)
            assert (await get(p1, "/stats"))["backplane"]["channels"] == 0

    with nodes(redis.url, n=3, namespace="only") as [(p1, _), (p2, _), (p3, _)]:
        asyncio.run(main(p1, p2, p3))


def test_channels_spread_over_two_redis_servers() -> None:
    """WSMANAGER_REDIS_URL with two URLs: each lobby's channel lives on the
    Redis the rendezvous hash picks, and broadcasts cross nodes on both."""
    with redis_server() as first, redis_server() as second:
        urls = [first.url, second.url]
        lobbies = [f"room{i}" for i in range(8)]
        homes = {lobby: shard_of(lobby_channel("two", lobby), urls) for lobby in lobbies}
        assert set(homes.values()) == {0, 1}  # both servers carry some

        async def main(p1: int, p2: int) -> None:
            pairs = []
            for lobby in lobbies:
                pairs.append(
                    (await connect(url(p1, lobby, f"a-{lobby}")), await connect(url(p2, lobby, f"b-{lobby}")))
                )
            await wait_for(p1, "/stats", total_is(16), "all sixteen in the cluster")
            await wait_for(p2, "/stats", total_is(16), "all sixteen in the cluster")
            for lobby, (a, b) in zip(lobbies, pairs, strict=True):
                home, other = (first, second) if homes[lobby] == 0 else (second, first)
                assert await subscribers(home.port, f"two:l:{lobby}") == 2
                assert await subscribers(other.port, f"two:l:{lobby}") == 0
                await a.send(json.dumps({"type": "chat", "text": lobby}))
                assert (await recv(b))["text"] == lobby
            for a, b in pairs:
                await a.close()
                await b.close()

        with nodes(",".join(urls), namespace="two") as [(p1, _), (p2, _)]:
            asyncio.run(main(p1, p2))


def publish(redis_url: str, namespace: str, *args: str) -> str:
    """Run examples/multiworker/publish.py in a process of its own; its output."""
    env = {**os.environ, "REDIS_URL": redis_url, "CHAT_NAMESPACE": namespace}
    cmd = [sys.executable, "-m", "examples.multiworker.publish", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_a_publisher_in_another_process_reaches_members_on_two_nodes(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        async with (
            connect(url(p1, "L", "alice")) as alice,
            connect(url(p2, "L", "bob")) as bob,
            connect(url(p2, "M", "carol")) as carol,
        ):
            await wait_for(p1, "/stats", total_is(3), "node 1 sees the three")
            loop = asyncio.get_running_loop()
            # asyncio Publisher
            out = await loop.run_in_executor(None, publish, redis.url, "pub", "L", "hello")
            assert out == "delivered to 2 connection(s) of ['alice', 'bob']"
            for ws in (alice, bob):
                assert await recv(ws) == {"type": "chat", "from": "server", "text": "hello"}
            # SyncPublisher from a plain script
            out = await loop.run_in_executor(None, publish, redis.url, "pub", "--sync", "L", "again")
            assert out == "delivered to 2 connection(s) of ['alice', 'bob']"
            for ws in (alice, bob):
                assert (await recv(ws))["text"] == "again"
            args = ("--sync", "--user", "carol", "x", "dm")
            out = await loop.run_in_executor(None, publish, redis.url, "pub", *args)
            assert out == "online: True"
            # carol (lobby M) got the direct message first: none of L's broadcasts
            assert await recv(carol) == {"type": "dm", "from": "server", "text": "dm"}
            out = await loop.run_in_executor(None, publish, redis.url, "pub", "--user", "nobody", "x", "dm")
            assert out == "online: False"
            out = await loop.run_in_executor(None, publish, redis.url, "pub", "empty", "to no one")
            assert out == "delivered to 0 connection(s) of []"

    with nodes(redis.url, namespace="pub") as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


# ------------------------------------------------------------------ rooms
# tests/rooms_cluster_app.py: connections join and leave lobbies, presence on


@contextlib.contextmanager
def room_nodes(
    redis_url: str, n: int = 2, namespace: str = "", **settings: str
) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    """``n`` uvicorn nodes of tests/rooms_cluster_app.py in one fresh cluster."""
    env = {
        "WSMANAGER_REDIS_URL": redis_url,
        "WSMANAGER_REDIS_NAMESPACE": namespace or f"rooms{next(_namespaces)}",
        "WSMANAGER_LEASE_SECONDS": "1",
        **settings,
    }
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(uvicorn_server("tests.rooms_cluster_app:app", env=env)) for _ in range(n)]


class Member:
    """A real client of a rooms node: every message it receives, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.got: list[Any] = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int, lobby: str, user: str) -> Member:
        return cls(await connect(f"ws://127.0.0.1:{port}/ws/{lobby}?user={user}"))

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                self.got.append(json.loads(raw))

    async def until(self, check: Any, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not check(self):
            if loop.time() > deadline:
                raise AssertionError(f"never happened: {what}; got {self.got}")
            await asyncio.sleep(0.02)

    def of(self, kind: str, lobby: str | None = None) -> list[Any]:
        return [m for m in self.got if m.get("type") == kind and (lobby is None or m.get("lobby") == lobby)]

    async def ask(self, kind: str, lobby: str) -> bool:
        """Join or leave ``lobby``: the node's answer."""
        answer = {"join": "joined", "leave": "left"}[kind]
        before = len(self.of(answer, lobby))
        await self.ws.send(json.dumps({"type": kind, "lobby": lobby}))
        await self.until(lambda m: len(m.of(answer, lobby)) > before, f"{kind} {lobby} answered")
        return bool(self.of(answer, lobby)[before]["ok"])

    async def chat(self, lobby: str, text: str) -> None:
        await self.ws.send(json.dumps({"type": "chat", "lobby": lobby, "text": text}))

    def chats(self, lobby: str, text: str) -> int:
        return sum(1 for m in self.of("chat", lobby) if m["text"] == text)

    def presence(self, lobby: str) -> set[str]:
        """The lobby's users as this client knows them: the state it got, then every diff applied."""
        users: set[str] = set()
        for m in self.of("presence", lobby):
            base = set() if m.get("state") else users  # a state replaces, a diff applies
            users = (base | set(m["joins"])) - set(m["leaves"])
        return users

    def abort(self) -> None:
        """Die without a close frame (a crashed tab, a pulled cable)."""
        self.ws.transport.abort()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()


async def lobby_is(port: int, lobby: str, users: set[str]) -> None:
    await wait_for(port, f"/lobby/{lobby}", lambda r: set(r["cluster"]) == users, f"{lobby} has {users}")


def test_one_connection_in_three_lobbies_gets_each_lobbys_broadcast_once(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        x = await Member.open(p1, "L1", "xavier")
        assert await x.ask("join", "L2") and await x.ask("join", "L3")
        assert await x.ask("join", "L2")  # already a member: nothing changes
        local = await Member.open(p1, "L2", "yann")  # a member of L2 on x's node too
        remote = {lobby: await Member.open(p2, lobby, f"m-{lobby}") for lobby in ("L1", "L2", "L3")}
        for lobby in ("L1", "L2", "L3"):
            await lobby_is(p2, lobby, {"xavier", f"m-{lobby}"} | ({"yann"} if lobby == "L2" else set()))
        for lobby, m in remote.items():
            await m.chat(lobby, "one")
        for lobby, m in remote.items():  # a second message per lobby: in order behind the first
            await m.chat(lobby, "fence")
        await x.until(lambda c: all(c.chats(lb, "fence") for lb in remote), "every lobby's fence")
        assert [x.chats(lobby, "one") for lobby in remote] == [1, 1, 1]
        await local.until(lambda c: c.chats("L2", "fence") == 1, "yann's fence")
        assert local.chats("L2", "one") == 1 and not local.of("chat", "L1")
        for m in (x, local, *remote.values()):
            await m.close()

    with room_nodes(redis.url) as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


def test_join_over_a_full_lobby_is_refused_atomically_in_a_storm_across_two_nodes(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        members = [await Member.open((p1, p2)[i % 2], f"home{i}", f"u{i}") for i in range(20)]
        results = await asyncio.gather(*(m.ask("join", "busy") for m in members))
        assert sum(results) == 5  # ROOMS_MAX_PER_LOBBY, cluster-wide
        admitted = {f"u{i}" for i, ok in enumerate(results) if ok}
        await lobby_is(p1, "busy", admitted)
        await lobby_is(p2, "busy", admitted)
        refused = 0
        for port in (p1, p2):
            refused += (await get(port, "/stats"))["refused"]["lobby_full"]
        assert refused == 15
        for m in members:
            await m.close()

    with room_nodes(redis.url, ROOMS_MAX_PER_LOBBY="5") as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


def test_presence_diffs_are_coalesced_and_exact_across_two_nodes(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        watchers = [await Member.open(p1, "P", "w1"), await Member.open(p2, "P", "w2")]
        for w in watchers:
            await w.until(lambda c: c.presence("P") == {"w1", "w2"}, "the watchers see each other")

        def sees(users: set[str]) -> Any:
            return lambda c: c.presence("P") == users

        # a burst of six joins over both nodes: coalesced into fewer messages
        before = [len(w.of("presence", "P")) for w in watchers]
        burst = [await Member.open((p1, p2)[i % 2], f"home{i}", f"b{i}") for i in range(6)]
        assert all(await asyncio.gather(*(m.ask("join", "P") for m in burst)))
        everyone = {"w1", "w2"} | {f"b{i}" for i in range(6)}
        for w, n in zip(watchers, before, strict=True):
            await w.until(sees(everyone), "the burst seen")
            assert len(w.of("presence", "P")) - n < 6
        # bob, on node 2 only, dies without a close frame: node 1 learns both from Redis
        bob = await Member.open(p2, "P", "bob")
        for w in watchers:
            await w.until(sees(everyone | {"bob"}), "bob in")
        bob.abort()
        for w in watchers:
            await w.until(sees(everyone), "bob out")
        # alice: a tab on each node; the one on node 2 dies, she stays through the other
        tab1, tab2 = await Member.open(p2, "home", "alice"), await Member.open(p1, "home", "alice")
        assert await tab1.ask("join", "P")
        for w in watchers:
            await w.until(sees(everyone | {"alice"}), "alice in")
        assert await tab2.ask("join", "P")
        tab1.abort()
        carol = await Member.open(p1, "home", "carol")  # a fence: after tab1's end on both nodes
        assert await carol.ask("join", "P")
        for w in watchers:
            await w.until(sees(everyone | {"alice", "carol"}), "carol in, alice still in")
        carol.abort()
        assert await tab2.ask("leave", "P")  # alice leaves, seen by node 2 from Redis
        for m in burst:
            m.abort()
        for w in watchers:
            await w.until(sees({"w1", "w2"}), "only the watchers left")
        for w in watchers:  # every user joined once and left once, on both nodes
            diffs = [m for m in w.of("presence", "P") if not m.get("state")]
            joins = [u for m in diffs for u in m["joins"]]
            leaves = [u for m in diffs for u in m["leaves"]]
            for user in ("alice", "bob", "carol", *(f"b{i}" for i in range(6))):
                assert (joins.count(user), leaves.count(user)) == (1, 1), (user, diffs)
        for m in (*watchers, tab2):
            await m.close()

    with room_nodes(redis.url, ROOMS_PRESENCE_INTERVAL="0.5", ROOMS_MAX_PER_LOBBY="20") as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


def test_a_node_unsubscribes_from_a_lobby_after_its_last_member_leaves(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        x = await Member.open(p1, "home", "xavier")
        y = await Member.open(p2, "J", "yann")
        assert await x.ask("join", "J")
        await wait_subscribers(redis.port, "unsub:l:J", 2)
        assert await x.ask("leave", "J")
        await wait_subscribers(redis.port, "unsub:l:J", 1)  # node 1 no longer gets J's traffic
        before = (await get(p1, "/stats"))["backplane"]["received"]
        await y.chat("J", "nobody on node 1")
        await y.until(lambda c: c.chats("J", "nobody on node 1") == 1, "yann's own echo")
        await x.chat("home", "fence")  # node 1's own lobby, local
        await x.until(lambda c: c.chats("home", "fence") == 1, "fence")
        assert (await get(p1, "/stats"))["backplane"]["received"] == before
        assert not x.of("chat", "J")
        await x.close()
        await y.close()

    with room_nodes(redis.url, namespace="unsub") as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))


def test_kill_9_of_a_node_frees_its_memberships_after_its_lease(redis: RedisServer) -> None:
    async def main(p1: int, p2: int, victim: subprocess.Popen[bytes]) -> None:
        on1 = [await Member.open(p1, f"h{i}", f"a{i}") for i in range(2)]
        on2 = [await Member.open(p2, f"k{i}", f"b{i}") for i in range(3)]
        assert all([await m.ask("join", "full") for m in on1 + on2])
        late = await Member.open(p1, "late-home", "late")
        assert not await late.ask("join", "full")
        victim.kill()  # SIGKILL: no cleanup at all
        victim.wait()
        await lobby_is(p1, "full", {"a0", "a1"})
        assert await late.ask("join", "full")
        for m in (*on1, late):
            await m.close()

    with room_nodes(redis.url, ROOMS_MAX_PER_LOBBY="5") as [(p1, _), (p2, victim)]:
        asyncio.run(main(p1, p2, victim))


def test_a_publisher_sees_and_reaches_joined_members(redis: RedisServer) -> None:
    async def main(p1: int, p2: int) -> None:
        x = await Member.open(p1, "home-x", "xavier")
        y = await Member.open(p2, "home-y", "yann")
        assert await x.ask("join", "news") and await y.ask("join", "news")
        await lobby_is(p1, "news", {"xavier", "yann"})
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(None, publish, redis.url, "pubrooms", "news", "hello")
        assert out == "delivered to 2 connection(s) of ['xavier', 'yann']"
        for m in (x, y):
            await m.until(lambda c: [c["text"] for c in c.of("chat")] == ["hello"], "the publisher's message")
        assert await y.ask("leave", "news")
        await lobby_is(p1, "news", {"xavier"})
        out = await loop.run_in_executor(None, publish, redis.url, "pubrooms", "--sync", "news", "again")
        assert out == "delivered to 1 connection(s) of ['xavier']"
        await x.close()
        await y.close()

    with room_nodes(redis.url, namespace="pubrooms") as [(p1, _), (p2, _)]:
        asyncio.run(main(p1, p2))
