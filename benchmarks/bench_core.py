"""wsmanager's C core against the seed's plain-Python manager, measured in one run.

    python benchmarks/bench_core.py            # the real measurement: one markdown table
    python benchmarks/bench_core.py --json     # the same numbers as JSON
    python benchmarks/bench_core.py --quick    # small N, under a minute: a smoke run, not a measurement
    python benchmarks/bench_core.py --rows connect,disconnect/own,bytes/with,bytes/one-task
                                               # only the realistic rows whose key starts so

The seed is benchmarks/baseline.py (the pattern's ``ConnectionManager``,
statement for statement). Every row prints the ratio seed / wsmanager (>1:
wsmanager is faster, or smaller) and the goal of issue 10 for that row.

Two kinds of rows:

* realistic rows (what a server runs): real Starlette ``WebSocket`` objects
  over an in-memory ASGI receive/send (``accept()`` completes at once; the
  ``send`` is a plain async function, so uvicorn's direct-frame path is not
  taken), the seed's endpoint (``connect``, then ``receive_json()`` until the
  client leaves, then ``disconnect``) each in its own task, garbage collector
  on unless the row says otherwise. Times are per connection or per
  broadcast, the best of a few rounds that alternate seed and wsmanager.
* operation rows: one method called in a loop on a registry filled through
  the bookkeeping alone (``_reserve``/``_commit``, websockets are plain
  ``object()`` instances), garbage collector off (as ``timeit`` does); best of
  ``--repeat`` runs of N calls (N sized so that a run lasts ``--target-ms``).
  ns/op includes the Python loop driving the calls, the same on both sides.
  Rows marked "favourable path" skip what a real ``connect()`` does besides
  the bookkeeping (``accept()``, the heartbeat's endpoint watch): they are
  kept for comparison with earlier runs, and carry no goal.

Websockets and ids are created before any timing or memory measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import orjson  # noqa: E402
from baseline import BaselineManager  # noqa: E402
from starlette.types import Message  # noqa: E402
from starlette.websockets import WebSocket, WebSocketDisconnect  # noqa: E402

from wsmanager import ConnectionManager, dumps  # noqa: E402
from wsmanager._core import Core  # noqa: E402

MAX_ARGS = 20_000  # most pre-built (random) arguments per timed run
CONNECT_BATCH = 500  # connections added then removed per round
BIG = 10**9  # limits that never refuse
SEED_GOAL = 1.0  # issue 10: every seed operation, and bytes, at least the seed's
BROADCAST_GOAL = 2.0  # issue 10: ordinary-path broadcast at 20k connections, GC on

Runner = Callable[[int], Callable[[], None]]  # prepares n operations; the thunk performs them


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; ``QUICK`` shrinks them for a smoke run."""

    scales: tuple[int, int] = (1_000, 100_000)  # operation rows: connections
    lobbies: int = 10_000  # lobbies of the operation rows and of the one-task rows
    flat_lobbies: tuple[int, int] = (10, 100_000)
    flat_connections: int = 100_000
    memory_connections: int = 100_000  # bookkeeping bytes (favourable and one-task)
    own_task: int = 20_000  # connections, each in its own endpoint task
    own_task_lobbies: int = 2_000
    one_task: int = 100_000  # connections made by one task
    broadcast_lobby: int = 10  # members per lobby in the broadcast rows (own_task connections)
    broadcasts: int = 2_000  # per timed run
    rounds: int = 5  # rounds of the realistic rows (best kept)
    repeat: int = 9
    target_ms: float = 30.0


FULL = Sizes()
QUICK = Sizes(
    scales=(200, 5_000),
    lobbies=500,
    flat_lobbies=(10, 5_000),
    flat_connections=5_000,
    memory_connections=5_000,
    own_task=2_000,
    own_task_lobbies=200,
    one_task=5_000,
    broadcasts=200,
    rounds=2,
    repeat=2,
    target_ms=3.0,
)


@dataclass
class Row:
    key: str  # stable name of the row, the same at every size (--json, tests)
    operation: str
    scale: str
    baseline: str  # what the wsmanager column is compared against
    baseline_value: float  # ns per operation, or bytes per connection (unit)
    wsmanager_value: float
    unit: str = "ns"  # "ns" or "B"
    goal: float | None = None  # the ratio issue 10 asks for; None: no goal for this row
    favourable: bool = False  # kept for comparison; skips part of what a server runs
    o1: bool = False  # an O(1) operation in wsmanager: held to the earlier 3x aim

    @property
    def ratio(self) -> float:
        """Seed / wsmanager: >1 means wsmanager is faster (or smaller)."""
        return self.baseline_value / self.wsmanager_value

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.ratio >= self.goal


@dataclass
class Aim:
    text: str
    met: bool
    detail: str


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    loop_ns: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)
    aims: list[Aim] = field(default_factory=list)
    dict_lookup_ns: dict[int, float] = field(default_factory=dict)  # control for the flatness aim
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after
    seconds: float = 0.0
    quick: bool = False


# ---------------------------------------------------------------- timing


class Timer:
    def __init__(self, repeat: int, target_ms: float) -> None:
        self.repeat = repeat
        self.target_ns = target_ms * 1e6

    def calibrate(self, prepare: Runner, max_n: int) -> int:
        """N such that one run of N operations lasts about the target time."""
        n = 1
        while True:
            run = prepare(n)
            t0 = time.perf_counter_ns()
            run()
            elapsed = time.perf_counter_ns() - t0
            if elapsed > self.target_ns / 10 or n >= max_n:
                break
            n = min(n * 10, max_n)
        per_op = max(elapsed / n, 1.0)
        return int(max(3, min(max_n, self.target_ns / per_op)))

    def ns_per_op(self, *prepares: Runner, max_n: int = MAX_ARGS) -> list[float]:
        """Best ns/op of each runner; the runs alternate so that all see the same machine load."""
        sizes = [self.calibrate(prepare, max_n) for prepare in prepares]
        runs = [prepare(n) for prepare, n in zip(prepares, sizes, strict=True)]
        best = [float("inf")] * len(runs)
        for _ in range(self.repeat):
            for i, (run, n) in enumerate(zip(runs, sizes, strict=True)):
                t0 = time.perf_counter_ns()
                run()
                best[i] = min(best[i], (time.perf_counter_ns() - t0) / n)
        return best


def over(fn: Callable[[Any], object], args: Sequence[Any]) -> Runner:
    """Calls of ``fn(arg)`` for the first n of ``args``."""

    def prepare(n: int) -> Callable[[], None]:
        some = list(args[:n])

        def run() -> None:
            for a in some:
                fn(a)

        return run

    return prepare


def repeated(fn: Callable[[], object]) -> Runner:
    """n calls of ``fn()``."""

    def prepare(n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                fn()

        return run

    return prepare


def empty_loop(args: Sequence[Any]) -> Runner:
    """The loop of ``over`` without the call: its overhead per operation."""

    def prepare(n: int) -> Callable[[], None]:
        some = list(args[:n])

        def run() -> None:
            for _a in some:
                pass

        return run

    return prepare


# ------------------------------------------------------------ populations


@dataclass
class Population:
    """Websockets and ids of ``n`` connections over ``lobbies`` lobbies (created up front)."""

    sockets: list[object]
    lobbies: list[str]
    users: list[str]

    @classmethod
    def make(cls, n: int, n_lobbies: int, prefix: str = "user") -> Population:
        codes = [f"lobby-{i:06d}" for i in range(n_lobbies)]
        return cls(
            sockets=[object() for _ in range(n)],
            lobbies=[codes[i % n_lobbies] for i in range(n)],
            users=[f"{prefix}-{i:07d}" for i in range(n)],
        )

    def triples(self) -> list[tuple[object, str, str]]:
        return list(zip(self.sockets, self.lobbies, self.users, strict=True))


def fill_baseline(pop: Population) -> BaselineManager:
    m = BaselineManager(BIG, BIG)
    book = m.connect_bookkeeping
    for ws, lobby, user in pop.triples():
        book(ws, lobby, user)
    return m


def fill_wsm(pop: Population) -> ConnectionManager:
    m = ConnectionManager(BIG, BIG)
    reserve, commit = m._reserve, m._commit
    for ws, lobby, user in pop.triples():
        reserve(ws, lobby, user)
        commit(ws)
    return m


Batch = list[tuple[object, str, str]]


def connect_disconnect(
    impls: Sequence[tuple[Callable[[Batch], None], Callable[[object], object]]],
    fresh: list[Batch],
    repeat: int,
) -> list[tuple[float, float]]:
    """Best (connect, disconnect) ns/op of each (connect_batch, disconnect) pair.

    Each round adds a batch of fresh connections then removes them, so the
    population is the same before and after; implementations alternate.
    """
    best = [(float("inf"), float("inf"))] * len(impls)
    ops = sum(len(b) for b in fresh)
    for _ in range(repeat):
        for i, (connect_batch, disconnect) in enumerate(impls):
            tc = td = 0
            for batch in fresh:
                t0 = time.perf_counter_ns()
                connect_batch(batch)
                t1 = time.perf_counter_ns()
                for ws, _lobby, _user in batch:
                    disconnect(ws)
                t2 = time.perf_counter_ns()
                tc += t1 - t0
                td += t2 - t1
            best[i] = (min(best[i][0], tc / ops), min(best[i][1], td / ops))
    return best


def bench_scale(report: Report, timer: Timer, sizes: Sizes, which: str, rng: random.Random) -> None:
    scale = sizes.scales[0 if which == "small" else 1]
    pop = Population.make(scale, sizes.lobbies)
    base, wsm = fill_baseline(pop), fill_wsm(pop)
    used_lobbies = sorted(set(pop.lobbies))
    lobby_args = rng.choices(used_lobbies, k=MAX_ARGS)
    user_args = rng.choices(pop.users, k=MAX_ARGS)
    label = f"{scale:,} conns / {len(used_lobbies):,} lobbies, GC off"

    def add(op: str, bn: float, wn: float, *, o1: bool = True, favourable: bool = False) -> None:
        report.rows.append(
            Row(
                f"{op.split(' ')[0]}/{which}",
                op,
                label,
                "seed",
                bn,
                wn,
                goal=None if favourable else SEED_GOAL,
                favourable=favourable,
                o1=o1,
            )
        )

    def row(op: str, b: Runner, w: Runner, o1: bool = True) -> None:
        bn, wn = timer.ns_per_op(b, w)
        add(op, bn, wn, o1=o1)

    # connect bookkeeping + disconnect: fresh users joining existing lobbies.
    rounds = 10
    newcomers = Population.make(CONNECT_BATCH * rounds, sizes.lobbies, prefix=f"new{scale}")
    fresh_all = [(ws, rng.choice(used_lobbies), u) for ws, _, u in newcomers.triples()]
    fresh = [fresh_all[i : i + CONNECT_BATCH] for i in range(0, len(fresh_all), CONNECT_BATCH)]

    def base_connect(batch: Batch) -> None:
        book = base.connect_bookkeeping
        for ws, lobby, user in batch:
            book(ws, lobby, user)

    def wsm_connect(batch: Batch) -> None:
        reserve, commit = wsm._reserve, wsm._commit
        for ws, lobby, user in batch:
            reserve(ws, lobby, user)
            commit(ws)

    (bc, bd), (wc, wd) = connect_disconnect(
        [(base_connect, base.disconnect), (wsm_connect, wsm.disconnect)], fresh, timer.repeat
    )
    assert len(wsm) == scale and len(base.connection_info) == scale
    add(
        "connect-bookkeeping (favourable path: _reserve/_commit, no accept, no heartbeat)",
        bc,
        wc,
        favourable=True,
    )
    add("disconnect", bd, wd)

    row(
        "can_accept_connection",
        over(base.can_accept_connection, lobby_args),
        over(wsm.can_accept_connection, lobby_args),
    )
    row("is_user_connected", over(base.is_user_connected, user_args), over(wsm.is_user_connected, user_args))
    row(
        "get_lobby_users",
        over(base.get_lobby_users, lobby_args),
        over(wsm.get_lobby_users, lobby_args),
        o1=False,
    )
    row("get_stats", repeated(base.get_stats), repeated(wsm.get_stats))
    row(
        "update_last_message",
        over(base.update_last_message, user_args),
        over(wsm.update_last_message, user_args),
    )
    row("record_pong", over(base.record_pong, user_args), over(wsm.record_pong, user_args))


def bench_flat(
    report: Report, timer: Timer, sizes: Sizes, rng: random.Random
) -> dict[str, dict[int, tuple[float, float]]]:
    """can_accept_connection / get_stats with the same connection count over few vs many lobbies."""
    out: dict[str, dict[int, tuple[float, float]]] = {"can_accept_connection": {}, "get_stats": {}}
    for tag, n_lobbies in zip(("few-lobbies", "many-lobbies"), sizes.flat_lobbies, strict=True):
        pop = Population.make(sizes.flat_connections, n_lobbies)
        base, wsm = fill_baseline(pop), fill_wsm(pop)
        lobby_args = rng.choices(sorted(set(pop.lobbies)), k=MAX_ARGS)
        label = f"{sizes.flat_connections:,} conns / {n_lobbies:,} lobbies, GC off"
        for op, b, w in (
            (
                "can_accept_connection",
                over(base.can_accept_connection, lobby_args),
                over(wsm.can_accept_connection, lobby_args),
            ),
            ("get_stats", repeated(base.get_stats), repeated(wsm.get_stats)),
        ):
            bn, wn = timer.ns_per_op(b, w)
            out[op][n_lobbies] = (bn, wn)
            report.rows.append(Row(f"{op}/{tag}", op, label, "seed", bn, wn, goal=SEED_GOAL, o1=True))
        # Control: a plain dict membership test of the same lobby codes, to
        # separate cache misses (a bigger table) from work per lobby.
        codes = dict.fromkeys(pop.lobbies)
        (report.dict_lookup_ns[n_lobbies],) = timer.ns_per_op(over(codes.__contains__, lobby_args))
        del base, wsm, pop, codes
        gc.collect()
    return out


# ------------------------------------------------------------------- JSON

PLAYER_NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
MESSAGES: dict[str, Any] = {
    "chat message": {
        "type": "chat",
        "lobby": "ABC123",
        "user_id": "user-42",
        "text": "gg everyone, ready for the next round?",
        "timestamp": 1732752000.123456,
        "seq": 1042,
    },
    "game state, 10 players": {
        "type": "state",
        "tick": 48213,
        "phase": "playing",
        "players": [
            {
                "id": f"p{i}",
                "name": name,
                "x": 12.5 + i * 3.25,
                "y": -7.75 + i,
                "hp": 100 - i * 7,
                "score": 1500 + i * 125,
                "alive": i % 4 != 0,
                "team": None if i % 3 == 0 else "red",
            }
            for i, name in enumerate(PLAYER_NAMES)
        ],
    },
    "100-element list": {"type": "scores", "values": [i * 37 % 1000 for i in range(100)]},
    "non-ASCII chat": {
        "type": "chat",
        "user_id": "José-Müller",
        "text": "Ça va? Grüße aus Köln 🎉🔥 — 日本語もOK 👍",
        "reactions": ["❤️", "😂", "👏"],
        "timestamp": 1732752001.5,
    },
}
MESSAGE_KEYS = {
    "chat message": "chat",
    "game state, 10 players": "state",
    "100-element list": "list",
    "non-ASCII chat": "non-ascii",
}


def bench_json(report: Report, timer: Timer) -> dict[str, float]:
    orjson_ratio: dict[str, float] = {}
    for name, msg in MESSAGES.items():
        if json.loads(dumps(msg)) != msg:
            raise AssertionError(f"wsmanager.dumps does not round-trip {name!r}")
        std_dumps, or_dumps = json.dumps, orjson.dumps

        def run_std(n: int, msg: Any = msg, d: Callable[[Any], str] = std_dumps) -> Callable[[], None]:
            def run() -> None:
                for _ in range(n):
                    d(msg)

            return run

        def run_orjson(n: int, msg: Any = msg, d: Callable[[Any], bytes] = or_dumps) -> Callable[[], None]:
            def run() -> None:
                for _ in range(n):
                    d(msg).decode()

            return run

        def run_wsm(n: int, msg: Any = msg, d: Callable[[Any], str] = dumps) -> Callable[[], None]:
            def run() -> None:
                for _ in range(n):
                    d(msg)

            return run

        std_ns, or_ns, w_ns = timer.ns_per_op(run_std, run_orjson, run_wsm, max_n=10**6)
        key, size = MESSAGE_KEYS[name], f"{len(dumps(msg))} B, GC off"
        report.rows.append(Row(f"dumps/{key}/json", f"dumps: {name}", size, "json.dumps", std_ns, w_ns))
        report.rows.append(
            Row(f"dumps/{key}/orjson", f"dumps: {name}", size, "orjson .decode()", or_ns, w_ns)
        )
        orjson_ratio[name] = or_ns / w_ns
    return orjson_ratio


# ----------------------------------------------------------------- memory


def traced_bytes_per_connection(
    fill: Callable[[list[tuple[object, str, str]]], object], n: int, lobbies: int
) -> float:
    """tracemalloc growth while registering n connections, per connection."""
    pop = Population.make(n, lobbies)
    triples = pop.triples()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        manager = fill(triples)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del manager
    return (after - before) / n


def memory_fill_baseline(triples: list[tuple[object, str, str]]) -> object:
    m = BaselineManager(BIG, BIG)
    book = m.connect_bookkeeping
    for ws, lobby, user in triples:
        book(ws, lobby, user)
    return m


def memory_fill_wsm(triples: list[tuple[object, str, str]]) -> object:
    m = ConnectionManager(BIG, BIG)
    reserve, commit = m._reserve, m._commit
    for ws, lobby, user in triples:
        reserve(ws, lobby, user)
        commit(ws)
    return m


# -------------------------------------------------- realistic: a server's view

_CONNECT: Message = {"type": "websocket.connect"}
_DISCONNECT: Message = {"type": "websocket.disconnect", "code": 1000}


class Peers:
    """The client sides of n real Starlette ``WebSocket`` objects, in memory.

    ``receive`` hands the connect event at once (so ``accept()`` completes
    without suspending), then waits until :meth:`leave` and reports a
    disconnect. ``send`` is a plain async function that takes the message:
    uvicorn's direct-frame path is not taken, every send goes through
    Starlette's ordinary ``send_text`` path. ``wrapped``: the ``send`` the
    ``WebSocket`` gets is a plain async closure around it, as a middleware
    that wraps ``send`` makes it.
    """

    def __init__(self, n: int, *, wrapped: bool = False) -> None:
        self.left = asyncio.Event()
        self.wrapped = wrapped
        self.sockets = [self._socket(i) for i in range(n)]

    def _socket(self, i: int) -> WebSocket:
        left = self.left
        first = [True]

        async def receive() -> Message:
            if first[0]:
                first[0] = False
                return _CONNECT
            await left.wait()
            return _DISCONNECT

        async def send(message: Message) -> None:
            return None

        if self.wrapped:  # what a middleware that wraps `send` hands the app
            server_send = send

            async def send(message: Message) -> None:
                await server_send(message)

        scope = {
            "type": "websocket",
            "path": "/ws",
            "raw_path": b"/ws",
            "headers": [],
            "query_string": b"",
            "client": ("127.0.0.1", 10_000 + i % 50_000),
            "server": ("127.0.0.1", 80),
            "subprotocols": [],
        }
        return WebSocket(scope, receive=receive, send=send)

    def leave(self) -> None:
        """Every client leaves: each endpoint's pending receive gets a disconnect."""
        self.left.set()


Manager = BaselineManager | ConnectionManager
Side = tuple[str, Callable[[], Manager]]  # ("seed" | "wsmanager", factory)


def registered(m: Manager) -> int:
    return len(m.connection_info) if isinstance(m, BaselineManager) else len(m)


async def stop(m: Manager) -> None:
    if isinstance(m, ConnectionManager):
        await m.stop()  # the heartbeat's monitor task


class Countdown:
    """A future that completes after ``n`` ticks."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def tick(self) -> None:
        self.left -= 1
        if not self.left:
            self.done.set_result(None)


async def endpoint(m: Manager, ws: WebSocket, lobby: str, user: str, ready: Countdown) -> None:
    """The seed's endpoint, as a server runs it (one task per connection)."""
    await m.connect(ws, lobby, user)
    ready.tick()
    try:
        while True:
            await ws.receive_json()
            m.update_last_message(user)
    except WebSocketDisconnect:
        m.disconnect(ws)


def ids(n: int, n_lobbies: int, prefix: str) -> tuple[list[str], list[str]]:
    codes = [f"lobby-{i:06d}" for i in range(n_lobbies)]
    return [codes[i % n_lobbies] for i in range(n)], [f"{prefix}-{i:07d}" for i in range(n)]


class Served:
    """n connections, each served by the seed's endpoint in its own task."""

    def __init__(self, m: Manager, n: int, n_lobbies: int, *, wrapped: bool = False) -> None:
        self.m = m
        self.peers = Peers(n, wrapped=wrapped)
        self.lobbies, self.users = ids(n, n_lobbies, "u")
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every endpoint; returns once all are connected."""
        ready = Countdown(len(self.users))
        create, m = asyncio.get_running_loop().create_task, self.m
        self.tasks = [
            create(endpoint(m, ws, lobby, user, ready))
            for ws, lobby, user in zip(self.peers.sockets, self.lobbies, self.users, strict=True)
        ]
        await ready.done

    async def end(self) -> None:
        """Every client leaves; returns once every endpoint has returned."""
        self.peers.leave()
        await asyncio.gather(*self.tasks)
        self.tasks = []


async def time_own_task(make: Callable[[], Manager], n: int, n_lobbies: int) -> tuple[float, float]:
    """(connect, endpoint exit with disconnect) ns per connection, n endpoint tasks."""
    m = make()
    served = Served(m, n, n_lobbies)
    gc.collect()
    t0 = time.perf_counter_ns()
    await served.start()
    t1 = time.perf_counter_ns()
    assert registered(m) == n, (registered(m), n)
    await served.end()
    t2 = time.perf_counter_ns()
    assert registered(m) == 0, registered(m)
    await stop(m)
    return (t1 - t0) / n, (t2 - t1) / n


async def bytes_own_task(make: Callable[[], Manager], n: int, n_lobbies: int) -> float:
    """tracemalloc growth per connection while n endpoint tasks connect and then wait."""
    m = make()
    served = Served(m, n, n_lobbies)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await served.start()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    await served.end()
    await stop(m)
    return (after - before) / n


async def in_one_task(make: Callable[[], Manager], n: int, n_lobbies: int, traced: bool) -> float:
    """ns per ``await connect()`` (or tracemalloc bytes per connection when
    ``traced``), n connections made one after the other by one task."""
    m = make()
    peers = Peers(n)
    lobbies, users = ids(n, n_lobbies, "one")
    triples = list(zip(peers.sockets, lobbies, users, strict=True))

    async def run() -> float:
        connect = m.connect
        gc.collect()
        if traced:
            tracemalloc.start()
        try:
            b0 = tracemalloc.get_traced_memory()[0] if traced else 0
            t0 = time.perf_counter_ns()
            for ws, lobby, user in triples:
                await connect(ws, lobby, user)
            t1 = time.perf_counter_ns()
            if traced:
                gc.collect()
                return (tracemalloc.get_traced_memory()[0] - b0) / n
        finally:
            if traced:
                tracemalloc.stop()
        return (t1 - t0) / n

    # Its own task: the heartbeat watches the task that called connect().
    value = await asyncio.get_running_loop().create_task(run())
    assert registered(m) == n, (registered(m), n)
    for ws in peers.sockets:
        m.disconnect(ws)
    await stop(m)
    return value


async def time_broadcasts(m: Manager, codes: list[str], message: dict[str, Any], expect: int) -> float:
    """ns per ``await broadcast_to_lobby()`` over ``codes``."""
    broadcast = m.broadcast_to_lobby
    if await broadcast(codes[0], message) != expect:
        raise AssertionError(f"{type(m).__name__}: a broadcast did not reach {expect} members")
    t0 = time.perf_counter_ns()
    for code in codes:
        await broadcast(code, message)
    return (time.perf_counter_ns() - t0) / len(codes)


def wanted(key: str, rows: Sequence[str] | None) -> bool:
    """Whether ``--rows`` (key prefixes; None: every row) asks for the row ``key``."""
    return rows is None or any(key.startswith(prefix) for prefix in rows)


async def bench_realistic(
    report: Report, sizes: Sizes, rng: random.Random, rows: Sequence[str] | None = None
) -> None:
    sides: list[Side] = [
        ("seed", lambda: BaselineManager(BIG, BIG)),
        ("wsmanager", lambda: ConnectionManager(BIG, BIG)),
    ]
    best: dict[tuple[str, str], float] = {}

    def keep(what: str, side: str, value: float) -> None:
        best[what, side] = min(best.get((what, side), float("inf")), value)

    n, lobbies = sizes.own_task, sizes.own_task_lobbies
    bc_lobbies = max(1, n // sizes.broadcast_lobby)
    codes = rng.choices(ids(bc_lobbies, bc_lobbies, "x")[0], k=sizes.broadcasts)
    message = MESSAGES["chat message"]
    own_rows = wanted("connect/own-task", rows) or wanted("disconnect/own-task-exit", rows)
    broadcast_rows = any(
        wanted(key, rows) for key in ("broadcast/gc-on", "broadcast/gc-off", "broadcast/wrapped-send")
    )
    for _ in range(sizes.rounds):
        for side, make in sides:
            if own_rows:
                connect_ns, exit_ns = await time_own_task(make, n, lobbies)
                keep("connect/own-task", side, connect_ns)
                keep("disconnect/own-task-exit", side, exit_ns)
            if wanted("connect/one-task", rows):
                keep("connect/one-task", side, await in_one_task(make, sizes.one_task, sizes.lobbies, False))
            if not broadcast_rows:
                continue
            # broadcast: a population of endpoint tasks, lobbies of broadcast_lobby members
            m = make()
            served = Served(m, n, bc_lobbies)
            await served.start()
            gc.collect()
            keep("broadcast/gc-on", side, await time_broadcasts(m, codes, message, sizes.broadcast_lobby))
            gc.disable()
            try:
                keep(
                    "broadcast/gc-off", side, await time_broadcasts(m, codes, message, sizes.broadcast_lobby)
                )
            finally:
                gc.enable()
            await served.end()
            await stop(m)
            # the same, `send` wrapped by a middleware closure
            m = make()
            served = Served(m, n, bc_lobbies, wrapped=True)
            await served.start()
            gc.collect()
            wrapped_ns = await time_broadcasts(m, codes, message, sizes.broadcast_lobby)
            keep("broadcast/wrapped-send", side, wrapped_ns)
            await served.end()
            await stop(m)
            del m, served
    for side, make in sides:  # memory is deterministic enough: one measurement each
        if wanted("bytes/with-task", rows):
            keep("bytes/with-task", side, await bytes_own_task(make, n, lobbies))
        if wanted("bytes/one-task", rows):
            keep(
                "bytes/one-task", side, await in_one_task(make, sizes.memory_connections, sizes.lobbies, True)
            )

    def add(key: str, operation: str, scale: str, goal: float | None, unit: str = "ns") -> None:
        if not wanted(key, rows):
            return
        report.rows.append(
            Row(
                key, operation, scale, "seed", best[key, "seed"], best[key, "wsmanager"], unit=unit, goal=goal
            )
        )

    own = f"{n:,} conns / {lobbies:,} lobbies, GC on"
    one = f"{sizes.one_task:,} conns / {sizes.lobbies:,} lobbies, GC on"
    add("connect/own-task", "`connect`, each endpoint in its own task (accept + bookkeeping)", own, SEED_GOAL)
    add(
        "disconnect/own-task-exit",
        "client leaves: endpoint's receive raises, `disconnect`, task ends",
        own,
        SEED_GOAL,
    )
    add("connect/one-task", "`connect`, one task connecting one after the other", one, SEED_GOAL)
    add(
        "bytes/with-task",
        "bytes per connection incl. the endpoint's task (waiting in receive)",
        f"{n:,} conns / {lobbies:,} lobbies",
        SEED_GOAL,
        "B",
    )
    add(
        "bytes/one-task",
        "bytes per connection, bookkeeping only (`connect` in one task)",
        f"{sizes.memory_connections:,} conns / {sizes.lobbies:,} lobbies",
        SEED_GOAL,
        "B",
    )
    bc = f"to {sizes.broadcast_lobby} of {n:,} conns, ordinary send path"
    add("broadcast/gc-on", "`broadcast_to_lobby`, GC on", bc, BROADCAST_GOAL)
    add("broadcast/gc-off", "`broadcast_to_lobby`, gc.disable()", bc, None)
    wrapped = "`broadcast_to_lobby`, `send` wrapped by a middleware, GC on"
    add("broadcast/wrapped-send", wrapped, bc, BROADCAST_GOAL)


# ------------------------------------------------------------------ output


def fmt_value(v: float, unit: str) -> str:
    if unit == "B":
        return f"{v:,.0f} B"
    if v >= 1e6:
        return f"{v / 1e6:,.2f} ms"
    if v >= 1e4:
        return f"{v / 1e3:,.1f} µs"
    return f"{v:,.0f} ns"


def fmt_ratio(r: float) -> str:
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def markdown(report: Report) -> str:
    lines = [
        "| path | scale | seed (or baseline) | wsmanager | ratio seed/wsmanager | goal | met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report.rows:
        path = r.operation if r.baseline == "seed" else f"{r.operation} (vs {r.baseline})"
        goal = "—" if r.goal is None else f"≥{r.goal:g}x"
        met = "—" if r.met is None else ("met" if r.met else "**not met**")
        lines.append(
            f"| {path} | {r.scale} | {fmt_value(r.baseline_value, r.unit)} "
            f"| {fmt_value(r.wsmanager_value, r.unit)} | {r.ratio:.2f}x | {goal} | {met} |"
        )
    out = ["\n".join(lines), ""]
    goals = [r for r in report.rows if r.goal is not None]
    out.append(
        f"Issue 10 goals: {sum(1 for r in goals if r.met)} of {len(goals)} rows met. "
        "Ratio >1: wsmanager faster (bytes: smaller). "
        f"Operation rows include the Python loop driving the calls, about {report.loop_ns:.0f} ns/op "
        "(an empty loop of the same shape), on both sides. "
        f"Run: {report.seconds:.0f} s on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"1-min load average {report.load[0]:.2f} before / {report.load[1]:.2f} after "
        "(other load makes timings noisier)."
        + (" QUICK RUN (--quick): small N, a smoke test, not a measurement." if report.quick else "")
    )
    out.append("")
    out.append("Earlier aims (issues before 10), on the operation rows:")
    for aim in report.aims:
        out.append(
            f"- [{'x' if aim.met else ' '}] {aim.text}: {'MET' if aim.met else 'NOT MET'} ({aim.detail})"
        )
    return "\n".join(out)


def evaluate(
    report: Report,
    sizes: Sizes,
    flat: dict[str, dict[int, tuple[float, float]]],
    orjson_ratio: dict[str, float],
) -> None:
    slow = [r for r in report.rows if r.o1 and r.ratio < 3.0]
    report.aims.append(
        Aim(
            "every O(1) operation at least 3x faster than the seed",
            not slow,
            "all rows >= 3x"
            if not slow
            else "below 3x: " + "; ".join(f"{r.operation} @ {r.scale} = {r.ratio:.1f}x" for r in slow),
        )
    )
    lo, hi = sizes.flat_lobbies
    growth = {op: (v[hi][1] / v[lo][1], v[hi][0] / v[lo][0]) for op, v in flat.items()}
    report.aims.append(
        Aim(
            f"can_accept_connection / get_stats flat: {hi:,}-lobby / {lo}-lobby time < 1.5",
            all(w < 1.5 for w, _ in growth.values()),
            "; ".join(f"{op}: wsmanager {w:.2f}, seed {b:,.0f}" for op, (w, b) in growth.items())
            + f"; control, `code in dict` over the same lobby codes: "
            f"{report.dict_lookup_ns[hi] / report.dict_lookup_ns[lo]:.2f}",
        )
    )
    report.aims.append(
        Aim(
            "wsmanager.dumps no slower than orjson.dumps(m).decode()",
            all(r >= 1.0 for r in orjson_ratio.values()),
            "; ".join(f"{k}: {fmt_ratio(v)}" for k, v in orjson_ratio.items()),
        )
    )
    mem = report.memory
    report.aims.append(
        Aim(
            "at most half the seed's bytes per connection (favourable path: bookkeeping on object())",
            mem["wsmanager"] <= mem["baseline"] / 2,
            f"{mem['wsmanager']:,.0f} B vs {mem['baseline']:,.0f} B "
            f"= {mem['wsmanager'] / mem['baseline']:.0%} of the seed's",
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead")
    parser.add_argument("--quick", action="store_true", help="small N (under a minute): a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="runs per operation row (best is kept)")
    parser.add_argument("--target-ms", type=float, default=None, help="duration of one operation-row run")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the realistic rows (best is kept)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated key prefixes of the realistic rows to run (e.g. connect,bytes/); "
        "only those are measured: no operation rows, no aims",
    )
    args = parser.parse_args(argv)
    rows = None if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]

    sizes = QUICK if args.quick else FULL
    sizes = replace(
        sizes,
        repeat=args.repeat if args.repeat is not None else sizes.repeat,
        target_ms=args.target_ms if args.target_ms is not None else sizes.target_ms,
        rounds=args.rounds if args.rounds is not None else sizes.rounds,
    )
    if not isinstance(ConnectionManager(1, 1), Core):
        raise SystemExit("wsmanager.ConnectionManager is not built on the C core")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    timer = Timer(sizes.repeat, sizes.target_ms)
    rng = random.Random(args.seed)
    report = Report(quick=args.quick)

    # realistic rows first, garbage collector on
    asyncio.run(bench_realistic(report, sizes, rng, rows))
    if rows is not None:
        report.seconds = time.perf_counter() - started
        report.load = (load_before, os.getloadavg()[0])
        if args.json:
            doc = {
                "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in report.rows],
                "load_average": report.load,
                "seconds": report.seconds,
                "quick": report.quick,
                "python": sys.version,
            }
            print(json.dumps(doc, indent=2))
        else:
            print(markdown(report))
        return 0
    gc.collect()
    gc.disable()
    try:
        (report.loop_ns,) = timer.ns_per_op(empty_loop(list(range(MAX_ARGS))))
        for which in ("small", "large"):
            bench_scale(report, timer, sizes, which, rng)
            gc.collect()
        flat = bench_flat(report, timer, sizes, rng)
        orjson_ratio = bench_json(report, timer)
    finally:
        gc.enable()
    n_mem = sizes.memory_connections
    report.memory = {
        "baseline": traced_bytes_per_connection(memory_fill_baseline, n_mem, sizes.lobbies),
        "wsmanager": traced_bytes_per_connection(memory_fill_wsm, n_mem, sizes.lobbies),
    }
    report.rows.append(
        Row(
            "bytes/bookkeeping-favourable",
            "bytes per connection (favourable path: _reserve/_commit on object(), no heartbeat)",
            f"{n_mem:,} conns / {sizes.lobbies:,} lobbies",
            "seed",
            report.memory["baseline"],
            report.memory["wsmanager"],
            unit="B",
            favourable=True,
        )
    )
    evaluate(report, sizes, flat, orjson_ratio)
    report.seconds = time.perf_counter() - started
    report.load = (load_before, os.getloadavg()[0])

    if args.json:
        doc = {
            "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in report.rows],
            "loop_ns": report.loop_ns,
            "dict_lookup_ns": report.dict_lookup_ns,
            "load_average": report.load,
            "seconds": report.seconds,
            "quick": report.quick,
            "memory_bytes_per_connection": report.memory,
            "aims": [asdict(a) for a in report.aims],
            "python": sys.version,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
