"""Real servers for tests: uvicorn (or another ASGI server) in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent


async def http_stats(port: int, path: str = "/stats") -> dict[str, Any]:
    """GET ``path`` (/stats) of a test app on 127.0.0.1:``port``: its JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return dict(json.loads(raw.split(b"\r\n\r\n", 1)[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


#: How each ASGI server of tests/test_server_matrix.py is started: its
#: arguments after ``python`` (split at spaces), with ``{app}`` ("module:attribute") and ``{port}``
#: filled in. One process each (granian: a supervisor and one worker), on
#: 127.0.0.1, the app's lifespan on where the server has one, logs at warning.
_UVICORN = "-m uvicorn {app} --host 127.0.0.1 --port {port} --log-level warning"
SERVER_COMMANDS: dict[str, str] = {
    "uvicorn": _UVICORN,
    **{f"uvicorn-{ws}": f"{_UVICORN} --ws {ws}" for ws in ("websockets-sansio", "websockets", "wsproto")},
    "hypercorn": "-m hypercorn {app} --bind 127.0.0.1:{port} --log-level warning",
    "granian": "-m granian --interface asgi --host 127.0.0.1 --port {port} --log-level warning {app}",
    "daphne": "-m daphne -b 127.0.0.1 -p {port} -v 0 {app}",
}


@contextlib.contextmanager
def asgi_server(
    server: str,
    app: str,
    *,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    port: int | None = None,
    stderr: IO[bytes] | None = None,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run ``app`` ("module:attribute") under ``server`` (a key of
    :data:`SERVER_COMMANDS`) on ``port`` (default: a free one); yields
    (port, process). On exit stops it by its PID (SIGINT, then SIGKILL after
    10 s) unless it already exited. ``stderr``: a file the server's standard
    error (its log) goes to, else the test's."""
    port = port or free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    args = SERVER_COMMANDS[server].format(app=app, port=port).split()
    cmd = [sys.executable, *args, *(extra_args or [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stderr=stderr)
    try:
        wait_for_port(port, proc)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def uvicorn_server(
    app: str,
    *,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    port: int | None = None,
    stderr: IO[bytes] | None = None,
) -> contextlib.AbstractContextManager[tuple[int, subprocess.Popen[bytes]]]:
    """:func:`asgi_server` for ``uvicorn app`` with its default WebSocket protocol."""
    return asgi_server("uvicorn", app, env=env, extra_args=extra_args, port=port, stderr=stderr)


async def attempt_ws(url: str) -> ClientConnection | int:
    """Open a client to a seed-style endpoint: its open connection, or how it
    was refused: the HTTP status (closed before accept by the endpoint's own
    capacity check) or 4002 (accepted, then closed by ``connect()`` with
    reason ``lobby_full``)."""
    import asyncio

    try:
        ws = await connect(url)
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    try:
        await asyncio.wait_for(ws.recv(), timeout=0.5)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None
        assert (exc.rcvd.code, exc.rcvd.reason) == (4002, "lobby_full")
        return 4002
    except asyncio.TimeoutError:
        pass
    return ws


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a state a user would observe (bounded; no timing asserted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)
