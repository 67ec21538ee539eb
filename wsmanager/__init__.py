"""wsmanager: WebSocket connection management for FastAPI / Starlette, C core.

    from wsmanager import manager          # the module-level ConnectionManager()

See the documentation (``make docs``; docs/) for the API, the close codes and
the configuration, README.md for the benchmarks.
"""

from __future__ import annotations

from ._core import dumps
from .backends import Backend, InMemoryBackend, backend_from_env
from .codes import CLOSE_CODES, CloseCode, close_code_for
from .endpoint import Connection
from .manager import ConnectionManager
from .servers import quiet_client_faults
from .stats import (
    BackplaneStats,
    ClusterStats,
    CoreStats,
    HistoryStats,
    LatencyStats,
    LocalStats,
    RefusedStats,
    StaleClosedStats,
    Stats,
)

__all__ = [
    "CLOSE_CODES",
    "Backend",
    "BackplaneStats",
    "CloseCode",
    "ClusterStats",
    "Connection",
    "ConnectionManager",
    "CoreStats",
    "HistoryStats",
    "InMemoryBackend",
    "LatencyStats",
    "LocalStats",
    "RefusedStats",
    "StaleClosedStats",
    "Stats",
    "backend_from_env",
    "close_code_for",
    "dumps",
    "manager",
]

__version__ = "0.1.0"

quiet_client_faults()  # a client's invalid UTF-8 is no traceback in uvicorn's log (wsmanager.servers)

manager = ConnectionManager(backend=backend_from_env())
"""The shared manager, with the seed's defaults (500 connections, 10 per lobby).

In memory, unless ``WSMANAGER_REDIS_URL`` is set at import: then it joins the
Redis backplane at that URL (see ``wsmanager.backends.backend_from_env``)."""
