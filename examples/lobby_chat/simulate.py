"""Simulated clients for the demo, run inside the server process.

Each one is a real Starlette ``WebSocket`` whose ASGI ``receive`` / ``send``
are played by this module instead of a network peer, served by the same
``manager.serve()`` as a browser's, in a lobby of the visitor's choice, so a
visitor watches the manager's protections act on it:

* ``frozen``: connects, then never sends anything again (a frozen tab, a dead
  network): the heartbeat pings it and, after ``ping_timeout``, closes it with
  4004 ``stale``.
* ``flooder``: sends chat messages far faster than the rate limit: the first
  ``rate_burst`` get through, the rest are dropped, and after
  ``rate_limit_close_after`` drops it is closed with 4005 ``rate_limited``.
* ``nonreader``: the server streams it updates; it still sends now and then
  (so the heartbeat finds it alive), but it never reads (its ASGI
  ``send`` never completes, like a client whose TCP window stays full): its
  backlog grows to ``max_backlog`` and it is closed with 4006 ``slow_consumer``
  while the other members keep getting every message at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.types import Message
from starlette.websockets import WebSocket

from wsmanager import Connection, ConnectionManager

KINDS: dict[str, str] = {
    "frozen": "stops answering pings: the heartbeat closes it as stale (4004)",
    "flooder": "sends 50 messages a second: the rate limit drops them, then closes it (4005)",
    "nonreader": "never reads what it is sent: its backlog fills and it is closed as a slow consumer (4006)",
}
"""Simulated client kinds -> what a visitor will see happen to it."""


class SimulatedPeer:
    """The client side of one in-process WebSocket, as the ASGI app sees it."""

    def __init__(self, lobby: str, user: str, *, reads: bool = True) -> None:
        self.reads = reads  # False: every websocket.send suspends forever (a client that does not read)
        self.to_app: asyncio.Queue[Message] = asyncio.Queue()
        self.to_app.put_nowait({"type": "websocket.connect"})
        self.received: list[dict[str, Any]] = []  # what it read (nothing for a non-reader)
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self._never = asyncio.Event()
        path = f"/ws/{quote(lobby)}"
        scope = {
            "type": "websocket",
            "path": path,
            "raw_path": path.encode(),
            "headers": [],
            "query_string": f"token={quote(user)}".encode(),
            "client": ("simulated", 0),
            "server": ("demo", 0),
            "subprotocols": [],
        }
        self.websocket = WebSocket(scope, receive=self._receive, send=self._send)

    async def _receive(self) -> Message:
        return await self.to_app.get()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if not self.reads:
                # suspends until the connection is closed, then fails as an aborted transport would
                await self._never.wait()
                raise OSError("connection closed")
            text = message.get("text")
            if text is not None:
                self.received.append(json.loads(text))
        elif kind == "websocket.close":
            self.close_code = int(message.get("code", 1000))
            self.close_reason = str(message.get("reason") or "")
            self.closed.set()
            self._never.set()
            self.to_app.put_nowait({"type": "websocket.disconnect", "code": self.close_code})

    def send_json(self, data: Any) -> None:
        """The client sends a text message."""
        self.to_app.put_nowait({"type": "websocket.receive", "text": json.dumps(data)})

    def leave(self) -> None:
        """The client goes away (as a closed tab would)."""
        if not self.closed.is_set():
            self.closed.set()
            self._never.set()
            self.to_app.put_nowait({"type": "websocket.disconnect", "code": 1001})


Serve = Callable[[WebSocket, str, str], Coroutine[Any, Any, None]]
"""``await serve(websocket, lobby, user)``: the app's endpoint, minus the HTTP parsing."""


@dataclass
class Simulation:
    """One simulated client and the tasks that play it."""

    kind: str
    user: str
    lobby: str
    peer: SimulatedPeer
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "user": self.user, "lobby": self.lobby}


class Simulator:
    """Starts simulated clients (at most ``limit`` at a time) and stops them all on :meth:`close`.

    ``interval``: seconds between a flooder's messages and between the
    updates streamed to a non-reader (0: as fast as the loop runs, for tests).
    """

    def __init__(
        self,
        manager: ConnectionManager,
        serve: Serve,
        *,
        interval: float = 0.02,
        limit: int = 6,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.manager = manager
        self._serve = serve
        self._on_change = on_change  # called when a simulation starts or ends
        self.interval = interval
        self.limit = limit
        self.running: dict[str, Simulation] = {}
        self._numbers = itertools.count(1)

    def start(self, kind: str, lobby: str) -> Simulation | None:
        """Start a simulated client of ``kind`` (a key of :data:`KINDS`) in ``lobby``;
        None when ``limit`` of them run already. Raises ValueError for an unknown kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown simulated client {kind!r}")
        if len(self.running) >= self.limit:
            return None
        user = f"{kind}-{next(self._numbers)}"
        peer = SimulatedPeer(lobby, user, reads=kind != "nonreader")
        sim = Simulation(kind, user, lobby, peer)
        self.running[user] = sim
        loop = asyncio.get_running_loop()
        served = loop.create_task(self._serve(peer.websocket, lobby, user))
        served.add_done_callback(lambda _t: self._ended(sim))
        sim.tasks.append(served)
        if kind == "flooder":
            sim.tasks.append(loop.create_task(self._flood(sim)))
        elif kind == "nonreader":
            sim.tasks.append(loop.create_task(self._feed(sim)))
        self._on_change()
        return sim

    def _ended(self, sim: Simulation) -> None:
        self.running.pop(sim.user, None)
        for task in sim.tasks[1:]:
            task.cancel()
        self._on_change()

    async def _admitted(self, sim: Simulation) -> bool:
        """Wait until the manager holds the simulated connection (False: it was refused)."""
        while sim.peer.websocket not in self.manager:
            if sim.peer.closed.is_set() or sim.tasks[0].done():
                return False
            await asyncio.sleep(0.005 if self.interval else 0)
        return True

    async def _flood(self, sim: Simulation) -> None:
        if not await self._admitted(sim):
            return
        for n in itertools.count(1):
            if sim.peer.closed.is_set():
                return
            sim.peer.send_json({"type": "chat", "text": f"spam #{n}"})
            await asyncio.sleep(self.interval)

    async def _feed(self, sim: Simulation) -> None:
        if not await self._admitted(sim):
            return
        conn = Connection(self.manager, sim.peer.websocket, sim.lobby, sim.user)
        for n in itertools.count(1):
            # an update of about 1 kB (a game state, a price tick...), to this client only
            if not await conn.send({"type": "update", "n": n, "payload": "x" * 1000}):
                return  # closed (as a slow consumer) or gone
            if n % 10 == 0:  # it still talks (so the heartbeat sees it alive): it only never reads
                sim.peer.send_json({"type": "still_here"})
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Stop every simulated client (their connections leave) and wait for them."""
        sims = list(self.running.values())
        for sim in sims:
            sim.peer.leave()
        for sim in sims:
            for task in sim.tasks[1:]:
                task.cancel()
        tasks = [t for sim in sims for t in sim.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
