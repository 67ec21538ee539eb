"""Reference counts and memory of the C registry.

(a) Every reference the core takes (websockets, lobby and user ids) is given
back: after disconnect, release, a refused or failed reservation, once the
lists it returns are dropped, and when the manager itself goes away, with or
without a reference cycle through it.

(b) Connection churn leaves memory flat, and the core's bookkeeping is
allocated through PyMem, so that tracemalloc sees it (and sees it freed).
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.websockets import WebSocket, WebSocketState

from wsmanager import ConnectionManager

KIB = 1024


class Sock:
    """Stands for a websocket: anything hashable will do for the sync steps."""

    __slots__ = ("__weakref__", "manager")

    def __init__(self) -> None:
        self.manager: ConnectionManager | None = None


class AcceptingSocket:
    """Just enough of a Starlette WebSocket for ConnectionManager.connect()."""

    def __init__(self) -> None:
        self.application_state = WebSocketState.CONNECTING
        self.closed_with: tuple[int, str] | None = None

    async def accept(self) -> None:
        self.application_state = WebSocketState.CONNECTED

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)


def new_id(prefix: str, n: int = 0) -> str:
    """A str built at runtime: not interned, not shared with anything else."""
    return f"{prefix}-{n}-{'x' * 3}"


def refcounts(*objects: object) -> list[int]:
    return [sys.getrefcount(o) for o in objects]


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Objects must be freed by reference counting alone, or by our gc.collect()."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------- (a)


def test_connect_disconnect_gives_back_every_reference() -> None:
    m = ConnectionManager()
    socks = [Sock() for _ in range(3)]
    lobby, user = new_id("lobby"), new_id("user")
    # equal ids, other objects: a second tab of the same user in the same lobby
    lobby2, user2 = new_id("lobby"), new_id("user")
    start = refcounts(*socks, lobby, user, lobby2, user2)
    for _ in range(50):
        assert m._reserve(socks[0], lobby, user) == ""
        assert m._reserve(socks[1], lobby2, user2) == ""
        assert m._reserve(socks[2], lobby, user2) == ""
        assert all(m._commit(ws) for ws in socks)
        held = refcounts(*socks, lobby, user)
        assert all(h > s for h, s in zip(held, start[:5], strict=True)), (
            "the registry keeps what it refers to alive"
        )
        infos = [m.disconnect(ws) for ws in socks]
        assert infos == [(lobby, user), (lobby, user2), (lobby, user2)]
        del infos
        assert refcounts(*socks, lobby, user, lobby2, user2) == start
    assert len(m) == 0


def test_async_connect_disconnect_gives_back_every_reference() -> None:
    m = ConnectionManager(max_per_lobby=1)
    ws, other = AcceptingSocket(), AcceptingSocket()
    lobby, user = new_id("lobby"), new_id("user")
    start = refcounts(ws, other, lobby, user)

    async def scenario() -> None:
        assert await m.connect(cast(WebSocket, ws), lobby, user)
        assert not await m.connect(cast(WebSocket, other), lobby, user)  # refused: lobby_full
        assert other.closed_with == (4002, "lobby_full")
        assert m.disconnect(cast(WebSocket, ws)) == (lobby, user)

    for _ in range(20):
        ws.application_state = other.application_state = WebSocketState.CONNECTING
        asyncio.run(scenario())
    assert refcounts(ws, other, lobby, user) == start


def test_reserve_release_gives_back_every_reference() -> None:
    m = ConnectionManager()
    ws = Sock()
    lobby, user = new_id("lobby"), new_id("user")
    start = refcounts(ws, lobby, user)
    for _ in range(50):
        assert m._reserve(ws, lobby, user) == ""
        assert all(h > s for h, s in zip(refcounts(ws, lobby, user), start, strict=True))
        assert m._release(ws)
        assert refcounts(ws, lobby, user) == start
    assert m.get_stats()["pending_connections"] == 0


def _refusing_manager(reason: str) -> tuple[ConnectionManager, Sock | None]:
    """A manager that refuses the next reservation in new_id("lobby") by new_id("user") for reason."""
    if reason == "server_full":
        return ConnectionManager(max_connections=0), None
    if reason == "shutting_down":
        m = ConnectionManager()
        m._set_shutting_down(True)
        return m, None
    m = ConnectionManager(max_per_lobby=1, max_per_user=1)
    holder = Sock()
    if reason == "lobby_full":
        assert m._reserve(holder, new_id("lobby"), new_id("someone-else")) == ""
    else:
        assert m._reserve(holder, new_id("another-lobby"), new_id("user")) == ""
    assert m._commit(holder)
    return m, holder


@pytest.mark.parametrize("reason", ["server_full", "lobby_full", "user_limit", "shutting_down"])
def test_refused_reservation_keeps_no_reference(reason: str) -> None:
    lobby, user = new_id("lobby"), new_id("user")
    m, holder = _refusing_manager(reason)
    ws = Sock()
    start = refcounts(ws, lobby, user)
    for _ in range(50):
        assert m._reserve(ws, lobby, user) == reason
        assert refcounts(ws, lobby, user) == start
    assert m.get_stats()["refused"].get(reason) == 50
    assert ws not in m
    if holder is not None:
        assert m.disconnect(holder) is not None


class Id(str):
    __slots__ = ()


BAD_IDS: list[Callable[[], object]] = [
    lambda: "",
    lambda: new_id("y" * 2000),
    lambda: Id("z" * 2000),
    lambda: "\ud800" + new_id("lone-surrogate"),
    lambda: 12345678,
    lambda: b"lobby",
    lambda: object(),
]


@pytest.mark.parametrize("make_bad", BAD_IDS)
@pytest.mark.parametrize("bad_arg", ["lobby", "user"])
def test_invalid_id_keeps_no_reference(
    make_bad: Callable[[], object], bad_arg: str, no_automatic_gc: None
) -> None:
    m = ConnectionManager()
    ws = Sock()
    bad, good = make_bad(), new_id("good")
    args = (bad, good) if bad_arg == "lobby" else (good, bad)
    start = refcounts(ws, bad, good)
    for _ in range(20):
        with pytest.raises((TypeError, ValueError)):
            m._reserve(ws, *args)
        assert refcounts(ws, bad, good) == start
    assert m.get_stats()["pending_connections"] == 0
    assert ws not in m


def test_double_connect_keeps_no_extra_reference() -> None:
    m = ConnectionManager()
    ws = Sock()
    lobby, user = new_id("lobby"), new_id("user")
    lobby2, user2 = new_id("lobby2"), new_id("user2")
    start = refcounts(ws, lobby, user, lobby2, user2)
    assert m._reserve(ws, lobby, user) == ""
    for committed in (False, True):
        if committed:
            assert m._commit(ws)
        connected = refcounts(ws, lobby, user, lobby2, user2)
        for _ in range(20):
            with pytest.raises(ValueError, match="already connected"):
                m._reserve(ws, lobby2, user2)
        assert refcounts(ws, lobby, user, lobby2, user2) == connected
    assert m._info(ws) == (lobby, user)
    assert m.disconnect(ws) == (lobby, user)
    assert refcounts(ws, lobby, user, lobby2, user2) == start


def test_failing_clock_keeps_no_reference() -> None:
    def broken_clock() -> float:
        raise RuntimeError("clock broke")

    m = ConnectionManager(clock=broken_clock)
    ws = Sock()
    lobby, user = new_id("lobby"), new_id("user")
    start = refcounts(ws, lobby, user)
    for _ in range(20):
        # reserving reads no clock; committing does, and fails
        assert m._reserve(ws, lobby, user) == ""
        with pytest.raises(RuntimeError, match="clock broke"):
            m._commit(ws)
        assert m._release(ws)
        assert refcounts(ws, lobby, user) == start
    assert m.get_stats()["pending_connections"] == 0
    assert m.can_accept_connection(lobby) == (True, "")


def test_returned_lists_and_views_own_their_references() -> None:
    now = [100.0]
    m = ConnectionManager(clock=lambda: now[0])
    socks = [Sock() for _ in range(4)]
    lobby = new_id("lobby")
    users = [new_id("user", i) for i in range(2)]
    for i, ws in enumerate(socks):
        assert m._reserve(ws, lobby, users[i % 2]) == ""
        assert m._commit(ws)
    connected = refcounts(*socks, lobby, *users)

    results: list[Any] = [
        m._lobby_targets(lobby),
        m._lobby_targets(lobby, users[0]),
        m._user_targets(users[1]),
        m._snapshot(),
        m.get_lobby_users(lobby),
        m._info(socks[0]),
        dict(m.connection_info),
        dict(m.active_connections),
        dict(m.user_connections),
    ]
    assert results[0] == socks
    assert results[1] == socks[1::2]
    assert all(h > c for h, c in zip(refcounts(*socks), connected[: len(socks)], strict=True)), (
        "the lists hold the websockets"
    )
    del results
    assert refcounts(*socks, lobby, *users) == connected

    now[0] += 10.0
    to_ping, expired = m._sweep(5.0, 5.0)
    assert to_ping == socks and expired == []
    del to_ping, expired
    now[0] += 10.0
    to_ping, expired = m._sweep(5.0, 5.0)
    assert to_ping == [] and [e[0] for e in expired] == socks
    assert len(m) == 0
    assert all(h >= s for h, s in zip(refcounts(*socks), connected[: len(socks)], strict=True)), (
        "expired tuples hold the websockets"
    )
    del to_ping, expired
    assert refcounts(*socks) == [c - 1 for c in connected[: len(socks)]]
    assert refcounts(lobby, *users) == [c - 1 for c in connected[len(socks) :]]


def test_deleting_manager_gives_back_every_reference(no_automatic_gc: None) -> None:
    m = ConnectionManager()
    socks = [Sock() for _ in range(4)]
    lobby, user = new_id("lobby"), new_id("user")
    start = refcounts(*socks, lobby, user)
    assert [m._reserve(ws, lobby, user) for ws in socks] == [""] * 4
    assert m._commit(socks[0]) and m._commit(socks[1])  # two open, two handshakes pending
    alive = weakref.ref(m)
    del m
    assert alive() is None, "freed by reference counting: no cycle through the manager"
    assert refcounts(*socks, lobby, user) == start


@pytest.mark.parametrize("through", ["open connection", "pending handshake", "clock"])
def test_gc_collects_manager_in_a_cycle(through: str, no_automatic_gc: None) -> None:
    lobby, user = new_id("lobby"), new_id("user")
    start = refcounts(lobby, user)

    class Holder:
        def __init__(self) -> None:
            self.manager: ConnectionManager | None = None

        def now(self) -> float:
            return 1.0

    holder = Holder()
    m = ConnectionManager(clock=holder.now if through == "clock" else None)
    ws = Sock()
    ws.manager = m  # the websocket refers back to the manager that holds it
    holder.manager = m
    assert m._reserve(ws, lobby, user) == ""
    if through != "pending handshake":
        assert m._commit(ws)
    alive = weakref.ref(m)
    ws_alive, holder_alive = weakref.ref(ws), weakref.ref(holder)
    if through == "clock":
        assert m.disconnect(ws) == (lobby, user)
        ws.manager = None  # only the clock closes the cycle
    else:
        holder.manager = None  # only the websocket closes the cycle
    del m, ws, holder

    assert alive() is not None, "the cycle keeps the manager alive until the collector runs"
    gc.collect()
    assert alive() is None
    assert ws_alive() is None
    assert holder_alive() is None
    assert refcounts(lobby, user) == start


# A clock is Python code: it may call back into the manager. The core must not
# keep pointers to entries across that call. Run in a subprocess: a core that
# does would corrupt the heap of the test process.
REENTRANT_CLOCK = """
from wsmanager import ConnectionManager
ws = object()
armed = False
def clock():
    global armed
    if armed:
        armed = False
        {meanwhile}
    return 1.0
m = ConnectionManager(clock=clock)
assert m._reserve(ws, "lobby", "user") == ""
{setup}
armed = True
try:
    print(repr({call}))
except Exception as exc:
    print(type(exc).__name__)
print(len(m), m.get_stats()["pending_connections"], m._sweep(0.0, 0.0))
"""


@pytest.mark.parametrize(
    ("setup", "meanwhile", "call", "expected"),
    [
        ("pass", "m._release(ws)", "m._commit(ws)", "False\n0 0 ([], [])"),
        ("m._commit(ws)", "m.disconnect(ws)", "m.touch(ws)", "False\n0 0 ([], [])"),
        ("m._commit(ws)", "m.disconnect(ws)", 'm.update_last_message("user")', "None\n0 0 ([], [])"),
        ("m._commit(ws)", "m.disconnect(ws)", "m.record_pong_ws(ws)", "None\n0 0 ([], [])"),
        ("m._commit(ws)", "m.disconnect(ws)", "m._note_ping(ws)", "False\n0 0 ([], [])"),
        ("m._commit(ws)", "m.disconnect(ws)", 'm.record_pong("user")', "None\n0 0 ([], [])"),
    ],
    # (_reserve reads no clock, so nothing can re-enter it there)
    ids=["commit", "touch", "update_last_message", "record_pong_ws", "note_ping", "record_pong"],
)
def test_clock_that_reenters_the_manager_is_safe(
    setup: str, meanwhile: str, call: str, expected: str
) -> None:
    code = REENTRANT_CLOCK.format(setup=setup, meanwhile=meanwhile, call=call)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, expected), proc.stderr[-2000:]


# --------------------------------------------------------------------------- (b)


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """Start tracemalloc; yield a function giving the traced memory now."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()

    def current() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    try:
        yield current
    finally:
        if not was_tracing:
            tracemalloc.stop()


def test_memory_flat_over_100k_connection_cycles(traced: Callable[[], int]) -> None:
    n_lobbies, n_users, keep_open, warmup, cycles = 1_000, 5_000, 1_000, 10_000, 100_000
    lobbies = [new_id("lobby", i) for i in range(n_lobbies)]
    users = [new_id("user", i) for i in range(n_users)]
    kept = [Sock() for _ in range(keep_open)]
    churn = [Sock() for _ in range(1_000)]
    m = ConnectionManager(max_connections=keep_open + 1)
    # the open connections fill half the lobbies: the other half are created and freed by the churn
    for k, ws in enumerate(kept):
        assert m._reserve(ws, lobbies[k % (n_lobbies // 2)], users[k]) == ""
        assert m._commit(ws)

    def churn_cycles(first: int, count: int) -> None:
        reserve, commit, disconnect = m._reserve, m._commit, m.disconnect
        for i in range(first, first + count):
            ws = churn[i % len(churn)]
            if reserve(ws, lobbies[i * 7 % n_lobbies], users[i * 13 % n_users]):
                raise AssertionError(f"cycle {i} refused")
            commit(ws)
            disconnect(ws)

    churn_cycles(0, warmup)
    before = traced()
    churn_cycles(warmup, cycles)
    after = traced()
    assert len(m) == keep_open
    assert m.get_stats()["connects"] == keep_open + warmup + cycles
    assert after - before < 64 * KIB, f"grew by {after - before} bytes over {cycles} cycles"


@pytest.mark.parametrize("finish", ["disconnect", "release"])
@pytest.mark.parametrize(("n_lobbies", "n_users"), [(200, 10_000), (10, 10)], ids=["distinct", "shared"])
def test_open_connections_are_traced_and_freed(
    traced: Callable[[], int], finish: str, n_lobbies: int, n_users: int
) -> None:
    """With ids shared by many connections, the entries themselves must be traced."""
    n = 10_000
    socks = [Sock() for _ in range(n)]
    lobbies = [new_id("lobby", i) for i in range(n_lobbies)]
    users = [new_id("user", i) for i in range(n_users)]
    m = ConnectionManager(max_connections=n, max_per_lobby=n // n_lobbies)
    empty = traced()
    for i, ws in enumerate(socks):
        assert m._reserve(ws, lobbies[i % n_lobbies], users[i % n_users]) == ""
        if finish == "disconnect":
            m._commit(ws)
    full = traced()
    assert full - empty >= n * 64, f"only {full - empty} bytes traced for {n} connections"
    end = m.disconnect if finish == "disconnect" else m._release
    for ws in socks:
        assert end(ws)
    freed = traced()
    assert m.get_stats()["total_connections"] == m.get_stats()["pending_connections"] == 0
    assert freed - empty < 64 * KIB, f"{freed - empty} bytes still traced once all are gone"


def test_a_manager_used_from_successive_event_loops_keeps_none_of_the_closed_ones() -> None:
    """connect() keeps a loop's record of handshakes in flight from one
    connect to the next; a closed loop's is dropped by the next loop's first
    connect, so a manager that outlives its loops (TestClient sessions,
    successive asyncio.run()) does not keep them alive."""
    m = ConnectionManager(ping_interval=None)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def session() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        ws = AcceptingSocket()
        assert await m.connect(cast(WebSocket, ws), "lobby", "user")
        assert m.disconnect(ws) == ("lobby", "user")

    for _ in range(4):
        asyncio.run(session())
    gc.collect()
    assert [ref() is None for ref in loops[:-1]] == [True, True, True]
    assert len(m) == 0
