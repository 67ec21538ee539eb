"""wsmanager.metrics: Prometheus metrics of a manager (the optional ``metrics`` extra)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wsmanager import ConnectionManager
from wsmanager.metrics import ManagerMetrics


def samples(metrics: ManagerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scrape_reads_the_managers_live_counts() -> None:
    manager = ConnectionManager(10, 1)
    metrics = ManagerMetrics(manager)
    ws_a, ws_b = object(), object()
    assert manager._reserve(ws_a, "l1", "alice") == ""
    manager._commit(ws_a)
    assert manager._reserve(ws_b, "l1", "bob") == "lobby_full"
    metrics.record_refusal("unauthorized")
    metrics.record_sent(3)
    metrics.record_stale()
    metrics.observe_latency_ms(4.0)
    metrics.observe_latency_ms(None)

    s = samples(metrics)
    assert s[("wsmanager_connections", ())] == 1
    assert s[("wsmanager_lobbies", ())] == 1
    assert s[("wsmanager_max_connections", ())] == 10
    assert s[("wsmanager_refusals_total", (("reason", "lobby_full"),))] == 1
    assert s[("wsmanager_refusals_total", (("reason", "unauthorized"),))] == 1
    assert s[("wsmanager_refusals_total", (("reason", "server_full"),))] == 0
    assert s[("wsmanager_messages_sent_total", ())] == 3
    assert s[("wsmanager_stale_closes_total", ())] == 1
    assert s[("wsmanager_latency_seconds_count", ())] == 1
    assert s[("wsmanager_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("wsmanager_latency_seconds_bucket", (("le", "0.0025"),))] == 0

    manager.disconnect(ws_a)
    s = samples(metrics)
    assert s[("wsmanager_connections", ())] == 0
    assert s[("wsmanager_disconnects_total", ())] == 1


def test_two_managers_have_separate_registries() -> None:
    a, b = ManagerMetrics(ConnectionManager()), ManagerMetrics(ConnectionManager(7))
    a.record_sent(2)
    assert samples(a)[("wsmanager_messages_sent_total", ())] == 2
    assert samples(b)[("wsmanager_messages_sent_total", ())] == 0
    assert samples(b)[("wsmanager_max_connections", ())] == 7
    assert ManagerMetrics.content_type.startswith("text/plain")


def test_without_the_extra_the_import_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "wsmanager.metrics")
    with pytest.raises(ImportError, match=r"pip install 'wsmanager\[metrics\]'"):
        importlib.import_module("wsmanager.metrics")


def test_closes_by_reason_come_from_the_managers_stats() -> None:
    class Source:
        def get_stats(self) -> dict[str, Any]:
            return {"total_connections": 3, "closed": {"stale": 2, "slow_consumer": 1}}

    s = samples(ManagerMetrics(Source()))
    assert s[("wsmanager_connections", ())] == 3
    assert s[("wsmanager_closes_total", (("reason", "stale"),))] == 2
    assert s[("wsmanager_closes_total", (("reason", "slow_consumer"),))] == 1


def test_the_managers_round_trips_and_stale_closes_need_no_recording() -> None:
    """With the built-in heartbeat, /metrics shows latencies and stale closes by itself."""
    import asyncio

    from tests.asgi_fakes import FakePeer

    now = [1000.0]
    manager = ConnectionManager(clock=lambda: now[0], ping_interval=1, ping_timeout=1)
    metrics = ManagerMetrics(manager)

    async def main() -> None:
        alive, dead = FakePeer(), FakePeer()
        assert await manager.connect(alive.ws, "l", "alive")
        assert await manager.connect(dead.ws, "l", "dead")
        now[0] += 1
        await manager.health.sweep(wait=True)  # both pinged
        now[0] += 0.004
        manager.record_pong_ws(alive.ws)  # a 4 ms round trip
        now[0] += 1
        await manager.health.sweep(wait=True)  # dead is closed as stale
        assert dead.close_code == 4004
        manager.disconnect(alive.ws)

    asyncio.run(main())
    s = samples(metrics)
    assert s[("wsmanager_latency_seconds_count", ())] == 1
    assert s[("wsmanager_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("wsmanager_latency_seconds_bucket", (("le", "0.0025"),))] == 0
    assert s[("wsmanager_stale_closes_total", ())] == 1
    assert s[("wsmanager_stale_removals_total", (("reason", "no_pong"),))] == 1
    assert s[("wsmanager_stale_removals_total", (("reason", "handler_exited"),))] == 0
    metrics.record_stale(2)  # an application's own stale closes add up
    assert samples(metrics)[("wsmanager_stale_closes_total", ())] == 3

    metrics.close()  # stops observing the manager
    assert manager._latency_listeners == []


def test_history_figures_are_exported() -> None:
    manager = ConnectionManager(10, 10, history_size=2)
    metrics = ManagerMetrics(manager)
    for i in range(3):
        manager._history_append("L", f'{{"i":{i}}}')
    manager._recovery_counts.count(True, 2)
    manager._recovery_counts.count(False, 0)
    s = samples(metrics)
    assert s[("wsmanager_history_lobbies", ())] == 1
    assert s[("wsmanager_history_entries", ())] == 2
    assert s[("wsmanager_history_bytes", ())] == manager.get_stats()["history"]["bytes"] > 0
    assert s[("wsmanager_history_appended_total", ())] == 3
    assert s[("wsmanager_history_dropped_total", ())] == 0
    assert s[("wsmanager_history_replayed_total", ())] == 2
    assert s[("wsmanager_history_recoveries_total", (("recovered", "true"),))] == 1
    assert s[("wsmanager_history_recoveries_total", (("recovered", "false"),))] == 1


def test_the_backplanes_losses_and_health_are_exported() -> None:
    from wsmanager.backends.redis import RedisBackend

    backend = RedisBackend("redis://127.0.0.1:1/0")  # never started: no server needed
    metrics = ManagerMetrics(ConnectionManager(backend=backend))
    backend.dropped, backend.missed, backend.subscriber_cuts, backend.oversize = 3, 5, 1, 2
    s = samples(metrics)
    assert s[("wsmanager_backplane_up", ())] == 0
    assert s[("wsmanager_backplane_dropped_total", ())] == 3
    assert s[("wsmanager_backplane_missed_total", ())] == 5
    assert s[("wsmanager_backplane_subscriber_cuts_total", ())] == 1
    assert s[("wsmanager_backplane_oversize_total", ())] == 2
    assert s[("wsmanager_backplane_backlog_bytes", ())] == 0
    assert ("wsmanager_backplane_up", ()) not in samples(ManagerMetrics(ConnectionManager()))
