"""Trying to break rooms (issue 11): memberships, capacity, presence, hostile ids.

A reviewer's attack on ``join`` / ``leave`` / ``lobbies_of`` and presence
events, as a user and as an attacker would go at them:

* a hypothesis state machine drives the core through handshakes (pending
  and committed), joins, leaves, disconnects, the "replace" policy, the stale
  sweep and limit changes, and compares every public view (counts, stats,
  refusals, ``active_connections``, ``connection_info``, ``get_lobby_users``,
  send targets, presence marks) with a plain-Python model after each step;
* the same for presence, from the members' side: each member applies the
  state and the diffs it receives, and its view must equal the lobby's users
  after every flush, without a diff ever naming a user it was not told of;
* directed cases: concurrent joins into a nearly full lobby racing
  handshakes, joins while the handshake is pending or after a disconnect,
  ``"replace"`` of a connection in several lobbies, ``exclude_user_id`` and
  ``send_to_user`` with users in several lobbies, shutdown, the heartbeat;
* hostile ids (str subclasses, huge, lone surrogates), finalizers that join,
  leave or disconnect in the middle of a call (run this file under ASan too),
  and memory: join / leave churn gives back every byte and reference.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from starlette.types import Message

from tests.asgi_fakes import FakePeer
from tests.test_c_safety import assert_rooms_consistent, call_with_finalizer
from wsmanager import ConnectionManager
from wsmanager.backends import ClusterView

T = TypeVar("T")

LOBBIES = ("a", "b", "c", "éé")
USERS = ("u1", "u2", "u3")
N_SOCKETS = 8
REFUSALS = ("server_full", "lobby_full", "user_limit")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def fresh(text: str) -> str:
    """An equal str that is a new object (the core must compare by value)."""
    return text.encode("utf-8").decode("utf-8")


class Sock:
    """A websocket stand-in for the synchronous steps: keyed by identity."""

    __slots__ = ("__weakref__", "name")

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# ===================================================================== model


class Conn:
    """The model of one registry entry."""

    def __init__(self, ws: Sock, first: str, user: str, seq: int) -> None:
        self.ws = ws
        self.first = first
        self.user = user
        self.active = False
        self.seq = seq  # reserve order while pending, commit order once active
        self.lobbies: set[str] = set()
        self.last_rx = 0.0
        self.pinged_at: float | None = None


class RoomsModel(RuleBasedStateMachine):
    """The core against a plain model, with every room operation interleaved
    with handshakes, the "replace" policy and the stale sweep."""

    def __init__(self) -> None:
        super().__init__()
        self.sockets = [Sock(f"ws{i}") for i in range(N_SOCKETS)]
        self.conns: dict[Sock, Conn] = {}
        self.seq = 0
        self.now = 1000.0
        self.dirty: set[str] = set()
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.m: ConnectionManager

    @initialize(
        max_connections=st.integers(1, 7),
        max_per_lobby=st.integers(0, 4),
        max_per_user=st.none() | st.integers(1, 3),
    )
    def create(self, max_connections: int, max_per_lobby: int, max_per_user: int | None) -> None:
        self.max_conn, self.max_lobby, self.max_user = max_connections, max_per_lobby, max_per_user
        self.m = ConnectionManager(
            max_connections,
            max_per_lobby,
            max_per_user=max_per_user,
            clock=lambda: self.now,
            ping_interval=None,
        )
        self.m._track_presence(True)

    # ------------------------------------------------------------ helpers

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def members(self, lobby: str) -> list[Conn]:
        return [c for c in self.conns.values() if c.active and lobby in c.lobbies]

    def held(self, lobby: str) -> int:
        """Memberships plus handshakes in progress into it: its capacity used."""
        return len(self.members(lobby)) + sum(
            1 for c in self.conns.values() if not c.active and c.first == lobby
        )

    def of_user(self, user: str) -> list[Conn]:
        return [c for c in self.conns.values() if c.user == user]

    def remove(self, c: Conn) -> None:
        del self.conns[c.ws]
        if c.active:
            self.dirty |= c.lobbies

    def victims(self, user: str) -> list[Conn]:
        """The user's entries in replacement order: open ones oldest first,
        then its handshakes in progress oldest first."""
        mine = self.of_user(user)
        return sorted((c for c in mine if c.active), key=lambda c: c.seq) + sorted(
            (c for c in mine if not c.active), key=lambda c: c.seq
        )

    def model_reserve(self, ws: Sock, lobby: str, user: str, replace: bool) -> tuple[str, list[Conn]]:
        replaced: list[Conn] = []
        if replace and self.max_user is not None:
            need = len(self.of_user(user)) - self.max_user + 1
            if need > 0:
                order = self.victims(user)[:need]
                in_lobby = sum(1 for c in order if (lobby in c.lobbies if c.active else c.first == lobby))
                total = len(self.conns)
                if total - need < self.max_conn and self.held(lobby) - in_lobby < self.max_lobby:
                    replaced = order
                    for c in order:
                        self.remove(c)
        if len(self.conns) >= self.max_conn:
            return "server_full", replaced
        if self.held(lobby) >= self.max_lobby:
            return "lobby_full", replaced
        if self.max_user is not None and len(self.of_user(user)) >= self.max_user:
            return "user_limit", replaced
        self.conns[ws] = Conn(ws, lobby, user, self.next_seq())
        return "", replaced

    def pick(self, data: st.DataObject, *, active: bool | None = None) -> Conn | None:
        pool = [c for c in self.conns.values() if active is None or c.active is active]
        if not pool:
            return None
        return pool[data.draw(st.integers(0, len(pool) - 1))]

    # -------------------------------------------------------------- rules

    @rule(
        i=st.integers(0, N_SOCKETS - 1),
        lobby=st.sampled_from(LOBBIES),
        user=st.sampled_from(USERS),
        replace=st.booleans(),
        commit=st.booleans(),
    )
    def reserve(self, i: int, lobby: str, user: str, replace: bool, commit: bool) -> None:
        ws = self.sockets[i]
        if ws in self.conns:
            with pytest.raises(ValueError):
                self.m._reserve(ws, fresh(lobby), fresh(user))
            return
        expected, replaced = self.model_reserve(ws, lobby, user, replace)
        if expected:
            self.refused[expected] += 1
        if replace:
            got, open_replaced, pending_replaced = self.m._reserve(ws, fresh(lobby), fresh(user), True)
            assert {id(w) for w in open_replaced} == {id(c.ws) for c in replaced if c.active}
            assert pending_replaced == sum(1 for c in replaced if not c.active)
        else:
            got = self.m._reserve(ws, fresh(lobby), fresh(user))
        assert got == expected
        if not expected and commit:
            self.commit_ws(ws)

    def commit_ws(self, ws: Sock) -> None:
        c = self.conns[ws]
        assert self.m._commit(ws) is True
        c.active, c.seq, c.lobbies, c.last_rx = True, self.next_seq(), {c.first}, self.now
        self.dirty.add(c.first)

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        c = self.pick(data, active=False)
        if c is not None:
            self.commit_ws(c.ws)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        c = self.pick(data, active=False)
        if c is not None:
            assert self.m._release(c.ws) is True
            self.remove(c)

    @rule(i=st.integers(0, N_SOCKETS - 1), lobby=st.sampled_from(LOBBIES))
    def join(self, i: int, lobby: str) -> None:
        ws = self.sockets[i]
        c = self.conns.get(ws)
        got = self.m._join(ws, fresh(lobby))
        if c is None or not c.active:
            assert got == "not_connected"  # unknown, or its handshake is pending
        elif lobby in c.lobbies:
            assert got == "member"
        elif self.held(lobby) >= self.max_lobby:
            assert got == "lobby_full"
            self.refused["lobby_full"] += 1
        else:
            assert got == ""
            c.lobbies.add(lobby)
            self.dirty.add(lobby)

    @rule(i=st.integers(0, N_SOCKETS - 1), lobby=st.sampled_from(LOBBIES))
    def leave(self, i: int, lobby: str) -> None:
        ws = self.sockets[i]
        c = self.conns.get(ws)
        member = c is not None and c.active and lobby in c.lobbies
        assert self.m.leave(ws, fresh(lobby)) is member
        if member:
            assert c is not None
            c.lobbies.discard(lobby)
            self.dirty.add(lobby)

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def disconnect(self, i: int) -> None:
        ws = self.sockets[i]
        c = self.conns.get(ws)
        got = self.m.disconnect(ws)
        if c is None or not c.active:
            assert got is None
            return
        assert got == (c.first, c.user)  # the connect() lobby, even if it was left
        self.remove(c)

    @rule()
    def stale_sweep(self) -> None:
        """The heartbeat's two steps: silent connections pinged, then removed."""
        self.now += 10.0
        to_ping, expired = self.m._sweep(5.0, 5.0)
        due = [c for c in self.conns.values() if c.active and c.pinged_at is not None]
        gone = [c for c in due if c.pinged_at is not None and c.pinged_at + 5.0 <= self.now]
        assert sorted((t[0].name, t[1], t[2]) for t in expired) == sorted(
            (c.ws.name, c.first, c.user) for c in gone
        )
        for c in gone:
            self.remove(c)
        idle = [c for c in self.conns.values() if c.active and c.pinged_at is None]
        pinged = [c for c in idle if c.last_rx + 5.0 <= self.now]
        assert {id(w) for w in to_ping} == {id(c.ws) for c in pinged}
        for c in pinged:
            c.pinged_at = self.now

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def touch(self, i: int) -> None:
        ws = self.sockets[i]
        c = self.conns.get(ws)
        self.m.touch(ws)
        if c is not None and c.active:
            c.last_rx, c.pinged_at = self.now, None

    @rule(value=st.integers(0, 4))
    def set_max_per_lobby(self, value: int) -> None:
        self.m.max_per_lobby = self.max_lobby = value

    @rule(value=st.integers(1, 7))
    def set_max_connections(self, value: int) -> None:
        self.m.max_connections = self.max_conn = value

    @rule(lobby=st.sampled_from(LOBBIES))
    def can_accept(self, lobby: str) -> None:
        if len(self.conns) >= self.max_conn:
            expected = (False, "server_full")
        elif self.held(lobby) >= self.max_lobby:
            expected = (False, "lobby_full")
        else:
            expected = (True, "")
        if not expected[0]:
            self.refused[expected[1]] += 1
        assert self.m.can_accept_connection(fresh(lobby)) == expected

    @rule()
    def take_dirty(self) -> None:
        got = self.m._take_dirty()
        assert len(got) == len(set(got))  # each lobby once
        assert set(got) == self.dirty
        self.dirty = set()

    # --------------------------------------------------------- invariants

    @invariant()
    def views_agree(self) -> None:
        m = self.m
        active = [c for c in self.conns.values() if c.active]
        stats = m.get_stats()
        lobbies = {lobby for c in active for lobby in c.lobbies}
        users = {c.user for c in active}
        assert len(m) == stats["total_connections"] == len(active)
        assert stats["active_lobbies"] == len(lobbies)
        assert stats["connected_users"] == len(users)
        assert {k: stats["refused"][k] for k in REFUSALS} == self.refused  # type: ignore[literal-required]
        assert dict(m.connection_info) == {c.ws: (c.first, c.user) for c in active}
        assert dict(m.active_connections) == {
            lobby: frozenset(c.ws for c in self.members(lobby)) for lobby in lobbies
        }
        for c in self.conns.values():
            assert m.lobbies_of(c.ws) == (c.lobbies if c.active else set())
            assert (c.ws in m) is c.active
        for lobby in LOBBIES:
            members = self.members(lobby)
            targets = m._lobby_targets(lobby)
            assert len(targets) == len(members) == m._lobby_count(lobby)
            assert {id(w) for w in targets} == {id(c.ws) for c in members}
            assert m.get_lobby_users(lobby) == {c.user for c in members}
            for user in USERS:
                assert {id(w) for w in m._lobby_targets(lobby, user)} == {
                    id(c.ws) for c in members if c.user != user
                }
        for user in USERS:
            mine = sorted((c for c in active if c.user == user), key=lambda c: c.seq)
            assert m._user_targets(user) == [c.ws for c in mine]  # oldest first
            assert m.is_user_connected(user) is bool(mine)


TestRoomsModel = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)(RoomsModel).TestCase


# ================================================== presence, members' side


class Member:
    """A client applying the presence messages it receives, as the browser
    client does: a state replaces its view of a lobby, a diff updates it."""

    def __init__(self, peer: FakePeer) -> None:
        self.peer = peer
        self.seen = 0
        self.views: dict[str, set[str]] = {}

    def read(self) -> list[dict[str, Any]]:
        """Apply what arrived since the last read; returns the diffs."""
        frames = [f for f in self.peer.frames if f["type"] == "websocket.send"]
        diffs = []
        for frame in frames[self.seen :]:
            msg = json.loads(frame["text"])
            if msg.get("type") != "presence":
                continue
            lobby = msg["lobby"]
            assert len(set(msg["joins"])) == len(msg["joins"]) and msg["joins"] == sorted(msg["joins"])
            if msg.get("state"):
                assert msg["leaves"] == []
                self.views[lobby] = set(msg["joins"])
                continue
            assert lobby in self.views, f"a diff of {lobby} before its state"
            view = self.views[lobby]
            joins, leaves = set(msg["joins"]), set(msg["leaves"])
            assert joins or leaves, "an empty diff was sent"
            assert not joins & view, f"{joins & view} joined twice"
            assert leaves <= view, f"{leaves - view} left without having joined"
            view |= joins
            view -= leaves
            diffs.append(msg)
        self.seen = len(frames)
        return diffs


OPS = st.lists(
    st.tuples(
        st.sampled_from(["connect", "join", "leave", "disconnect", "abrupt", "flush", "rejoin"]),
        st.integers(0, 5),
        st.sampled_from(("a", "b", "c")),
        st.sampled_from(USERS),
    ),
    max_size=40,
)


def check_presence_run(ops: list[tuple[str, int, str, str]], replace: bool) -> None:
    async def main() -> None:
        m = ConnectionManager(
            100,
            4,
            max_per_user=2 if replace else None,
            on_user_limit="replace" if replace else "refuse",
            presence_events=True,
            presence_interval=3600,  # flushed by hand only
            ping_interval=None,
        )
        assert m.presence is not None
        members: list[Member | None] = [None] * 6

        def settle() -> None:
            for _ in range(3):  # a failed presence send removes its member: flush again
                m.presence.flush()  # type: ignore[union-attr]
                for mb in members:
                    if mb is not None:
                        lobbies = [d["lobby"] for d in mb.read()]
                        assert len(lobbies) == len(set(lobbies)), "two diffs of a lobby in one flush"
            for i, mb in enumerate(members):
                if mb is None:
                    continue
                if mb.peer.ws not in m:
                    members[i] = None
                    continue
                for lobby in m.lobbies_of(mb.peer.ws):
                    assert mb.views.get(lobby) == m.get_lobby_users(lobby), (i, lobby)

        for op, i, lobby, user in ops:
            mb = members[i]
            if op == "connect" and mb is None:
                peer = FakePeer()
                if await m.connect(peer.ws, lobby, user):
                    members[i] = Member(peer)
            elif mb is None:
                continue
            elif op == "join" or op == "rejoin":
                if op == "rejoin":
                    m.leave(mb.peer.ws, lobby)
                await m.join(mb.peer.ws, lobby)
            elif op == "leave":
                m.leave(mb.peer.ws, lobby)
                mb.views.pop(lobby, None)
            elif op == "disconnect":
                m.disconnect(mb.peer.ws)
            elif op == "abrupt":
                mb.peer.fail_sends = True
                await m.broadcast_to_lobby(lobby, {"type": "chat"})
            elif op == "flush":
                settle()
            if mb is not None:
                mb.read()  # applied as they come: a diff must fit what came before it
        settle()
        await m.shutdown(timeout=1)

    run(main())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, replace=st.booleans())
def test_presence_members_views_stay_exact(ops: list[tuple[str, int, str, str]], replace: bool) -> None:
    """Whatever the order of connects, joins, leaves, rejoins, disconnects,
    failed sends and "replace" closes, every member's view of each of its
    lobbies equals ``get_lobby_users`` after a flush, and no diff names a
    user joining that it already had or leaving that it never had."""
    check_presence_run(ops, replace)


# ========================================================= directed attacks


async def connected(m: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user) is True
    return peer


def chat(peer: FakePeer) -> list[Any]:
    return [t for t in peer.texts() if t.get("type") == "chat"]


def presence_of(peer: FakePeer, lobby: str) -> list[Any]:
    return [t for t in peer.texts() if t.get("type") == "presence" and t["lobby"] == lobby]


def test_joins_racing_handshakes_into_a_nearly_full_lobby_never_overshoot() -> None:
    """10 handshakes (suspended in accept()) and 10 joins race for the 3
    places left in a lobby: exactly 3 get in, every other one is refused
    once as lobby_full, the refused handshakes are closed 4002."""

    async def main() -> None:
        m = ConnectionManager(100, 5, ping_interval=None)
        await connected(m, "hot", "owner1")
        await connected(m, "hot", "owner2")
        joiners = [await connected(m, f"home{i}", f"j{i}") for i in range(10)]
        handshakes = [FakePeer(accept_yields=3) for _ in range(10)]
        calls: list[Coroutine[Any, Any, bool]] = []
        for i in range(10):
            calls.append(m.connect(handshakes[i].ws, "hot", f"h{i}"))
            calls.append(m.join(joiners[i].ws, "hot"))
        results = await asyncio.gather(*calls)
        assert results.count(True) == 3
        assert m._lobby_count("hot") == 5 == len(m.active_connections["hot"])
        assert m.get_stats()["refused"]["lobby_full"] == 17
        refused = [p for p, ok in zip(handshakes, results[::2], strict=True) if not ok]
        assert all(p.close_code == 4002 and p.close_reason == "lobby_full" for p in refused)
        assert m.can_accept_connection("hot") == (False, "lobby_full")
        await m.shutdown(timeout=1)

    run(main())


def test_join_while_the_handshake_is_pending_is_refused_not_connected() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, ping_interval=None, presence_events=True)
        peer = FakePeer(accept_yields=5)
        task = asyncio.ensure_future(m.connect(peer.ws, "A", "alice"))
        await asyncio.sleep(0)  # reserved, inside accept()
        assert not peer.accepted
        assert await m.join(peer.ws, "B") is False
        assert m.leave(peer.ws, "A") is False  # a handshake is in no lobby yet
        assert m.lobbies_of(peer.ws) == set()
        assert await task is True
        assert m.lobbies_of(peer.ws) == {"A"}
        assert m.get_lobby_users("B") == set()
        assert m.get_stats()["refused"]["lobby_full"] == 0
        assert [t["lobby"] for t in peer.texts() if t.get("type") == "presence"] == ["A"]
        await m.shutdown(timeout=1)

    run(main())


def test_leave_the_first_lobby_then_rejoin_it() -> None:
    """Its place is freed, taken by someone else (the rejoin is refused), freed
    again and taken back; broadcasts reach it once; disconnect() still names
    the first lobby and every count returns to zero."""

    async def main() -> None:
        m = ConnectionManager(100, 1, ping_interval=None)
        a = await connected(m, "A", "alice")
        assert await m.join(a.ws, "B")
        assert m.leave(a.ws, "A") is True
        bob = await connected(m, "A", "bob")
        assert await m.join(a.ws, "A") is False  # full again
        assert m.disconnect(bob.ws) == ("A", "bob")
        assert await m.join(a.ws, "A") is True
        assert m.lobbies_of(a.ws) == {"A", "B"}
        assert await m.broadcast_to_lobby("A", {"type": "chat"}) == 1
        assert len(chat(a)) == 1
        assert m.can_accept_connection("A") == (False, "lobby_full")
        assert m.leave(a.ws, "A") is True and m.leave(a.ws, "A") is False
        assert m.can_accept_connection("A") == (True, "")
        assert dict(m.connection_info) == {a.ws: ("A", "alice")}
        assert m.disconnect(a.ws) == ("A", "alice")
        stats = m.get_stats()
        assert (stats["total_connections"], stats["active_lobbies"], stats["connected_users"]) == (0, 0, 0)
        assert m._snapshot() == [] and dict(m.active_connections) == {}

    run(main())


def test_joining_the_same_lobby_twice_at_once_is_one_membership_and_one_state() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 1, presence_events=True, ping_interval=None)
        a = await connected(m, "A", "alice")
        assert list(await asyncio.gather(m.join(a.ws, "B"), m.join(a.ws, "B"))) == [True, True]
        assert m._lobby_count("B") == 1
        assert m.get_stats()["refused"]["lobby_full"] == 0
        assert len(presence_of(a, "B")) == 1
        assert m.leave(a.ws, "B") is True and m.lobbies_of(a.ws) == {"A"}
        await m.shutdown(timeout=1)

    run(main())


def test_replace_removes_the_old_connection_from_every_lobby() -> None:
    """on_user_limit="replace": the replaced connection was in three lobbies;
    it leaves all three (each watcher sees alice leave once, the lobby that
    the new tab shares sees nothing), it is closed 4003, counts stay exact."""

    async def main() -> None:
        m = ConnectionManager(
            100, 10, max_per_user=1, on_user_limit="replace", presence_events=True, ping_interval=None
        )
        assert m.presence is not None
        old = await connected(m, "A", "alice")
        assert await m.join(old.ws, "B") and await m.join(old.ws, "C")
        watchers = {lobby: await connected(m, lobby, f"w{lobby}") for lobby in ("A", "B", "C")}
        m.presence.flush()
        new = await connected(m, "C", "alice")
        await asyncio.sleep(0.01)  # the background close
        assert old.close_code == 4003 and old.close_reason == "replaced"
        assert old.ws not in m and m.lobbies_of(old.ws) == set()
        assert m.lobbies_of(new.ws) == {"C"}
        assert m.get_lobby_users("A") == {"wA"} and m.get_lobby_users("B") == {"wB"}
        assert m.get_lobby_users("C") == {"wC", "alice"}
        stats = m.get_stats()
        assert (stats["total_connections"], stats["active_lobbies"], stats["connected_users"]) == (4, 3, 4)
        assert stats["closed"].get("replaced") == 1
        m.presence.flush()
        for lobby in ("A", "B"):
            assert presence_of(watchers[lobby], lobby)[-1]["leaves"] == ["alice"]
        # alice stayed in C through the new tab: no diff there
        assert [p for p in presence_of(watchers["C"], "C") if "state" not in p][-1]["joins"] == [
            "alice",
            "wC",
        ]
        await m.shutdown(timeout=1)

    run(main())


def test_replace_frees_the_place_the_old_connection_held_as_a_guest() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 2, max_per_user=1, on_user_limit="replace", ping_interval=None)
        await connected(m, "L", "bob")
        old = await connected(m, "home", "alice")
        assert await m.join(old.ws, "L")
        assert m.can_accept_connection("L") == (False, "lobby_full")
        new = await connected(m, "L", "alice")  # admitted: replacing alice frees her place in L
        assert m.get_lobby_users("L") == {"bob", "alice"} and m._lobby_count("L") == 2
        assert old.ws not in m and new.ws in m
        assert m.get_lobby_users("home") == set()
        await m.shutdown(timeout=1)

    run(main())


def test_max_connections_counts_connections_not_memberships() -> None:
    async def main() -> None:
        m = ConnectionManager(2, 10, ping_interval=None)
        a = await connected(m, "A", "alice")
        b = await connected(m, "B", "bob")
        for lobby in ("X", "Y", "Z"):
            assert await m.join(a.ws, lobby) and await m.join(b.ws, lobby)
        stats = m.get_stats()
        assert stats["total_connections"] == 2 and stats["capacity_percent"] == 100.0
        assert stats["active_lobbies"] == 5
        assert m.can_accept_connection("Q") == (False, "server_full")
        for lobby in ("A", "X", "Y", "Z"):
            m.leave(a.ws, lobby)
        assert m.lobbies_of(a.ws) == set()
        assert m.can_accept_connection("Q") == (False, "server_full")  # still a connection
        m.disconnect(a.ws)
        assert m.can_accept_connection("Q") == (True, "")
        assert m.get_stats()["active_lobbies"] == 4

    run(main())


def test_exclude_user_id_skips_every_tab_of_a_user_in_several_lobbies() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, ping_interval=None)
        tab1 = await connected(m, "L", "alice")
        tab2 = await connected(m, "M", "alice")
        assert await m.join(tab2.ws, "L")
        bob = await connected(m, "N", "bob")
        assert await m.join(bob.ws, "L")
        assert await m.broadcast_to_lobby("L", {"type": "chat", "n": 1}, exclude_user_id="alice") == 1
        assert chat(bob) == [{"type": "chat", "n": 1}] and chat(tab1) == chat(tab2) == []
        assert await m.broadcast_to_lobby("L", {"type": "chat", "n": 2}, exclude_user_id="bob") == 2
        assert len(chat(tab1)) == len(chat(tab2)) == 1 and len(chat(bob)) == 1
        assert await m.broadcast_to_lobby("M", {"type": "chat", "n": 3}, exclude_user_id="alice") == 0

    run(main())


def test_send_to_user_reaches_each_connection_once_whatever_its_lobbies() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, ping_interval=None)
        tab1 = await connected(m, "A", "alice")
        tab2 = await connected(m, "B", "alice")
        for lobby in ("A", "B", "C"):
            await m.join(tab1.ws, lobby)
            await m.join(tab2.ws, lobby)
        m.leave(tab2.ws, "B")  # one tab in no first lobby
        assert await m.send_to_user("alice", {"type": "chat"}) is True
        assert len(chat(tab1)) == 1 and len(chat(tab2)) == 1
        assert m._user_targets("alice") == [tab1.ws, tab2.ws]

    run(main())


def test_shutdown_closes_connections_in_several_lobbies_and_in_none() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, ping_interval=None, presence_events=True)
        a = await connected(m, "A", "alice")
        await m.join(a.ws, "B")
        nowhere = await connected(m, "A", "bob")
        m.leave(nowhere.ws, "A")
        c = await connected(m, "C", "carol")
        await m.shutdown(timeout=2)
        assert [p.close_code for p in (a, nowhere, c)] == [1001, 1001, 1001]
        stats = m.get_stats()
        assert (stats["total_connections"], stats["active_lobbies"], stats["connected_users"]) == (0, 0, 0)
        assert all(m.lobbies_of(p.ws) == set() for p in (a, nowhere, c))
        assert dict(m.active_connections) == {} and dict(m.connection_info) == {}

    run(main())


def test_the_stale_sweep_removes_a_silent_connection_from_every_lobby() -> None:
    async def main() -> None:
        clock = [100.0]
        m = ConnectionManager(
            100, 10, clock=lambda: clock[0], ping_interval=5, ping_timeout=5, presence_events=True
        )
        assert m.presence is not None
        silent = await connected(m, "A", "silent")
        for lobby in ("B", "C"):
            assert await m.join(silent.ws, lobby)
        watchers = [await connected(m, lobby, f"w{lobby}") for lobby in ("A", "B", "C")]
        m.presence.flush()
        for _ in range(2):
            clock[0] += 6.0
            for w in watchers:
                m.touch(w.ws)
            await m.health.sweep(wait=True)
        assert silent.ws not in m and m.lobbies_of(silent.ws) == set()
        assert all(m.get_lobby_users(lobby) == {f"w{lobby}"} for lobby in ("A", "B", "C"))
        m.presence.flush()
        for w, lobby in zip(watchers, ("A", "B", "C"), strict=True):
            assert presence_of(w, lobby)[-1] == {
                "type": "presence",
                "lobby": lobby,
                "joins": [],
                "leaves": ["silent"],
            }
        assert m.get_stats()["active_lobbies"] == 3
        await m.shutdown(timeout=1)

    run(main())


def test_a_broadcast_whose_send_makes_members_leave_and_rejoin() -> None:
    """During the fan-out a send makes a later recipient leave and rejoin
    (still a member at its turn: gets it once), another leave for good and
    join elsewhere (skipped), and a third leave its first lobby then join it
    back as a guest (gets it once)."""

    async def main() -> None:
        m = ConnectionManager(100, 10, ping_interval=None)
        peers = [await connected(m, "L", f"u{i}") for i in range(5)]
        original = peers[0].ws._send

        async def hostile(message: Message) -> None:
            await original(message)
            if message["type"] == "websocket.send":
                m.leave(peers[1].ws, "L")
                await m.join(peers[1].ws, "L")
                m.leave(peers[2].ws, "L")
                await m.join(peers[2].ws, "Z")
                m.leave(peers[3].ws, "L")
                await m.join(peers[3].ws, "L")

        peers[0].ws._send = hostile
        assert await m.broadcast_to_lobby("L", {"type": "chat"}) == 4
        assert [len(chat(p)) for p in peers] == [1, 1, 0, 1, 1]
        assert_rooms_consistent(m)
        assert await m.broadcast_to_lobby("L", {"type": "chat"}) == 4
        assert [len(chat(p)) for p in peers] == [2, 2, 0, 2, 2]

    run(main())


# ================================================================ hostile ids


class RaisingStr(str):
    """A lobby code whose own hash and eq raise: only the core's exact copy
    of it may be hashed or compared."""

    __slots__ = ()

    def __hash__(self) -> int:
        raise RuntimeError("hash of a hostile id")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq of a hostile id")


@pytest.mark.parametrize("presence", [False, True])
def test_a_str_subclass_lobby_whose_hash_raises_is_used_by_value(presence: bool) -> None:
    """connect() and join() with such a lobby code register the plain id and
    return True; with presence on the state message goes out too (the code
    is never hashed by Python code either)."""

    async def main() -> None:
        m = ConnectionManager(100, 10, presence_events=presence, ping_interval=None)
        a = FakePeer()
        assert await m.connect(a.ws, RaisingStr("L"), "alice") is True
        b = await connected(m, "X", "bob")
        assert await m.join(b.ws, RaisingStr("L")) is True
        assert await m.join(b.ws, RaisingStr("L")) is True  # already a member
        assert m.leave(b.ws, RaisingStr("X")) is True
        assert m.lobbies_of(b.ws) == {"L"} and all(type(k) is str for k in m.lobbies_of(b.ws))
        assert m.get_lobby_users(RaisingStr("L")) == {"alice", "bob"}
        assert all(type(k) is str for k in m.active_connections)
        if presence:
            assert presence_of(a, "L") == [
                {"type": "presence", "lobby": "L", "joins": [], "leaves": [], "state": True}
            ]
            assert len(presence_of(b, "L")) == 1
        await m.shutdown(timeout=1)

    run(main())


def test_huge_and_lone_surrogate_lobby_codes() -> None:
    async def main() -> None:
        m = ConnectionManager(100, 10, max_id_bytes=1 << 20, presence_events=True, ping_interval=None)
        assert m.presence is not None
        a = await connected(m, "A", "alice")
        huge = "é" * (1 << 19)  # exactly 1 MiB of UTF-8
        assert await m.join(a.ws, huge) is True
        with pytest.raises(ValueError):
            await m.join(a.ws, huge + "x")
        for bad in ("\ud800", "a\udfffb", ""):
            with pytest.raises(ValueError):
                await m.join(a.ws, bad)
            assert m.leave(a.ws, bad) is False
            assert m.get_lobby_users(bad) == set()
            assert await m.broadcast_to_lobby(bad, {"type": "chat"}) == 0
        for wrong in (None, 5, b"A", ["A"]):
            with pytest.raises(TypeError):
                await m.join(a.ws, wrong)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                m.leave(a.ws, wrong)  # type: ignore[arg-type]
        assert m.lobbies_of(a.ws) == {"A", huge}
        m.presence.flush()
        assert presence_of(a, huge)[-1] == {
            "type": "presence",
            "lobby": huge,
            "joins": ["alice"],
            "leaves": [],
        }
        assert m.leave(a.ws, huge) is True
        assert m.get_stats()["active_lobbies"] == 1
        await m.shutdown(timeout=1)

    run(main())


# =============================================== finalizers in the middle of a call


def many_rooms(m: ConnectionManager, n_lobbies: int = 40) -> list[Any]:
    """Six connections of three users, each in its own lobby plus L0..L<n>."""
    socks = []
    for i in range(6):
        ws = Sock(f"s{i}")
        assert m._reserve(ws, fresh(f"H{i}"), fresh(f"u{i % 3}")) == ""
        assert m._commit(ws)
        for k in range(n_lobbies):
            assert m._join(ws, fresh(f"L{k}")) == ""
        socks.append(ws)
    return socks


def room_action(m: ConnectionManager, socks: list[Any], action: str) -> Callable[[], None]:
    def act() -> None:
        if action == "disconnect":
            for ws in socks:
                m.disconnect(ws)
        elif action == "leave":
            for ws in socks:
                for lobby in list(m.lobbies_of(ws)):
                    m.leave(ws, lobby)
        elif action == "join":
            for ws in socks:
                for k in range(40, 80):
                    m._join(ws, fresh(f"L{k}"))
        else:  # replace every connection of u0 by a new handshake
            m.on_user_limit = "replace"
            m.max_per_user = 1
            m._reserve(Sock("newcomer"), fresh("L0"), fresh("u0"), True)

    return act


ROOM_CALLS: dict[str, Callable[[ConnectionManager, list[Any]], Any]] = {
    "lobbies_of": lambda m, socks: m.lobbies_of(socks[0]),
    "get_lobby_users": lambda m, socks: m.get_lobby_users("L0"),
    "lobby_targets": lambda m, socks: m._lobby_targets("L0"),
    "lobby_targets_exclude": lambda m, socks: m._lobby_targets("L0", "u1"),
    "user_targets": lambda m, socks: m._user_targets("u0"),
    "active_connections": lambda m, socks: dict(m.active_connections),
    "connection_info": lambda m, socks: dict(m.connection_info),
    "take_dirty": lambda m, socks: m._take_dirty(),
    "snapshot": lambda m, socks: m._snapshot(),
}


@pytest.mark.parametrize("call", sorted(ROOM_CALLS))
@pytest.mark.parametrize("action", ["disconnect", "leave", "join", "replace"])
@pytest.mark.parametrize("after", [0, 2])
def test_finalizer_joining_leaving_disconnecting_during_multi_lobby_reads(
    call: str, action: str, after: int
) -> None:
    """A GC finalizer that disconnects, leaves every lobby, joins 40 more or
    replaces connections while a multi-lobby connection's lobbies, a lobby
    of guests or the compatibility views are read: no crash (ASan), no None,
    no duplicate, and the registry agrees with itself afterwards."""
    m = ConnectionManager(1000, 100, ping_interval=None)
    m._track_presence(True)
    socks = many_rooms(m)
    result, _fired = call_with_finalizer(
        lambda: ROOM_CALLS[call](m, socks), room_action(m, socks, action), after=after
    )
    if isinstance(result, list):
        assert None not in result
        if call != "take_dirty" and call != "snapshot":
            assert len({id(x) for x in result}) == len(result)
    assert_rooms_consistent(m)
    m._track_presence(False)
    for ws in socks:
        m.disconnect(ws)


@pytest.mark.parametrize("action", ["disconnect", "leave", "join", "replace"])
def test_finalizer_during_a_fanout_to_a_lobby_of_guests(action: str) -> None:
    """The C fan-out (csrc/fanout.c) to a lobby whose members are all guests,
    with a finalizer that changes the memberships at the first allocation:
    each recipient gets the message at most once and only while a member."""

    async def main() -> None:
        m = ConnectionManager(1000, 100, ping_interval=None)
        peers = [FakePeer() for _ in range(6)]
        for i, p in enumerate(peers):
            assert await m.connect(p.ws, f"H{i}", f"u{i % 3}")
            for k in range(5):
                assert await m.join(p.ws, f"L{k}")
        socks = [p.ws for p in peers]
        data = json.dumps({"type": "chat"})
        sent, _fired = call_with_finalizer(
            lambda: m.delivery.deliver_lobby_now("L0", data, None), room_action(m, socks, action)
        )
        got = [len(chat(p)) for p in peers]
        assert all(n <= 1 for n in got) and sent == sum(got)
        assert_rooms_consistent(m)
        await m.shutdown(timeout=1)

    run(main())


# ===================================================================== memory


def test_join_leave_churn_gives_back_every_byte_and_reference() -> None:
    """Thousands of join / leave cycles (and disconnects of connections in
    several lobbies) over lobby codes used nowhere else: traced memory flat,
    every count back to zero, each code's refcount back to what it was."""
    codes = [f"room-{i}-{'x' * 3}" for i in range(64)]  # built at runtime: ours alone
    before_refs = [sys.getrefcount(c) for c in codes]
    m = ConnectionManager(1000, 1000, ping_interval=None)
    m._track_presence(True)
    socks = [Sock(f"s{i}") for i in range(32)]

    def cycles(count: int) -> None:
        for i in range(count):
            ws = socks[i % len(socks)]
            if ws not in m:
                assert m._reserve(ws, codes[i % 7], f"user{i % 5}") == ""
                assert m._commit(ws)
            lobby = codes[(i * 13) % len(codes)]
            m._join(ws, lobby)
            if i % 3:
                m.leave(ws, lobby)
            if i % 11 == 0:
                m.leave(ws, codes[i % 7])  # its first lobby
            if i % 17 == 0:
                m.disconnect(ws)
            if i % 50 == 0:
                m._take_dirty()

    def drain() -> None:
        for ws in socks:
            m.disconnect(ws)
        m._take_dirty()

    tracemalloc.start()
    try:
        cycles(5_000)
        drain()
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        cycles(20_000)
        drain()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"grew by {grown} bytes"
    stats = m.get_stats()
    assert (stats["total_connections"], stats["active_lobbies"], stats["connected_users"]) == (0, 0, 0)
    assert [sys.getrefcount(c) for c in codes] == before_refs
    assert all(m.lobbies_of(ws) == set() for ws in socks)


def test_presence_churn_keeps_no_announced_state_for_empty_lobbies() -> None:
    async def main() -> None:
        m = ConnectionManager(1000, 1000, presence_events=True, presence_interval=3600, ping_interval=None)
        assert m.presence is not None
        a = await connected(m, "home", "alice")
        for i in range(500):
            lobby = f"r{i}"
            assert await m.join(a.ws, lobby)
            if i % 2:
                m.presence.flush()
            m.leave(a.ws, lobby)
        m.presence.flush()
        assert set(m.presence.announced) == {"home"}
        m.disconnect(a.ws)
        m.presence.flush()
        assert m.presence.announced == {}
        assert m._take_dirty() == []
        await m.shutdown(timeout=1)

    run(main())


# ============================================ a clustered backend's join paths


class FakeCluster:
    """A clustered backend that admits every connection and lets the test
    decide, and delay, each membership (``join``)."""

    clustered = True

    def __init__(self) -> None:
        self.view = ClusterView()
        self.gate: asyncio.Event | None = None
        self.verdict = ""
        self.error: BaseException | None = None
        self.calls: list[tuple[Any, ...]] = []

    def bind(self, manager: ConnectionManager) -> None:
        self.manager = manager

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def ensure_running(self) -> None:
        pass

    def pending_count(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"backend": "fake", "up": True}

    async def reserve(self, websocket: Any, lobby: str, user: str) -> str:
        return ""

    def commit(self, websocket: Any) -> None:
        self.calls.append(("commit", websocket))

    def release(self, websocket: Any) -> None:
        self.calls.append(("release", websocket))

    def publish_lobby(self, lobby: str, data: str, exclude: str | None) -> int:
        return 0

    def publish_user(self, user: str, data: str) -> int:
        return 0

    async def join(self, websocket: Any, lobby: str) -> str:
        self.calls.append(("join", websocket, lobby))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            error, self.error = self.error, None  # once
            raise error
        return self.verdict

    def leave(self, websocket: Any, lobby: str) -> None:
        self.calls.append(("leave", websocket, lobby))


def clustered(max_per_lobby: int = 1, **kwargs: Any) -> tuple[ConnectionManager, FakeCluster]:
    bp = FakeCluster()
    return ConnectionManager(100, max_per_lobby, backend=bp, ping_interval=None, **kwargs), bp


@pytest.mark.parametrize("outcome", ["refused", "raises", "cancelled", "disconnected"])
def test_a_clustered_join_that_fails_frees_its_local_place(outcome: str) -> None:
    """The local place a clustered join holds while the backend decides is
    given back however the join ends: refused (counted once), the backend
    raising, the join cancelled, or the connection gone meanwhile."""

    async def main() -> None:
        m, bp = clustered(1)
        a = await connected(m, "A", "alice")
        bp.gate = asyncio.Event()
        if outcome == "refused":
            bp.verdict = "lobby_full"
        elif outcome == "raises":
            bp.error = RuntimeError("redis down")
        task = asyncio.ensure_future(m.join(a.ws, "B"))
        await asyncio.sleep(0)
        assert m.can_accept_connection("B") == (False, "lobby_full")  # held meanwhile
        if outcome == "cancelled":
            task.cancel()
        if outcome == "disconnected":
            m.disconnect(a.ws)
        bp.gate.set()
        result = await asyncio.gather(task, return_exceptions=True)
        expected: Any = {
            "refused": False,
            "raises": RuntimeError,
            "cancelled": asyncio.CancelledError,
            "disconnected": False,
        }[outcome]
        if isinstance(expected, bool):
            assert list(result) == [expected]
        else:
            assert isinstance(result[0], expected)
        assert m.lobbies_of(a.ws) == ({"A"} if outcome != "disconnected" else set())
        assert m._lobby_count("B") == 0 and m.get_lobby_users("B") == set()
        refused = m.get_stats()["refused"]["lobby_full"]
        assert refused == (2 if outcome == "refused" else 1)  # + the probe above
        bp.gate, bp.verdict, bp.error = None, "", None
        b = await connected(m, "C", "bob")
        assert await m.join(b.ws, "B") is True  # the place is free
        assert m.get_stats(local=True)["active_lobbies"] == 3 - (outcome == "disconnected")

    run(main())


@pytest.mark.parametrize("max_per_lobby", [1, 5])
def test_two_clustered_joins_of_one_connection_to_one_lobby_at_once(max_per_lobby: int) -> None:
    """Joining a lobby it is (being) joined to: True for both (as without a
    backend), no refusal counted, one membership, and one cluster membership
    (the backend's joins and leaves balance)."""

    async def main() -> None:
        m, bp = clustered(max_per_lobby)
        a = await connected(m, "A", "alice")
        bp.gate = asyncio.Event()
        first = asyncio.ensure_future(m.join(a.ws, "B"))
        second = asyncio.ensure_future(m.join(a.ws, "B"))
        await asyncio.sleep(0)
        bp.gate.set()
        assert [await first, await second] == [True, True]
        assert m._lobby_count("B") == 1
        assert m.get_stats()["refused"]["lobby_full"] == 0
        joins = sum(1 for c in bp.calls if c[0] == "join")
        leaves = sum(1 for c in bp.calls if c[0] == "leave")
        assert m.leave(a.ws, "B") is True
        leaves_after = sum(1 for c in bp.calls if c[0] == "leave")
        assert joins - leaves == leaves_after - leaves == 1

    run(main())


def test_clustered_leave_tells_the_backend_once_and_only_for_a_member() -> None:
    async def main() -> None:
        m, bp = clustered(5)
        a = await connected(m, "A", "alice")
        assert await m.join(a.ws, "B") is True
        assert m.leave(a.ws, "B") is True
        assert m.leave(a.ws, "B") is False
        assert m.leave(a.ws, "nowhere") is False
        assert [c for c in bp.calls if c[0] == "leave"] == [("leave", a.ws, "B")]

    run(main())


def test_clustered_presence_covers_other_nodes_and_the_state_too() -> None:
    async def main() -> None:
        m, bp = clustered(5, presence_events=True, presence_interval=3600)
        assert m.presence is not None
        w = await connected(m, "L", "watcher")
        m.presence.flush()
        bp.view.add("node2", "c1", "L", "remote")
        m.presence_changed("L")
        m.presence.flush()
        assert presence_of(w, "L")[-1] == {
            "type": "presence",
            "lobby": "L",
            "joins": ["remote"],
            "leaves": [],
        }
        late = await connected(m, "X", "late")
        assert await m.join(late.ws, "L") is True
        assert presence_of(late, "L")[0]["joins"] == ["remote", "watcher"]
        bp.view.remove("node2", "c1")
        m.presence_changed("L")
        m.presence.flush()
        for member in (w, late):
            assert presence_of(member, "L")[-1]["leaves"] == ["remote"]
        await m.stop()

    run(main())


def test_a_clustered_join_waiting_on_one_that_raises_tries_again() -> None:
    async def main() -> None:
        m, bp = clustered(1)
        a = await connected(m, "A", "alice")
        bp.gate = asyncio.Event()
        bp.error = RuntimeError("redis down")
        first = asyncio.ensure_future(m.join(a.ws, "B"))
        second = asyncio.ensure_future(m.join(a.ws, "B"))
        await asyncio.sleep(0)
        bp.gate.set()
        with pytest.raises(RuntimeError):
            await first
        assert await second is True
        assert m.lobbies_of(a.ws) == {"A", "B"} and m._lobby_count("B") == 1
        assert m.get_stats()["refused"]["lobby_full"] == 0

    run(main())


def test_presence_to_a_slow_member_keeps_the_state_before_its_diffs() -> None:
    """A member whose sends block gets the state and the diffs queued in its
    backlog, in order: applied once it reads, its view is exact."""

    async def main() -> None:
        m = ConnectionManager(100, 10, presence_events=True, presence_interval=3600, ping_interval=None)
        assert m.presence is not None
        bob = await connected(m, "L", "bob")
        m.presence.flush()
        slow = FakePeer()
        slow.send_gate = asyncio.Event()  # every send blocks until set
        assert await m.connect(slow.ws, "X", "slow")
        assert await m.join(slow.ws, "L")
        for i in range(3):
            carol = await connected(m, "L", f"c{i}")
            m.presence.flush()
            m.disconnect(carol.ws)
            m.presence.flush()
        m.leave(bob.ws, "L")
        m.presence.flush()
        assert m.get_stats()["backlogged_connections"] == 1
        slow.send_gate.set()
        member = Member(slow)
        while m.get_stats()["backlogged_connections"]:
            await slow.got_text.wait()
            slow.got_text.clear()
            await asyncio.sleep(0)
        diffs = member.read()
        assert [(d["joins"], d["leaves"]) for d in diffs if d["lobby"] == "L"][-1] == ([], ["bob"])
        assert member.views["L"] == m.get_lobby_users("L") == {"slow"}
        assert member.views["X"] == m.get_lobby_users("X")
        await m.shutdown(timeout=1)

    run(main())
