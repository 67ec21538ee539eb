"""Attacks on history and recovery (issue 12): orderings a recovering
connection must survive, rings at their bounds, epochs across processes,
hostile input from clients and apps, and the C core's safety (these run
under ASan too). Each test that found a bug says which, in its docstring."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from starlette.websockets import WebSocket

from tests.asgi_fakes import FakePeer
from wsmanager import Connection, ConnectionManager

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def texts(peer: FakePeer) -> list[Any]:
    return peer.texts()


def chats(peer: FakePeer, lobby: str = "L") -> list[dict[str, Any]]:
    return [t for t in peer.texts() if t.get("type") == "chat" and t["_pos"]["lobby"] == lobby]


def offsets(peer: FakePeer, lobby: str = "L") -> list[int]:
    return [t["_pos"]["offset"] for t in chats(peer, lobby)]


def recoveries(peer: FakePeer, lobby: str | None = None) -> list[dict[str, Any]]:
    return [t for t in peer.texts() if t.get("type") == "recovery" and lobby in (None, t["lobby"])]


async def connected(m: ConnectionManager, lobby: str, user: str, **kw: Any) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user, **kw) is True
    return peer


async def chat(m: ConnectionManager, lobby: str, n: int, **kw: Any) -> None:
    await m.broadcast_to_lobby(lobby, {"type": "chat", "n": n}, **kw)


async def drain(peer: FakePeer, count: int, lobby: str = "L") -> None:
    for _ in range(100_000):
        if len(chats(peer, lobby)) >= count:
            return
        await asyncio.sleep(0)


def epoch_of(m: ConnectionManager, lobby: str) -> str:
    info = m._history_info(lobby)
    assert info is not None
    return str(info[0])


def strictly_contiguous(got: list[int], first: int, last: int) -> None:
    assert got == list(range(first, last + 1)), got


# -- orderings: a broadcast racing a recovery --------------------------------


@pytest.mark.parametrize("accept_yields", [0, 1, 2, 5])
@pytest.mark.parametrize("slow", [False, True])
@pytest.mark.parametrize("since_at", [0, 7, 20])
def test_broadcasts_at_every_await_of_a_recovering_connect_never_reorder_gap_or_repeat(
    accept_yields: int, slow: bool, since_at: int
) -> None:
    """A broadcaster that sends one message per loop turn, started before
    the handshake: whichever turn the commit falls on, the client sees every
    offset after its position exactly once, in order, the replay first."""

    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=1000)
        for n in range(1, 21):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        peer = FakePeer(accept_yields=accept_yields)
        gate = asyncio.Event()
        if slow:
            peer.send_gate = gate

        async def broadcaster() -> None:
            for n in range(21, 61):
                await chat(m, "L", n)
                await asyncio.sleep(0)

        task = asyncio.create_task(broadcaster())
        await asyncio.sleep(0)
        assert await m.connect(peer.ws, "L", "b", since=(epoch, since_at))
        gate.set()
        await task
        await drain(peer, 60 - since_at)
        strictly_contiguous(offsets(peer), since_at + 1, 60)
        [rec] = recoveries(peer)
        assert rec["recovered"] is True
        # the recovery message sits between the replay and the live messages
        kinds = [t.get("type") for t in peer.texts()]
        at = kinds.index("recovery")
        replayed = [t["_pos"]["offset"] for t in peer.texts()[:at]]
        assert replayed == list(range(since_at + 1, rec["offset"] + 1))

    run(main())


@pytest.mark.parametrize("member_first", [False, True])
def test_a_join_with_since_racing_broadcasts_to_that_lobby_sees_each_offset_once(member_first: bool) -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=1000)
        a = await connected(m, "home", "a")
        for n in range(1, 11):
            await chat(m, "R", n)
        epoch = epoch_of(m, "R")
        if member_first:  # a backlog already: the replay queues behind it, live after
            a.send_gate = asyncio.Event()
            await chat(m, "home", 1)
        stop = False

        async def broadcaster() -> None:
            n = 11
            while not stop:
                await chat(m, "R", n)
                n += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(broadcaster())
        for _ in range(3):
            await asyncio.sleep(0)
        assert await m.join(a.ws, "R", since=(epoch, 4))
        for _ in range(3):
            await asyncio.sleep(0)
        stop = True
        await task
        if a.send_gate is not None:
            a.send_gate.set()
        top = epoch_of(m, "R") and (m._history_info("R") or ("", 0, 0))[1]
        await drain(a, int(top) - 4, "R")
        strictly_contiguous(offsets(a, "R"), 5, int(top))

    run(main())


class SuspendingOnce:
    """An ASGI send wrapper (as a middleware would add) whose first text
    send suspends on a future: the rest must queue behind it in order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release: asyncio.Future[None] | None = None

    async def __call__(self, message: Any) -> None:
        if message["type"] == "websocket.send" and self.release is None:
            self.release = asyncio.get_running_loop().create_future()
            await self.release
        await self.inner(message)


class SubWebSocket(WebSocket):
    """Not Starlette's exact class: the C fan-out hands it back to Python."""


@pytest.mark.parametrize("kind", ["wrapped_send", "subclass"])
def test_recovery_through_a_wrapped_send_or_a_websocket_subclass_keeps_the_order(kind: str) -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        for n in range(1, 11):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        peer = FakePeer()
        wrapper = None
        if kind == "wrapped_send":
            wrapper = SuspendingOnce(peer.ws._send)
            peer.ws._send = wrapper
        else:
            peer.ws = SubWebSocket(peer.ws.scope, receive=peer.ws._receive, send=peer.ws._send)
        assert await m.connect(peer.ws, "L", "b", since=(epoch, 3))
        for n in range(11, 21):
            await chat(m, "L", n)
        if wrapper is not None:
            assert wrapper.release is not None
            wrapper.release.set_result(None)
        await drain(peer, 17)
        strictly_contiguous(offsets(peer), 4, 20)

    run(main())


def test_a_send_that_broadcasts_to_the_lobby_while_the_replay_is_posted_keeps_the_order() -> None:
    """A send wrapper that itself broadcasts (an audit hook, say) runs in
    the middle of the replay: the live message it sends must still come
    after the replay."""

    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        for n in range(1, 6):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        peer = FakePeer()
        inner = peer.ws._send
        fired = False

        async def send(message: Any) -> None:
            nonlocal fired
            if message["type"] == "websocket.send" and not fired and '"offset":2}' in message["text"]:
                fired = True
                await chat(m, "L", 99)  # runs inside the replay's post() of offset 2
            await inner(message)

        peer.ws._send = send
        assert await m.connect(peer.ws, "L", "b", since=(epoch, 0))
        await drain(peer, 6)
        assert fired
        strictly_contiguous(offsets(peer), 1, 6)

    run(main())


@pytest.mark.parametrize("suspend_at", [None, 2, 4])
def test_a_send_that_broadcasts_during_the_replay_then_suspends_keeps_the_order(
    suspend_at: int | None,
) -> None:
    """The same re-entrant broadcast, and then one send of the replay
    suspends (a slow client): the writer that takes over sends the rest of
    the replay, the recovery message, then the live messages, in order."""

    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        for n in range(1, 6):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        peer = FakePeer()
        inner = peer.ws._send
        gate = asyncio.Event()
        fired = 0

        async def send(message: Any) -> None:
            nonlocal fired
            if message["type"] == "websocket.send" and '"type":"chat"' in message["text"]:
                offset = json.loads(message["text"])["_pos"]["offset"]
                if offset in (1, 3) and fired < 2:
                    fired += 1
                    await chat(m, "L", 100 + offset)
                if offset == suspend_at:
                    await gate.wait()
            await inner(message)

        peer.ws._send = send
        assert await m.connect(peer.ws, "L", "b", since=(epoch, 0))
        await chat(m, "L", 200)
        gate.set()
        await drain(peer, 8)
        strictly_contiguous(offsets(peer), 1, 8)
        kinds = [t.get("type") for t in peer.texts()]
        assert kinds.index("recovery") == 5  # after the replay of 1..5, before 6..8
        assert peer.ws in m and not m.delivery.outboxes

    run(main())


def test_a_send_that_broadcasts_while_the_position_is_sent_comes_after_it() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        await chat(m, "L", 1)
        peer = FakePeer()
        inner = peer.ws._send
        fired = False

        async def send(message: Any) -> None:
            nonlocal fired
            if message["type"] == "websocket.send" and "lobby_position" in message["text"] and not fired:
                fired = True
                await chat(m, "L", 2)
            await inner(message)

        peer.ws._send = send
        assert await m.connect(peer.ws, "L", "b")
        await drain(peer, 1)
        assert [t["type"] for t in peer.texts()] == ["lobby_position", "chat"]
        assert peer.texts()[0]["offset"] == 1 and offsets(peer) == [2]

    run(main())


def test_a_replay_larger_than_the_backlog_closes_the_slow_client_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=500)
        m.max_backlog = 10
        for n in range(1, 201):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        peer = FakePeer()
        peer.send_gate = asyncio.Event()
        ok = await m.connect(peer.ws, "L", "b", since=(epoch, 0))
        assert ok is True  # registered; the replay then overflowed its backlog
        for _ in range(50):
            await asyncio.sleep(0)
        peer.send_gate.set()
        for _ in range(200):
            await asyncio.sleep(0)
        assert peer.ws not in m
        got = offsets(peer)
        assert got == list(range(1, len(got) + 1))  # a prefix, never out of order
        assert recoveries(peer) == []  # it never got to claim success
        assert m.get_stats()["closed"].get("slow_consumer") == 1

    caplog.set_level(logging.INFO, logger="wsmanager")
    run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- rooms ------------------------------------------------------------------


def test_one_connection_recovers_several_lobbies_each_in_its_own_sequence() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        a = await connected(m, "A", "u")
        assert await m.join(a.ws, "B")
        assert await m.join(a.ws, "C")
        for n in range(1, 4):
            for lobby in "ABC":
                await chat(m, lobby, n)
        pos = {lobby: (epoch_of(m, lobby), 3) for lobby in "ABC"}
        m.disconnect(a.ws)
        for n in range(4, 7):
            for lobby in "ABC":
                await chat(m, lobby, n)
        b = await connected(m, "A", "u", since=pos["A"])
        assert await m.join(b.ws, "B", since=pos["B"])
        assert await m.join(b.ws, "C", since=("wrong-epoch!", 3))
        await chat(m, "B", 7)
        assert offsets(b, "A") == [4, 5, 6]
        assert offsets(b, "B") == [4, 5, 6, 7]
        assert offsets(b, "C") == []
        assert [(r["lobby"], r["recovered"], r["offset"]) for r in recoveries(b)] == [
            ("A", True, 6),
            ("B", True, 6),
            ("C", False, 6),
        ]

    run(main())


def test_join_with_since_while_a_member_replays_nothing_and_leave_then_rejoin_replays_the_gap() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        a = await connected(m, "home", "u")
        assert await m.join(a.ws, "R")
        await chat(m, "R", 1)
        epoch = epoch_of(m, "R")
        assert await m.join(a.ws, "R", since=(epoch, 0))  # a member: it missed nothing
        assert offsets(a, "R") == [1] and recoveries(a) == []
        assert m.leave(a.ws, "R")
        await chat(m, "R", 2)
        await chat(m, "R", 3, exclude_user_id="u")
        await chat(m, "R", 4)
        assert await m.join(a.ws, "R", since=(epoch, 1))
        await chat(m, "R", 5)
        assert offsets(a, "R") == [1, 2, 4, 5]  # 3 was excluded for u: a documented gap
        assert recoveries(a, "R")[0]["recovered"] is True

    run(main())


# -- ring bounds ------------------------------------------------------------


def test_history_size_1_keeps_exactly_the_last_message() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=1)
        for n in range(1, 6):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        assert m._history_info("L") == (epoch, 5, 1)
        b = await connected(m, "L", "b", since=(epoch, 4))
        assert offsets(b) == [5] and recoveries(b)[0]["recovered"] is True
        c = await connected(m, "L", "c", since=(epoch, 3))
        assert offsets(c) == [] and recoveries(c)[0]["recovered"] is False
        d = await connected(m, "L", "d", since=(epoch, 5))
        assert offsets(d) == [] and recoveries(d)[0]["recovered"] is True

    run(main())


def test_a_huge_history_size_grows_the_ring_only_as_messages_come() -> None:
    m = ConnectionManager(10, 10, history_size=2**40)
    assert m.history_size == 2**40
    for i in range(100):
        m._history_append("L", f'{{"i":{i}}}')
    assert m._history_stats() == (1, 100)
    recovered, _, top, got = m._history_since("L", epoch_of(m, "L"), 0)
    assert recovered and top == 100 and len(got) == 100


def test_shrinking_history_size_at_runtime_keeps_at_most_the_new_size() -> None:
    """Lowering history_size bounds what every ring holds: the memory goes
    at once, and a client more than the new size behind is not recovered."""
    m = ConnectionManager(10, 10, history_size=100)
    for lobby in ("L", "M"):
        for i in range(50):
            m._history_append(lobby, f'{{"i":{i}}}')
    epoch = epoch_of(m, "L")
    m.history_size = 5
    assert m._history_stats() == (2, 10)
    assert m._history_since("L", epoch, 40)[0] is False
    recovered, _, _, got = m._history_since("L", epoch, 45)
    assert recovered and [json.loads(t)["i"] for t in got] == [45, 46, 47, 48, 49]
    # growing it again keeps what is there, and the same epoch
    m.history_size = 100
    m._history_append("L", '{"i":50}')
    assert m._history_info("L") == (epoch, 51, 6)


def test_history_size_0_then_on_again_is_a_new_epoch_and_frees_everything() -> None:
    m = ConnectionManager(10, 10, history_size=10)
    lobby = "".join(["lob", "by-x"])  # not interned: its refcount is ours to watch
    user = "".join(["us", "er"])
    base_lobby, base_user = sys.getrefcount(lobby), sys.getrefcount(user)
    m._history_append(lobby, '{"a":1}', user)
    old = epoch_of(m, lobby)
    assert sys.getrefcount(lobby) > base_lobby and sys.getrefcount(user) > base_user
    m.history_size = 0
    assert m._history_stats() == (0, 0)
    assert (sys.getrefcount(lobby), sys.getrefcount(user)) == (base_lobby, base_user)
    m.history_size = 10
    assert m._history_since(lobby, old, 1)[:3] == (False, m._history_info(lobby)[0], 0)  # type: ignore[index]
    assert epoch_of(m, lobby) != old


def test_ttl_at_exactly_the_boundary_keeps_the_entry() -> None:
    """docs/history.md: entries "older than history_ttl" are dropped; one
    exactly history_ttl old is not older than it."""
    clock = Clock()
    m = ConnectionManager(10, 10, history_size=10, history_ttl=60, clock=clock)
    m._history_append("L", '{"a":1}')
    epoch = epoch_of(m, "L")
    clock.t += 60
    assert m._history_info("L") == (epoch, 1, 1)
    assert m._history_since("L", epoch, 0)[0] is True
    clock.t += 0.5
    assert m._history_info("L") is None or m._history_info("L") != (epoch, 1, 1)
    assert m._history_since("L", epoch, 0)[0] is False


def test_thousands_of_lobbies_expire_back_to_the_refcounts_they_started_with() -> None:
    clock = Clock()
    m = ConnectionManager(10, 10, history_size=4, history_ttl=10, clock=clock)
    lobbies = [f"lobby-{i}-" + "x" * (i % 7) for i in range(5000)]
    user = "".join(["exc", "luded"])
    base = [sys.getrefcount(lobby) for lobby in lobbies]
    base_user = sys.getrefcount(user)
    for i in range(len(lobbies)):  # no loop variable left holding a lobby
        for k in range(3):
            m._history_append(lobbies[i], f'{{"k":{k}}}', user if i % 2 else None)
        if i % 3 == 0:
            m._history_since(lobbies[i], "nope", 0)
    assert m._history_stats() == (5000, 15000)
    clock.t += 10.5
    assert m._history_stats() == (0, 0)
    assert [sys.getrefcount(lobby) for lobby in lobbies] == base
    assert sys.getrefcount(user) == base_user


def test_a_lobby_kept_alive_by_one_ring_while_others_expire_behind_it() -> None:
    """Expiry walks the age list from its oldest end and stops at the ring
    in use: rings behind it still go once they are due."""
    clock = Clock()
    m = ConnectionManager(10, 10, history_size=4, history_ttl=10, clock=clock)
    m._history_append("old", '{"a":1}')
    clock.t += 1
    m._history_append("mid", '{"a":1}')
    clock.t += 20  # both expired
    m._history_append("old", '{"a":2}')  # "old" again: a new epoch
    assert m._history_stats() == (1, 1)
    assert m._history_info("mid") is None


# -- epochs across processes -------------------------------------------------


def _epochs_in_child(m: ConnectionManager, lobbies: list[str]) -> list[str]:
    r, w = os.pipe()
    with warnings.catch_warnings():  # 3.12+: fork with threads alive is deprecated (the child only computes)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            got = [json.loads(m._history_append(lobby, '{"a":1}'))["_pos"]["epoch"] for lobby in lobbies]
            os.write(w, json.dumps(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return list(json.loads(data))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_never_hands_out_its_parents_epochs() -> None:
    """A manager created before the server forks its workers (gunicorn
    --preload, a module-level ``manager``): each worker's lobbies must have
    epochs of their own, else a client moving from one worker to another is
    told recovered: true with the other worker's messages."""
    m = ConnectionManager(10, 10, history_size=8)
    m._history_append("before", '{"a":1}')  # a ring that exists at the fork
    child = _epochs_in_child(m, ["before", "after"])
    mine = [json.loads(m._history_append(lobby, '{"a":1}'))["_pos"]["epoch"] for lobby in ["before", "after"]]
    assert child[0] != mine[0], "a ring from before the fork continues under the same epoch in both"
    assert child[1] != mine[1], "rings created after the fork get the same epoch in both"


def test_an_epoch_from_another_manager_is_not_recovered() -> None:
    async def main() -> None:
        m1 = ConnectionManager(10, 10, history_size=10)
        m2 = ConnectionManager(10, 10, history_size=10)
        for n in range(1, 4):
            await chat(m1, "L", n)
            await chat(m2, "L", n)
        e1, e2 = epoch_of(m1, "L"), epoch_of(m2, "L")
        assert e1 != e2
        b = await connected(m2, "L", "b", since=(e1, 1))
        assert recoveries(b)[0]["recovered"] is False and offsets(b) == []

    run(main())


# -- hostile input from a client ----------------------------------------------


async def _nothing(conn: Connection, data: dict[str, Any]) -> None:
    pass


def _admit(conn: Connection, lobby: str) -> bool:
    return True


async def _open(m: ConnectionManager, query: bytes) -> tuple[FakePeer, asyncio.Task[None]]:
    peer = FakePeer(query_string=query)
    task = asyncio.create_task(m.serve(peer.ws, "home", "alice", _nothing, on_join=_admit))
    for _ in range(30):
        await asyncio.sleep(0)
    return peer, task


async def _close(peer: FakePeer, task: asyncio.Task[None]) -> None:
    peer.leave()
    await asyncio.wait_for(task, 1)


HOSTILE_PARAMS = [
    b"wsm_since=e:nan",
    b"wsm_since=e:NaN",
    b"wsm_since=e:-0",
    b"wsm_since=e:18446744073709551616",  # 2**64
    b"wsm_since=e:9007199254740992",  # 2**53
    b"wsm_since=e:1.0",
    b"wsm_since=e:%D9%A1%D9%A2",  # '١٢'
    b"wsm_since=e:%EF%BC%91",  # fullwidth 1
    b"wsm_since=e:%C2%B2",  # superscript 2
    b"wsm_since=e:%201",
    b"wsm_since=e:1%20",
    b"wsm_since=e:1%0A",
    b"wsm_since=e:",
    b"wsm_since=:",
    b"wsm_since=",
    b"wsm_since",
    b"wsm_since=%ED%A0%80:1",  # a lone surrogate's UTF-8 form
    b"wsm_since=e:" + b"1" * 10_000,
    b"wsm_since=" + b"e" * 100_000 + b":1",
    b"wsm_since=" + b":" * 5_000,
    b"wsm_since=e:1&wsm_since=e:2&wsm_since=bad",
]


@pytest.mark.parametrize("query", HOSTILE_PARAMS)
def test_hostile_wsm_since_is_answered_not_recovered_and_the_connection_stays(
    query: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        await chat(m, "home", 1)
        caplog.set_level(logging.INFO, logger="wsmanager")
        peer, task = await _open(m, query)
        recs = recoveries(peer) + [t for t in peer.texts() if t.get("type") == "lobby_position"]
        assert len(recs) == 1 and recs[0].get("recovered", False) is False and recs[0]["offset"] == 1
        assert peer.ws in m and peer.close_message is None
        await chat(m, "home", 2)
        assert offsets(peer, "home") == [2]
        await _close(peer, task)

    run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_several_wsm_since_parameters_use_one_of_them_and_never_two_replays() -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        for n in range(1, 4):
            await chat(m, "home", n)
        epoch = epoch_of(m, "home")
        q = f"wsm_since={epoch}:1&wsm_since={epoch}:2".encode()
        peer, task = await _open(m, q)
        [rec] = recoveries(peer)
        assert rec["recovered"] is True
        assert offsets(peer, "home") in ([2, 3], [3])
        await _close(peer, task)

    run(main())


def _deep(n: int) -> str:
    return "[" * n + "]" * n


HOSTILE_JOIN_SINCE = [
    "[]",
    '"e:1"',
    "1",
    "true",
    '{"epoch": "e"}',
    '{"offset": 1}',
    '{"epoch": "e", "offset": 1, "x": 0}',
    '{"epoch": null, "offset": 1}',
    '{"epoch": "e", "offset": null}',
    '{"epoch": "e", "offset": -1}',
    '{"epoch": "e", "offset": 1.0}',
    '{"epoch": "e", "offset": 1e400}',
    '{"epoch": "e", "offset": NaN}',
    '{"epoch": "e", "offset": Infinity}',
    '{"epoch": "e", "offset": 9007199254740992}',
    '{"epoch": "e", "offset": 18446744073709551616}',
    '{"epoch": "e", "offset": ' + "9" * 4000 + "}",
    '{"epoch": "e", "offset": true}',
    '{"epoch": "e", "offset": "1"}',
    '{"epoch": ' + _deep(50) + ', "offset": 1}',
    '{"epoch": "' + "e" * 65 + '", "offset": 1}',
    '{"epoch": {"epoch": "e", "offset": 1}, "offset": 1}',
]


@pytest.mark.parametrize("since", HOSTILE_JOIN_SINCE)
def test_hostile_lobby_join_since_is_a_bad_message_and_joins_nothing(
    since: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        peer, task = await _open(m, b"")
        peer.send_text('{"type": "lobby_join", "lobby": "R", "ref": 1, "since": ' + since + "}")
        for _ in range(30):
            await asyncio.sleep(0)
        last = peer.texts()[-1]
        # not finite numbers are refused by the JSON layer (bad_json) before the request is read
        want = "bad_json" if any(x in since for x in ("NaN", "Infinity", "e400")) else "bad_message"
        assert last["type"] == "error" and last["error"] == want, last
        assert m.lobbies_of(peer.ws) == {"home"}
        assert peer.ws in m
        await _close(peer, task)

    caplog.set_level(logging.INFO, logger="wsmanager")
    run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_deeply_nested_lobby_join_is_answered_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        peer, task = await _open(m, b"")
        for depth in (1_000, 10_000):  # within max_message_size (a bigger one is 1009)
            peer.send_text('{"type": "lobby_join", "lobby": "R", "since": ' + _deep(depth) + "}")
            for _ in range(30):
                await asyncio.sleep(0)
            assert peer.texts()[-1]["type"] == "error"
        assert peer.close_message is None
        assert m.lobbies_of(peer.ws) == {"home"}
        await _close(peer, task)

    caplog.set_level(logging.INFO, logger="wsmanager")
    run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the reserved member, and what is not a lobby message ---------------------


class Sub(dict[str, Any]):
    pass


def test_the_position_wins_over_an_apps_own_pos_member_and_odd_objects() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=10)
        a = await connected(m, "L", "a")
        await m.broadcast_to_lobby("L", {"type": "chat", "_pos": "the app's"})
        await m.broadcast_to_lobby("L", Sub(type="chat", n=2))
        await m.broadcast_to_lobby("L", {1: "int key", "type": "chat"})
        await m.broadcast_to_lobby(
            "L", {"type": "chat", "_pos": {"lobby": "L", "epoch": "forged", "offset": 99}}
        )
        got = chats(a)
        assert [t["_pos"]["offset"] for t in got] == [1, 2, 3, 4]
        assert {t["_pos"]["epoch"] for t in got} == {epoch_of(m, "L")}
        assert got[2]["1"] == "int key"
        for bad in ("{}", '{"a": 1}', b"{}", 1.5, True, ["{}"]):
            with pytest.raises(TypeError):
                await m.broadcast_to_lobby("L", bad)
        assert m._history_info("L") == (epoch_of(m, "L"), 4, 4)
        # direct messages: no position, not kept
        await m.send_to_user("a", {"type": "dm"})
        assert "_pos" not in a.texts()[-1]
        assert m._history_stats() == (1, 4)

    run(main())


# -- shutdown during a replay ------------------------------------------------


def test_shutdown_during_a_replay_to_a_slow_client_returns_and_closes_it() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=500)
        for n in range(1, 301):
            await chat(m, "L", n)
        epoch = epoch_of(m, "L")
        peer = FakePeer()
        peer.send_gate = asyncio.Event()
        assert await m.connect(peer.ws, "L", "b", since=(epoch, 0))
        await asyncio.wait_for(m.shutdown(timeout=0.5), 5)
        assert len(m) == 0
        peer.send_gate.set()
        for _ in range(50):
            await asyncio.sleep(0)
        got = offsets(peer)
        assert got == list(range(1, len(got) + 1))
        late = FakePeer()
        assert await m.connect(late.ws, "L", "c", since=(epoch, 0)) is False
        assert offsets(late) == []

    run(main())


# -- C safety (ASan) ---------------------------------------------------------


class HostileStr(str):
    def __hash__(self) -> int:
        raise RuntimeError("hash called")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq called")

    __ne__ = __eq__

    def __str__(self) -> str:
        raise RuntimeError("str called")


def test_hostile_str_subclasses_as_lobby_epoch_and_users_never_run() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=8)
        await m.broadcast_to_lobby(HostileStr("L"), {"type": "chat"}, exclude_user_id=HostileStr("x"))
        epoch = epoch_of(m, "L")
        got = m._history_since(HostileStr("L"), HostileStr(epoch), 0, HostileStr("y"))
        assert got[0] is True and len(got[3]) == 1
        assert m._history_since("L", epoch, 0, HostileStr("x"))[3] == []  # excluded for x
        a = await connected(m, HostileStr("L"), HostileStr("u"), since=(epoch, 0))
        assert offsets(a) == [1]

    run(main())


class Cycle:
    def __init__(self, action: Any) -> None:
        self.me = self
        self.action = action

    def __del__(self) -> None:
        self.action()


@pytest.mark.parametrize("where", ["append", "since", "info", "stats"])
@pytest.mark.parametrize("action", ["clear", "shrink", "append_other", "append_same"])
def test_a_clock_that_changes_the_history_cannot_corrupt_a_call(where: str, action: str) -> None:
    """The injected clock is Python code the core calls first: it may clear,
    shrink or append to the very ring the call then uses."""
    box: dict[str, Any] = {}

    def act() -> None:
        m = box["m"]
        if action == "clear":
            m.history_size = 0
            m.history_size = 4
        elif action == "shrink":
            m.history_size = 1
            m.history_size = 4
        elif action == "append_other":
            for i in range(20):
                m._history_append(f"o{i}", "{}")
        else:
            for _ in range(5):
                m._history_append("L", "{}")

    calls = 0

    def clock() -> float:
        nonlocal calls
        calls += 1
        if box.get("armed"):
            box["armed"] = False
            act()
        return 1000.0 + calls

    m = ConnectionManager(10, 10, history_size=4, history_ttl=3, clock=clock)
    box["m"] = m
    for _ in range(10):
        for i in range(3):
            m._history_append("L", f'{{"i":{i}}}')
        epoch = epoch_of(m, "L")
        box["armed"] = True
        if where == "append":
            out = json.loads(m._history_append("L", '{"x":1}'))
            assert out["x"] == 1 and out["_pos"]["offset"] == (m._history_info("L") or ("", 0, 0))[1]
        elif where == "since":
            recovered, _, top, got = m._history_since("L", epoch, 0)
            if recovered:
                assert len(got) == top
        elif where == "info":
            m._history_info("L")
        else:
            m._history_stats()
    nrings, nentries = m._history_stats()
    assert nentries <= 4 * nrings


@pytest.mark.parametrize("action", ["clear", "shrink", "append"])
def test_finalizers_during_a_replay_of_excluded_entries_cannot_corrupt_it(action: str) -> None:
    m = ConnectionManager(10, 10, history_size=64)
    for i in range(64):
        m._history_append("L", f'{{"i":{i}}}', "u" if i % 2 else "v")
    epoch = epoch_of(m, "L")

    def act() -> None:
        if action == "clear":
            m.history_size = 0
            m.history_size = 64
        elif action == "shrink":
            m.history_size = 1
            m.history_size = 64
        else:
            for i in range(100):
                m._history_append("L", f'{{"late":{i}}}', "u")

    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        for _ in range(30):
            Cycle(act)
            recovered, _, _top, got = m._history_since("L", epoch, 0, "u")
            if recovered:
                assert all(json.loads(t)["i"] % 2 == 0 for t in got)
            gc.collect()
            del got
    finally:
        gc.set_threshold(*threshold)


def test_deleting_the_history_settings_is_refused() -> None:
    m = ConnectionManager(10, 10, history_size=4)
    core = type(m).__mro__[-2]
    for name in ("history_size", "history_ttl"):
        with pytest.raises(AttributeError):
            core.__dict__[name].__delete__(m)
    assert m.history_size == 4
