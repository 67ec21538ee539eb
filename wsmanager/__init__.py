"""wsmanager: WebSocket connection management for FastAPI / Starlette, C core.

    from wsmanager import manager          # the module-level ConnectionManager()

See README.md for the API, the close codes and the benchmarks.
"""

from __future__ import annotations

from ._core import dumps
from .codes import CLOSE_CODES, CloseCode, close_code_for
from .endpoint import Connection
from .manager import ConnectionManager

__all__ = [
    "CLOSE_CODES",
    "CloseCode",
    "Connection",
    "ConnectionManager",
    "close_code_for",
    "dumps",
    "manager",
]

__version__ = "0.1.0"

manager = ConnectionManager()
"""The shared manager, with the seed's defaults (500 connections, 10 per lobby)."""
