"""Cost of one heartbeat sweep over N idle-but-healthy connections.

wsmanager keeps connections on time-ordered lists in C, so a sweep reads the
heads and stops at the first connection not due: O(connections due). The
baseline is what a hand-written manager would do: scan a dict of last-seen
times (the seed's ``_last_message_times``) for the silent ones, O(connections).
Both run in this process, now; the table prints their ratio.

    python benchmarks/bench_sweep.py            # 1,000 and 100,000 connections
    python benchmarks/bench_sweep.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsmanager import ConnectionManager

INTERVAL, TIMEOUT = 20.0, 10.0


class Clock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


def best_per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best mean time of one call, in microseconds."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def python_sweep(last_seen: dict[object, float], now: float, interval: float) -> list[object]:
    """The plain-Python heartbeat scan: every connection, every sweep."""
    due = []
    for ws, seen in last_seen.items():
        if now - seen >= interval:
            due.append(ws)
    return due


def build(n: int) -> tuple[ConnectionManager, Clock, dict[object, float]]:
    """n connections that arrived over the last 10 s: all alive, none due."""
    clock = Clock()
    m = ConnectionManager(n, n, clock=clock)
    last_seen: dict[object, float] = {}
    start = clock.t
    for i in range(n):
        ws = object()
        clock.t = start + 10.0 * i / n
        assert m._reserve(ws, f"lobby{i % 1000}", f"user{i}") == ""
        m._commit(ws)
        last_seen[ws] = clock.t
    clock.t = start + 15.0  # the oldest has been silent 15 s < 20 s
    return m, clock, last_seen


def measure(n: int, quick: bool) -> tuple[float, float, float]:
    m, clock, last_seen = build(n)
    now = clock.t
    assert m._sweep(INTERVAL, TIMEOUT, 1024) == ([], [])
    assert python_sweep(last_seen, now, INTERVAL) == []
    repeat = 3 if quick else 7
    core = best_per_call(lambda: m._sweep(INTERVAL, TIMEOUT, 1024), 2000 if quick else 20000, repeat)

    async def wrapper() -> float:
        async def one() -> None:
            await m.health.sweep()

        loop = asyncio.get_running_loop()
        number = 1000 if quick else 10000
        best = float("inf")
        for _ in range(repeat):
            t0 = loop.time()
            for _ in range(number):
                await one()
            best = min(best, (loop.time() - t0) / number * 1e6)
        return best

    full = asyncio.run(wrapper())
    scan_number = max(1, (20 if quick else 200) * 1000 // n)
    scan = best_per_call(lambda: python_sweep(last_seen, now, INTERVAL), scan_number, repeat)
    assert len(m) == n  # nothing was due: nobody pinged, nobody closed
    return core, full, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000, 100_000])
    args = parser.parse_args()
    print(f"One sweep, none due (ping_interval={INTERVAL:g}s), Python {sys.version.split()[0]}")
    header = (
        f"{'connections':>12} | {'C _sweep':>10} | {'health.sweep()':>14} | "
        f"{'Python dict scan':>16} | {'scan / C':>9} | {'scan / sweep()':>14}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.sizes:
        core, full, scan = measure(n, args.quick)
        rows.append((n, core))
        print(
            f"{n:>12,} | {core:>8.2f}µs | {full:>12.2f}µs | {scan:>14.1f}µs | "
            f"{scan / core:>8.0f}x | {scan / full:>13.0f}x"
        )
    if len(rows) > 1:
        (n0, c0), (n1, c1) = rows[0], rows[-1]
        print(f"\nC sweep at {n1:,} / at {n0:,}: {c1 / c0:.2f}x (flat: cost does not grow with connections)")


if __name__ == "__main__":
    main()
