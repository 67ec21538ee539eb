"""History and recovery (issue 12), in one process: positions on the wire,
the per-lobby rings (csrc/history.c), recovery on connect() / join()."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import tracemalloc
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager, dumps

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def chats(peer: FakePeer) -> list[dict[str, Any]]:
    return [t for t in peer.texts() if t.get("type") == "chat"]


def offsets(peer: FakePeer, lobby: str = "L") -> list[int]:
    return [t["_pos"]["offset"] for t in chats(peer) if t["_pos"]["lobby"] == lobby]


def recoveries(peer: FakePeer) -> list[dict[str, Any]]:
    return [t for t in peer.texts() if t.get("type") == "recovery"]


async def connected(m: ConnectionManager, lobby: str, user: str, **kw: Any) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user, **kw) is True
    return peer


# -- settings and wire format ----------------------------------------------


def test_history_is_off_by_default_and_the_bytes_on_the_wire_are_unchanged() -> None:
    async def main() -> None:
        for m in (ConnectionManager(10, 10), ConnectionManager(10, 10, history_size=0)):
            assert m.history_size == 0 and m.history_ttl is None
            a = await connected(m, "L", "a")
            message = {"type": "chat", "text": "héllo", "n": [1, 2.5, None]}
            await m.broadcast_to_lobby("L", message)
            await m.broadcast_to_lobby("L", [1, 2])  # any JSON value, as before
            sent = [f["text"] for f in a.frames if f["type"] == "websocket.send"]
            assert sent == [dumps(message), dumps([1, 2])]
            assert m._history_stats() == (0, 0)  # nothing kept

    run(main())


def test_each_lobby_message_carries_its_position_as_the_last_member() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=8)
        a = await connected(m, "L", "a")
        await m.join(a.ws, 'we"ird')
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 1})
        await m.broadcast_to_lobby("L", {})
        await m.broadcast_to_lobby('we"ird', {"type": "chat", "n": 2})
        raw = [
            f["text"] for f in a.frames if f["type"] == "websocket.send" and "lobby_position" not in f["text"]
        ]
        epoch = json.loads(raw[0])["_pos"]["epoch"]
        assert len(epoch) == 12
        pos = '"_pos":{"lobby":"L","epoch":"' + epoch + '","offset":'
        assert raw[0] == '{"type":"chat","n":1,' + pos + "1}}"
        assert raw[1] == "{" + pos + "2}}"
        other = json.loads(raw[2])["_pos"]
        assert other["lobby"] == 'we"ird' and other["offset"] == 1 and other["epoch"] != epoch
        # direct messages carry no position
        await m.send_to_user("a", {"type": "dm"})
        assert "_pos" not in a.texts()[-1]

    run(main())


def test_a_lobby_message_that_is_not_an_object_is_refused_with_history_on() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=8)
        a = await connected(m, "L", "a")
        for bad in ([1], "s", 3, None):
            with pytest.raises(TypeError, match="JSON object"):
                await m.broadcast_to_lobby("L", bad)
        assert [t["type"] for t in a.texts()] == ["lobby_position"]
        info = m._history_info("L")
        assert info is not None and info[1:] == (0, 0)  # nothing kept

    run(main())


@pytest.mark.parametrize(
    ("kw", "exc"),
    [
        ({"history_size": -1}, ValueError),
        ({"history_size": True}, TypeError),
        ({"history_size": 2.0}, TypeError),
        ({"history_size": "10"}, TypeError),
        ({"history_ttl": 0}, ValueError),
        ({"history_ttl": math.nan}, ValueError),
        ({"history_ttl": math.inf}, ValueError),
        ({"history_ttl": -1.0}, ValueError),
        ({"history_ttl": "5"}, TypeError),
    ],
)
def test_history_settings_are_checked(kw: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc, match=next(iter(kw))):
        ConnectionManager(10, 10, **kw)


def test_history_settings_are_keyword_only_settable_and_class_defaults() -> None:
    m = ConnectionManager(10, 10, history_size=5, history_ttl=2)
    assert (m.history_size, m.history_ttl) == (5, 2.0)
    m.history_size = None
    assert m.history_size == 0 and m._history is False
    with pytest.raises(ValueError, match="history_size"):
        m.history_size = -3

    class Kept(ConnectionManager):
        history_size = 100

    assert Kept(10, 10).history_size == 100 and Kept(10, 10, history_size=3).history_size == 3


# -- recovery -----------------------------------------------------------------


def test_a_client_offline_for_n_messages_gets_exactly_those_in_order_then_live_ones() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        a = await connected(m, "L", "a")
        for n in range(1, 4):
            await m.broadcast_to_lobby("L", {"type": "chat", "n": n})
        last = a.texts()[-1]["_pos"]
        m.disconnect(a.ws)
        for n in range(4, 11):  # 7 messages while offline, some to an empty lobby
            await m.broadcast_to_lobby("L", {"type": "chat", "n": n})
        b = await connected(m, "L", "a", since=(last["epoch"], last["offset"]))
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 11})
        assert [t["n"] for t in chats(b)] == list(range(4, 12))
        assert offsets(b) == list(range(4, 12))
        assert recoveries(b) == [
            {"type": "recovery", "lobby": "L", "recovered": True, "epoch": last["epoch"], "offset": 10}
        ]
        # the recovery message comes after the replay, before the live message
        assert [t["type"] for t in b.texts()][-2:] == ["recovery", "chat"]

    run(main())


def test_join_with_since_recovers_that_lobby() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        a = await connected(m, "home", "a")
        assert await m.join(a.ws, "R")
        await m.broadcast_to_lobby("R", {"type": "chat", "n": 1})
        epoch = a.texts()[-1]["_pos"]["epoch"]
        assert m.leave(a.ws, "R")
        await m.broadcast_to_lobby("R", {"type": "chat", "n": 2})
        await m.broadcast_to_lobby("R", {"type": "chat", "n": 3})
        assert await m.join(a.ws, "R", since=(epoch, 1))
        assert offsets(a, "R") == [1, 2, 3]
        assert recoveries(a)[-1]["recovered"] is True
        # already a member: nothing replayed again
        assert await m.join(a.ws, "R", since=(epoch, 0))
        assert offsets(a, "R") == [1, 2, 3] and len(recoveries(a)) == 1

    run(main())


def test_broadcasts_during_a_replay_to_a_slow_client_come_after_it_without_gap_or_duplicate() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=1000)
        a = await connected(m, "L", "x")
        for n in range(1, 51):
            await m.broadcast_to_lobby("L", {"type": "chat", "n": n})
        epoch = chats(a)[0]["_pos"]["epoch"]
        peer = FakePeer(accept_yields=3)
        gate = asyncio.Event()
        peer.send_gate = gate  # every send suspends: the replay goes to the backlog

        async def broadcaster() -> None:
            for n in range(51, 151):
                await m.broadcast_to_lobby("L", {"type": "chat", "n": n})
                await asyncio.sleep(0)

        task = asyncio.create_task(broadcaster())
        assert await m.connect(peer.ws, "L", "b", since=(epoch, 10))
        await asyncio.sleep(0)
        gate.set()
        await task
        for _ in range(100_000):  # the writer task drains the backlog
            if len(chats(peer)) >= 140:
                break
            await asyncio.sleep(0)
        got = offsets(peer)
        assert got == list(range(11, got[-1] + 1)) and got[-1] == 150
        assert recoveries(peer)[0]["recovered"] is True

    run(main())


def test_recovered_false_when_the_gap_exceeds_the_history() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=3)
        a = await connected(m, "L", "a")
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 1})
        pos = a.texts()[-1]["_pos"]
        m.disconnect(a.ws)
        for n in range(2, 6):  # 4 missed, 3 kept
            await m.broadcast_to_lobby("L", {"type": "chat", "n": n})
        b = await connected(m, "L", "a", since=(pos["epoch"], 1))
        assert chats(b) == []
        assert recoveries(b) == [
            {"type": "recovery", "lobby": "L", "recovered": False, "epoch": pos["epoch"], "offset": 5}
        ]
        # exactly as many as kept: recovered
        c = await connected(m, "L", "c", since=(pos["epoch"], 2))
        assert offsets(c) == [3, 4, 5] and recoveries(c)[0]["recovered"] is True

    run(main())


def test_recovered_false_when_the_epoch_changed_or_the_offset_is_ahead() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=10)
        a = await connected(m, "L", "a")
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 1})
        old = a.texts()[-1]["_pos"]["epoch"]
        b = await connected(m, "L", "b", since=(old, 7))  # ahead of the lobby
        assert recoveries(b)[0]["recovered"] is False
        m.history_size = 0  # history lost
        m.history_size = 10
        c = await connected(m, "L", "c", since=(old, 0))
        rec = recoveries(c)[0]
        assert rec["recovered"] is False and rec["epoch"] != old and rec["offset"] == 0
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 2})
        assert chats(c)[-1]["_pos"] == {"lobby": "L", "epoch": rec["epoch"], "offset": 1}
        # another process (another manager): another epoch
        m2 = ConnectionManager(10, 10, history_size=10)
        d = await connected(m2, "L", "d", since=(rec["epoch"], 1))
        assert recoveries(d)[0]["recovered"] is False and recoveries(d)[0]["epoch"] != rec["epoch"]

    run(main())


def test_recovered_false_when_the_entries_expired() -> None:
    async def main() -> None:
        clock = Clock()
        m = ConnectionManager(10, 10, history_size=10, history_ttl=60, clock=clock)
        a = await connected(m, "L", "a")
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 1})
        clock.t += 30
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 2})
        epoch = a.texts()[-1]["_pos"]["epoch"]
        m.disconnect(a.ws)
        clock.t += 31  # entry 1 expired, entry 2 still kept
        b = await connected(m, "L", "a", since=(epoch, 1))
        assert offsets(b) == [2] and recoveries(b)[0]["recovered"] is True
        c = await connected(m, "L", "c", since=(epoch, 0))
        assert chats(c) == [] and recoveries(c)[0]["recovered"] is False
        m.disconnect(b.ws)
        m.disconnect(c.ws)
        clock.t += 60  # every entry expired: the ring and its epoch are gone
        assert m._history_stats() == (0, 0)
        d = await connected(m, "L", "d", since=(epoch, 2))
        rec = recoveries(d)[0]
        assert rec["recovered"] is False and rec["epoch"] != epoch and rec["offset"] == 0

    run(main())


def positions(peer: FakePeer) -> list[dict[str, Any]]:
    return [t for t in peer.texts() if t.get("type") == "lobby_position"]


def test_a_client_that_received_nothing_reconnects_from_its_position_and_gets_the_5_it_missed() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 0})  # before it came: not its business
        a = await connected(m, "L", "a")
        # it received no lobby message, yet it knows where it stands
        assert a.texts() == [positions(a)[0]]
        pos = positions(a)[0]
        assert pos["lobby"] == "L" and pos["offset"] == 1 and len(pos["epoch"]) == 12
        m.disconnect(a.ws)  # lost its connection
        for n in range(1, 6):
            await m.broadcast_to_lobby("L", {"type": "chat", "n": n})
        b = await connected(m, "L", "a", since=(pos["epoch"], pos["offset"]))
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 6})
        assert [t["n"] for t in chats(b)] == [1, 2, 3, 4, 5, 6]
        assert offsets(b) == [2, 3, 4, 5, 6, 7]
        assert recoveries(b) == [
            {"type": "recovery", "lobby": "L", "recovered": True, "epoch": pos["epoch"], "offset": 6}
        ]
        assert positions(b) == []  # with since: the recovery message says it

    run(main())


def test_a_position_message_comes_first_on_connect_and_join_in_an_empty_lobby_too() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=10)
        a = await connected(m, "L", "a")
        assert await m.join(a.ws, "R")
        first = positions(a)
        assert [(p["lobby"], p["offset"]) for p in first] == [("L", 0), ("R", 0)]
        assert first[0]["epoch"] != first[1]["epoch"]
        await m.broadcast_to_lobby("R", {"type": "chat"})
        # the epoch handed out is the one of the lobby's next messages
        assert chats(a)[0]["_pos"] == {"lobby": "R", "epoch": first[1]["epoch"], "offset": 1}
        assert await m.join(a.ws, "R")  # a member already: nothing new
        assert len(positions(a)) == 2
        # history off: no position, nothing on the wire
        off = ConnectionManager(10, 10)
        b = await connected(off, "L", "b")
        assert await off.join(b.ws, "R")
        assert b.texts() == []

    run(main())


def test_a_message_broadcast_with_exclude_user_id_is_never_replayed_to_that_user() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=100)
        a = await connected(m, "L", "alice")
        b = await connected(m, "L", "bob")
        start = positions(a)[0]
        m.disconnect(a.ws)
        m.disconnect(b.ws)
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 1})
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 2}, exclude_user_id="alice")
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 3}, exclude_user_id="bob")
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 4})
        since = (start["epoch"], start["offset"])
        a2 = await connected(m, "L", "alice", since=since)
        b2 = await connected(m, "L", "bob", since=since)
        c = await connected(m, "L", "carol", since=since)
        assert [t["n"] for t in chats(a2)] == [1, 3, 4]
        assert [t["n"] for t in chats(b2)] == [1, 2, 4]
        assert [t["n"] for t in chats(c)] == [1, 2, 3, 4]
        # recovered all the same, and the position is the lobby's: the next live one follows it
        assert recoveries(a2)[0]["recovered"] is True and recoveries(a2)[0]["offset"] == 4
        # live and replayed alike: a second connection of alice joining with since
        a3 = await connected(m, "home", "alice")
        await m.broadcast_to_lobby("L", {"type": "chat", "n": 5}, exclude_user_id="alice")
        assert [t["n"] for t in chats(a2)] == [1, 3, 4]
        assert await m.join(a3.ws, "L", since=since)
        assert [t["n"] for t in chats(a3)] == [1, 3, 4]
        # a user id that is a str subclass is compared by its characters, its methods never run
        d = await connected(m, "L", HostileStr("alice"), since=since)
        assert [t["n"] for t in chats(d)] == [1, 3, 4]

    run(main())


def test_the_excluded_user_in_the_ring_survives_finalizers_and_expiry() -> None:
    clock = Clock()
    m = ConnectionManager(10, 10, history_size=4, history_ttl=10, clock=clock)
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        for i in range(40):  # wraps the ring, drops entries with their excluded user
            Finalizer(lambda: m._history_append("L", '{"late":1}', HostileStr("f")))
            m._history_append("L", f'{{"i":{i}}}', HostileStr(f"u{i % 3}"))
            epoch, top, count = m._history_info("L") or ("", 0, 0)
            recovered, _, _, texts = m._history_since("L", epoch, top - count, f"u{i % 3}")
            assert recovered is True and texts
            assert all(f'"i":{i},' not in t for t in texts)
        with pytest.raises(TypeError, match="exclude_user_id"):
            m._history_append("L", "{}", 3)  # type: ignore[arg-type]
    finally:
        gc.set_threshold(*threshold)
    assert m._history_since("L", "\ud800" * 12, 0)[0] is False  # a lone surrogate epoch: no match
    clock.t += 11
    assert m._history_stats() == (0, 0)


@pytest.mark.parametrize(
    ("since", "exc"),
    [
        (("e", math.nan), TypeError),
        (("e", 1.0), TypeError),
        (("e", -1), ValueError),
        (("e", 2**53), ValueError),
        (("e", 10**5000), ValueError),
        (("e", True), TypeError),
        ((1, 2), TypeError),
        ("e:1", TypeError),
        (("e", 1, 2), TypeError),
        ({"epoch": "e"}, TypeError),
        (("x" * 65, 1), ValueError),
    ],
)
def test_a_bad_since_is_refused_before_the_socket_is_touched(since: Any, exc: type[Exception]) -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=10)
        peer = FakePeer()
        with pytest.raises(exc, match="since"):
            await m.connect(peer.ws, "L", "a", since=since)
        assert not peer.accepted and len(m) == 0
        a = await connected(m, "L", "a")
        with pytest.raises(exc, match="since"):
            await m.join(a.ws, "R", since=since)
        assert m.lobbies_of(a.ws) == {"L"}

    run(main())


def test_since_without_history_answers_not_recovered() -> None:
    async def main() -> None:
        m = ConnectionManager(10, 10)
        a = await connected(m, "L", "a", since=("abc", 3))
        expected = {"type": "recovery", "lobby": "L", "recovered": False, "epoch": "", "offset": 0}
        assert recoveries(a) == [expected]

    run(main())


# -- memory -----------------------------------------------------------------


def test_memory_is_bounded_with_thousands_of_lobbies() -> None:
    async def main() -> None:
        clock = Clock()
        m = ConnectionManager(10, 10, history_size=16, history_ttl=60, clock=clock)
        lobbies = [f"lobby-{i}" for i in range(3000)]
        message = {"type": "chat", "text": "x" * 40}

        async def round_() -> None:
            for lobby in lobbies:
                for _ in range(4):
                    await m.broadcast_to_lobby(lobby, message)

        tracemalloc.start()
        try:
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(4):  # 16 messages per lobby: the rings are full
                await round_()
            gc.collect()
            full = tracemalloc.get_traced_memory()[0] - base
            for _ in range(8):  # twice as many again: nothing more is kept
                await round_()
            gc.collect()
            later = tracemalloc.get_traced_memory()[0] - base
            assert m._history_stats() == (3000, 3000 * 16)
            per_entry = full / (3000 * 16)
            # the entry is its str (~130 bytes of text) plus 16 bytes of slot
            assert per_entry < 250, per_entry
            assert later <= full * 1.02, (full, later)
            clock.t += 61  # everything expired: freed on the next history call
            assert m._history_stats() == (0, 0)
            gc.collect()
            assert tracemalloc.get_traced_memory()[0] - base < full * 0.05
        finally:
            tracemalloc.stop()

    run(main())


# -- C safety (run under ASan too) -------------------------------------------


class HostileStr(str):
    def __hash__(self) -> int:
        raise RuntimeError("hash called")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq called")

    __ne__ = __eq__


def test_hostile_and_wrong_ids_never_reach_python_code_in_the_core() -> None:
    m = ConnectionManager(10, 10, history_size=4)
    text = m._history_append(HostileStr("L"), '{"a":1}')
    assert json.loads(text)["_pos"]["lobby"] == "L"
    epoch = json.loads(text)["_pos"]["epoch"]
    assert m._history_since(HostileStr("L"), HostileStr(epoch), 0)[3] == [text]
    assert m._history_info(HostileStr("L")) == (epoch, 1, 1)
    for bad in (None, 1, b"L"):
        with pytest.raises(TypeError):
            m._history_append(bad, '{"a":1}')  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            m._history_since(bad, epoch, 0)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        m._history_since("L", epoch, -1)
    with pytest.raises(TypeError):
        m._history_append("L", b"{}")  # type: ignore[arg-type]
    assert m._history_since("\ud800", "x", 0)[0] is False  # a lone surrogate as a lobby


class Finalizer:
    """A cycle whose finalizer changes the history (a GC pass may run it at
    any allocation of a tracked object)."""

    def __init__(self, action: Any) -> None:
        self.me = self
        self.action = action

    def __del__(self) -> None:
        self.action()


@pytest.mark.parametrize("action", ["clear", "append", "resize"])
def test_finalizers_during_a_replay_cannot_corrupt_it(action: str) -> None:
    m = ConnectionManager(10, 10, history_size=64)
    for i in range(64):
        m._history_append("L", f'{{"i":{i}}}')
    epoch, _, _ = m._history_info("L") or ("", 0, 0)

    def act() -> None:
        if action == "clear":
            m.history_size = 0
            m.history_size = 64
        elif action == "append":
            for i in range(100):
                m._history_append("L", f'{{"late":{i}}}')
        else:
            m.history_size = 2

    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        for _ in range(50):
            Finalizer(act)
            recovered, _, got_top, texts = m._history_since("L", epoch, 0)
            if recovered:
                assert [json.loads(t)["_pos"]["offset"] for t in texts] == list(range(1, got_top + 1))
            gc.collect()
            del texts
    finally:
        gc.set_threshold(*threshold)
    assert m._history_stats()[0] <= 1


def test_get_stats_counts_the_rings_their_bytes_and_the_recoveries() -> None:
    """get_stats()["history"] (docs/history.md): what the rings hold now,
    in lobbies, messages and bytes, and how recoveries went."""

    async def main() -> None:
        m = ConnectionManager(10, 10, history_size=3)
        zero = {
            "lobbies": 0,
            "entries": 0,
            "bytes": 0,
            "appended": 0,
            "dropped": 0,
            "backlog": 0,
            "recoveries": 0,
            "recovered": 0,
            "not_recovered": 0,
            "replayed": 0,
        }
        assert m.get_stats()["history"] == zero
        texts = []
        for n in range(5):
            for lobby in ("A", "B"):
                texts.append(m._history_append(lobby, json.dumps({"n": n, "s": "é"}, ensure_ascii=False)))
        epoch = m._history_info("A")
        assert epoch is not None
        got = m.get_stats()["history"]
        kept = [t for t in texts if '"offset":3' in t or '"offset":4' in t or '"offset":5' in t]
        assert (got["lobbies"], got["entries"], got["appended"]) == (2, 6, 10)
        assert got["bytes"] == sum(len(t) for t in kept)  # latin-1 text: one byte per character
        ok = FakePeer()
        assert await m.connect(ok.ws, "A", "u", since=(epoch[0], 3))
        late = FakePeer()
        assert await m.connect(late.ws, "A", "v", since=(epoch[0], 0))  # missed 5 > 3 kept
        fresh = FakePeer()
        assert await m.connect(fresh.ws, "B", "w")  # no since: a position, not a recovery
        got = m.get_stats()["history"]
        assert (got["recoveries"], got["recovered"], got["not_recovered"], got["replayed"]) == (2, 1, 1, 2)
        m.history_size = 0
        got = m.get_stats()["history"]
        assert (got["lobbies"], got["entries"], got["bytes"], got["appended"]) == (0, 0, 0, 10)
        assert m.get_stats(local=True)["history"] == got

    asyncio.run(main())
