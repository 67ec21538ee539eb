"""Prometheus metrics for a ConnectionManager (the optional ``metrics`` extra).

    pip install 'wsmanager[metrics]'

    from wsmanager.metrics import ManagerMetrics
    metrics = ManagerMetrics(manager)
    app.add_route("/metrics", metrics.endpoint)

Gauges and totals the core already keeps (connections, lobbies, users,
refusals by reason, pings, pongs, connects, disconnects, the heartbeat's stale
closes) are read from ``manager.get_stats()`` at scrape time: nothing is
counted twice and the hot path pays nothing. Every round trip the manager
measures (a pong answering the built-in heartbeat's ping) goes into the
latency histogram by itself, through ``manager.add_latency_listener``. What
only the application sees is recorded through :meth:`ManagerMetrics.record_sent`,
:meth:`record_refusal`, and, for an application that runs pings or stale checks
of its own, :meth:`record_stale` and :meth:`observe_latency_ms`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the module
    raise ImportError(
        "wsmanager.metrics needs prometheus-client: install the extra with  pip install 'wsmanager[metrics]'"
    ) from exc

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["DEFAULT_LATENCY_BUCKETS", "ManagerMetrics"]

DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Ping round-trip buckets, in seconds."""


class _StatsSource(Protocol):
    def get_stats(self) -> Mapping[str, Any]: ...


class _StatsCollector(Collector):
    """Reads the manager's counters when Prometheus scrapes."""

    def __init__(
        self, manager: _StatsSource, namespace: str, extra_refusals: dict[str, int], extra_stale: list[int]
    ) -> None:
        self._manager = manager
        self._ns = namespace
        self._extra_refusals = extra_refusals
        self._extra_stale = extra_stale

    def describe(self) -> Iterable[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._manager.get_stats()))

    def _families(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        ns = self._ns

        def gauge(name: str, doc: str, key: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{ns}_{name}", doc, value=float(stats.get(key) or 0))

        def total(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"{ns}_{name}", doc, value=float(stats.get(key) or 0))

        yield gauge("connections", "Open WebSocket connections.", "total_connections")
        yield gauge("max_connections", "Connection limit of this process.", "max_connections")
        yield gauge("lobbies", "Lobbies with at least one connection.", "active_lobbies")
        yield gauge("users", "Distinct connected users.", "connected_users")
        yield gauge(
            "pending_connections", "Handshakes holding a capacity reservation.", "pending_connections"
        )
        yield total("connects", "Connections registered.", "connects")
        yield total("disconnects", "Connections removed.", "disconnects")
        yield total("pings_sent", "health_ping messages sent.", "pings_sent")
        yield total("pongs_received", "health_pong messages recorded.", "pongs_received")
        refusals = CounterMetricFamily(f"{ns}_refusals", "Connections refused, by reason.", labels=["reason"])
        counts: dict[str, float] = {k: float(v) for k, v in (stats.get("refused") or {}).items()}
        for reason, n in self._extra_refusals.items():
            counts[reason] = counts.get(reason, 0.0) + n
        for reason in sorted(counts):
            refusals.add_metric([reason], counts[reason])
        yield refusals
        closes = CounterMetricFamily(
            f"{ns}_closes",
            "Connections the library closed, by reason (stale, slow_consumer, ...).",
            labels=["reason"],
        )
        for reason, n in sorted((stats.get("closed") or {}).items()):
            closes.add_metric([reason], float(n))
        yield closes
        stale: dict[str, Any] = stats.get("stale_closed") or {}
        yield CounterMetricFamily(
            f"{ns}_stale_closes",
            "Connections closed for not answering pings (close code 4004).",
            value=float(stale.get("no_pong", 0)) + self._extra_stale[0],
        )
        removed = CounterMetricFamily(
            f"{ns}_stale_removals",
            "Connections the heartbeat removed, by reason (no_pong, send_failed, handler_exited).",
            labels=["reason"],
        )
        for reason, n in sorted(stale.items()):
            removed.add_metric([reason], float(n))
        yield removed
        history: dict[str, Any] = stats.get("history") or {}

        def hist(family: type[Metric], name: str, doc: str, key: str) -> Metric:
            return family(f"{ns}_{name}", doc, value=float(history.get(key, 0)))  # type: ignore[call-arg]

        yield hist(GaugeMetricFamily, "history_lobbies", "Lobbies with a history ring in memory.", "lobbies")
        yield hist(GaugeMetricFamily, "history_entries", "Messages kept in the history rings.", "entries")
        yield hist(GaugeMetricFamily, "history_bytes", "Character bytes of the messages kept.", "bytes")
        yield hist(
            GaugeMetricFamily, "history_backlog", "Messages waiting to be appended to Redis.", "backlog"
        )
        yield hist(
            CounterMetricFamily, "history_appended", "Lobby messages kept with a position.", "appended"
        )
        yield hist(
            CounterMetricFamily,
            "history_dropped",
            "Lobby messages that could not be kept (a gap).",
            "dropped",
        )
        yield hist(CounterMetricFamily, "history_replayed", "Messages replayed by recoveries.", "replayed")
        recoveries = CounterMetricFamily(
            f"{ns}_history_recoveries", "Recoveries asked for, by outcome.", labels=["recovered"]
        )
        recoveries.add_metric(["true"], float(history.get("recovered", 0)))
        recoveries.add_metric(["false"], float(history.get("not_recovered", 0)))
        yield recoveries
        bp: Mapping[str, Any] | None = stats.get("backplane")
        if bp is not None:  # a clustered backend (RedisBackend): its losses and health
            yield GaugeMetricFamily(
                f"{ns}_backplane_up", "1 while the backplane is up.", value=float(bp["up"])
            )
            yield GaugeMetricFamily(
                f"{ns}_backplane_backlog_bytes",
                "Bytes of messages queued for Redis.",
                value=float(bp.get("backlog_bytes") or 0),
            )
            for key, doc in _BACKPLANE_TOTALS:
                yield CounterMetricFamily(f"{ns}_backplane_{key}", doc, value=float(bp.get(key) or 0))


_BACKPLANE_TOTALS = (
    ("dropped", "Messages of this node that did not reach the cluster."),
    ("missed", "Messages of other nodes this node did not receive (sequence gaps)."),
    ("oversize", "Messages over max_message_bytes, delivered locally only."),
    ("subscriber_cuts", "Subscriber connections Redis closed (pub/sub output buffer limit)."),
    ("outages", "Times the backplane went down."),
    ("lease_losses", "Times this node found its lease expired while alive."),
    ("shed", "Connections closed with 1013 lease_lost after a lost lease."),
)


class ManagerMetrics:
    """Prometheus metrics of one manager, in their own registry by default.

    ``registry`` defaults to a fresh ``CollectorRegistry`` (so that several
    managers, or tests, never collide); pass ``prometheus_client.REGISTRY`` to
    expose them with the process's other metrics.
    """

    def __init__(
        self,
        manager: _StatsSource,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "wsmanager",
        latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._extra_refusals: dict[str, int] = {}
        self._extra_stale = [0]
        self.registry.register(_StatsCollector(manager, namespace, self._extra_refusals, self._extra_stale))
        self.messages_sent = Counter(
            f"{namespace}_messages_sent", "Messages delivered to connections.", registry=self.registry
        )
        self.latency = Histogram(
            f"{namespace}_latency_seconds",
            "Ping round-trip time.",
            buckets=tuple(latency_buckets),
            registry=self.registry,
        )
        add_listener = getattr(manager, "add_latency_listener", None)
        self._remove_listener = add_listener(_latency_listener(self)) if callable(add_listener) else None

    def close(self) -> None:
        """Stop observing the manager's round trips (the scrape still works)."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None

    def record_stale(self, count: int = 1) -> None:
        """Count connections the application closed as stale itself (its own
        heartbeat); the built-in heartbeat's are read from the manager."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._extra_stale[0] += count

    def record_sent(self, count: int = 1) -> None:
        """Count messages delivered (e.g. the return value of ``broadcast_to_lobby``)."""
        if count:
            self.messages_sent.inc(count)

    def record_refusal(self, reason: str) -> None:
        """Count a refusal the application made itself (e.g. a ``bad_lobby``
        check of its own); refusals the manager decides (capacity, shutdown,
        a False ``can_accept_connection()``, and ``serve()``'s
        ``unauthorized`` / ``forbidden_origin`` / ``invalid_id``) are already
        counted in its ``get_stats()["refused"]``."""
        self._extra_refusals[reason] = self._extra_refusals.get(reason, 0) + 1

    def observe_latency_ms(self, latency_ms: float | None) -> None:
        """Record one ping round trip, in milliseconds (None is ignored). The
        manager's own measurements are recorded already: this is for round
        trips the application measures itself."""
        if latency_ms is not None:
            self.latency.observe(latency_ms / 1000.0)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return bytes(generate_latest(self.registry))

    content_type: str = CONTENT_TYPE_LATEST

    async def endpoint(self, request: Request) -> Response:
        """A Starlette / FastAPI route: ``app.add_route("/metrics", metrics.endpoint)``."""
        return Response(self.render(), media_type=self.content_type)


def _latency_listener(metrics: ManagerMetrics) -> Any:
    """A listener holding ``metrics`` weakly: the manager outliving its
    metrics object does not keep it alive (the listener then does nothing)."""
    ref = weakref.ref(metrics)

    def listener(_websocket: Any, latency_ms: float) -> None:
        m = ref()
        if m is not None:
            m.latency.observe(latency_ms / 1000.0)

    return listener
