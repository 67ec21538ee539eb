"""Model-based test of the C registry against a plain-Python model.

A hypothesis ``RuleBasedStateMachine`` drives a ``ConnectionManager`` through
random sequences of the synchronous steps of ``connect()`` (``_reserve``,
``_commit``, ``_release``), ``disconnect``, limit changes at runtime,
shutdown, invalid ids and the heartbeat steps (``touch``, pongs, ``_sweep``
with an injected clock). After every step, everything the core reports is
compared with a model made of dicts and lists: counts, statistics, admission
verdicts, lobby and user membership, send targets and their order.

Pools are small (3 lobbies, 3 users, 9 websockets, limits of a few units) so
that every refusal reason is reached often.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from wsmanager import ConnectionManager
from wsmanager._core import Core

MAX_ID_BYTES = 8
# "éééé" and "üüüü" are 4 characters but 8 bytes of UTF-8: exactly the limit.
LOBBIES = ("a", "b", "éééé")
USERS = ("u1", "u2", "üüüü")
N_SOCKETS = 9

# (bad id, exception) for the id arguments of _reserve.
BAD_IDS: list[tuple[Any, type[Exception]]] = [
    ("", ValueError),
    ("x" * (MAX_ID_BYTES + 1), ValueError),
    ("ééééé", ValueError),  # 5 characters, 10 bytes
    ("\ud800", ValueError),  # lone surrogate: not encodable as UTF-8
    (1, TypeError),
    (None, TypeError),
    (b"a", TypeError),
]


class Id(str):
    """A str subclass: ids are compared by value, whatever their type."""

    __slots__ = ()


class FakeWebSocket:
    """Stands for a websocket: the core keys connections by identity."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def fresh(text: str) -> str:
    """An equal str that is (for multi-character text) a different object."""
    return text.encode("utf-8").decode("utf-8")


max_users = st.none() | st.integers(1, 3)


@settings(
    max_examples=400,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class CoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sockets = [FakeWebSocket(f"ws{i}") for i in range(N_SOCKETS)]
        self.now = 1000.0
        self.shutting_down = False
        self.pending: dict[FakeWebSocket, tuple[str, str]] = {}
        # committed connections, in commit order (dicts keep insertion order)
        self.active: dict[FakeWebSocket, tuple[str, str]] = {}
        # activity lists of the heartbeat, oldest first
        self.idle: list[FakeWebSocket] = []
        self.wait: list[FakeWebSocket] = []
        self.last_rx: dict[FakeWebSocket, float] = {}
        self.ping_sent: dict[FakeWebSocket, float] = {}
        self.pong_due: dict[FakeWebSocket, float] = {}
        self.pong_deadline: dict[FakeWebSocket, float] = {}  # a later pong is no round trip
        self.connects = 0
        self.disconnects = 0
        self.pings = 0
        self.pongs = 0
        self.refused = dict.fromkeys(
            (
                "server_full",
                "lobby_full",
                "user_limit",
                "shutting_down",
                "unauthorized",
                "forbidden_origin",
                "invalid_id",
            ),
            0,
        )
        self.m: ConnectionManager

    def clock(self) -> float:
        return self.now

    @initialize(
        max_connections=st.integers(0, 8),
        max_per_lobby=st.integers(0, 4),
        max_per_user=max_users,
        initial=st.lists(st.tuples(st.sampled_from(LOBBIES), st.sampled_from(USERS)), max_size=N_SOCKETS),
    )
    def create(
        self,
        max_connections: int,
        max_per_lobby: int,
        max_per_user: int | None,
        initial: list[tuple[str, str]],
    ) -> None:
        self.max_connections = max_connections
        self.max_per_lobby = max_per_lobby
        self.max_per_user = max_per_user
        self.m = ConnectionManager(
            max_connections,
            max_per_lobby,
            max_per_user=max_per_user,
            max_id_bytes=MAX_ID_BYTES,
            clock=self.clock,
        )
        # start from a populated registry more often than random steps would
        for i, (lobby, user) in enumerate(initial):
            self.connect(i, lobby, user)

    # ------------------------------------------------------------ model helpers

    def lobby_members(self, lobby: str) -> list[FakeWebSocket]:
        return [ws for ws, (lo, _) in self.active.items() if lo == lobby]

    def user_members(self, user: str) -> list[FakeWebSocket]:
        return [ws for ws, (_, us) in self.active.items() if us == user]

    def held_by_lobby(self, lobby: str) -> int:
        """Committed plus reserved connections of a lobby."""
        return sum(1 for conns in (self.active, self.pending) for lo, _ in conns.values() if lo == lobby)

    def held_by_user(self, user: str) -> int:
        return sum(1 for conns in (self.active, self.pending) for _, us in conns.values() if us == user)

    def unlist(self, ws: FakeWebSocket) -> None:
        if ws in self.idle:
            self.idle.remove(ws)
        if ws in self.wait:
            self.wait.remove(ws)

    def model_touch(self, ws: FakeWebSocket) -> None:
        self.unlist(ws)
        self.idle.append(ws)
        self.last_rx[ws] = self.now
        self.ping_sent.pop(ws, None)

    def forget(self, ws: FakeWebSocket) -> tuple[str, str]:
        self.unlist(ws)
        self.last_rx.pop(ws, None)
        self.ping_sent.pop(ws, None)
        self.pong_due.pop(ws, None)
        self.pong_deadline.pop(ws, None)
        self.disconnects += 1
        return self.active.pop(ws)

    # ------------------------------------------------------------ admission

    @rule(
        i=st.integers(0, N_SOCKETS - 1),
        lobby=st.sampled_from(LOBBIES),
        user=st.sampled_from(USERS),
        subclass=st.booleans(),
    )
    def reserve(self, i: int, lobby: str, user: str, subclass: bool) -> None:
        ws = self.sockets[i]
        lobby_arg, user_arg = (Id(lobby), Id(user)) if subclass else (fresh(lobby), fresh(user))
        if ws in self.pending or ws in self.active:
            with pytest.raises(ValueError, match="already connected"):
                self.m._reserve(ws, lobby_arg, user_arg)
            return
        if self.shutting_down:
            expected = "shutting_down"
        elif len(self.active) + len(self.pending) >= self.max_connections:
            expected = "server_full"
        elif self.held_by_lobby(lobby) >= self.max_per_lobby:
            expected = "lobby_full"
        elif self.max_per_user is not None and self.held_by_user(user) >= self.max_per_user:
            expected = "user_limit"
        else:
            expected = ""
        event(f"reserve: {expected or 'admitted'}")
        assert self.m._reserve(ws, lobby_arg, user_arg) == expected
        if expected:
            self.refused[expected] += 1
        else:
            self.pending[ws] = (lobby, user)

    @rule(i=st.integers(0, N_SOCKETS - 1), bad=st.sampled_from(BAD_IDS), bad_lobby=st.booleans())
    def reserve_invalid_id(self, i: int, bad: tuple[Any, type[Exception]], bad_lobby: bool) -> None:
        value, exc = bad
        ws = self.sockets[i]
        lobby, user = (value, "u1") if bad_lobby else ("a", value)
        with pytest.raises(exc):
            self.m._reserve(ws, lobby, user)

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def commit(self, i: int) -> None:
        ws = self.sockets[i]
        expected = ws in self.pending
        assert self.m._commit(ws) is expected
        if expected:
            self.active[ws] = self.pending.pop(ws)
            self.connects += 1
            self.model_touch(ws)
            self.pong_due[ws] = 0.0

    @rule(i=st.integers(0, N_SOCKETS - 1), lobby=st.sampled_from(LOBBIES), user=st.sampled_from(USERS))
    def connect(self, i: int, lobby: str, user: str) -> None:
        """What connect() does when accept() succeeds: reserve, then commit."""
        self.reserve(i, lobby, user, subclass=False)
        self.commit(i)

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def release(self, i: int) -> None:
        ws = self.sockets[i]
        expected = ws in self.pending
        assert self.m._release(ws) is expected
        if expected:
            del self.pending[ws]

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def disconnect(self, i: int) -> None:
        ws = self.sockets[i]
        expected = self.forget(ws) if ws in self.active else None
        assert self.m.disconnect(ws) == expected

    @rule()
    def disconnect_stranger(self) -> None:
        assert self.m.disconnect(FakeWebSocket("stranger")) is None
        assert self.m._commit(FakeWebSocket("stranger")) is False
        assert self.m._release(FakeWebSocket("stranger")) is False

    # ------------------------------------------------------------ limits

    @rule(value=st.integers(0, 8))
    def set_max_connections(self, value: int) -> None:
        self.m.max_connections = value
        self.max_connections = value

    @rule(value=st.integers(0, 4))
    def set_max_per_lobby(self, value: int) -> None:
        self.m.max_per_lobby = value
        self.max_per_lobby = value

    @rule(value=max_users)
    def set_max_per_user(self, value: int | None) -> None:
        self.m.max_per_user = value
        self.max_per_user = value

    @rule(
        attr_value=st.sampled_from(
            [
                ("max_connections", -1, ValueError),
                ("max_per_lobby", -1, ValueError),
                ("max_per_user", 0, ValueError),
                ("max_connections", "3", TypeError),
                ("max_per_lobby", 2.5, TypeError),
            ]
        )
    )
    def set_invalid_limit(self, attr_value: tuple[str, Any, type[Exception]]) -> None:
        attr, value, exc = attr_value
        with pytest.raises(exc):
            setattr(self.m, attr, value)

    @rule(draw=st.integers(0, 3))
    def set_shutting_down(self, draw: int) -> None:
        flag = draw == 0  # shutting down one time in four, so that connections pile up too
        self.m._set_shutting_down(flag)
        self.shutting_down = flag

    # ------------------------------------------------------------ heartbeat

    @rule(dt=st.integers(0, 4))
    def advance_clock(self, dt: int) -> None:
        self.now += dt

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def touch(self, i: int) -> None:
        ws = self.sockets[i]
        expected = ws in self.active
        assert self.m.touch(ws) is expected
        if expected:
            self.model_touch(ws)

    @rule(user=st.sampled_from(USERS))
    def update_last_message(self, user: str) -> None:
        self.m.update_last_message(fresh(user))
        for ws in self.user_members(user):
            self.model_touch(ws)

    def model_due(self, ws: FakeWebSocket) -> bool:
        return ws in self.active and self.pong_due[ws] > 0 and self.now <= self.pong_deadline[ws]

    def model_pong(self, ws: FakeWebSocket) -> float | None:
        """The round trip in seconds a pong on ws measures (None: no ping
        awaited, or it timed out), and the ping is answered."""
        rtt = max(self.now - self.pong_due[ws], 0.0) if self.model_due(ws) else None
        self.pong_due[ws] = 0.0
        return rtt

    @rule(i=st.integers(0, N_SOCKETS - 1), timeout=st.none() | st.integers(0, 6))
    def note_ping(self, i: int, timeout: int | None) -> None:
        ws = self.sockets[i]
        expected = ws in self.active
        if timeout is None:
            assert self.m._note_ping(ws) is expected
        else:
            assert self.m._note_ping(ws, float(timeout)) is expected
        if expected:
            self.pings += 1
            deadline = math.inf if timeout is None else self.now + timeout
            if not self.model_due(ws):
                self.pong_due[ws] = self.now
                self.pong_deadline[ws] = deadline
            else:
                self.pong_deadline[ws] = max(self.pong_deadline[ws], deadline)

    @rule(i=st.integers(0, N_SOCKETS - 1))
    def record_pong_ws(self, i: int) -> None:
        ws = self.sockets[i]
        expected: float | None = None
        if ws in self.active:
            self.pongs += 1
            rtt = self.model_pong(ws)
            expected = None if rtt is None else rtt * 1000.0
            self.model_touch(ws)
        assert self.m.record_pong_ws(ws) == expected

    @rule(user=st.sampled_from(USERS))
    def record_pong(self, user: str) -> None:
        members = self.user_members(user)
        rtts = []
        if members:
            self.pongs += 1
        for ws in members:
            rtt = self.model_pong(ws)
            if rtt is not None:
                rtts.append(rtt)
            self.model_touch(ws)
        samples = self.m.get_stats()["latency_ms"]["samples"]
        result: object = Core.record_pong(self.m, fresh(user))  # type: ignore[func-returns-value]
        assert result is None  # the seed's return value
        # the fastest answered ping of the user is one latency sample
        assert self.m.get_stats()["latency_ms"]["samples"] == min(samples + (1 if rtts else 0), 1024)

    @rule(interval=st.integers(0, 6), timeout=st.integers(0, 6))
    def sweep(self, interval: int, timeout: int) -> None:
        expired_ws = [ws for ws in self.wait if self.ping_sent[ws] + timeout <= self.now]
        expired = [(ws, *self.forget(ws)) for ws in expired_ws]
        to_ping = [ws for ws in self.idle if self.last_rx[ws] + interval <= self.now]
        for ws in to_ping:
            self.idle.remove(ws)
            self.wait.append(ws)
            self.ping_sent[ws] = self.now
            self.pong_due[ws] = self.now
            self.pong_deadline[ws] = self.now + timeout
        self.pings += len(to_ping)
        event(
            f"sweep: {'expired' if expired else 'nothing expired'}, {'pinged' if to_ping else 'none pinged'}"
        )
        assert self.m._sweep(float(interval), float(timeout)) == (to_ping, expired)

    # ------------------------------------------------------------ invariants

    @invariant()
    def counts_and_stats_match(self) -> None:
        m = self.m
        total = len(self.active)
        assert len(m) == total
        stats = m.get_stats()
        expected_percent = (
            100.0 if self.max_connections == 0 else round(total / self.max_connections * 100, 1)
        )
        assert stats["total_connections"] == total
        assert stats["pending_connections"] == len(self.pending)
        assert stats["capacity_percent"] == expected_percent
        assert stats["active_lobbies"] == len({lobby for lobby, _ in self.active.values()})
        assert stats["connected_users"] == len({user for _, user in self.active.values()})
        assert stats["max_connections"] == self.max_connections == m.max_connections
        assert stats["max_per_lobby"] == self.max_per_lobby == m.max_per_lobby
        assert stats["max_per_user"] == self.max_per_user == m.max_per_user
        assert stats["shutting_down"] is self.shutting_down is m.shutting_down
        assert stats["connects"] == self.connects
        assert stats["disconnects"] == self.disconnects
        assert stats["pings_sent"] == self.pings
        assert stats["pongs_received"] == self.pongs
        assert stats["refused"] == self.refused

    @invariant()
    def admission_matches(self) -> None:
        held = len(self.active) + len(self.pending)
        for lobby in (*LOBBIES, "never-used"):
            if self.shutting_down:
                expected = (False, "shutting_down")
            elif held >= self.max_connections:
                expected = (False, "server_full")
            elif self.held_by_lobby(lobby) >= self.max_per_lobby:
                expected = (False, "lobby_full")
            else:
                expected = (True, "")
            assert self.m.can_accept_connection(fresh(lobby)) == expected
            if not expected[0]:  # a False answer is a refusal: counted
                self.refused[expected[1]] += 1

    @invariant()
    def membership_matches(self) -> None:
        m = self.m
        for user in USERS:
            members = self.user_members(user)
            assert m.is_user_connected(fresh(user)) is bool(members)
            assert m._user_targets(fresh(user)) == members
        for lobby in LOBBIES:
            members = self.lobby_members(lobby)
            assert m.get_lobby_users(fresh(lobby)) == {self.active[ws][1] for ws in members}
            assert m._lobby_targets(fresh(lobby)) == members
            assert m._lobby_targets(fresh(lobby), None) == members
            for user in USERS:
                kept = [ws for ws in members if self.active[ws][1] != user]
                assert m._lobby_targets(lobby, fresh(user)) == kept
        assert m.get_lobby_users("never-used") == set()
        assert m._lobby_targets("never-used") == []
        assert not m.is_user_connected("never-used")
        for ws in self.sockets:
            assert (ws in m) is (ws in self.active)
            assert m._info(ws) == self.active.get(ws)

    @invariant()
    def pongs_due_match(self) -> None:
        for ws in self.sockets:
            assert self.m._pong_due(ws) is self.model_due(ws)

    @invariant()
    def views_match(self) -> None:
        m = self.m
        assert sorted(m._snapshot(), key=repr) == sorted(
            ((ws, lobby, user) for ws, (lobby, user) in self.active.items()), key=repr
        )
        assert dict(m.connection_info) == self.active
        assert dict(m.active_connections) == {
            lobby: frozenset(members) for lobby in LOBBIES if (members := self.lobby_members(lobby))
        }
        assert dict(m.user_connections) == {
            user: members[-1] for user in USERS if (members := self.user_members(user))
        }


TestCoreModel = CoreModel.TestCase


def test_connected_users_ignores_pending_handshakes() -> None:
    """A user whose only handshake is still in progress is not connected.

    get_stats()["connected_users"] must agree with is_user_connected(): a
    reservation that is never committed (accept() failed, the client left)
    must not count as a connected user.
    """
    m = ConnectionManager()
    ws = FakeWebSocket("ws")
    assert m._reserve(ws, "lobby", "alice") == ""
    assert not m.is_user_connected("alice")
    assert m.get_stats()["connected_users"] == 0
    m._commit(ws)
    assert m.get_stats()["connected_users"] == 1
