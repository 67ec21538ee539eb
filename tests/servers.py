"""Real servers for tests: uvicorn in a subprocess on a free 127.0.0.1 port."""

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
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent


async def http_stats(port: int) -> dict[str, Any]:
    """GET /stats of a test app on 127.0.0.1:``port``: its JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
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


@contextlib.contextmanager
def uvicorn_server(
    app: str,
    *,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    port: int | None = None,
    stderr: IO[bytes] | None = None,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run ``uvicorn app`` on ``port`` (default: a free one); yields (port, process). Stops it on exit.
    ``stderr``: a file the server's standard error (its log) goes to, else the test's."""
    port = port or free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "warning", *(extra_args or [])]
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
