"""Memory safety of the C core when Python code runs in the middle of a call.

The rule (csrc/module.c, DESIGN.md): no pointer into a table or list of the
registry survives a call that can run Python code. Python code gets in
through four doors, each tried on every entry point that can open it:

* an id that is a ``str`` subclass with its own ``__hash__`` / ``__eq__``
  (ids are copied to exact ``str`` before any lookup);
* a websocket with its own ``__hash__`` / ``__eq__`` (websockets are keyed by
  identity: theirs never run);
* a garbage-collector finalizer (``__del__`` of an unreachable cycle) run by
  an allocation inside the call (results are allocated before the walk);
* hooks the core calls: the injected clock, the pong hook, the drop hook.

Each hostile party disconnects members (or connects new ones) while the call
is under way. What a user would notice, and what every test asserts: no
crash, and what the call returns agrees with what the registry holds when
it returns (recipients, users, counts, ``len(m)``, ``get_stats()``).

Run this file under the ASan build too (see the Makefile's test-asan).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import gc
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from starlette.types import Message
from starlette.websockets import WebSocketState

from tests.asgi_fakes import FakePeer
from wsmanager import ConnectionManager
from wsmanager._core import Core

# CPython 3.10 and 3.11 run a GC pass inside the allocation that crosses the
# threshold, hence inside a C call; 3.12+ only schedule it for the next
# eval-breaker check, after the C call returned.
GC_INSIDE_ALLOCATION = sys.version_info < (3, 12)


class Sock:
    """A websocket stand-in: the core keys websockets by identity."""

    __slots__ = ("__weakref__",)


class HostileSock:
    """A websocket whose ``__hash__`` / ``__eq__`` run ``action`` first."""

    __slots__ = ("__weakref__", "action")

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action

    def __hash__(self) -> int:
        self.action()
        return id(self) >> 4

    def __eq__(self, other: object) -> bool:
        self.action()
        return self is other


def hostile_str(value: str, action: Callable[[], None]) -> str:
    """A ``str`` subclass equal to ``value`` whose hash and eq run ``action``."""

    class Hostile(str):
        def __hash__(self) -> int:
            action()
            return str.__hash__(self)

        def __eq__(self, other: object) -> bool:
            action()
            return str.__eq__(self, other)

    return Hostile(value)


def fresh(text: str) -> str:
    """An equal str that is a new object: the core's copy is then the only
    reference to its key, so a use after free of a key shows under ASan."""
    return (text + ".")[:-1]


def new_manager(**kwargs: Any) -> ConnectionManager:
    return ConnectionManager(max_connections=1000, max_per_lobby=100, ping_interval=None, **kwargs)


def join(m: Core, lobby: str, user: str, ws: Any = None) -> Any:
    """Register ``ws`` (a new Sock by default) as connect() does, synchronously."""
    ws = Sock() if ws is None else ws
    assert m._reserve(ws, fresh(lobby), fresh(user)) == ""
    assert m._commit(ws)
    return ws


def populate(m: Core, n: int = 10, lobby: str = "L") -> list[Any]:
    """n members of ``lobby``: users u0..u(n-1), plus a second tab of u0."""
    socks = [join(m, lobby, f"u{i}") for i in range(n)]
    socks.append(join(m, lobby, "u0"))
    return socks


def leave_all(m: Core, socks: list[Any]) -> Callable[[], None]:
    """An action that disconnects every one of ``socks``, once."""
    done: list[bool] = []

    def action() -> None:
        if not done:
            done.append(True)
            for ws in socks:
                m.disconnect(ws)

    return action


def join_more(m: Core, lobby: str = "L", n: int = 5) -> Callable[[], None]:
    """An action that connects ``n`` new members to ``lobby``, once."""
    done: list[bool] = []

    def action() -> None:
        if not done:
            done.append(True)
            for i in range(n):
                join(m, lobby, f"late{i}")

    return action


def assert_consistent(m: Core) -> None:
    """Every view of the registry tells the same story as len(m)."""
    snap = m._snapshot()
    assert len(snap) == len(m)
    assert all(isinstance(t, tuple) and len(t) == 3 for t in snap)
    lobbies = {lobby for _, lobby, _ in snap}
    users = {user for _, _, user in snap}
    stats = Core.get_stats(m)
    assert stats["total_connections"] == len(m)
    assert stats["active_lobbies"] == len(lobbies)
    assert stats["connected_users"] == len(users)
    for lobby in lobbies:
        members = [ws for ws, lo, _ in snap if lo == lobby]
        assert m._lobby_targets(lobby) == members
        assert m._lobby_count(lobby) == len(members)
        assert m.get_lobby_users(lobby) == {u for _, lo, u in snap if lo == lobby}
    for user in users:
        assert {id(ws) for ws in m._user_targets(user)} == {id(ws) for ws, _, u in snap if u == user}
        assert m.is_user_connected(user)
    for ws, lobby, user in snap:
        assert ws in m
        assert m._info(ws) == (lobby, user)


# ----------------------------------------------------------- the two reports


def test_hostile_hash_id_in_a_lobby_of_three_does_not_crash() -> None:
    """Reported: a str subclass whose __hash__ disconnects members segfaulted
    get_lobby_users (the table pointer was taken before the hash ran)."""
    m = new_manager()
    socks = [join(m, "L", f"u{i}") for i in range(3)]
    users = m.get_lobby_users(hostile_str("L", leave_all(m, socks)))
    assert users == m.get_lobby_users("L")
    assert len(users) == len(m)
    assert_consistent(m)


class _Fuse:
    __slots__ = ("action", "armed", "fired", "left")

    def __init__(self, action: Callable[[], None], left: int) -> None:
        self.action = action
        self.armed = True
        self.fired = False
        self.left = left


class _Bomb:
    """Cyclic garbage: the GC pass that collects it runs its finalizer, which
    plants the next link until the fuse is spent, then runs the action."""

    __slots__ = ("cycle", "fuse")

    def __init__(self, fuse: _Fuse) -> None:
        self.fuse = fuse
        self.cycle = self

    def __del__(self) -> None:
        fuse = self.fuse
        if not fuse.armed:
            return
        if fuse.left > 0:
            fuse.left -= 1
            _Bomb(fuse)
            return
        fuse.armed = False
        fuse.fired = True
        fuse.action()


@contextmanager
def gc_every_allocation() -> Iterator[None]:
    enabled = gc.isenabled()
    threshold = gc.get_threshold()
    gc.collect()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if enabled:
            gc.enable()
        else:
            gc.disable()
        gc.collect()


def call_with_finalizer(
    call: Callable[[], Any], action: Callable[[], None], *, after: int = 0
) -> tuple[Any, bool]:
    """Run ``call()`` with a GC pass on every allocation and cyclic garbage
    whose finalizer runs ``action`` in the (after+1)-th pass. Returns the
    result and whether the action ran; it never runs after ``call()``."""
    fuse = _Fuse(action, after)
    with gc_every_allocation():
        gc.disable()
        _Bomb(fuse)
        gc.set_threshold(1)
        gc.enable()
        result = call()
        fuse.armed = False
    return result, fuse.fired


def test_finalizer_disconnecting_everyone_during_a_broadcast_snapshot() -> None:
    """Reported: a finalizer that disconnects members while _lobby_targets
    snapshots them: use after free under ASan, and 10 recipients returned
    while the registry held 0."""
    m = new_manager()
    socks = [join(m, "L", f"u{i}") for i in range(10)]
    targets, fired = call_with_finalizer(lambda: m._lobby_targets("L"), leave_all(m, socks))
    assert fired
    if GC_INSIDE_ALLOCATION:
        assert targets == m._lobby_targets("L") == []
    assert len(m) == 0
    assert_consistent(m)


# ------------------------------------------------------- hostile str ids

# name -> call(m, lobby_id, user_id); each is a read whose result must equal
# the same call with plain ids once it returned.
ID_READS: dict[str, Callable[[Core, str, str], Any]] = {
    "can_accept_connection": lambda m, lo, u: m.can_accept_connection(lo),
    "is_user_connected": lambda m, lo, u: m.is_user_connected(u),
    "is_user_connected_local": lambda m, lo, u: m.is_user_connected(u, local=True),
    "get_lobby_users": lambda m, lo, u: m.get_lobby_users(lo),
    "get_lobby_users_local": lambda m, lo, u: m.get_lobby_users(lo, local=True),
    "_lobby_targets": lambda m, lo, u: m._lobby_targets(lo),
    "_lobby_targets_exclude": lambda m, lo, u: m._lobby_targets(lo, u),
    "_lobby_targets_exclude_only": lambda m, lo, u: m._lobby_targets("L", u),
    "_user_targets": lambda m, lo, u: m._user_targets(u),
    "_lobby_count": lambda m, lo, u: m._lobby_count(lo),
}

# Calls that change state: their effect must match the registry afterwards.
ID_WRITES: dict[str, Callable[[Core, str, str], Any]] = {
    "update_last_message": lambda m, lo, u: m.update_last_message(u),
    "record_pong": lambda m, lo, u: m.record_pong(u),
}


@pytest.mark.parametrize("leave", ["half", "all"])
@pytest.mark.parametrize("hostile", ["lobby", "user", "both"])
@pytest.mark.parametrize("name", sorted(ID_READS))
def test_hostile_str_ids_on_every_lookup(name: str, hostile: str, leave: str) -> None:
    """A str subclass whose __hash__ / __eq__ disconnect half the lobby (the
    user u0 entirely) or all of it: the lookup sees the registry as it is."""
    m = new_manager()
    socks = populate(m)
    action = leave_all(m, socks[::2] if leave == "half" else socks)
    lobby = hostile_str("L", action) if hostile != "user" else "L"
    user = hostile_str("u0", action) if hostile != "lobby" else "u0"
    result = ID_READS[name](m, lobby, user)
    assert result == ID_READS[name](m, "L", "u0")
    assert_consistent(m)


@pytest.mark.parametrize("name", sorted(ID_WRITES))
def test_hostile_str_ids_on_every_update(name: str) -> None:
    m = new_manager()
    socks = populate(m)
    assert ID_WRITES[name](m, "L", hostile_str("u0", leave_all(m, socks))) is None
    assert_consistent(m)


def test_hostile_str_ids_at_registration() -> None:
    m = new_manager()
    socks = populate(m)
    ws = Sock()
    action = leave_all(m, socks)
    assert m._reserve(ws, hostile_str("L", action), hostile_str("new", action)) == ""
    assert m._commit(ws)
    assert m._info(ws) == ("L", "new")
    assert all(type(key) is str for key in m._info(ws) or ())
    assert_consistent(m)


class Room(str, enum.Enum):
    """A str-mixin enum, a common way to spell lobby codes."""

    MAIN = "Main"


class FoldedId(str):
    """An id type with its own hash (case-folded), equal to its plain str."""

    def __hash__(self) -> int:
        return hash(self.casefold())


@pytest.mark.parametrize("make", [FoldedId, lambda text: Room(text)], ids=["own_hash", "str_enum"])
def test_str_subclass_ids_find_what_the_equal_str_registered(make: Callable[[str], str]) -> None:
    """An id that is a str subclass finds the lobby and user registered under
    the equal plain str, whatever its own __hash__ says."""
    m = new_manager()
    ws = join(m, "Main", "Main")
    lobby = user = make("Main")
    assert m.get_lobby_users(lobby) == {"Main"}
    assert m._lobby_targets(lobby) == [ws]
    assert m._lobby_targets(lobby, user) == []
    assert m._lobby_count(lobby) == 1
    assert m.is_user_connected(user)
    assert m._user_targets(user) == [ws]
    assert m.can_accept_connection(lobby) == (True, "")
    m.max_per_lobby = 1
    assert m.can_accept_connection(lobby) == (False, "lobby_full")


def test_non_str_lookup_ids_are_a_type_error() -> None:
    m = new_manager()
    populate(m)
    for call in [*ID_READS.values(), *ID_WRITES.values()]:
        with pytest.raises(TypeError, match="must be a str"):
            call(m, 1, 1)  # type: ignore[arg-type]
    assert_consistent(m)


# ------------------------------------------------------- hostile websockets

# name -> call(m, websocket); the websocket's own __hash__/__eq__ must never run.
WS_CALLS: dict[str, Callable[[Core, Any], Any]] = {
    "__contains__": lambda m, ws: ws in m,
    "touch": lambda m, ws: m.touch(ws),
    "record_pong_ws": lambda m, ws: m.record_pong_ws(ws),
    "latency_ms": lambda m, ws: m.latency_ms(ws),
    "_note_ping": lambda m, ws: m._note_ping(ws),
    "_info": lambda m, ws: m._info(ws),
    "_allow": lambda m, ws: m._allow(ws),
    "_set_notify": lambda m, ws: m._set_notify(ws, 2, True),
    "_commit": lambda m, ws: m._commit(ws),
    "_release": lambda m, ws: m._release(ws),
    "disconnect": lambda m, ws: m.disconnect(ws),
    "_reap": lambda m, ws: m._reap(ws, "send_failed"),
    "_reserve": lambda m, ws: ws in m or m._reserve(ws, "L", "again"),
    "_reserve_replace": lambda m, ws: ws in m or m._reserve(ws, "L", "u0", True),
    "_note_ping_timeout": lambda m, ws: m._note_ping(ws, 5.0),
    "_pong_due": lambda m, ws: m._pong_due(ws),
}


@pytest.mark.parametrize("registered", [True, False])
@pytest.mark.parametrize("name", sorted(WS_CALLS))
def test_hostile_websocket_on_every_entry_point(name: str, registered: bool) -> None:
    """Websockets are keyed by identity: a websocket class with its own
    __hash__ / __eq__ (which here would disconnect everyone) is never asked."""
    m = new_manager()
    m._set_rate_limit(1.0, 1.0, 0)
    socks = populate(m)
    ws = HostileSock(leave_all(m, socks))
    if registered:
        join(m, "L", "hostile", ws)
    if name == "_reserve_replace":
        m.max_per_user = 2  # u0 is at the limit: its oldest tab makes room
        socks.remove(socks[0])
    WS_CALLS[name](m, ws)
    assert all(s in m for s in socks)
    assert_consistent(m)


# ------------------------------------------------------- GC finalizers


def _stats_view(m: Core) -> Any:
    stats = Core.get_stats(m)
    return (stats["total_connections"], stats["active_lobbies"], stats["connected_users"])


# (call(m, socks), view(result), expected view, computed after the call)
Snapshot = tuple[Callable[[Core, list[Any]], Any], Callable[[Any], Any], Callable[[Core, list[Any]], Any]]

SNAPSHOTS: dict[str, Snapshot] = {
    "_lobby_targets": (lambda m, s: m._lobby_targets("L"), list, lambda m, s: m._lobby_targets("L")),
    "_lobby_targets_exclude": (
        lambda m, s: m._lobby_targets("L", "u1"),
        list,
        lambda m, s: [ws for ws, _, u in m._snapshot() if u != "u1"],
    ),
    "_user_targets": (lambda m, s: m._user_targets("u0"), list, lambda m, s: m._user_targets("u0")),
    "get_lobby_users": (
        lambda m, s: m.get_lobby_users("L"),
        set,
        lambda m, s: {u for _, _, u in m._snapshot()},
    ),
    "_snapshot": (lambda m, s: m._snapshot(), list, lambda m, s: m._snapshot()),
    "get_stats": (
        lambda m, s: Core.get_stats(m),
        lambda r: (r["total_connections"], r["active_lobbies"], r["connected_users"]),
        lambda m, s: (len(m), len({lo for _, lo, _ in m._snapshot()}), len({u for _, _, u in m._snapshot()})),
    ),
    "manager.get_stats": (
        lambda m, s: m.get_stats(),
        lambda r: (r["total_connections"], r["active_lobbies"], r["connected_users"]),
        lambda m, s: _stats_view(m),
    ),
    "_info": (lambda m, s: m._info(s[3]), lambda r: r, lambda m, s: m._info(s[3])),
    "disconnect": (
        lambda m, s: m.disconnect(s[3]),
        lambda r: r is None or r == ("L", "u3"),
        lambda m, s: s[3] not in m,
    ),
    "_reap": (
        lambda m, s: m._reap(s[3], "handler_exited"),
        lambda r: r is None or r == ("L", "u3"),
        lambda m, s: s[3] not in m,
    ),
}


@pytest.mark.parametrize("after", range(4))
@pytest.mark.parametrize("action", ["leave", "join"])
@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_finalizer_during_every_snapshot(name: str, action: str, after: int) -> None:
    """A finalizer run by the (after+1)-th GC pass inside the call disconnects
    every member, or connects five more: the result matches the registry."""
    m = new_manager()
    socks = populate(m)
    call, view, expected = SNAPSHOTS[name]
    before = view(call(m, socks)) if name not in ("disconnect", "_reap") else None
    act = leave_all(m, socks) if action == "leave" else join_more(m)
    result, fired = call_with_finalizer(lambda: call(m, socks), act, after=after)
    if after == 0 and name != "_info":
        assert fired
    if name in ("disconnect", "_reap"):
        assert view(result)
        assert expected(m, socks)
    elif GC_INSIDE_ALLOCATION and not name.startswith("manager."):
        assert view(result) == expected(m, socks)
    else:  # 3.12+, or a Python wrapper: the pass may run after the C call returned
        assert view(result) in (before, expected(m, socks))
    assert_consistent(m)


def test_finalizer_during_the_sweep() -> None:
    """The sweep's to-ping list holds only connections still registered, and
    its expired list only removed ones, whatever finalizers do meanwhile."""
    now = [0.0]
    for after in range(6):
        now[0] = 0.0
        m = new_manager(clock=lambda: now[0])
        socks = populate(m)
        now[0] = 10.0
        assert len(m._sweep(5.0, 5.0)[0]) == len(socks)  # all pinged at t=10
        late = [join(m, "L", f"v{i}") for i in range(6)]
        now[0] = 20.0  # socks expire, late are due for a ping
        (to_ping, expired), fired = call_with_finalizer(
            functools.partial(m._sweep, 5.0, 5.0), leave_all(m, late[::2] + socks[:3]), after=after
        )
        assert fired or after > 0
        assert not any(ws in m for ws in socks)
        assert not any(ws in m for ws, _, _ in expired)
        assert len({id(ws) for ws, _, _ in expired}) == len(expired)
        if GC_INSIDE_ALLOCATION:
            assert {id(ws) for ws in to_ping} == {id(ws) for ws, _, _ in m._snapshot()}
        assert_consistent(m)


# ------------------------------------------------------- reentrant hooks


def test_pong_hook_that_disconnects_and_connects() -> None:
    m = new_manager()
    socks = populate(m)
    calls: list[tuple[str, Any, float | None]] = []

    def hook(user: str, ws: Any, latency: float | None) -> None:
        calls.append((user, ws, latency))
        leave_all(m, socks)()
        join_more(m)()

    m._set_pong_hook(hook)
    m._note_ping(socks[0])
    m.record_pong("u0")
    assert calls[0][0] == "u0"
    assert m.record_pong_ws(socks[1]) is None  # gone: the hook disconnected it
    m.record_pong("u0")  # nobody left: no hook call
    assert len(calls) == 1
    joined = [join(m, "L", "w")]
    m._note_ping(joined[0])
    assert isinstance(m.record_pong_ws(joined[0]), float)
    assert calls[-1][:2] == ("w", joined[0])
    m._set_pong_hook(None)
    assert_consistent(m)


@pytest.mark.parametrize("name", ["disconnect", "_reap"])
def test_drop_hook_that_disconnects_the_rest(name: str) -> None:
    m = new_manager()
    socks = populate(m)
    dropped: list[Any] = []

    def hook(ws: Any) -> None:
        dropped.append(ws)
        for other in socks:
            m.disconnect(other)  # re-enters disconnect, and this hook

    m._set_drop_hook(hook, True)
    before = Core.get_stats(m)["disconnects"]
    first = m.disconnect(socks[0]) if name == "disconnect" else m._reap(socks[0], "no_pong")
    assert first == ("L", "u0")
    assert len(m) == 0
    assert {id(ws) for ws in dropped} == {id(ws) for ws in socks}
    assert Core.get_stats(m)["disconnects"] - before == len(socks)
    m._set_drop_hook(None)
    assert_consistent(m)


# name -> call(m, socks): every method that reads the injected clock.
CLOCKED: dict[str, Callable[[Core, list[Any]], Any]] = {
    "touch": lambda m, s: m.touch(s[0]),
    "record_pong_ws": lambda m, s: m.record_pong_ws(s[0]),
    "_note_ping": lambda m, s: m._note_ping(s[0]),
    "_note_ping_timeout": lambda m, s: m._note_ping(s[0], 5.0),
    "_pong_due": lambda m, s: m._pong_due(s[0]),
    "_allow": lambda m, s: m._allow(s[0]),
    "update_last_message": lambda m, s: m.update_last_message("u0"),
    "record_pong": lambda m, s: m.record_pong("u0"),
    "_sweep": lambda m, s: m._sweep(0.0, 0.0),
    "_commit": lambda m, s: m._commit(s[-1]),
}


@pytest.mark.parametrize("name", sorted(CLOCKED))
def test_clock_that_disconnects_everyone(name: str) -> None:
    armed: list[Callable[[], None]] = []

    def clock() -> float:
        while armed:
            armed.pop()()
        return 1.0

    m = new_manager(clock=clock)
    m._set_rate_limit(1.0, 1.0, 0)
    socks = populate(m)
    pending = Sock()
    assert m._reserve(pending, "L", "pending") == ""
    leave = leave_all(m, socks)

    def action() -> None:
        leave()
        m._release(pending)

    socks.append(pending)
    armed.append(action)
    CLOCKED[name](m, socks)
    assert len(m) == 0
    assert Core.get_stats(m)["pending_connections"] == 0
    assert_consistent(m)


# ------------------------------------------------------- the "replace" policy


def replacing(m: Core, ws: Any, lobby: str, user: str) -> tuple[str, tuple[Any, ...], int]:
    """_reserve(..., replace=True), as connect() calls it with
    on_user_limit="replace": (reason, replaced open websockets, replaced
    handshakes in progress)."""
    reason, opened, n_pending = m._reserve(ws, lobby, user, True)
    assert isinstance(reason, str) and isinstance(opened, tuple) and isinstance(n_pending, int)
    return reason, opened, n_pending


def at_the_user_limit(m: Core) -> tuple[list[Any], Any]:
    """populate() (u0 has two tabs) plus a handshake of u0 in progress, then
    max_per_user=1: a new u0 replaces three entries, the pending one last."""
    socks = populate(m)
    pending = Sock()
    assert m._reserve(pending, "L", fresh("u0")) == ""
    m.max_per_user = 1
    return socks, pending


@pytest.mark.parametrize("action", ["leave", "join"])
@pytest.mark.parametrize("hostile", ["lobby", "user", "both"])
def test_hostile_str_ids_when_replacing(hostile: str, action: str) -> None:
    """The user's id is looked up three times (count, oldest, reserve): a
    str subclass is copied first, so its __hash__ / __eq__ never run."""
    m = new_manager()
    socks, pending = at_the_user_limit(m)
    act = leave_all(m, socks) if action == "leave" else join_more(m)
    ran: list[bool] = []

    def spy() -> None:
        ran.append(True)
        act()

    ws = Sock()
    lobby = hostile_str("L", spy) if hostile != "user" else "L"
    user = hostile_str("u0", spy) if hostile != "lobby" else "u0"
    reason, opened, n_pending = replacing(m, ws, lobby, user)
    assert not ran
    assert (reason, n_pending) == ("", 1)
    assert [id(w) for w in opened] == [id(socks[0]), id(socks[-1])]
    assert not m._commit(pending)  # replaced while in progress
    assert m._commit(ws)
    assert m._info(ws) == ("L", "u0")
    assert all(type(key) is str for key in m._info(ws) or ())
    assert Core.get_stats(m)["pending_connections"] == 0
    assert_consistent(m)


@pytest.mark.parametrize("after", range(4))
@pytest.mark.parametrize("action", ["leave", "join", "replace"])
def test_finalizer_during_a_replacing_reservation(action: str, after: int) -> None:
    """The result tuples are allocated after the victims were removed and
    the seat reserved: a finalizer run there may disconnect anyone, connect
    more, or replace the reservation just made."""
    m = new_manager()
    socks, pending = at_the_user_limit(m)
    ws, other = Sock(), Sock()
    act = {
        "leave": leave_all(m, socks),
        "join": join_more(m),
        "replace": lambda: replacing(m, other, "L", fresh("u0")) and None,
    }[action]
    (reason, opened, n_pending), fired = call_with_finalizer(
        lambda: replacing(m, ws, "L", fresh("u0")), act, after=after
    )
    assert (reason, n_pending) == ("", 1)
    victims = [id(socks[0]), id(socks[-1])]
    if fired and action == "leave":
        # on 3.10 the call's own frame is GC-tracked: the pass may come before
        # the C call, and then there is nobody left to replace
        assert [id(w) for w in opened] in ([], victims)
    else:
        assert [id(w) for w in opened] == victims
    assert not any(w in m for w in opened)
    assert not m._commit(pending)
    replaced = fired and action == "replace"
    assert m._commit(ws) is not replaced
    if replaced:
        assert m._commit(other)
    assert Core.get_stats(m)["pending_connections"] == 0
    assert_consistent(m)


def test_drop_hook_that_disconnects_and_replaces_while_replacing() -> None:
    """The drop hook runs once per replaced connection, after the registry
    is consistent: it may disconnect the rest and replace the new seat."""
    m = new_manager()
    socks, pending = at_the_user_limit(m)
    ws, other = Sock(), Sock()
    dropped: list[Any] = []

    def hook(gone: Any) -> None:
        first = not dropped
        dropped.append(gone)
        if first:
            assert replacing(m, other, "L", fresh("u0"))[0] == ""  # re-enters the hook
            leave_all(m, socks)()  # and again, through disconnect()

    m._set_drop_hook(hook, True)
    reason, opened, n_pending = replacing(m, ws, "L", fresh("u0"))
    m._set_drop_hook(None)
    assert (reason, n_pending) == ("", 1)
    assert [id(w) for w in opened] == [id(socks[0]), id(socks[-1])]
    assert {id(w) for w in dropped} == {id(w) for w in socks} | {id(pending), id(ws)}
    assert not m._commit(ws)  # replaced by the hook's reservation
    assert m._commit(other)
    assert len(m) == 1
    assert_consistent(m)


def _hook_that_unsets_itself(m: Core, gone: Any) -> None:
    m._set_drop_hook(None)  # the core's reference was the only one
    raise RuntimeError("the drop hook failed")


def test_drop_hook_that_unsets_itself_and_raises_while_replacing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure of a drop hook is reported with the hook: the core's own
    reference to it must outlive the report (use after free before)."""
    m = new_manager()
    old = join(m, "L", "u0")
    m.max_per_user = 1
    reports: list[tuple[Any, str]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reports.append((u.exc_type, repr(u.object))))
    m._set_drop_hook(functools.partial(_hook_that_unsets_itself, m), True)  # only the core holds it
    ws = Sock()
    reason, opened, n_pending = replacing(m, ws, "L", "u0")
    assert (reason, opened, n_pending) == ("", (old,), 0)
    assert [exc for exc, _ in reports] == [RuntimeError]
    assert "_hook_that_unsets_itself" in reports[0][1]
    assert m._commit(ws)
    assert_consistent(m)


def test_note_ping_timeout_whose_float_disconnects() -> None:
    """_note_ping(ws, timeout) converts the timeout (which may run Python
    code) before the lookup."""
    m = new_manager()
    socks = populate(m)

    class Timeout:
        def __float__(self) -> float:
            leave_all(m, socks)()
            return 5.0

    assert m._note_ping(socks[0], Timeout()) is False  # type: ignore[arg-type]
    assert not m._pong_due(socks[0])
    assert_consistent(m)


def test_pong_due_follows_note_ping_and_the_deadline() -> None:
    now = [1.0]
    m = new_manager(clock=lambda: now[0])
    socks = populate(m)
    assert not m._pong_due(socks[0])
    assert m._note_ping(socks[0], 5.0)
    assert m._pong_due(socks[0])
    now[0] = 7.0  # past the deadline
    assert not m._pong_due(socks[0])
    assert m.record_pong_ws(socks[0]) is None  # a late pong is no round trip
    m.disconnect(socks[1])
    assert not m._note_ping(socks[1], 5.0)
    assert not m._pong_due(socks[1])
    assert_consistent(m)


# ------------------------------------------------------- random interleavings

LOBBIES = ("a", "b")
USERS = ("u1", "u2", "u3")


@settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
class ReentrantMachine(RuleBasedStateMachine):
    """Random reads with a hostile party (hostile id, finalizer at a random
    GC pass, hostile clock) that disconnects and connects members meanwhile;
    after every step each view of the registry agrees with every other and
    with a plain model updated by the same hostile actions."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[int, tuple[Any, str, str]] = {}
        self.pending: list[Callable[[], None]] = []
        # handshakes in progress, oldest first: what "replace" takes after
        # a user's open connections
        self.held: list[tuple[Any, str, str]] = []

        def clock() -> float:
            while self.pending:
                self.pending.pop()()
            return 1.0

        self.m = new_manager(clock=clock)

    def _connect(self, lobby: str, user: str) -> None:
        ws = join(self.m, lobby, user)
        self.model[id(ws)] = (ws, lobby, user)

    def _disconnect(self, key: int) -> None:
        ws, lobby, user = self.model.pop(key)
        assert self.m.disconnect(ws) == (lobby, user)

    def _action(
        self, leave: list[int], joins: list[tuple[str, str]], replacing: bool = False
    ) -> Callable[[], None]:
        """With replacing (inside a replacing reservation: max_per_user is
        set, and its victims are gone but still in the model until it
        returns) joins replace too, and leaving skips the victims."""
        done: list[bool] = []

        def action() -> None:
            if done:
                return
            done.append(True)
            for key in leave:
                if key in self.model and (not replacing or self.model[key][0] in self.m):
                    self._disconnect(key)
            for lobby, user in joins:
                if replacing:
                    self._join_replacing(lobby, user, Sock())
                else:
                    self._connect(lobby, user)

        return action

    def _join_replacing(self, lobby: str, user: str, ws: Any, call: Callable[..., Any] | None = None) -> None:
        """Reserve with replace=True (through ``call`` if given), update the
        model with what was replaced, and commit unless replaced meanwhile."""
        reserve = call if call is not None else (lambda: replacing(self.m, ws, fresh(lobby), fresh(user)))
        reason, opened, n_pending = reserve()
        for gone in opened:
            self.model.pop(id(gone), None)
        mine = [h for h in self.held if h[2] == user][:n_pending]  # the oldest ones
        self.held = [h for h in self.held if not any(h is g for g in mine)]
        if reason == "" and self.m._commit(ws):
            self.model[id(ws)] = (ws, lobby, user)

    @rule(lobby=st.sampled_from(LOBBIES), user=st.sampled_from(USERS))
    def connect(self, lobby: str, user: str) -> None:
        self._connect(lobby, user)

    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        if self.model:
            self._disconnect(data.draw(st.sampled_from(list(self.model))))

    @rule(
        data=st.data(),
        read=st.sampled_from(sorted(ID_READS)),
        door=st.sampled_from(["id", "finalizer", "clock"]),
        after=st.integers(0, 3),
        joins=st.lists(st.tuples(st.sampled_from(LOBBIES), st.sampled_from(USERS)), max_size=3),
    )
    def hostile_read(
        self, data: st.DataObject, read: str, door: str, after: int, joins: list[tuple[str, str]]
    ) -> None:
        leave = data.draw(st.lists(st.sampled_from(list(self.model)), unique=True)) if self.model else []
        action = self._action(leave, joins)
        lobby, user = data.draw(st.sampled_from(LOBBIES)), data.draw(st.sampled_from(USERS))
        call = ID_READS[read]
        if door == "id":
            result = call(self.m, hostile_str(lobby, action), hostile_str(user, action))
        elif door == "clock":
            self.pending.append(action)  # run by the clock inside the call
            if read < "i":
                self.m.record_pong(user)
            else:
                self.m.update_last_message(user)
            return
        else:
            result, _ = call_with_finalizer(lambda: call(self.m, lobby, user), action, after=after)
            if not GC_INSIDE_ALLOCATION:
                return
        assert result == call(self.m, lobby, user)

    @rule(lobby=st.sampled_from(LOBBIES), user=st.sampled_from(USERS))
    def hold(self, lobby: str, user: str) -> None:
        """A handshake in progress (reserved, not committed)."""
        ws = Sock()
        assert self.m._reserve(ws, fresh(lobby), fresh(user)) == ""
        self.held.append((ws, lobby, user))

    @rule(data=st.data(), commit=st.booleans())
    def settle(self, data: st.DataObject, commit: bool) -> None:
        if not self.held:
            return
        ws, lobby, user = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if commit:
            assert self.m._commit(ws)
            self.model[id(ws)] = (ws, lobby, user)
        else:
            assert self.m._release(ws)

    @rule(
        data=st.data(),
        lobby=st.sampled_from(LOBBIES),
        user=st.sampled_from(USERS),
        limit=st.integers(1, 2),
        door=st.sampled_from(["id", "finalizer", "drop_hook"]),
        after=st.integers(0, 3),
        joins=st.lists(st.tuples(st.sampled_from(LOBBIES), st.sampled_from(USERS)), max_size=3),
    )
    def join_replacing(
        self,
        data: st.DataObject,
        lobby: str,
        user: str,
        limit: int,
        door: str,
        after: int,
        joins: list[tuple[str, str]],
    ) -> None:
        """on_user_limit="replace": a user at max_per_user gets in, its
        oldest entries make room, while a hostile party acts meanwhile."""
        leave = data.draw(st.lists(st.sampled_from(list(self.model)), unique=True)) if self.model else []
        action = self._action(leave, joins, replacing=True)
        ws = Sock()
        self.m.max_per_user = limit
        try:
            if door == "id":
                self._join_replacing(
                    lobby,
                    user,
                    ws,
                    lambda: replacing(self.m, ws, hostile_str(lobby, action), hostile_str(user, action)),
                )
            elif door == "finalizer":

                def reserve() -> Any:
                    return call_with_finalizer(
                        lambda: replacing(self.m, ws, fresh(lobby), fresh(user)), action, after=after
                    )[0]

                self._join_replacing(lobby, user, ws, reserve)
            else:
                self.m._set_drop_hook(lambda gone: action(), True)
                try:
                    self._join_replacing(lobby, user, ws)
                finally:
                    self.m._set_drop_hook(None)
        finally:
            self.m.max_per_user = None

    @rule(data=st.data(), timeout=st.sampled_from([0.0, 5.0, math.inf]), pong=st.booleans())
    def ping(self, data: st.DataObject, timeout: float, pong: bool) -> None:
        """_note_ping(ws, timeout) / _pong_due / the pong that answers it
        (the clock stands still: a ping is due until answered)."""
        if not self.model:
            return
        ws = self.model[data.draw(st.sampled_from(list(self.model)))][0]
        assert self.m._note_ping(ws, timeout)
        assert self.m._pong_due(ws)
        if pong:
            assert self.m.record_pong_ws(ws) == 0.0
            assert not self.m._pong_due(ws)

    @invariant()
    def agrees_with_model(self) -> None:
        m = self.m
        assert len(m) == len(self.model)
        assert Core.get_stats(m)["pending_connections"] == len(self.held)
        assert not any(m._pong_due(ws) or ws in m for ws, _, _ in self.held)
        for lobby in LOBBIES:
            members = [ws for ws, lo, _ in self.model.values() if lo == lobby]
            assert {id(ws) for ws in m._lobby_targets(lobby)} == {id(ws) for ws in members}
            assert m.get_lobby_users(lobby) == {u for _, lo, u in self.model.values() if lo == lobby}
        for user in USERS:
            assert m.is_user_connected(user) == any(u == user for _, _, u in self.model.values())
        assert_consistent(m)


TestReentrantMachine = ReentrantMachine.TestCase


# ----------------------------------------- the C fan-out of a lobby broadcast


class _ScriptedPeer(FakePeer):
    """A FakePeer whose ASGI send runs ``script`` (any Python) on each text
    frame: what a server's or a middleware's send may do in the middle of
    the C fan-out (csrc/fanout.c)."""

    def __init__(self, script: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.script = script
        self.ws.application_state = WebSocketState.CONNECTED  # as after accept()

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.send" and self.script is not None:
            result = self.script()
            if result is _BARE_YIELD:
                await asyncio.sleep(0)
            elif isinstance(result, asyncio.Future):
                await result
        await super()._send(message)


_BARE_YIELD = object()


def _bomb_then(action: Callable[[], None]) -> Callable[[], None]:
    """A script that leaves cyclic garbage whose finalizer runs ``action``,
    and collects it: the finalizer runs inside the send, hence inside the
    fan-out's call of it."""

    def script() -> None:
        _Bomb(_Fuse(action, 0))
        gc.collect()

    return script


def test_broadcast_whose_sends_disconnect_join_raise_suspend_and_run_finalizers() -> None:
    """Every send of the C fan-out runs arbitrary Python code: a send that
    disconnects later members and connects new ones, one that raises
    (OSError and another error), one that suspends (on a future, and on a
    bare yield), one whose GC finalizer disconnects a later member whose last
    other reference it drops. No crash (run under ASan too), and the count
    and the frames agree with who was still a member when its turn came."""

    async def main() -> None:
        m = new_manager()
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        peers: dict[str, _ScriptedPeer] = {}
        doomed: list[Any] = []  # the only other reference to late_gc's websocket

        def add(name: str, script: Callable[[], Any] | None = None) -> None:
            peers[name] = _ScriptedPeer(script)
            join(m, "L", name, peers[name].ws)

        def leave_and_join() -> None:
            m.disconnect(peers["left"].ws)
            for i in range(3):
                add(f"new{i}")  # not in the snapshot: not a recipient

        def oserror() -> None:
            raise OSError("connection reset by peer")

        def valueerror() -> None:
            raise ValueError("a broken send wrapper")

        def finalizer_action() -> None:
            m.disconnect(doomed.pop())

        add("churn", leave_and_join)
        add("left")
        add("oserror", oserror)
        add("valueerror", valueerror)
        add("suspends", lambda: gate)
        add("bare_yield", lambda: _BARE_YIELD)
        add("finalizer", _bomb_then(finalizer_action))
        late = _ScriptedPeer()
        join(m, "L", "late_gc", late.ws)
        doomed.append(late.ws)
        del late  # from now on the registry (and the fan-out's list) hold it
        add("plain")
        add("excluded")
        sent = await m.broadcast_to_lobby("L", {"n": 1}, exclude_user_id="excluded")
        got = {name for name, p in peers.items() if p.texts() == [{"n": 1}]}
        # suspended: queued in its outbox, counted, delivered once the gate opens
        assert got == {"churn", "bare_yield", "finalizer", "plain"}
        assert sent == len(got) + 1
        gate.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert peers["suspends"].texts() == [{"n": 1}]
        for name in ("left", "oserror", "valueerror"):
            assert peers[name].ws not in m
        assert peers["oserror"].ws.application_state is WebSocketState.DISCONNECTED
        assert not doomed and len(m) == 9  # 10 members, 3 failed or left, late_gc gone, 3 new
        assert all(not p.frames for name, p in peers.items() if name.startswith("new"))
        assert_consistent(m)
        await m.shutdown()

    asyncio.run(main())


# ------------------------------------------------- rooms (issue 11): join / leave


def assert_rooms_consistent(m: Core) -> None:
    """Every view agrees once connections are in several lobbies: each
    membership is seen exactly once by every lobby walk."""
    snap = m._snapshot()
    assert len(snap) == len(m) == Core.get_stats(m)["total_connections"]
    memberships: dict[str, list[Any]] = {}
    for ws, _first, user in snap:
        assert m._info(ws) is not None and m._info(ws)[1] == user  # type: ignore[index]
        for lobby in m.lobbies_of(ws):
            memberships.setdefault(lobby, []).append((ws, user))
    assert Core.get_stats(m)["active_lobbies"] == len(memberships)
    for lobby, members in memberships.items():
        targets = m._lobby_targets(lobby)
        assert len(targets) == len(members) == m._lobby_count(lobby)
        assert {id(ws) for ws in targets} == {id(ws) for ws, _ in members}
        assert m.get_lobby_users(lobby) == {u for _, u in members}
        assert all(m._is_member(ws, lobby) for ws, _ in members)


def rooms_population(m: Core) -> list[Any]:
    """10 connections: u0..u9 in their own lobby H<i>, each also in L and R."""
    socks = [join(m, f"H{i}", f"u{i}") for i in range(10)]
    for ws in socks:
        assert m._join(ws, fresh("L")) == ""
        assert m._join(ws, fresh("R")) == ""
    return socks


@pytest.mark.parametrize("what", ["join", "leave", "is_member"])
@pytest.mark.parametrize("leave", ["half", "all"])
def test_hostile_str_lobby_ids_for_join_and_leave(what: str, leave: str) -> None:
    """A str subclass lobby code whose __hash__ / __eq__ would disconnect
    members (the very connection joining or leaving among them): the core
    copies it to an exact str first, so that code never runs mid-lookup,
    the result is the plain id's, and the registry stays consistent."""
    m = new_manager()
    socks = rooms_population(m)
    action = leave_all(m, socks[::2] if leave == "half" else socks)
    lobby = hostile_str("L", action)
    if what == "join":
        assert m._join(socks[0], lobby) == "member"
        newcomer = join(m, "N", "n0")
        assert m._join(newcomer, hostile_str("Z", action)) == ""
        assert m.lobbies_of(newcomer) == {"N", "Z"}
        assert m.get_lobby_users("Z") == {"n0"}
    elif what == "leave":
        assert m.leave(socks[1], lobby) is True
        assert m.leave(socks[1], hostile_str("L", action)) is False
        assert m.lobbies_of(socks[1]) == {"H1", "R"}
    else:
        assert m._is_member(socks[1], lobby) is True
    action()  # now, between calls: everything still agrees
    assert_rooms_consistent(m)


def _room_action(m: Core, socks: list[Any], action: str) -> Callable[[], None]:
    """An action that runs once: disconnect everyone, leave L and R, or
    connect five more and add them to L."""
    if action == "disconnect_all":
        return leave_all(m, socks)
    done: list[bool] = []

    def act() -> None:
        if done:
            return
        done.append(True)
        if action == "leave_all":
            for ws in socks:
                m.leave(ws, "L")
                m.leave(ws, "R")
        else:
            for i in range(5):
                m._join(join(m, "H0", f"late{i}"), fresh("L"))

    return act


ROOM_READS: dict[str, Callable[[Core, list[Any]], Any]] = {
    "targets": lambda m, socks: m._lobby_targets("L"),
    "users": lambda m, socks: m.get_lobby_users("L"),
    "lobbies_of": lambda m, socks: m.lobbies_of(socks[0]),
    "snapshot": lambda m, socks: m._snapshot(),
    "take_dirty": lambda m, socks: m._take_dirty(),
}


@pytest.mark.parametrize("call", sorted(ROOM_READS))
@pytest.mark.parametrize("action", ["disconnect_all", "leave_all", "join_new"])
@pytest.mark.parametrize("after", [0, 1, 3])
def test_finalizer_that_joins_leaves_disconnects_during_room_snapshots(
    call: str, action: str, after: int
) -> None:
    """A GC finalizer that disconnects, leaves or joins while a lobby with
    guests (join()) is snapshotted, its users read or a connection's lobbies
    listed: no NULL slot, no freed member, each membership once."""
    m = new_manager()
    m._track_presence(True)
    socks = rooms_population(m)
    result, _fired = call_with_finalizer(
        lambda: ROOM_READS[call](m, socks), _room_action(m, socks, action), after=after
    )
    assert None not in result
    assert_rooms_consistent(m)
    m._track_presence(False)


def test_finalizer_joining_and_leaving_during_a_rooms_broadcast() -> None:
    """The C fan-out to a lobby of guests, with sends that leave the lobby,
    disconnect, or join others: each still-member gets it once, no crash."""

    async def main() -> None:
        m = ConnectionManager(max_connections=1000, max_per_lobby=100, ping_interval=None)
        peers = [FakePeer() for _ in range(8)]
        for i, p in enumerate(peers):
            assert await m.connect(p.ws, f"H{i}", f"u{i}")
            assert await m.join(p.ws, "L")
        late = FakePeer()
        assert await m.connect(late.ws, "X", "late")
        original = peers[0].ws._send

        async def hostile_send(message: Message) -> None:
            await original(message)
            m.leave(peers[1].ws, "L")  # not yet sent: skipped
            m.disconnect(peers[2].ws)  # not yet sent: skipped
            await m.join(late.ws, "L")  # joined after the snapshot: not sent
            m.leave(peers[0].ws, "L")  # itself, already sent

        peers[0].ws._send = hostile_send
        sent = await m.broadcast_to_lobby("L", {"type": "chat"})
        assert sent == 6
        got = [p for p in peers if any(t.get("type") == "chat" for t in p.texts())]
        assert peers[1] not in got and peers[2] not in got and len(got) == 6
        assert not any(t.get("type") == "chat" for t in late.texts())
        assert_rooms_consistent(m)
        await m.shutdown()

    asyncio.run(main())


LOBBY_NAMES = ["A", "B", "C"]


class RoomsMachine(RuleBasedStateMachine):
    """connect / join / leave / disconnect against a plain model: after
    every step each lobby walk sees each membership once, in delivery order
    (first-lobby members by connect, then the others by join)."""

    def __init__(self) -> None:
        super().__init__()
        self.m = ConnectionManager(max_connections=1000, max_per_lobby=3, ping_interval=None)
        self.m._track_presence(True)
        self.model: dict[int, tuple[Any, str, str, set[str]]] = {}
        self.dirty: set[str] = set()
        #: lobby -> (first-lobby members, the others), each oldest first
        self.order: dict[str, tuple[list[Any], list[Any]]] = {name: ([], []) for name in LOBBY_NAMES}

    def _pick(self, data: st.DataObject) -> int:
        keys = list(self.model)  # oldest first: the same draw picks the same one
        return keys[data.draw(st.integers(0, len(keys) - 1))]

    def _count(self, lobby: str) -> int:
        return sum(lobby in lobbies for _, _, _, lobbies in self.model.values())

    @rule(lobby=st.sampled_from(LOBBY_NAMES), user=st.sampled_from(["u", "v", "w"]))
    def connect(self, lobby: str, user: str) -> None:
        ws = Sock()
        reason = self.m._reserve(ws, fresh(lobby), fresh(user))
        if self._count(lobby) >= 3:
            assert reason == "lobby_full"
            return
        assert reason == "" and self.m._commit(ws)
        self.model[id(ws)] = (ws, lobby, user, {lobby})
        self.order[lobby][0].append(ws)
        self.dirty.add(lobby)

    @rule(data=st.data(), lobby=st.sampled_from(LOBBY_NAMES))
    def join_lobby(self, data: st.DataObject, lobby: str) -> None:
        if not self.model:
            return
        ws, _first, _user, lobbies = self.model[self._pick(data)]
        reason = self.m._join(ws, fresh(lobby))
        if lobby in lobbies:
            assert reason == "member"
        elif self._count(lobby) >= 3:
            assert reason == "lobby_full"
        else:
            assert reason == ""
            lobbies.add(lobby)
            self.order[lobby][1].append(ws)  # back in its first lobby too: after the others
            self.dirty.add(lobby)

    @rule(data=st.data(), lobby=st.sampled_from(LOBBY_NAMES))
    def leave_lobby(self, data: st.DataObject, lobby: str) -> None:
        if not self.model:
            return
        ws, _first, _user, lobbies = self.model[self._pick(data)]
        assert self.m.leave(ws, fresh(lobby)) is (lobby in lobbies)
        if lobby in lobbies:
            lobbies.discard(lobby)
            self._unlist(ws, lobby)
            self.dirty.add(lobby)

    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        if not self.model:
            return
        ws, first, user, lobbies = self.model.pop(self._pick(data))
        assert self.m.disconnect(ws) == (first, user)
        for lobby in lobbies:
            self._unlist(ws, lobby)
        self.dirty |= lobbies

    def _unlist(self, ws: Any, lobby: str) -> None:
        for members in self.order[lobby]:
            if any(x is ws for x in members):
                members[:] = [x for x in members if x is not ws]
                return
        raise AssertionError(f"{lobby}: not in the model's order")

    @rule()
    def take_dirty(self) -> None:
        assert set(self.m._take_dirty()) == self.dirty
        self.dirty = set()

    @invariant()
    def agrees(self) -> None:
        for ws, _first, _user, lobbies in self.model.values():
            assert self.m.lobbies_of(ws) == lobbies
        for lobby in LOBBY_NAMES:
            assert self.m._lobby_count(lobby) == self._count(lobby)
            firsts, others = self.order[lobby]
            assert [id(ws) for ws in self.m._lobby_targets(lobby)] == [id(ws) for ws in firsts + others]
        assert_rooms_consistent(self.m)


TestRoomsMachine = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)(RoomsMachine).TestCase
