"""The seed's app (tests/seed_app.py) with a heartbeat of a fraction of a second
and lobbies of one, for the real-socket heartbeat tests. Settings come from the
environment so that a test can choose them."""

from __future__ import annotations

import os

import wsmanager
from tests.seed_app import app

__all__ = ["app", "manager"]

manager = wsmanager.manager  # the one the seed's endpoint imported

manager.ping_interval = float(os.environ.get("WSM_TEST_PING_INTERVAL", "0.3"))
manager.ping_timeout = float(os.environ.get("WSM_TEST_PING_TIMEOUT", "0.5"))
manager.max_per_lobby = int(os.environ.get("WSM_TEST_MAX_PER_LOBBY", "1"))
