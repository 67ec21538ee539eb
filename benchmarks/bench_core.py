"""wsmanager's C core against the seed's plain-Python manager, measured in one run.

    python benchmarks/bench_core.py            # one markdown table, then the aims
    python benchmarks/bench_core.py --json     # the same numbers as JSON

Every number is the best of ``--repeat`` runs of N operations (N sized so that a
run lasts about ``--target-ms``), timed with ``time.perf_counter_ns`` with the
garbage collector off (as ``timeit`` does). ns/op includes the cost of the
Python ``for`` loop driving the calls, identical for both sides (printed below
the table). Websockets are plain ``object()`` instances; ids are created before
any timing or memory measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import orjson  # noqa: E402
from baseline import BaselineManager  # noqa: E402

from wsmanager import ConnectionManager, dumps  # noqa: E402
from wsmanager._core import Core  # noqa: E402

N_LOBBIES = 10_000
SCALES = (1_000, 100_000)
FLAT_LOBBIES = (10, 100_000)
FLAT_CONNECTIONS = 100_000
MEMORY_CONNECTIONS = 100_000
MAX_ARGS = 20_000  # most pre-built (random) arguments per timed run
CONNECT_BATCH = 500  # connections added then removed per round
BIG = 10**9  # limits that never refuse

Runner = Callable[[int], Callable[[], None]]  # prepares n operations; the thunk performs them


@dataclass
class Row:
    operation: str
    scale: str
    baseline: str  # what the wsmanager column is compared against
    baseline_ns: float
    wsmanager_ns: float
    o1: bool = False  # an O(1) operation in wsmanager: held to the 3x aim

    @property
    def ratio(self) -> float:
        return self.baseline_ns / self.wsmanager_ns


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


def bench_scale(report: Report, timer: Timer, scale: int, rng: random.Random) -> None:
    pop = Population.make(scale, N_LOBBIES)
    base, wsm = fill_baseline(pop), fill_wsm(pop)
    used_lobbies = sorted(set(pop.lobbies))
    lobby_args = rng.choices(used_lobbies, k=MAX_ARGS)
    user_args = rng.choices(pop.users, k=MAX_ARGS)
    label = f"{scale:,} conns / {len(used_lobbies):,} lobbies"

    def row(op: str, b: Runner, w: Runner, o1: bool = True) -> None:
        bn, wn = timer.ns_per_op(b, w)
        report.rows.append(Row(op, label, "seed (Python)", bn, wn, o1))

    # connect bookkeeping + disconnect: fresh users joining existing lobbies.
    rounds = 10
    newcomers = Population.make(CONNECT_BATCH * rounds, N_LOBBIES, prefix=f"new{scale}")
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
    report.rows.append(Row("connect (bookkeeping)", label, "seed (Python)", bc, wc, True))
    report.rows.append(Row("disconnect", label, "seed (Python)", bd, wd, True))

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


def bench_flat(report: Report, timer: Timer, rng: random.Random) -> dict[str, dict[int, tuple[float, float]]]:
    """can_accept_connection / get_stats with the same connection count over 10 vs 100,000 lobbies."""
    out: dict[str, dict[int, tuple[float, float]]] = {"can_accept_connection": {}, "get_stats": {}}
    for n_lobbies in FLAT_LOBBIES:
        pop = Population.make(FLAT_CONNECTIONS, n_lobbies)
        base, wsm = fill_baseline(pop), fill_wsm(pop)
        lobby_args = rng.choices(sorted(set(pop.lobbies)), k=MAX_ARGS)
        label = f"{FLAT_CONNECTIONS:,} conns / {n_lobbies:,} lobbies"
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
            report.rows.append(Row(op, label, "seed (Python)", bn, wn, True))
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
        report.rows.append(Row(f"dumps: {name}", f"{len(dumps(msg))} B", "json.dumps", std_ns, w_ns))
        report.rows.append(Row(f"dumps: {name}", f"{len(dumps(msg))} B", "orjson .decode()", or_ns, w_ns))
        orjson_ratio[name] = or_ns / w_ns
    return orjson_ratio


# ----------------------------------------------------------------- memory


def traced_bytes_per_connection(fill: Callable[[list[tuple[object, str, str]]], object], n: int) -> float:
    """tracemalloc growth while registering n connections, per connection."""
    pop = Population.make(n, N_LOBBIES)
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


# ------------------------------------------------------------------ output


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:,.2f} ms"
    if ns >= 1e4:
        return f"{ns / 1e3:,.1f} µs"
    return f"{ns:,.0f}"


def fmt_ratio(r: float) -> str:
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def fmt_size_ratio(r: float) -> str:
    return f"{r:.2f}x smaller" if r >= 1 else f"{1 / r:.2f}x larger"


def markdown(report: Report) -> str:
    lines = [
        "| operation | scale | baseline | baseline ns/op | wsmanager ns/op | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.operation} | {r.scale} | {r.baseline} | {fmt_ns(r.baseline_ns)} "
            f"| {fmt_ns(r.wsmanager_ns)} | {fmt_ratio(r.ratio)} |"
        )
    mem = report.memory
    lines.append(
        f"| memory, bytes/connection | {MEMORY_CONNECTIONS:,} conns / {N_LOBBIES:,} lobbies | seed (Python) "
        f"| {mem['baseline']:,.0f} B | {mem['wsmanager']:,.0f} B "
        f"| {fmt_size_ratio(mem['baseline'] / mem['wsmanager'])} |"
    )
    out = ["\n".join(lines), ""]
    out.append(
        f"ns/op includes the Python loop driving the calls: about {report.loop_ns:.0f} ns/op "
        "(an empty loop of the same shape). Memory: tracemalloc growth while registering "
        "the connections (websockets and ids allocated beforehand). "
        f"Run: {report.seconds:.0f} s on {os.cpu_count()} CPUs, 1-min load average "
        f"{report.load[0]:.1f} before / {report.load[1]:.1f} after (other load makes timings noisier)."
    )
    out.append("")
    out.append("Aims:")
    for aim in report.aims:
        out.append(
            f"- [{'x' if aim.met else ' '}] {aim.text}: {'MET' if aim.met else 'NOT MET'} ({aim.detail})"
        )
    return "\n".join(out)


def evaluate(
    report: Report, flat: dict[str, dict[int, tuple[float, float]]], orjson_ratio: dict[str, float]
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
    lo, hi = FLAT_LOBBIES
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
            "at most half the seed's bytes per connection",
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
    parser.add_argument("--repeat", type=int, default=9, help="runs per measurement (best is kept)")
    parser.add_argument("--target-ms", type=float, default=30.0, help="duration of one run")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    if not isinstance(ConnectionManager(1, 1), Core):
        raise SystemExit("wsmanager.ConnectionManager is not built on the C core")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    timer = Timer(args.repeat, args.target_ms)
    rng = random.Random(args.seed)
    report = Report()
    gc.collect()
    gc.disable()
    try:
        (report.loop_ns,) = timer.ns_per_op(empty_loop(list(range(MAX_ARGS))))
        for scale in SCALES:
            bench_scale(report, timer, scale, rng)
            gc.collect()
        flat = bench_flat(report, timer, rng)
        orjson_ratio = bench_json(report, timer)
    finally:
        gc.enable()
    report.memory = {
        "baseline": traced_bytes_per_connection(memory_fill_baseline, MEMORY_CONNECTIONS),
        "wsmanager": traced_bytes_per_connection(memory_fill_wsm, MEMORY_CONNECTIONS),
    }
    evaluate(report, flat, orjson_ratio)
    report.seconds = time.perf_counter() - started
    report.load = (load_before, os.getloadavg()[0])

    if args.json:
        doc = {
            "rows": [asdict(r) | {"ratio": r.ratio} for r in report.rows],
            "loop_ns": report.loop_ns,
            "dict_lookup_ns": report.dict_lookup_ns,
            "load_average": report.load,
            "seconds": report.seconds,
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
