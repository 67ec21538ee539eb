"""The heartbeat on a real uvicorn server with real clients (the seed's endpoint).

A client process frozen with SIGSTOP keeps its TCP socket open but answers
nothing: only the heartbeat can tell it is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.servers import ROOT, uvicorn_server
from tests.servers import http_stats as stats

pytestmark = pytest.mark.slow

PING_INTERVAL, PING_TIMEOUT = 0.3, 0.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    env = {"WSM_TEST_PING_INTERVAL": str(PING_INTERVAL), "WSM_TEST_PING_TIMEOUT": str(PING_TIMEOUT)}
    with uvicorn_server("tests.heartbeat_app:app", env=env) as (p, _proc):
        yield p


class Lines:
    """The stdout of a subprocess, line by line, with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._q: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._q.put(line.strip())

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def get(self, timeout: float = 10.0) -> str:
        return self._q.get(timeout=timeout)


def get_stats(port: int) -> dict[str, Any]:
    return asyncio.run(stats(port))


def wait_stats(port: int, ok: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = get_stats(port)
        if ok(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never got there: {s}")
        time.sleep(0.05)


async def chat_roundtrip(url: str) -> dict[str, Any]:
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "chat", "text": "hi"}))
        while True:  # the seed's broadcast reaches the sender too; skip health pings
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if message["type"] == "chat":
                return dict(message)


def test_frozen_client_is_closed_as_stale_and_its_lobby_slot_freed(port: int) -> None:
    url = f"ws://127.0.0.1:{port}/ws/frozen?token=user:"
    before = get_stats(port)
    client = subprocess.Popen(
        [sys.executable, "-m", "tests.pong_client", url + "alice"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = Lines(client)
    try:
        assert lines.get() == "connected"
        assert [lines.get(), lines.get(), lines.get()] == ["pong"] * 3  # alive: pinged and kept
        assert get_stats(port)["total_connections"] == before["total_connections"] + 1
        with pytest.raises(InvalidStatus):  # a lobby of one: full (the seed closes before accept)
            asyncio.run(chat_roundtrip(url + "bob"))

        os.kill(client.pid, signal.SIGSTOP)  # its socket stays open; it answers nothing
        frozen_at = time.monotonic()
        s = wait_stats(port, lambda s: s["stale_closed"]["no_pong"] == before["stale_closed"]["no_pong"] + 1)
        removed_after = time.monotonic() - frozen_at
        assert s["total_connections"] == before["total_connections"]
        assert s["active_lobbies"] == before["active_lobbies"]
        assert asyncio.run(chat_roundtrip(url + "bob")) == {"type": "chat", "from": "bob", "text": "hi"}

        os.kill(client.pid, signal.SIGCONT)  # it now reads the close frame sent meanwhile
        last = lines.get()
        while last == "pong":  # answers to pings it had read before the freeze
            last = lines.get()
        assert last == "closed 4004 stale"
        print(
            f"frozen client removed {removed_after:.2f}s after SIGSTOP"
            f" (interval {PING_INTERVAL}s + timeout {PING_TIMEOUT}s)"
        )
    finally:
        os.kill(client.pid, signal.SIGCONT)
        client.kill()
        client.wait(10)
        lines.thread.join(10)  # it reads to EOF
        assert client.stdout is not None
        client.stdout.close()


def test_seed_endpoint_crashing_on_malformed_json_leaves_no_entry(port: int) -> None:
    before = get_stats(port)

    async def main() -> None:
        async with connect(f"ws://127.0.0.1:{port}/ws/crash?token=user:carol") as ws:
            await ws.send("{not json")
            with pytest.raises(ConnectionClosed):  # uvicorn drops it: the app raised
                while True:
                    await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(main())
    s = wait_stats(
        port, lambda s: s["stale_closed"]["handler_exited"] == before["stale_closed"]["handler_exited"] + 1
    )
    assert s["total_connections"] == before["total_connections"]
    assert s["active_lobbies"] == before["active_lobbies"]
