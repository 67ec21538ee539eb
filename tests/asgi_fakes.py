"""An in-process WebSocket peer speaking ASGI to a real Starlette ``WebSocket``.

It lets tests drive many handshakes concurrently on one event loop, make
``accept()`` suspend, make sends fail or block, and read every frame the
server sent, without a network.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Message
from starlette.websockets import WebSocket


class FakePeer:
    """The client side of one WebSocket, as the ASGI app sees it."""

    def __init__(
        self,
        *,
        accept_yields: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
        receive_future: bool = False,
        query_string: bytes = b"",
    ) -> None:
        """``receive_future``: the ASGI ``receive`` is a plain function
        returning a future (some servers' is no coroutine function)."""
        self.accept_yields = accept_yields
        self.to_app: asyncio.Queue[Message] = asyncio.Queue()
        self.to_app.put_nowait({"type": "websocket.connect"})
        self.frames: list[Message] = []
        self.close_message: Message | None = None
        self.accepted = False
        self.fail_sends = False
        self.send_gate: asyncio.Event | None = None  # when set to a cleared Event, sends block
        self.got_text = asyncio.Event()  # set whenever a text frame arrives
        scope = {
            "type": "websocket",
            "path": "/ws",
            "raw_path": b"/ws",
            "headers": headers or [],
            "query_string": query_string,
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
            "subprotocols": [],
        }
        self.ws = WebSocket(
            scope, receive=self._receive_future if receive_future else self._receive, send=self._send
        )

    async def _receive(self) -> Message:
        return await self.to_app.get()

    def _receive_future(self) -> asyncio.Future[Message]:
        return asyncio.ensure_future(self.to_app.get())

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            for _ in range(self.accept_yields):
                await asyncio.sleep(0)
            self.accepted = True
        elif kind == "websocket.send":
            if self.send_gate is not None:
                await self.send_gate.wait()
            if self.fail_sends or self.close_message is not None:
                raise OSError("connection reset by peer")
            self.got_text.set()
        elif kind == "websocket.close":
            self.close_message = message
            # a well-behaved client answers the close handshake
            self.to_app.put_nowait({"type": "websocket.disconnect", "code": message.get("code", 1000)})
        self.frames.append(message)

    # ---- client actions

    def send_json(self, data: Any) -> None:
        self.to_app.put_nowait({"type": "websocket.receive", "text": json.dumps(data)})

    def send_text(self, text: str) -> None:
        self.to_app.put_nowait({"type": "websocket.receive", "text": text})

    def leave(self, code: int = 1000) -> None:
        self.to_app.put_nowait({"type": "websocket.disconnect", "code": code})

    # ---- what the server sent

    def texts(self) -> list[Any]:
        return [json.loads(f["text"]) for f in self.frames if f["type"] == "websocket.send"]

    @property
    def close_code(self) -> int | None:
        return None if self.close_message is None else int(self.close_message.get("code", 1000))

    @property
    def close_reason(self) -> str | None:
        return None if self.close_message is None else str(self.close_message.get("reason") or "")
