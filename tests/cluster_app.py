"""The seed's endpoint (tests/seed_app.py, unchanged) as one node of a cluster.

The module-level ``wsmanager.manager`` joins the Redis backplane because the
test sets ``WSMANAGER_REDIS_URL`` (and a namespace and a short lease) in the
server's environment. This app only adds a lifespan that starts and stops the
backend, read-only presence endpoints for the tests, settings from the
environment (``WSM_TEST_BACKEND`` / ``WSM_TEST_MANAGER``: JSON objects of
attributes to assign to the backend / the manager) and ``/flood``, which
broadcasts from this node.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tests import seed_app
from wsmanager import manager

for _name, _value in json.loads(os.environ.get("WSM_TEST_BACKEND", "{}")).items():
    setattr(manager.backend, _name, _value)
for _name, _value in json.loads(os.environ.get("WSM_TEST_MANAGER", "{}")).items():
    setattr(manager, _name, _value)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await manager.start()
    yield
    await manager.stop()


app = FastAPI(lifespan=lifespan)
app.router.routes.extend(seed_app.app.router.routes)


@app.get("/presence/{user_id}")
async def presence(user_id: str) -> dict[str, Any]:
    return {
        "cluster": manager.is_user_connected(user_id),
        "local": manager.is_user_connected(user_id, local=True),
    }


@app.get("/lobby/{lobby_code}")
async def lobby(lobby_code: str) -> dict[str, Any]:
    return {
        "cluster": sorted(manager.get_lobby_users(lobby_code)),
        "local": sorted(manager.get_lobby_users(lobby_code, local=True)),
    }


@app.get("/flood/{lobby_code}")
async def flood(
    lobby_code: str, n: int = 1, size: int = 0, gap: float = 0.0, tag: str = "flood"
) -> dict[str, Any]:
    """``n`` broadcasts ``{"type": tag, "i": i, "pad": "x" * size}`` to the lobby, ``gap`` s apart."""
    pad = "x" * size
    for i in range(n):
        await manager.broadcast_to_lobby(lobby_code, {"type": tag, "i": i, "pad": pad})
        if gap:
            await asyncio.sleep(gap)
    return {"sent": n}
