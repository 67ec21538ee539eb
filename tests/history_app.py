"""A FastAPI app on ``manager.serve()`` with history on, for the recovery tests
(tests/test_history_serve.py, tests/js/history.test.mjs, tests/test_history_browser.py).

``/ws/{lobby}?token=<user>``: the token is the user id; ``on_join`` admits
every lobby. ``/`` is a page running ``wsmanager.js`` that lists the ``note``
messages it gets (``n``, and the offset of their position) and the recovery
results. Test helpers: ``/announce/{lobby}?n=N`` broadcasts N ``note``
messages numbered on from the lobby's last one; ``/drop/{user}?then=N`` aborts
the TCP connection of the user's newest connection (the client sees 1006) and,
in the same step (no await in between: the client cannot be back yet),
broadcasts N notes to its lobby while it is offline.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse

from wsmanager import Connection, ConnectionManager
from wsmanager.client import mount_client
from wsmanager.servers import abort_transport

manager = ConnectionManager(history_size=100)
app = FastAPI(lifespan=manager.lifespan)
mount_client(app, "/wsmanager")

newest: dict[str, Connection] = {}
counters: dict[str, int] = {}


async def on_connect(conn: Connection) -> None:
    newest[conn.user_id] = conn


async def on_disconnect(conn: Connection) -> None:
    if newest.get(conn.user_id) is conn:
        del newest[conn.user_id]


async def handle(conn: Connection, data: dict[str, Any]) -> None:
    pass


@app.websocket("/ws/{lobby}")
async def ws(websocket: WebSocket, lobby: str, token: str = "") -> None:
    await manager.serve(
        websocket,
        lobby,
        token,
        handle,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        on_join=lambda _conn, _lobby: True,
    )


async def _notes(lobby: str, n: int) -> int:
    delivered = 0
    for _ in range(max(0, min(n, 1000))):
        counters[lobby] = counters.get(lobby, 0) + 1
        delivered += await manager.broadcast_to_lobby(
            lobby, {"type": "note", "lobby": lobby, "n": counters[lobby]}
        )
    return delivered


@app.get("/announce/{lobby}")
async def announce(lobby: str, n: int = 1) -> dict[str, int]:
    return {"delivered": await _notes(lobby, n)}


@app.get("/drop/{user}")
async def drop(user: str, then: int = 0) -> dict[str, Any]:
    conn = newest.get(user)
    if conn is None or not abort_transport(conn.websocket):
        return {"dropped": False}
    # history on and a local manager: broadcast_to_lobby never suspends, so
    # these are sent before the server reads anything of a new connection
    return {"dropped": True, "delivered": await _notes(conn.lobby_code, then)}


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>history</title>
<p id="status" data-state="idle"></p>
<ol id="notes"></ol>
<ol id="recoveries"></ol>
<script type="module">
import { WSManagerClient } from "/wsmanager/wsmanager.js";
const q = new URLSearchParams(location.search);
const client = new WSManagerClient(`/ws/home?token=${encodeURIComponent(q.get("user"))}`, {
  baseDelay: 100, maxDelay: 500,
});
const $ = (id) => document.getElementById(id);
client.addEventListener("state", (ev) => { $("status").dataset.state = ev.detail.state; });
client.on("note", (message, position) => {
  const li = document.createElement("li");
  li.textContent = String(message.n);
  li.dataset.offset = String(position ? position.offset : "");
  li.dataset.hasPos = String("_pos" in message);
  $("notes").append(li);
});
client.addEventListener("recovery", (ev) => {
  const li = document.createElement("li");
  li.textContent = `${ev.detail.lobby} ${ev.detail.recovered}`;
  $("recoveries").append(li);
});
window.wsmClient = client;
client.connect();
</script>
"""


@app.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)
