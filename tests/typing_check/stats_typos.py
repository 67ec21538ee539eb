"""Misspelt get_stats() keys: each line marked ``# error`` must be a mypy
--strict error (tests/test_stats.py checks that it is, and that no other line
is). Excluded from the project's own mypy run ([tool.mypy] exclude)."""

from __future__ import annotations

from wsmanager import ConnectionManager


def typos(manager: ConnectionManager) -> list[object]:
    stats = manager.get_stats()
    return [
        stats["total_conections"],  # error
        stats["refused"]["server_ful"],  # error
        stats["latency_ms"]["p90"],  # error
        stats["stale_closed"]["no_pongs"],  # error
        stats["capacity_percent"] + 1,
    ]


def wrong_types(manager: ConnectionManager) -> int:
    stats = manager.get_stats()
    p50: float = stats["latency_ms"]["p50"]  # error
    name: str = stats["max_per_user"]  # error
    return int(p50) + len(name)
