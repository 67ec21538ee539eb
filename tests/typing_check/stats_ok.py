"""Read get_stats() as an application would: mypy --strict finds nothing here
(tests/test_stats.py runs mypy on this file)."""

from __future__ import annotations

from wsmanager import ConnectionManager, Stats


def capacity_badge(manager: ConnectionManager) -> str:
    stats: Stats = manager.get_stats()
    refused = stats["refused"]["server_full"] + stats["refused"]["lobby_full"]
    p99 = stats["latency_ms"]["p99"]
    shown = "-" if p99 is None else f"{p99:.1f} ms"
    backplane = stats.get("backplane")
    up = True if backplane is None else backplane["up"]
    closed = stats["closed"].get("slow_consumer", 0)
    return f"{stats['capacity_percent']}% ({refused} refused, {closed} slow, p99 {shown}, up={up})"
