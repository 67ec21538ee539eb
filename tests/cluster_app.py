"""The seed's endpoint (tests/seed_app.py, unchanged) as one node of a cluster.

The module-level ``wsmanager.manager`` joins the Redis backplane because the
test sets ``WSMANAGER_REDIS_URL`` (and a namespace and a short lease) in the
server's environment. This app only adds a lifespan that starts and stops the
backend, and read-only presence endpoints for the tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tests import seed_app
from wsmanager import manager


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
